"""Benchmark: diffusers' video transformers under fxstream (issue 20): tokens found from the ops, attention cut along
its queries.

    python tools/bench_transformers.py                    # tiny configs on the CPU, full-size plans on meta; writes docs
    python tools/bench_transformers.py --no-full --no-write
    python tools/bench_transformers.py --no-tiny --slices 16

Two tables:

- *Measured on the CPU* (fp32, random weights, one video): the tiny configs of ``fxstream.models.TRANSFORMERS``
  (the shapes diffusers' tests use: two layers, two heads) at a few thousand tokens, and ``wan-mid`` (Wan-shaped,
  a wider hidden size: its token-sized values hold the memory, as at full size). The exported graph
  (``Policy()``) against ``Policy(slices=N)``: the activation peak measured by fxstream's tracker
  (``memory.measure_peak``: bytes allocated during the call), the planned peaks, the median latency of
  ``--repeats`` calls after one untimed call, and the largest difference from the eager module.
- *Planned on the meta device* (fp16, no weights, no compute): CogVideoX-5B at 720x480, 49 frames (batch 2:
  classifier-free guidance in one call, as its pipeline does) and Wan 2.1 14B at 1280x720, 81 frames (batch 1: its
  pipeline calls the transformer once per guidance branch), from the configs shipped in ``fxstream/configs``: the
  exported graph's planned activation peak against ``Policy(slices=N)``'s, the regions, and the plan's wall time.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxstream
from fxstream.bench import provenance, write_section
from fxstream.memory import measure_peak
from fxstream.models import TRANSFORMERS, build_transformer, transformer_inputs

ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20
TINY = ("cogvideox-tiny", "wan-tiny", "ltx-tiny", "wan-mid")
FULL = ("cogvideox-5b", "wan2.1-14b")


def _tokens(name: str, kw: dict) -> int:
    hs = kw["hidden_states"]
    if TRANSFORMERS[name][0] == "LTXVideoTransformer3DModel":
        return hs.shape[1]
    f, h, w = (hs.shape[1], hs.shape[3], hs.shape[4]) if TRANSFORMERS[name][0] == "CogVideoXTransformer3DModel" \
        else hs.shape[2:]
    return f * (h // 2) * (w // 2)


def _median_s(fn, kw, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(**kw)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def tiny_rows(slices: int, repeats: int) -> list:
    rows = []
    for name in TINY:
        m = build_transformer(name)
        kw = transformer_inputs(name, m)
        with torch.no_grad():
            want = m(**kw)[0]
            exported = fxstream.compile(m, fxstream.Policy())
            sliced = fxstream.compile(m, fxstream.Policy(slices=slices))
            exported(**kw), sliced(**kw)  # the first calls capture and compile
            (got, *_), peak = measure_peak(sliced, **kw)
            _, base = measure_peak(exported, **kw)
            t_base, t_sliced = _median_s(exported, kw, repeats), _median_s(sliced, kw, repeats)
        rep = sliced.explain()
        rows.append({"model": name, "tokens": _tokens(name, kw), "exported MiB": base / MiB,
                     "sliced MiB": peak / MiB, "measured": peak / base,
                     "planned": rep.peak_bytes / rep.original_peak_bytes, "regions": len(rep.regions),
                     "recomputed": rep.recomputed,
                     "exported s": t_base, "sliced s": t_sliced,
                     "max |diff|": (got - want).abs().max().item()})
        print(rows[-1], flush=True)
    return rows


def full_rows(slices: int) -> list:
    rows = []
    for name in FULL:
        m = build_transformer(name, "meta", torch.float16)
        kw = transformer_inputs(name, m)
        t = time.perf_counter()
        base = fxstream.explain(m, kw, fxstream.Policy())
        rep = fxstream.explain(m, kw, fxstream.Policy(slices=slices))
        seconds = time.perf_counter() - t
        rows.append({"model": name, "tokens": _tokens(name, kw), "batch": kw["hidden_states"].shape[0],
                     "weights GiB": rep.weight_bytes / 2 ** 30, "exported GiB": base.peak_bytes / 2 ** 30,
                     "sliced GiB": rep.peak_bytes / 2 ** 30, "ratio": rep.peak_bytes / base.peak_bytes,
                     "regions": len(rep.regions), "recomputed": rep.recomputed, "plan s": seconds,
                     "peak at": f"{rep.peak_node} ({rep.peak_module or 'top'})"})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=4, help="Policy(slices=N) (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median; default 3)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the CPU measurements")
    ap.add_argument("--no-full", action="store_true", help="skip the full-size plans on meta")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    ap.add_argument("--not-quiet", metavar="WHAT", help="what else ran meanwhile (timings are then indicative)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    tiny = [] if args.no_tiny else tiny_rows(args.slices, args.repeats)
    full = [] if args.no_full else full_rows(args.slices)
    doc = "## Video transformers\n\n" + provenance("python tools/bench_transformers.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]))
    doc += ("diffusers' video transformers, random weights, nothing model-specific in fxstream: the tokens axis is "
            "found from the ops, attention is cut along its queries with keys and values whole, and a region that "
            "would raise the planned peak is left whole; where an attention's queries and its keys and values share a "
            "chain of cheap ops (the normed tokens), the queries make it again ('recomputed': chains copied; NOTE "
            "[Queries recompute what they share with keys and values]). ")
    doc += (f"Timings: {args.not_quiet}.\n\n" if args.not_quiet else "Timings on a quiet machine.\n\n")
    if tiny:
        doc += (f"Measured on the CPU (fp32, one video; tiny configs of `fxstream.models.TRANSFORMERS`), exported "
                f"graph (`Policy()`) against `Policy(slices={args.slices})`; 'measured': the tracker's activation peak "
                f"over the exported graph's; 'planned': the same from the planner; latency: median of "
                f"{args.repeats} calls.\n\n```\n")
        doc += tabulate([(r["model"], r["tokens"], f"{r['exported MiB']:.2f}", f"{r['sliced MiB']:.2f}",
                          f"{r['measured']:.2f}x", f"{r['planned']:.2f}x", r["regions"], r["recomputed"],
                          f"{r['exported s']:.3f}", f"{r['sliced s']:.3f}", f"{r['max |diff|']:.1e}") for r in tiny],
                        headers=["model", "tokens", "exported MiB", "sliced MiB", "measured", "planned", "regions",
                                 "recomputed", "exported s", "sliced s", "max |diff|"]) + "\n```\n\n"
    if full:
        doc += (f"Planned on the meta device (fp16, activations only), configs shipped in `fxstream/configs`: "
                f"exported graph against `Policy(slices={args.slices})`; 'plan s': both plans' wall time.\n\n```\n")
        doc += tabulate([(r["model"], r["tokens"], r["batch"], f"{r['weights GiB']:.1f}", f"{r['exported GiB']:.2f}",
                          f"{r['sliced GiB']:.2f}", f"{r['ratio']:.2f}x", r["regions"], r["recomputed"], f"{r['plan s']:.0f}",
                          r["peak at"]) for r in full],
                        headers=["model", "tokens", "batch", "weights GiB", "exported GiB", "sliced GiB", "ratio",
                                 "regions", "recomputed", "plan s", "sliced peak at"]) + "\n```\n"
    print(doc)
    if not args.no_write:
        write_section(ROOT / "docs", "transformers", doc, {"tiny": tiny, "full": full, "args": vars(args)})
        print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
