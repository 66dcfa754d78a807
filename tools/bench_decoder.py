"""VAE decoders: all frames at once (exact), one frame at a time (diffusers' decode_chunk_size=1), and fxstream's
halo slicing under a memory budget, measured on the CPU at small sizes and planned at full size on ``meta``.

    python tools/bench_decoder.py                     # measured (CPU) and planned (full size) tables, docs written
    python tools/bench_decoder.py --quick --no-write  # tiny decoders, full sizes skipped: a smoke test

Also plans the whole released pipelines (``fxstream.explain_pipeline``: SVD-XT 25 frames at 576x1024 under 6 GiB,
SVD 14 frames under 5 GiB, AnimateDiff 16 frames at 512x512 under 4 GiB) and draws their timelines.

Decoders: SVD's ``AutoencoderKLTemporalDecoder`` (its decoder mixes frames: temporal res blocks and a Conv3d
``time_conv_out``) and Stable Diffusion 1.5's ``AutoencoderKL`` (AnimateDiff's; frame by frame), built from the
architecture configs shipped in ``fxstream/configs`` with random weights.

Measured: the real architectures in float32 at ``--frames`` frames of ``--latent`` x ``--latent`` latents on the
CPU; peak = :class:`fxstream.memory.MemoryTracker` (activations: storages made during the call), planned =
:func:`fxstream.memory.plan_memory` of the graph that runs, latency = median of ``--repeats`` runs after a warm-up
(min and max too), max abs difference to decoding all frames at once. fxstream's budget is the weights plus
``--fraction`` of the all-frames planned peak. Planned: float16 on ``meta`` at the released sizes (SVD 14 and
25 frames at 576x1024; SD 1.5 VAE 16 frames at 512x512), nothing computed; fxstream under activation budgets of
1 and 2 GiB (weights on top), with the slices, passes and planned compute (FLOPs over the unsliced decoder's)
the budget chose.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxstream
from fxstream.bench import provenance, timings, write_section
from fxstream.memory import MemoryTracker, measure_peak
from fxstream.models import load_config

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 2**20, 2**30
TINY = {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8}
FULL = [("svd", 14, 72, 128), ("svd", 25, 72, 128), ("sd15", 16, 64, 64)]


def build_vae(kind: str, device="cpu", dtype=torch.float32, tiny: bool = False):
    """SVD's temporal-decoder VAE or SD 1.5's VAE from the packaged configs (random weights, seeded)."""
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
    cls, cfg = (AutoencoderKLTemporalDecoder, "svd-vae.json") if kind == "svd" else (AutoencoderKL, "sd15-vae.json")
    cfg = load_config(cfg)
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k in cfg})
    torch.manual_seed(0)
    with torch.device("meta" if str(device) == "meta" else "cpu"):
        vae = cls.from_config(cfg)
    return vae.to(device=device, dtype=dtype).eval()


def decoder_inputs(kind: str, frames: int, h: int, w: int, device="cpu", dtype=torch.float32) -> dict:
    z = torch.randn(frames, 4, h, w, generator=torch.Generator().manual_seed(1)).to(dtype) if str(device) != "meta" \
        else torch.empty(frames, 4, h, w, device="meta", dtype=dtype)
    if kind == "svd":
        return dict(sample=z, image_only_indicator=torch.zeros(1, frames, device=device, dtype=dtype),
                    num_frames=frames)
    return dict(sample=z)


def per_frame(kind: str, decoder, kw: dict):
    """decode_chunk_size=1: each frame through the decoder alone (SVD's temporal layers then see one frame)."""
    outs = []
    for i in range(kw["sample"].shape[0]):
        one = decoder_inputs(kind, 1, *kw["sample"].shape[2:], device=kw["sample"].device, dtype=kw["sample"].dtype)
        one["sample"] = kw["sample"][i:i + 1]
        outs.append(decoder(**one))
    return torch.cat(outs)


def _weights(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _halo_desc(report) -> tuple[str, str, str]:
    """(regions x slices per kind: bands of rows, tiles of a grid, slices of frames; the most passes; compute)."""
    halo = [r for r in report.regions if r.kind == "halo"]
    if not halo:
        return "-", "-", "1.00x"
    kinds = [("height (halo)", "bands"), ("height x width (halo)", "tiles"), ("frames (halo)", "frames")]
    parts = []
    for dim, word in kinds:
        rs = [r for r in halo if r.dim == dim]
        if rs:
            parts.append(f"{len(rs)} x {max(r.slices for r in rs)} {word}")
    return "; ".join(parts), str(max(r.passes for r in halo)), f"{report.compute_factor:.2f}x"


def measured(kind: str, frames: int, latent: int, repeats: int, fraction: float, tiny: bool) -> list[dict]:
    vae = build_vae(kind, tiny=tiny)
    dec = vae.decoder
    kw = decoder_inputs(kind, frames, latent, latent)
    with torch.no_grad():
        ref, peak_all = measure_peak(dec, **kw)
    exported = fxstream.explain(dec, kw, fxstream.Policy())
    weights = _weights(dec)
    budget = weights + int(fraction * exported.original_peak_bytes)
    rows = []

    def row(name, fn, planned, extra=("-", "-", "1.00x"), report=None):
        with torch.no_grad(), MemoryTracker() as tracker:
            out = fn()
        with torch.no_grad():
            fn()  # warm-up done above; one more so the timed runs see a steady state
            t = timings(fn, repeats)
        rows.append(dict(decoder=kind, frames=frames, latent=latent, method=name, peak_mib=tracker.peak / MiB,
                         planned_mib=None if planned is None else planned / MiB, median_s=statistics.median(t),
                         min_s=min(t), max_s=max(t), max_abs_diff=float((out - ref).abs().max()),
                         regions=extra[0], passes=extra[1], compute=extra[2], host_mib=tracker.host_peak / MiB,
                         planned_host_mib=report.host_bytes / MiB if report is not None else None))

    row("all frames at once (exact)", lambda: dec(**kw), exported.original_peak_bytes)
    row("decode_chunk_size=1", lambda: per_frame(kind, dec, kw), None)
    t0 = time.perf_counter()
    compiled = fxstream.compile(dec, fxstream.Policy(max_memory=budget))
    with torch.no_grad():
        compiled(**kw)
    first = time.perf_counter() - t0
    report = compiled.explain()
    row(f"fxstream, max_memory = weights + {fraction:.0%} of all-frames peak", lambda: compiled(**kw),
        report.peak_bytes, _halo_desc(report), report)
    rows[-1]["first_call_s"] = first
    parked = fxstream.compile(dec, fxstream.Policy(max_memory=budget, host_memory=HOST))
    with torch.no_grad():
        parked(**kw)
    report = parked.explain()
    row(f"fxstream, the same max_memory, host_memory={HOST}", lambda: parked(**kw), report.peak_bytes,
        _halo_desc(report), report)
    return rows


HOST = "32GiB"  # the host memory of the rows that park values (Policy.host_memory)


def planned(kind: str, frames: int, h: int, w: int, budgets=(1, 2)) -> list[dict]:
    vae = build_vae(kind, device="meta", dtype=torch.float16)
    dec = vae.decoder
    weights = _weights(dec)
    size = f"{frames} x {h * 8}x{w * 8}"
    allf = fxstream.explain(dec, decoder_inputs(kind, frames, h, w, "meta", torch.float16), fxstream.Policy())
    one = fxstream.explain(dec, decoder_inputs(kind, 1, h, w, "meta", torch.float16), fxstream.Policy())
    rows = [dict(decoder=kind, size=size, method="all frames at once (exact)",
                 planned_gib=allf.original_peak_bytes / GiB, regions="-", passes="-", compute="1.00x", plan_s=None),
            dict(decoder=kind, size=size, method="decode_chunk_size=1" + (" (a different video)" if kind == "svd"
                                                                          else " (same video)"),
                 planned_gib=one.original_peak_bytes / GiB, regions="-", passes="-", compute="1.00x", plan_s=None)]
    for b, host in [(b, h) for b in budgets for h in (None, HOST)]:
        t0 = time.perf_counter()
        method = f"fxstream, {b:g} GiB of activations" + (f", host_memory={host}" if host else "")
        try:
            rep = fxstream.explain(dec, decoder_inputs(kind, frames, h, w, "meta", torch.float16),
                                   fxstream.Policy(max_memory=weights + int(b * GiB), host_memory=host))
        except fxstream.MemoryBudgetError as e:
            rows.append(dict(decoder=kind, size=size, method=method, planned_gib=None, regions="does not fit",
                             passes="-", compute="-", host_gib=None, traffic_gib=None,
                             plan_s=time.perf_counter() - t0, error=str(e).splitlines()[0]))
            continue
        rows.append(dict(decoder=kind, size=size, method=method + " (exact)",
                         planned_gib=rep.peak_bytes / GiB, regions=_halo_desc(rep)[0], passes=_halo_desc(rep)[1],
                         compute=_halo_desc(rep)[2], host_gib=rep.host_bytes / GiB,
                         traffic_gib=rep.host_traffic / GiB, plan_s=time.perf_counter() - t0))
    return rows


PIPELINES = [("svd-xt", 576, 1024, 25, "6GiB", None), ("svd-xt", 576, 1024, 25, "6GiB", HOST),
             ("svd", 576, 1024, 14, "5GiB", None), ("animatediff", 512, 512, 16, "4GiB", None)]


def whole_pipelines(plot_dir: Path | None) -> list[dict]:
    """``fxstream.explain_pipeline`` of the released pipelines (fp16, meta device) under the issue's budgets."""
    from fxstream.pipelines import build_pipeline
    rows = []
    for name, h, w, frames, budget, host in PIPELINES:
        print(f"planning the {name} pipeline ...", file=sys.stderr)
        pipe = build_pipeline(name, device="meta", dtype=torch.float16)
        t0 = time.perf_counter()
        rep = fxstream.explain_pipeline(pipe, height=h, width=w, num_frames=frames,
                                        policy=fxstream.Policy(max_memory=budget, host_memory=host))
        seconds = time.perf_counter() - t0
        decode = [s for s in rep.stages if s.name == "decode"]
        compute = [st.report.compute_factor for s in decode for st in s.steps if getattr(st, "report", None)]
        rows.append(dict(pipeline=name, size=f"{frames} x {h}x{w}", budget=budget, host_memory=host or "-",
                         original_gib=rep.original_peak_bytes / GiB, planned_gib=rep.peak_bytes / GiB,
                         lower_bound_gib=rep.lower_bound_bytes / GiB,
                         offloaded=", ".join(s.name for s in rep.stages if s.offload) or "-",
                         decode_compute=f"{max(compute):.2f}x" if compute else "-", plan_s=seconds))
        if plot_dir is not None and host is None:
            rep.plot(plot_dir / f"pipeline-{name}.png")
    return rows


def cpu_rates(repeats: int = 5) -> tuple[float, float]:
    """The CPU rates of fxstream.budget's NOTE [Planned time of a decode]: FLOP/s of a 3x3 convolution of a
    decoder's upper block (fp32, 4 x 128 x 128x128) and bytes/s of a band written into a whole-size buffer and read
    back into a new tensor (the host-checkpoint path on a CPU)."""
    torch.manual_seed(0)
    x, conv = torch.randn(4, 128, 128, 128), torch.nn.Conv2d(128, 128, 3, padding=1)
    flops = 2 * 128 * 9 * x.numel()
    with torch.no_grad():
        conv(x)
        t = time.perf_counter()
        for _ in range(repeats):
            conv(x)
        rate = flops * repeats / (time.perf_counter() - t)
    buf, band = torch.empty(4, 128, 512, 128), torch.randn(4, 128, 64, 128)
    t = time.perf_counter()
    for i in range(4 * repeats):
        buf.narrow(2, (i % 8) * 64, 64).copy_(band)
        torch.empty_like(band).copy_(buf.narrow(2, (i % 8) * 64, 64))
    copy = 2 * band.numel() * band.element_size() * 4 * repeats / (time.perf_counter() - t)
    return rate, copy


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8, help="frames of the measured runs (default 8)")
    ap.add_argument("--latent", type=int, default=16, help="latent height and width of the measured runs (16)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method after the warm-up (3)")
    ap.add_argument("--fraction", type=float, default=0.25,
                    help="fxstream's activation budget as a share of the all-frames planned peak (0.25)")
    ap.add_argument("--quick", action="store_true", help="tiny decoders, 1 repeat, no full-size planning")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--rates", action="store_true",
                    help="print only the CPU compute and copy rates the budget's planned time uses on a CPU")
    args = ap.parse_args(argv)
    if args.rates:
        rate, copy = cpu_rates()
        print(f"3x3 convolution: {rate:.3g} FLOP/s; band copied out and back: {copy:.3g} B/s")
        return 0
    repeats = 1 if args.quick else args.repeats
    if args.quick and args.fraction == 0.25:
        args.fraction = 0.6  # tiny decoders: a quarter is below the lower bound
    mrows = []
    for kind in ("svd", "sd15"):
        print(f"measuring {kind} decoder ...", file=sys.stderr)
        mrows += measured(kind, args.frames, args.latent, repeats, args.fraction, args.quick)
    mtable = tabulate([(r["decoder"], r["frames"], r["method"], f"{r['peak_mib']:.1f}", _fmt(r["planned_mib"], ".1f"),
                        f"{r['host_mib']:.1f}", _fmt(r["planned_host_mib"], ".1f"),
                        f"{r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})", f"{r['max_abs_diff']:.2e}",
                        r["regions"], r["passes"], r["compute"]) for r in mrows],
                      headers=["decoder", "frames", "method", "peak MiB (measured)", "planned MiB",
                               "host MiB (measured)", "planned host MiB", "latency s", "max abs diff",
                               "halo regions x slices", "passes", "planned compute"],
                      tablefmt="github")
    print(mtable)
    prow = []
    if not args.quick:
        for kind, frames, h, w in FULL:
            print(f"planning {kind} {frames} frames ...", file=sys.stderr)
            prow += planned(kind, frames, h, w, (0.5, 1, 2) if kind == "sd15" else (1, 2))
        ptable = tabulate([(r["decoder"], r["size"], r["method"], _fmt(r["planned_gib"], ".2f"), r["regions"],
                            r["passes"], r["compute"], _fmt(r.get("host_gib"), ".2f"), _fmt(r.get("traffic_gib"), ".1f"),
                            _fmt(r["plan_s"], ".0f")) for r in prow],
                          headers=["decoder", "frames x size", "method", "planned GiB (activations)",
                                   "halo regions x slices", "passes", "planned compute", "host GiB",
                                   "host traffic GiB per call", "planning s"],
                          tablefmt="github")
        print(ptable)
    wrows = [] if args.quick else whole_pipelines(None if args.no_write else ROOT / "docs" / "img")
    if wrows:
        wtable = tabulate([(r["pipeline"], r["size"], r["budget"], r["host_memory"], f"{r['original_gib']:.2f}",
                            f"{r['planned_gib']:.2f}", f"{r['lower_bound_gib']:.2f}", r["offloaded"],
                            r["decode_compute"], f"{r['plan_s']:.0f}") for r in wrows],
                          headers=["pipeline", "frames x size", "max_memory", "host_memory",
                                   "original GiB (diffusers defaults)",
                                   "planned GiB", "lower bound GiB", "stages offloading", "decoder compute",
                                   "planning s"], tablefmt="github")
        print(wtable)
    if args.no_write:
        return 0
    cmd = "python tools/bench_decoder.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["## VAE decoders: halo slicing\n", provenance(cmd),
          f"Measured: real decoder architectures, random weights, float32, {args.frames} frames of "
          f"{args.latent}x{args.latent} latents, CPU. Peak: activations measured by MemoryTracker. fxstream's "
          f"budget: weights + {args.fraction:.0%} of the all-frames planned peak; the budget chose the halo "
          "slices and the checkpoints (and, with host_memory, what to park in host memory: NOTE [Host "
          "checkpoints]; line buffers where it has room: NOTE [Line buffers]). Host: the parked values' storages, "
          "counted apart by the tracker. Planned compute: the halo regions' FLOPs (halo rows and GroupNorm "
          "statistics passes computed again) and the other ops' over the decoder's FLOPs; passes: the most in one "
          "region. Host traffic: bytes copied to and from host memory per call (planned).\n\n",
          mtable, "\n\n"]
    if prow:
        md += ["Planned at full size (float16, meta device, nothing computed; weights not included):\n\n", ptable,
               "\n"]
    if wrows:
        md += ["\nWhole pipelines (`fxstream.explain_pipeline`, float16, meta device, batch 1 with classifier-free "
               "guidance, weights included): the peak over the stages (encode, denoise, decode), against the "
               "original pipeline with diffusers' defaults (every module on the device; SVD decodes all frames at "
               "once, AnimateDiff 16 per chunk). Timelines: `docs/img/pipeline-*.png`.\n\n", wtable, "\n"]
    write_section(ROOT / "docs", "decoder", "".join(md), {"measured": mrows, "planned": prow, "pipelines": wrows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
