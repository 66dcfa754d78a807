"""Benchmark: how long fxstream takes to plan full-size UNets, and where the time goes (capture, each compile step).

    python tools/bench_compile.py                     # svd and animatediff on the meta device; writes docs/benchmarks.md
    python tools/bench_compile.py --models svd --no-write
    python tools/bench_compile.py --against 3213995 --rounds 2   # interleaved with an older commit; own section

Then two pipeline rows: a compiled tiny SVD pipeline's first generation on the CPU (3 steps, where its compiles
happen), and the full-size SVD-XT pipeline planned by ``explain_pipeline`` (25 frames, 576x1024, 6 GiB).

For each model (fp16, batch 2, built on the meta device: no weights, no compute), in one process, in this order:
``fxstream.explain`` under ``Policy(slices=8)`` (capture + compile + report), the report's lower bound (computed on
first access), and ``fxstream.explain`` under ``Policy(max_memory=...)`` (capture + the budget's search). Each
compile step's time comes from the driver's log (``fxstream.compiler`` at INFO), summed over every compile the
call made (the budget compiles several times). Wall times on this machine's CPU threads; run it on a quiet
machine (nothing else running), or the figures mean little.

With ``--against REF`` the same calls run in fresh processes, alternately on the code of commit ``REF`` and on
this checkout (each a snapshot of ``fxstream/`` and ``passes/``; the order flips every round), ``--rounds`` times:
this machine's speed drifts (the same code, quiet, 47 s and 59 s for the SVD-XT pipeline plan an hour apart), so
only calls timed side by side compare. Written to its own section, "compile-against".
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
from tabulate import tabulate

import fxstream
from fxstream.bench import provenance, write_section
from fxstream.compiler import STEPS
from fxstream.models import build_unet, example_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUDGETS = {"svd": "6GiB", "svd-xt": "8GiB", "animatediff": "4GiB"}  # weights + activations, fp16


class _StepTimes(logging.Handler):
    """Sums the driver's per-step times ("step 3 group_regions: 9.40 s") and counts the compiles."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: dict = defaultdict(float)
        self.compiles = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("step ") and getattr(record, "fxstream_depth", 0) == 0:  # nested compiles: in their step
            _, index, name, secs, _ = msg.replace(":", "").split()
            self.seconds[name] += float(secs)
            self.compiles += index == "0"


def _timed(fn):
    handler = _StepTimes()
    logger = logging.getLogger("fxstream.compiler")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return out, time.perf_counter() - start, handler


def measure(model: str) -> list:
    unet = build_unet(model, device="meta", dtype=torch.float16)
    kw = example_inputs(model, unet)
    rows = []
    report, total, steps = _timed(lambda: fxstream.explain(unet, kw, fxstream.Policy(slices=8)))
    rows.append((model, "explain, Policy(slices=8)", total, steps))
    _, total, steps = _timed(lambda: report.lower_bound_bytes)
    rows.append((model, "its lower bound", total, steps))
    budget = BUDGETS[model]
    _, total, steps = _timed(lambda: fxstream.explain(unet, kw, fxstream.Policy(max_memory=budget)))
    rows.append((model, f"explain, Policy(max_memory='{budget}')", total, steps))
    return rows


def measure_pipelines() -> list:
    """The two pipeline figures of the targets: a compiled tiny SVD pipeline's first generation (3 steps; its
    compiles happen there) and full-size SVD-XT's whole-pipeline plan (25 frames, 576x1024, 6 GiB)."""
    from fxstream.pipelines import build_pipeline, pipeline_inputs, tiny_pipeline

    rows = []
    for policy in (fxstream.Policy(slices=2), fxstream.Policy(max_memory="9MiB")):
        pipe = tiny_pipeline("svd")
        fxstream.compile_pipeline(pipe, policy)
        kw = pipeline_inputs(pipe, steps=3)
        with torch.no_grad():
            _, total, steps = _timed(lambda: pipe(**kw))
        rows.append(("svd-tiny pipeline", f"first generation (3 steps), {policy.describe()}", total, steps))
    pipe = build_pipeline("svd-xt", device="meta", dtype=torch.float16)
    policy = fxstream.Policy(max_memory="6GiB")
    _, total, steps = _timed(lambda: fxstream.explain_pipeline(pipe, height=576, width=1024, num_frames=25,
                                                                policy=policy))
    rows.append(("svd-xt pipeline", f"explain_pipeline, 25x576x1024, {policy.describe()}", total, steps))
    return rows


def table(rows) -> str:
    names = [s.name for s in STEPS]
    body = []
    for model, what, total, steps in rows:
        in_steps = sum(steps.seconds.values())
        body.append([model, what, f"{total:.1f}", steps.compiles, f"{total - in_steps:.1f}"]
                    + [f"{steps.seconds.get(n, 0.0):.1f}" for n in names])
    return tabulate(body, headers=["model", "call", "wall s", "compiles", "outside steps s"] + names,
                    disable_numparse=True)


def _rows(models: list, pipelines: bool) -> list:
    rows = []
    for m in models:
        print(f"{m}...", file=sys.stderr, flush=True)
        rows += measure(m)
    if pipelines:
        print("pipelines...", file=sys.stderr, flush=True)
        rows += measure_pipelines()
    return rows


def _child(src: pathlib.Path, models: list, pipelines: bool) -> list:
    """The calls timed in a fresh process importing fxstream from ``src``: [(model, call, wall s, compiles)]. (The
    child runs this file on an older fxstream too: what only the parent needs is imported here.)"""
    from fxstream.plan_cache import ENV as CACHE_ENV
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               FXSTREAM_PROGRESS="0")
    env.pop(CACHE_ENV, None)  # no plan cache: every call searches
    cmd = [sys.executable, __file__, "--child", "--models", *models] + ([] if pipelines else ["--no-pipelines"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(f"the timing subprocess on {src} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["module"].startswith(str(src)):
        raise RuntimeError(f"the subprocess imported fxstream from {result['module']}, not the snapshot {src}")
    return result["rows"]


def against(ref: str, models: list, pipelines: bool, rounds: int) -> tuple[list, str]:
    """The calls timed alternately on commit ``ref`` and on this checkout, ``rounds`` times each."""
    from fxstream.bench import snapshot
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True,
                         check=True).stdout.strip()
    times: dict = {}  # (model, call) -> {"ref": [s], "now": [s]}
    with tempfile.TemporaryDirectory(prefix="fxstream-ref-") as a, \
            tempfile.TemporaryDirectory(prefix="fxstream-now-") as b:
        srcs = {"ref": snapshot(ROOT, pathlib.Path(a), ref), "now": snapshot(ROOT, pathlib.Path(b))}
        for r in range(rounds):
            for which in (("ref", "now") if r % 2 == 0 else ("now", "ref")):
                print(f"round {r + 1}: {which}...", file=sys.stderr, flush=True)
                for model, call, secs, _ in _child(srcs[which], models, pipelines):
                    times.setdefault((model, call), {"ref": [], "now": []})[which].append(secs)
    rows = []
    for (model, call), t in times.items():
        med = {k: sorted(v)[len(v) // 2] for k, v in t.items() if v}
        rows.append((model, call, t["ref"], t["now"], med["now"] / med["ref"] if len(med) == 2 else None))
    return rows, sha


def against_table(rows, sha: str) -> str:
    def secs(v):
        return ", ".join(f"{x:.1f}" for x in v) or "-"
    return tabulate([[m, c, secs(a), secs(b), "-" if r is None else f"{r:.2f}x"] for m, c, a, b, r in rows],
                    headers=["model", "call", f"{sha} wall s", "this checkout wall s", "ratio (medians)"],
                    disable_numparse=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["svd", "animatediff"], choices=sorted(BUDGETS))
    ap.add_argument("--no-pipelines", action="store_true", help="skip the two pipeline rows (about 2 minutes)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    ap.add_argument("--not-quiet", metavar="WHAT", default=None,
                    help="what else ran on the machine meanwhile (written instead of 'Measured on a quiet machine')")
    ap.add_argument("--against", metavar="REF", help="time the calls alternately on commit REF and on this checkout")
    ap.add_argument("--rounds", type=int, default=2, help="with --against: runs of each (default 2)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds: expected at least 1, got {args.rounds}")
    if args.child:
        rows = _rows(args.models, not args.no_pipelines)
        print(json.dumps({"module": fxstream.__file__, "rows": [(m, w, t, s.compiles) for m, w, t, s in rows]}))
        return 0
    if args.against:
        rows, sha = against(args.against, args.models, not args.no_pipelines, args.rounds)
        text = against_table(rows, sha)
        print(text)
        if args.no_write:
            return 0
        cmd = f"python tools/bench_compile.py --against {args.against} --rounds {args.rounds}" + \
            (f" --models {' '.join(args.models)}" if args.models != ["svd", "animatediff"] else "") + \
            (" --no-pipelines" if args.no_pipelines else "")
        doc = (f"## Compile time against {sha}\n\n" + provenance(cmd) +
               f"The calls of \"Compile time\" timed in fresh processes, alternately on the code of commit {sha} and "
               "on this checkout (the order flipped every round), to compare code on a machine whose speed drifts "
               "(the same code, quiet, 47 s and 59 s for the SVD-XT pipeline plan an hour apart). " +
               ("Measured on a quiet machine." if args.not_quiet is None else
                f"Not measured on a quiet machine: {args.not_quiet}.") + f"\n\n```\n{text}\n```\n")
        write_section(ROOT / "docs", "compile-against", doc,
                      {"ref": sha, "rows": [(m, c, a, b) for m, c, a, b, _ in rows]})
        print("wrote docs/benchmarks.md")
        return 0
    rows = _rows(args.models, not args.no_pipelines)
    text = table(rows)
    print(text)
    if args.no_write:
        return 0
    cmd = "python tools/bench_compile.py" + (f" --models {' '.join(args.models)}" if args.models != ["svd", "animatediff"]
                                              else "") + (" --no-pipelines" if args.no_pipelines else "")
    doc = ("## Compile time: where it goes\n\n" + provenance(cmd) +
           "Full-size UNets built on the meta device (fp16, batch 2), planned without running. 'outside steps': "
           "capture (torch.export), the report and the memory plans; the step columns sum the compile driver's "
           "steps (fxstream/compiler.py STEPS) over every compile of the call. " +
           ("Measured on a quiet machine. " if args.not_quiet is None else
            f"Not measured on a quiet machine: {args.not_quiet}. ") +
           "Targets (issue 21, 2 cores, quiet): full-size SVD explain <= 15 s, a budget compile of it <= 30 s, the "
           "tiny SVD pipeline's first generation <= 20 s, the SVD-XT pipeline plan <= 60 s.\n\n"
           f"```\n{text}\n```\n")
    write_section(ROOT / "docs", "compile", doc, {"rows": [(m, w, t, s.compiles, dict(s.seconds)) for m, w, t, s in rows]})
    print("wrote docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
