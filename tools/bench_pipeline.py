"""Pipelined regions: latency and peak memory for k = 1, 2, 4 slices in flight against the unsliced graph.

    python tools/bench_pipeline.py                       # svd-mid and animatediff-mid on the CPU (and CUDA if present)
    python tools/bench_pipeline.py --models svd-mid --repeats 5 --no-write

For each model: the exported graph (nothing sliced), then the fewest slices (of --slices) whose planned peak is
at most half the exported graph's, run with Policy(pipeline=k) for each k. On the CPU every region measures
its serial loop against a worker pool on its first call and keeps the faster (the table counts the choices);
``--workers`` adds rows with the pool forced. Latency: median of --repeats runs after a warm-up call. Peak:
live storages created during a call (fxstream.memory.MemoryTracker, which follows slices into the workers);
planned: fxstream.memory.plan_memory. The loop's own cost per slice (everything a region does outside its bodies:
narrowing arguments, writing outputs, the Python loop) is timed on the k=1 run. Writes the "pipeline" section
of docs/benchmarks.md and docs/benchmarks.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tabulate import tabulate

import fxstream
from fxstream.bench import provenance, write_section
from fxstream.memory import measure_peak
from fxstream.models import build_unet, example_inputs
from fxstream.runtime import LoopRegion

ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20


def _loops(compiled) -> list:
    return [m for m in compiled._last.compiled.graph_module.modules() if isinstance(m, LoopRegion)]


def _timed(fn, repeats: int) -> list:
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def loop_overhead(compiled, call) -> tuple:
    """(microseconds per slice a region spends on its own work, slices per call). After a normal call, each
    body's results are kept and handed back instead of running the body again, and the leaf regions of one more
    call are timed: what remains is the loop itself (narrowing arguments, writing outputs into the buffers,
    partial sums, the Python around them)."""
    leaf = [m for m in _loops(compiled) if not m.nested]
    kept, state = {}, {"t": 0.0, "slices": 0}
    real = LoopRegion._body

    def keep(self, step, ins):
        key = (id(self), step)
        if key not in kept:
            kept[key] = real(self, step, ins)
        return kept[key]

    hooks = []
    for loop in leaf:
        hooks.append(loop.register_forward_pre_hook(lambda m, a: state.__setitem__("t0", time.perf_counter())))

        def post(m, a, o):
            state["t"] += time.perf_counter() - state["t0"]
            state["slices"] += len(m.bounds)
        hooks.append(loop.register_forward_hook(post))
    LoopRegion._body = keep
    try:
        call()  # fills ``kept``: these timings are not used
        state.update(t=0.0, slices=0)
        call()
    finally:
        LoopRegion._body = real
        for h in hooks:
            h.remove()
    return 1e6 * state["t"] / max(1, state["slices"]), state["slices"]


def bench_model(name: str, device: str, slice_choices, ks, repeats: int, workers: bool, log=print) -> list:
    unet = build_unet(name, device=device)
    kw = example_inputs(name, unet)
    rows = []
    with torch.no_grad():
        base = fxstream.compile(unet, policy=fxstream.Policy())
        ref = base(**kw)[0]
        base_report = base.explain()
        target = base_report.original_peak_bytes / 2
        slices = next((s for s in slice_choices
                       if fxstream.explain(unet, kw, fxstream.Policy(slices=s)).peak_bytes <= target),
                      slice_choices[-1])
        variants = [("exported graph", fxstream.Policy())]
        variants += [(f"slices={slices}, pipeline={k}", fxstream.Policy(slices=slices, pipeline=k)) for k in ks]
        if workers and device == "cpu":
            variants += [(f"slices={slices}, pipeline={k}, cpu_workers=True",
                          fxstream.Policy(slices=slices, pipeline=k, cpu_workers=True)) for k in ks if k > 1]
        for label, policy in variants:
            log(f"{name} ({device}): {label}")
            compiled = base if policy == fxstream.Policy() else fxstream.compile(unet, policy=policy)
            t = time.perf_counter()
            out = compiled(**kw)[0]  # compile + warm-up (and, on the CPU, each region's serial/worker choice)
            first_s = time.perf_counter() - t
            diff = (out - ref).abs().max().item()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                compiled(**kw)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
            else:
                _, peak = measure_peak(compiled, **kw)
            times = _timed(lambda: compiled(**kw), repeats)
            report = compiled.explain()
            loops = _loops(compiled) if policy.slices_anything else []
            leaf = [m for m in loops if not m.nested]
            modes = Counter(m.cpu_mode or "serial" for m in leaf if m.in_flight > 1) if device == "cpu" else {}
            overhead = loop_overhead(compiled, lambda: compiled(**kw)) if policy.pipeline == 1 and leaf else None
            rows.append(dict(model=name, device=device, variant=label, slices=slices if loops else None,
                             pipeline=policy.pipeline, peak_bytes=peak, planned_bytes=report.peak_bytes,
                             base_planned=base_report.original_peak_bytes, median_s=statistics.median(times),
                             min_s=min(times), max_s=max(times), max_abs_diff=diff, first_call_s=first_s,
                             regions=len(leaf), workers=modes.get("workers", 0), serial=modes.get("serial", 0),
                             overhead_us=None if overhead is None else overhead[0],
                             slices_per_call=None if overhead is None else overhead[1]))
    base_row = rows[0]
    for r in rows:
        r["peak_vs_base"] = r["peak_bytes"] / base_row["peak_bytes"]
        r["latency_vs_base"] = r["median_s"] / base_row["median_s"]
    return rows


def table(rows) -> str:
    body = [(r["model"], r["device"], r["variant"], f"{r['peak_bytes'] / MiB:.1f}", f"{r['planned_bytes'] / MiB:.1f}",
             f"{r['peak_vs_base']:.2f}x", f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}",
             f"{r['latency_vs_base']:.3f}x", f"{r['max_abs_diff']:.1e}",
             f"{r['workers']}/{r['workers'] + r['serial']}" if r["pipeline"] > 1 and r["device"] == "cpu" else "-",
             "-" if r["overhead_us"] is None else f"{r['overhead_us']:.0f} ({r['slices_per_call']})",
             f"{r['first_call_s']:.1f}") for r in rows]
    return tabulate(body, headers=["model", "device", "variant", "peak MiB", "planned MiB", "peak vs unsliced",
                                   "median s", "min-max s", "latency vs unsliced", "max |diff|",
                                   "regions on workers", "loop µs/slice (slices)", "first call s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["svd-mid", "animatediff-mid"])
    ap.add_argument("--slices", nargs="*", type=int, default=[2, 4, 8, 16],
                    help="slice counts to try, fewest first: the first whose plan is <= 0.5x the unsliced peak")
    ap.add_argument("--pipeline", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", action="store_true", help="also run with the CPU worker pool forced")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [r for d in devices for m in args.models
            for r in bench_model(m, d, args.slices, args.pipeline, args.repeats, args.workers)]
    out = table(rows)
    print(out)
    if args.no_write:
        return 0
    cmd = "python tools/bench_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = ("## Pipelining: slices in flight\n\n" + provenance(cmd) +
           "Inputs: batch 2, 8 frames, 64x64 latent, fp32, random weights. Slicing: the fewest slices whose planned\n"
           "peak is at most 0.5x the unsliced graph's. `pipeline=k`: up to k slices of a region in flight; on the\n"
           "CPU each region times its serial loop against a pool of k workers (the intra-op threads shared out) on\n"
           "its first call and keeps the faster: 'regions on workers' counts the pool's wins. The plan counts k\n"
           "working sets per region, an upper bound where a region runs serially. 'loop µs/slice': a region's wall\n"
           "time outside its bodies (narrowing arguments, writing outputs into the buffers, the loop itself) per\n"
           f"slice, on the k=1 run. Latency: median of {args.repeats} runs after a warm-up call.\n\n"
           f"```\n{out}\n```\n")
    write_section(ROOT / "docs", "pipeline", doc, rows)
    print("wrote docs/benchmarks.md (section: pipeline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
