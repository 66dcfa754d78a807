"""Benchmark: peak memory and latency of one UNet forward on the CPU, original vs exported vs compiled.

    python tools/bench_memory.py                      # svd-mid and animatediff-mid, slices=8; writes docs/benchmarks.md
    python tools/bench_memory.py --models svd-tiny --slices 4 --no-write
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import time

import torch
from tabulate import tabulate

import fxstream
from fxstream.bench import environment, measure_model
from fxstream.models import build_unet, example_inputs
from fxstream.demo import table
from fxstream.policy import Policy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def plan_full_size(models, slices: int) -> str:
    """Planned activation peaks of the full-size architectures on the meta device (fp16, batch 2): no compute."""
    rows = []
    for m in models:
        unet = build_unet(m, device="meta", dtype=torch.float16)
        kw = example_inputs(m, unet)
        t = time.perf_counter()
        rep = fxstream.explain(unet, kw, policy=fxstream.Policy(slices=slices))
        both = fxstream.explain(unet, kw, policy=fxstream.Policy(batch=2, slices=slices))
        rows.append((m, tuple(kw["sample"].shape), f"{rep.original_peak_bytes / 2**30:.2f}",
                     f"{rep.peak_bytes / 2**30:.2f}", f"{both.peak_bytes / 2**30:.2f}",
                     f"{both.peak_bytes / rep.original_peak_bytes:.2f}x", len(both.regions),
                     f"{time.perf_counter() - t:.0f}"))
    return tabulate(rows, headers=["model", "sample", "exported GiB", f"slices={slices} GiB",
                                   f"batch=2, slices={slices} GiB", "ratio (batch split)", "regions", "plan s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["svd-mid", "animatediff-mid"])
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", nargs="*", default=["svd", "svd-xt", "animatediff"],
                    help="full-size models to plan on the meta device (default: svd svd-xt animatediff)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args(argv)
    rows = []
    for m in args.models:
        policies = [Policy(slices=args.slices), Policy(batch=2, slices=args.slices)]
        rows += measure_model(m, policies, repeats=args.repeats, log=lambda s: print(s, file=sys.stderr))
    text = table(rows) if rows else ""
    print(text)
    full = plan_full_size(args.full, args.slices) if args.full else ""
    print(full)
    if args.no_write:
        return 0
    env = environment()
    cmd = "python tools/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = ROOT / "docs" / "benchmarks.md"
    section = (
        f"## CPU: one UNet forward, original vs exported vs compiled\n\n"
        f"Command: `{cmd.strip()}`  \nDate: {datetime.date.today().isoformat()}  \n"
        f"Machine: {env['machine']}; {env['os']}  \n"
        f"Versions: python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}\n\n"
        f"Inputs: batch 2 (classifier-free guidance), 8 frames, 64x64 latent, fp32, random weights. Peak: live\n"
        f"storages created during the call (weights and inputs excluded), measured with fxstream.memory.MemoryTracker;\n"
        f"planned: fxstream.memory.planned_peak on the graph. Latency: median of {args.repeats} runs after a warm-up.\n\n"
        f"```\n{text}\n```\n"
    )
    if full:
        section += (
            f"\n## Full-size architectures, planned on the meta device\n\n"
            f"Same command. fp16, batch 2, SVD/SVD-XT at 576x1024 (latent 72x128), AnimateDiff at 512x512 (latent\n"
            f"64x64); activation peak planned by fxstream.memory.planned_peak (weights apart), no compute.\n\n"
            f"```\n{full}\n```\n"
        )
    (ROOT / "docs" / "benchmarks.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    doc.write_text("# Benchmarks\n\nEvery figure here comes from the command above it.\n\n" + section)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
