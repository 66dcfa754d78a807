"""Measure one UNet forward: the original module, its exported graph, and the fxstream-compiled module.

Peak memory is measured with :class:`~fxstream.memory.MemoryTracker` (live storages created during the call,
weights and inputs excluded); latency is the median of timed runs after one warm-up run. Used by the demo
(``python -m fxstream.demo``) and by ``tools/bench_memory.py``.
"""
from __future__ import annotations

import contextlib

import datetime
import json
import logging
import platform
import re
from pathlib import Path
import statistics
import time
from dataclasses import dataclass

import torch

from .api import compile as fx_compile
from .memory import measure_peak
from .models import build_unet, example_inputs
from .policy import Policy

__all__ = ["Measurement", "measure_model", "environment", "write_section", "provenance", "timings",
           "allocator_peak", "cuda_peak"]

_log = logging.getLogger(__name__)


@dataclass
class Measurement:
    model: str
    variant: str
    peak_bytes: int
    planned_bytes: int | None
    median_s: float
    min_s: float
    max_s: float
    max_abs_diff: float
    compile_s: float | None = None
    regions: int | None = None


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            fn()
        times.append(time.perf_counter() - t)
    return times


def timings(fn, repeats: int, device: str = "cpu") -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` (no warm-up here: call it once before). On CUDA each call is
    timed with CUDA events around it, on the CPU with ``time.perf_counter``."""
    if torch.device(device).type != "cuda":
        return _time(fn, repeats)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.no_grad():
            start.record()
            fn()
            end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def allocator_peak(fn):
    """Run ``fn`` under ``torch.profiler`` with memory profiling; return (result, peak bytes).

    The peak is the highest running total of the CPU allocator's allocations during the call, as the profiler
    records them. Unlike :class:`~fxstream.memory.MemoryTracker` it also sees memory that does not come out of
    an ATen op (Inductor's generated code allocates its buffers directly) and kernels' scratch buffers; it does
    not see allocations on threads the profiler does not follow (fxstream's CPU workers). On svd-tiny's eager,
    exported and sliced forwards the two agree to the byte.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    allocs = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation]
    live = peak = 0
    for e in sorted(allocs, key=lambda e: e.start_time_ns):
        live += e.extra_fields.alloc_size
        peak = max(peak, live)
    return out, peak


def cuda_peak(fn):
    """Run ``fn`` on CUDA; return (result, the most bytes allocated above what was allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


def environment() -> dict:
    return {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "os": platform.platform(),
    }


def _logged(log):
    @contextlib.contextmanager
    def step(message: str):
        log(message)
        yield
    return step


def measure_model(model: str, policies, repeats: int = 3, log=_log.info, step=None) -> list[Measurement]:
    """Measurements of the original and exported forward of ``model`` (a name from ``MODELS``) and of the
    compiled forward under each policy. ``step(message)``: a context manager around each stage (default: ``log``
    the message; the demo passes :meth:`fxstream.progress.Progress.step`, a running clock on a terminal)."""
    step = step or _logged(log)
    with step(f"{model}: building the UNet and its inputs, one eager run for the reference"):
        unet = build_unet(model)
        kw = example_inputs(model, unet)
        with torch.no_grad():
            ref = unet(**kw)[0]
    rows = []

    def record(variant, fn, planned=None, compile_s=None, regions=None):
        with step(f"{model}: {variant}: peak memory (one run under the tracker)"):
            out, peak = measure_peak(fn)
        with step(f"{model}: {variant}: {repeats} timed runs"):
            times = _time(fn, repeats)
        diff = (out[0] - ref).abs().max().item()
        rows.append(Measurement(model, variant, peak, planned, statistics.median(times), min(times), max(times),
                                diff, compile_s, regions))

    record("original (eager)", lambda: unet(**kw))
    compiled = fx_compile(unet, policy=Policy())
    t = time.perf_counter()
    with torch.no_grad(), step(f"{model}: capturing the exported graph (torch.export)"):
        compiled(**kw)
    export_s = time.perf_counter() - t
    base = compiled.explain()
    record("exported graph", lambda: compiled(**kw), base.original_peak_bytes, export_s, 0)
    for pol in policies:
        sliced = fx_compile(unet, policy=pol)
        t = time.perf_counter()
        with torch.no_grad(), step(f"{model}: compiling under {pol.describe()} (capture, plan, group)"):
            sliced(**kw)
        compile_s = time.perf_counter() - t
        report = sliced.explain()
        record(f"fxstream {pol.describe()}", lambda: sliced(**kw), report.peak_bytes, compile_s, len(report.regions))
    return rows


_TITLE = "# Benchmarks\n\nEvery figure here comes from the command above it. Each tool rewrites only its own section.\n"


def provenance(cmd: str) -> str:
    """The lines that head a benchmark section: the exact command, date, machine and versions."""
    env = environment()
    return (f"Command: `{cmd.strip()}`  \nDate: {datetime.date.today().isoformat()}  \n"
            f"Machine: {env['machine']}; {env['os']}  \n"
            f"Versions: python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}\n\n")


def snapshot(root: Path, into: Path, ref: str | None = None) -> Path:
    """A copy of the fxstream package of the checkout at ``root`` (``passes/`` as ``fxstream/passes``, as the
    install maps it) under ``into``, for a benchmark's subprocesses to import with ``into`` on ``PYTHONPATH``:
    the files as they are, or those of commit ``ref`` (``git archive``)."""
    import shutil
    import subprocess
    if ref is None:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(root / "fxstream", into / "fxstream", ignore=ignore)
        shutil.copytree(root / "passes", into / "fxstream" / "passes", ignore=ignore)
        return into
    files = subprocess.run(["git", "-C", str(root), "archive", ref, "fxstream", "passes"], capture_output=True,
                           check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=files, check=True)
    (into / "passes").rename(into / "fxstream" / "passes")
    return into


def write_section(docs: Path, name: str, markdown: str, data=None) -> None:
    """Replace (or append) the section ``name`` of ``docs/benchmarks.md`` and the key ``name`` of
    ``docs/benchmarks.json``; other tools' sections stay as they are."""
    md, js = docs / "benchmarks.md", docs / "benchmarks.json"
    text = md.read_text() if md.exists() else _TITLE
    block = f"<!-- section: {name} -->\n{markdown.rstrip()}\n<!-- end: {name} -->"
    pattern = re.compile(rf"<!-- section: {re.escape(name)} -->.*?<!-- end: {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    md.write_text(text)
    if data is not None:
        blob = json.loads(js.read_text()) if js.exists() else {}
        blob[name] = data
        js.write_text(json.dumps(blob, indent=1))
