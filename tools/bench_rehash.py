"""Step Rehash over a whole denoising loop: speed against the uncompiled UNet, and fidelity of the final latents.

    python tools/bench_rehash.py                                  # svd-mid (every schedule) and animatediff-mid
    python tools/bench_rehash.py --models svd-mid --schedules every3 --no-write
    python tools/bench_rehash.py --unet /path/to/svd/unet --model svd --device cuda   # trained weights: fidelity

One loop = ``--steps`` UNet calls driven by the model's real scheduler (SVD: EulerDiscrete, v-prediction, Karras
sigmas, the image latents concatenated to the sample as the pipeline does; AnimateDiff: DDIM), batch 2 as the
pipelines run classifier-free guidance. Each schedule runs one whole loop from the same noise; the loop time is
wall clock (every call timed; full and rehash steps averaged apart). Fidelity: relative L2 error of the final
latents against the loop with the uncompiled UNet. The key-step schedule comes from the paper's search over the
cached feature recorded (with a forward hook) during the uncompiled loop, at ``--threshold``.

With random weights the features do not behave like trained ones, so the fidelity column says little about
video quality; ``--unet FOLDER`` runs the same table on a local diffusers UNet folder with trained weights.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxstream
from fxstream import Policy, StepRehash
from fxstream.bench import provenance, write_section
from fxstream.models import MODELS, build_unet, example_inputs, load_unet
from fxstream.pipelines import scheduler
from fxstream.rehash import default_cache_point, key_steps

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("every2", "every3", "every5", "key", "adaptive")


def denoise(unet, kind: str, kw: dict, steps: int, seed: int = 0):
    """One denoising loop; returns (final latents, [(seconds, step) per call])."""
    sched = scheduler(kind)
    sched.set_timesteps(steps)
    sample = kw["sample"]
    g = torch.Generator().manual_seed(seed)
    if kind == "svd":  # (B, F, 8, H, W): 4 noisy channels, then the conditioning image latents
        c = sample.shape[2] // 2
        cond = sample[:, :, c:]
        latents = torch.randn(sample[:, :, :c].shape, generator=g).to(sample) * sched.init_noise_sigma
    else:
        cond, latents = None, torch.randn(sample.shape, generator=g).to(sample) * sched.init_noise_sigma
    times = []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(latents, t)
            if cond is not None:
                x = torch.cat([x, cond], dim=2)
            start = time.perf_counter()
            out = unet(**dict(kw, sample=x, timestep=t))[0]
            if out.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            latents = sched.step(out, t, latents).prev_sample
    return latents, times


def _record_feature(unet, path: str):
    feats = []
    handle = unet.get_submodule(path).register_forward_hook(
        lambda m, a, out: feats.append((out[0] if isinstance(out, tuple) else out).detach().float().cpu()))
    return feats, handle


def _rel(a, b) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def run_model(model: str, kind: str, unet, kw: dict, steps: int, schedules, threshold: float, log=print) -> dict:
    point = default_cache_point(unet)
    feats, handle = _record_feature(unet, point)
    log(f"{model}: uncompiled loop, {steps} steps")
    try:
        ref, ref_times = denoise(unet, kind, kw, steps)
    finally:
        handle.remove()
    base = sum(ref_times)
    rows = [dict(schedule="uncompiled UNet (every step full)", full=steps, loop_s=base, speedup=1.0,
                 full_step_s=base / steps, rehash_step_s=None, rel_error=0.0)]
    policies = {"every2": StepRehash(full_every=2, steps=steps), "every3": StepRehash(full_every=3, steps=steps),
                "every5": StepRehash(full_every=5, steps=steps), "adaptive": StepRehash(adaptive=0.05)}
    if "key" in schedules:
        policies["key"] = key_steps(feats, threshold)
    planned = None
    for name in schedules:
        rehash = policies[name]
        compiled = fxstream.compile(unet, Policy(rehash=rehash))
        with torch.no_grad():  # compile and run both graphs once outside the timed loop
            compiled(**dict(kw, timestep=torch.tensor(999.0)))
            compiled(**dict(kw, timestep=torch.tensor(998.0)))
        compiled.reset()
        log(f"{model}: {rehash.describe()}")
        out, times = denoise(compiled, kind, kw, steps)
        log_ = compiled.step_log
        full_t = [t for t, s in zip(times, log_) if s == "full"]
        re_t = [t for t, s in zip(times, log_) if s == "rehash"]
        info = compiled.explain().rehash
        planned = info.skipped_share
        label = {"key": f"key steps (threshold {threshold})", "adaptive": "adaptive (probe change > 5%, max 4)"}
        rows.append(dict(schedule=label.get(name, f"uniform full_every={rehash.full_every}"), full=len(full_t),
                         full_steps=[i for i, s in enumerate(log_) if s == "full"], loop_s=sum(times),
                         speedup=base / sum(times), full_step_s=sum(full_t) / len(full_t),
                         rehash_step_s=sum(re_t) / len(re_t) if re_t else None, rel_error=_rel(out, ref)))
    return {"model": model, "steps": steps, "cache_point": point, "planned_skipped_share": planned, "rows": rows}


def table(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        skipped = (f"{1 - r['rehash_step_s'] / r['full_step_s']:.0%}" if r.get("rehash_step_s") else "-")
        rows.append((r["schedule"], f"{r['full']}/{result['steps']}", f"{r['loop_s']:.1f}", f"{r['speedup']:.2f}x",
                     f"{r['full_step_s']:.2f}", f"{r['rehash_step_s']:.2f}" if r.get("rehash_step_s") else "-",
                     skipped, f"{r['rel_error']:.2e}"))
    return tabulate(rows, headers=["schedule", "full steps", "loop s", "speedup", "full step s", "rehash step s",
                                   "work skipped (measured)", "rel. error of final latents"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["svd-mid", "animatediff-mid"], choices=list(MODELS))
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES,
                    help="default: all for the first model, every3 for the others")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threshold", type=float, default=0.95, help="key-step search: cosine similarity threshold")
    ap.add_argument("--unet", type=Path, metavar="FOLDER",
                    help="a local diffusers UNet folder with trained weights (one --models entry gives the sizes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps: at least 3")
    if args.unet is not None and len(args.models) != 1:
        ap.error("--unet: give one --models entry whose input sizes to use")
    results = []
    for i, model in enumerate(args.models):
        spec = MODELS[model]
        unet = load_unet(args.unet) if args.unet else build_unet(model)
        unet = unet.to(args.device)
        kw = example_inputs(model, unet)
        schedules = args.schedules or (SCHEDULES if i == 0 else ("every3",))
        res = run_model(model, spec.kind, unet, kw, args.steps, schedules, args.threshold)
        res["weights"] = str(args.unet) if args.unet else "random"
        results.append(res)
        print(f"\n{model} ({res['weights']} weights), cache point {res['cache_point']}, planned FLOPs skipped on a "
              f"rehash step {res['planned_skipped_share']:.1%}\n{table(res)}\n")
    if args.no_write:
        return 0
    cmd = "python tools/bench_rehash.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["## Step Rehash over a denoising loop\n", provenance(cmd),
          "One loop: the model's real scheduler driving the UNet (batch 2, as with classifier-free guidance), every "
          "call timed. Speedup: the uncompiled UNet's loop time over the schedule's. Work skipped (measured): 1 - "
          "mean rehash step / mean full step. Rel. error: L2 error of the final latents relative to the uncompiled "
          "loop's. **Random weights**: the features do not behave like trained ones, so the error column shows the "
          "mechanism, not video quality; run the command with `--unet FOLDER` on trained weights for that.\n\n"]
    for res in results:
        spec = MODELS[res["model"]]
        md.append(f"### {res['model']}: {spec.frames} frames, latent {spec.height}x{spec.width}, {res['steps']} steps\n\n"
                  f"Cache point `{res['cache_point']}`; planned FLOPs skipped on a rehash step: "
                  f"{res['planned_skipped_share']:.1%}.\n\n```\n{table(res)}\n```\n")
        for r in res["rows"]:
            if r.get("full_steps") is not None:
                md.append(f"- {r['schedule']}: full steps {r['full_steps']}\n")
        md.append("\n")
    write_section(ROOT / "docs", "rehash", "".join(md), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
