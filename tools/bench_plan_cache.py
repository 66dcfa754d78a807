"""Benchmark: the plan cache (``FXSTREAM_CACHE_DIR``, fxstream/plan_cache.py): the same compile in a first process
(the budget's search runs and its decision is stored) and in a second one (the decision is compiled once).

    python tools/bench_plan_cache.py                  # all four rows; writes docs/benchmarks.md
    python tools/bench_plan_cache.py --no-pipeline-plan --no-write

Each row runs in two fresh subprocesses, one after the other, with the same new temporary ``FXSTREAM_CACHE_DIR``
(removed afterwards), both importing one copy of fxstream taken at the start (the key holds a digest of its files,
so another edit of the checkout between the two would make the second miss): full-size SVD built on the meta device (fp16, batch 2) under ``fxstream.explain`` with
``Policy(max_memory="6GiB")``; full-size SVD-XT (25 frames, 576x1024) under ``fxstream.explain(..., ranks=[4])``
with its weights plus 0.85 GiB, a budget only 4 ranks together meet (NOTE [A budget per rank]: the search each
rank of a ``torchrun`` launch runs); a compiled tiny SVD pipeline's first generation (3 steps, where its compiles
happen) under ``Policy(max_memory="9MiB")``; and full-size SVD-XT's whole-pipeline plan (``explain_pipeline``,
25 frames, 576x1024, 6 GiB). The time is the call's wall time (capture, compiles, reports; not the imports or
building the model), measured as tools/bench_compile.py measures it, with its count of compiles (those that ran
the driver's steps). Wall times on this machine's CPU threads.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = {
    "svd": "svd, explain, Policy(max_memory='6GiB')",
    "tiny-pipeline": "svd-tiny pipeline, first generation (3 steps), Policy(max_memory='9MiB')",
    "pipeline-plan": "svd-xt pipeline, explain_pipeline 25x576x1024, Policy(max_memory='6GiB')",
    "ranks": "svd-xt 25x576x1024, explain ranks=4, Policy(max_memory=weights + 0.85 GiB)",
}


def run_case(case: str) -> dict:
    """One case in this process: its wall time, compiles and the cache's hits and stores."""
    import logging

    import torch

    import fxstream
    from bench_compile import _timed

    class _Count(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.hits = self.stored = 0

        def emit(self, record):
            msg = record.getMessage()
            self.hits += msg.startswith("cache hit")
            self.stored += msg.startswith("stored")

    count = _Count()
    logger = logging.getLogger("fxstream.plan_cache")
    logger.addHandler(count)
    logger.setLevel(logging.INFO)
    if case == "svd":
        from fxstream.models import build_unet, example_inputs
        unet = build_unet("svd", device="meta", dtype=torch.float16)
        kw = example_inputs("svd", unet)
        _, total, steps = _timed(lambda: fxstream.explain(unet, kw, fxstream.Policy(max_memory="6GiB")))
    elif case == "tiny-pipeline":
        from fxstream.pipelines import pipeline_inputs, tiny_pipeline
        pipe = tiny_pipeline("svd")
        fxstream.compile_pipeline(pipe, fxstream.Policy(max_memory="9MiB"))
        kw = pipeline_inputs(pipe, steps=3)
        with torch.no_grad():
            _, total, steps = _timed(lambda: pipe(**kw))
    elif case == "ranks":  # NOTE [A budget per rank]: what each rank of a torchrun launch searches, planned here
        from fxstream.models import build_unet, example_inputs
        unet = build_unet("svd-xt", device="meta", dtype=torch.float16)
        kw = example_inputs("svd-xt", unet, frames=25)
        weights = sum(p.numel() * p.element_size() for p in unet.parameters())
        policy = fxstream.Policy(max_memory=weights + int(0.85 * 2**30))
        _, total, steps = _timed(lambda: fxstream.explain(unet, kw, policy, ranks=[4]))
    else:
        from fxstream.pipelines import build_pipeline
        pipe = build_pipeline("svd-xt", device="meta", dtype=torch.float16)
        policy = fxstream.Policy(max_memory="6GiB")
        _, total, steps = _timed(lambda: fxstream.explain_pipeline(pipe, height=576, width=1024, num_frames=25,
                                                                    policy=policy))
    return {"seconds": total, "compiles": steps.compiles, "hits": count.hits, "stored": count.stored,
            "module": fxstream.__file__}


def _child(case: str, folder: str, src: pathlib.Path) -> dict:
    path = os.pathsep.join([str(src), str(ROOT / "tools")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, FXSTREAM_CACHE_DIR=folder, FXSTREAM_PROGRESS="0", PYTHONPATH=path)
    out = subprocess.run([sys.executable, __file__, "--child", case], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the {case!r} subprocess failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result.pop("module").startswith(str(src)):
        raise RuntimeError(f"the {case!r} subprocess imported fxstream from outside the snapshot {src}")
    return result


def measure(cases) -> list:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxstream-src-") as src:
        from fxstream.bench import snapshot
        # the subprocesses import a copy: the cache key holds a digest of fxstream's files, so an edit between
        # the two processes (a checkout others work in) would make the second one miss
        src = snapshot(ROOT, pathlib.Path(src))
        for case in cases:
            with tempfile.TemporaryDirectory(prefix="fxstream-plan-cache-") as folder:
                print(f"{case}: first process...", file=sys.stderr, flush=True)
                first = _child(case, folder, src)
                print(f"{case}: second process...", file=sys.stderr, flush=True)
                second = _child(case, folder, src)
                entries = len(list(pathlib.Path(folder).glob("*.json")))
            rows.append((case, first, second, entries))
    return rows


def table(rows) -> str:
    from tabulate import tabulate
    body = [[CASES[c], f"{a['seconds']:.1f}", a["compiles"], f"{b['seconds']:.1f}", b["compiles"], b["hits"], n,
             f"{a['seconds'] / b['seconds']:.1f}x"] for c, a, b, n in rows]
    return tabulate(body, headers=["call", "first process s", "compiles", "second process s", "compiles",
                                   "cache hits", "entries", "speed-up"], disable_numparse=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--no-pipeline-plan", action="store_true", help="skip the SVD-XT pipeline plan (about 4 minutes)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    ap.add_argument("--quiet-machine", action="store_true",
                    help="say in docs/benchmarks.md that nothing else ran during the measurement")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child)))
        return 0
    cases = [c for c in CASES if not (c == "pipeline-plan" and args.no_pipeline_plan)]
    rows = measure(cases)
    text = table(rows)
    print(text)
    if args.no_write:
        return 0
    from fxstream.bench import provenance, write_section
    cmd = "python tools/bench_plan_cache.py" + (" --no-pipeline-plan" if args.no_pipeline_plan else "") + \
        (" --quiet-machine" if args.quiet_machine else "")
    quiet = "Measured on a quiet machine." if args.quiet_machine else \
        "Not a quiet machine: other work ran on its cores during the measurement, so the times are rough."
    doc = ("## Plan cache: a second process\n\n" + provenance(cmd) +
           "Each row: two fresh processes one after the other with the same new FXSTREAM_CACHE_DIR; the first "
           "searches and stores the budget's decisions, the second compiles each stored decision once "
           "(fxstream/plan_cache.py). Wall time of the call (capture, compiles, reports; not imports or building "
           "the model); 'compiles': compiles that ran the driver's steps (tools/bench_compile.py's count: a body "
           "compiled inside a batch split and a Policy() compile are not counted); 'cache hits': entries the second "
           "process replayed (a budget error counts too); 'entries': files in the folder at the end. The second "
           f"process still captures every module (torch.export) and reports. {quiet}\n\n```\n{text}\n```\n")
    write_section(ROOT / "docs", "plan-cache", doc,
                  {"rows": [{"case": c, "first": a, "second": b, "entries": n} for c, a, b, n in rows]})
    print("wrote docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
