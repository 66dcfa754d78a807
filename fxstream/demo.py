"""The demo: compile the mid-size SVD-shaped UNet (random weights), run it, check equality, print memory.

    python -m fxstream.demo                 # svd-mid, batch 2, 8 frames, 64x64 latent, fp32, slices=8
    python -m fxstream.demo --model svd-tiny --slices 4
    python -m fxstream.demo --max-memory 400MiB   # the fewest slices whose planned peak (weights included) fits
"""
from __future__ import annotations

import argparse
import sys

from tabulate import tabulate

from .bench import measure_model
from .errors import MemoryBudgetError
from .models import MODELS
from .policy import Policy
from .progress import Progress


def table(rows) -> str:
    body = []
    for r in rows:
        base = next(b for b in rows if b.model == r.model and b.variant == "exported graph")
        body.append((r.model, r.variant, f"{r.peak_bytes / 2**20:.1f}",
                     "-" if r.planned_bytes is None else f"{r.planned_bytes / 2**20:.1f}",
                     f"{r.peak_bytes / base.peak_bytes:.2f}x", f"{r.median_s:.2f}",
                     f"{r.min_s:.2f}-{r.max_s:.2f}", f"{r.median_s / base.median_s:.2f}x",
                     f"{r.max_abs_diff:.1e}", "-" if r.compile_s is None else f"{r.compile_s:.1f}"))
    return tabulate(body, headers=["model", "variant", "peak MiB", "planned MiB", "peak vs export", "median s",
                                   "min-max s", "latency vs export", "max |diff|", "first call s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fxstream.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="svd-mid", choices=sorted(MODELS), help="model (default: svd-mid)")
    ap.add_argument("--slices", type=int, default=8, help="slices per region (default: 8)")
    ap.add_argument("--max-memory", default=None,
                    help="memory budget, weights included (e.g. 400MiB); replaces --slices by the budget policy")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default: 3)")
    args = ap.parse_args(argv)
    if MODELS[args.model].height > 64:
        ap.error(f"--model {args.model} is full size: too large to run on a CPU; use fxstream.explain to plan it")
    try:
        policy = Policy(max_memory=args.max_memory) if args.max_memory else Policy(slices=args.slices)
    except ValueError as e:
        ap.error(str(e))
    try:
        progress = Progress(enabled=sys.stderr.isatty())  # a running clock per stage on a terminal
        rows = measure_model(args.model, [policy], repeats=args.repeats, log=lambda m: print(m, file=sys.stderr),
                             step=progress.step if progress.enabled else None)
    except MemoryBudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    worst = max(r.max_abs_diff for r in rows)
    ok = worst <= 1e-5 and rows[0].max_abs_diff == 0.0 and rows[1].max_abs_diff == 0.0
    print(f"\nequality: {'OK' if ok else 'FAILED'} (max |diff| {worst:.1e}; exported graph bitwise equal: "
          f"{rows[1].max_abs_diff == 0.0})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
