"""Benchmark: memory (planned and measured) and latency of one UNet forward, original vs exported vs compiled.

    python tools/bench_memory.py                      # everything below; writes docs/benchmarks.md and .json
    python tools/bench_memory.py --models svd-tiny --slices 4 --full --no-frames --no-write

Sections:
1. CPU, mid-size configs, measured: the original module, its exported graph, fixed slicing, the batch split, and
   the memory budget set to the full-size target's ratio (target / exported peak) of the mid model's own peak.
2. Full-size architectures planned on the meta device (fp16, batch 2): the exported graph, diffusers' forward
   chunking, fxstream's lower bound, and Policy(max_memory=weights + target) with its planned peak.
3. The most SVD frames at 576x1024 whose planned peak, weights included, fits in 24 GiB: original vs compiled.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from tabulate import tabulate

import fxstream
from fxstream.bench import measure_model, provenance, write_section
from fxstream.demo import table
from fxstream.models import build_unet, example_inputs
from fxstream.policy import Policy

ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 2**30

# Planned activation peaks of the table (GiB, fp16, batch 2) and the targets.
TARGETS = {"svd": (3.27, 0.60), "svd-xt": (5.81, 1.00), "animatediff": (1.57, 0.30)}
RATIO_OF = {"svd-mid": "svd", "animatediff-mid": "animatediff", "svd-tiny": "svd", "animatediff-tiny": "animatediff"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _meta(model: str, **sizes):
    unet = build_unet(model, device="meta", dtype=torch.float16 if model in TARGETS else torch.float32)
    return unet, example_inputs(model, unet, **sizes)


def cpu_rows(models, slices: int, repeats: int):
    rows = []
    for m in models:
        unet, kw = _meta(m)
        base = fxstream.explain(unet, kw)
        exported, target = TARGETS[RATIO_OF[m]]
        activations = int(target / exported * base.original_peak_bytes)
        if activations < base.lower_bound_bytes:
            log(f"{m}: the target ratio is below this model's lower bound; budgeting the lower bound instead")
            activations = base.lower_bound_bytes
        budget = base.weight_bytes + activations
        policies = [Policy(slices=slices), Policy(batch=2, slices=slices), Policy(max_memory=budget)]
        rows += measure_model(m, policies, repeats=repeats, log=log)
    return rows


def full_rows(models):
    rows, data = [], []
    for m in models:
        exported_ref, target = TARGETS[m]
        unet, kw = _meta(m)
        t = time.perf_counter()
        base = fxstream.explain(unet, kw)
        bound = base.lower_bound_bytes
        chunk = "-"
        if hasattr(unet, "enable_forward_chunking") and m.startswith("svd"):
            chunked, _ = _meta(m)  # diffusers' own answer: feed-forward chunking in every transformer block
            chunked.enable_forward_chunking()
            chunk = f"{fxstream.explain(chunked, kw).original_peak_bytes / GiB:.2f}"
        rep = fxstream.explain(unet, kw, policy=Policy(max_memory=base.weight_bytes + int(target * GiB)))
        secs = time.perf_counter() - t
        met = rep.peak_bytes <= target * GiB
        slices = sorted({r.slices for r in rep.regions if r.dim != "batch"})
        rows.append((m, tuple(kw["sample"].shape), f"{base.weight_bytes / GiB:.2f}",
                     f"{base.original_peak_bytes / GiB:.2f}", chunk, f"{bound / GiB:.2f}",
                     f"{rep.peak_bytes / GiB:.2f}", f"{target:.2f}", "yes" if met else "NO",
                     f"{rep.peak_bytes / base.original_peak_bytes:.2f}x",
                     "yes" if any(r.dim == "batch" for r in rep.regions) else "no",
                     f"{slices[0]}-{slices[-1]}" if slices else "-", f"{secs:.0f}"))
        data.append({"model": m, "weights": base.weight_bytes, "exported": base.original_peak_bytes,
                     "forward_chunking": None if chunk == "-" else float(chunk) * GiB, "lower_bound": bound,
                     "budget_peak": rep.peak_bytes, "target": target * GiB, "met": met})
    text = tabulate(rows, headers=["model", "sample", "weights GiB", "exported GiB", "fwd chunking GiB",
                                   "lower bound GiB", "budget: planned GiB", "target GiB", "met", "ratio",
                                   "batch split", "slices", "plan s"])
    return text, data


def fits(model: str, frames: int, limit: int, compiled: bool) -> tuple[bool, int]:
    unet, kw = _meta(model, frames=frames)
    rep = fxstream.explain(unet, kw)
    peak = rep.lower_bound_bytes if compiled else rep.original_peak_bytes
    return rep.weight_bytes + peak <= limit, rep.weight_bytes + peak


def most_frames(model: str, limit: int, compiled: bool, start: int) -> tuple[int, int]:
    """Largest frame count that fits (doubling, then bisection); the planned total at that count."""
    lo, hi, best = 0, start, 0
    ok, total = fits(model, hi, limit, compiled)
    while ok:
        lo, best, hi = hi, total, hi * 2
        ok, total = fits(model, hi, limit, compiled)
        log(f"{model} {'compiled' if compiled else 'original'}: {lo} frames fit")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, total = fits(model, mid, limit, compiled)
        if ok:
            lo, best = mid, total
        else:
            hi = mid
    return lo, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["svd-mid", "animatediff-mid"], help="CPU runs (mid sizes)")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", nargs="*", default=["svd", "svd-xt", "animatediff"],
                    help="full-size models to plan on the meta device")
    ap.add_argument("--no-frames", action="store_true", help="skip the 24 GiB frame search")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args(argv)
    rows = cpu_rows(args.models, args.slices, args.repeats)
    cpu = table(rows) if rows else ""
    print(cpu)
    full, full_data = full_rows(args.full) if args.full else ("", [])
    print(full)
    frames = ""
    frames_data = {}
    if not args.no_frames:
        t = time.perf_counter()
        o = most_frames("svd", 24 * GiB, compiled=False, start=16)
        c = most_frames("svd", 24 * GiB, compiled=True, start=64)
        frames_data = {"original": o, "compiled": c}
        frames = tabulate([("original (exported graph)", o[0], f"{o[1] / GiB:.2f}"),
                           ("fxstream (lower bound: batch split, finest slicing)", c[0], f"{c[1] / GiB:.2f}")],
                          headers=["SVD 576x1024, fp16, batch 2", "most frames in 24 GiB", "planned GiB there"])
        frames += f"\n(search: {time.perf_counter() - t:.0f} s)"
        print(frames)
    if args.no_write:
        return 0
    cmd = "python tools/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = "## Memory: slicing, planner, budget\n\n" + provenance(cmd)
    if cpu:
        doc += (
            "### CPU: one UNet forward, original vs exported vs compiled\n\n"
            "Inputs: batch 2 (classifier-free guidance), 8 frames, 64x64 latent, fp32, random weights. Peak: live\n"
            "storages created during the call (weights and inputs excluded), measured with\n"
            "fxstream.memory.MemoryTracker; planned: fxstream.memory.plan_memory on the graph. Latency: median of\n"
            f"{args.repeats} runs after a warm-up. The max_memory row is the budget set to the full-size target's\n"
            "ratio (target / exported peak) of this model's exported peak, plus its weights.\n\n"
            f"```\n{cpu}\n```\n\n")
    if full:
        doc += (
            "### Full-size architectures, planned on the meta device\n\n"
            "fp16, batch 2, SVD/SVD-XT at 576x1024 (latent 72x128; 14 and 25 frames), AnimateDiff at 512x512 (latent\n"
            "64x64, 16 frames); activation peaks (weights apart) planned by fxstream.memory.plan_memory, no compute.\n"
            "Lower bound: every region at one element per slice and the batch split (see fxstream/budget.py).\n"
            "Budget: Policy(max_memory=weights + target). Attention counts as a fused kernel (its output only).\n\n"
            f"```\n{full}\n```\n\n")
    if frames:
        doc += (
            "### SVD frames in 24 GiB (weights included, planned)\n\n"
            f"```\n{frames}\n```\n")
    write_section(ROOT / "docs", "memory", doc,
                  {"cpu": [r.__dict__ for r in rows], "full": full_data, "frames_24gib": frames_data})
    print("wrote docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
