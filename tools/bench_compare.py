"""Side by side: fxstream against what users would use instead, on the same inputs, in one process.

    python tools/bench_compare.py                  # mid sizes measured on the CPU (and CUDA if present), full sizes planned
    python tools/bench_compare.py --quick --no-write                        # tiny models, 1 repeat: a smoke test
    python tools/bench_compare.py --models svd-mid --methods eager exported naive --repeats 1 --no-write
    python tools/bench_compare.py --partial bench-partial.json   # stoppable: run it again to resume

Models: ``svd-mid``, ``svd-xt-mid`` (svd-mid's architecture with 14 frames: SVD-XT is SVD's architecture at 25
frames) and ``animatediff-mid`` run for real (batch 2, 64x64 latent, fp32, random weights), and ``cogvideox-mid``, a
CogVideoX-shaped video transformer (4 layers, 4,096 video tokens, batch 2; eager, exported, fxstream slicing, budget,
pipelining and torch.compile: the UNet-only methods are n/a rows); ``svd``, ``svd-xt``
and ``animatediff`` (full size, fp16) are built on the meta device and planned, nothing computed; ``--quick``
runs ``svd-tiny`` and ``animatediff-tiny``.

Methods: the diffusers UNet (eager); its exported graph; diffusers ``enable_forward_chunking()``; diffusers FreeNoise
split inference (AnimateDiff only); naive slicing (the whole UNet on chunks of frames, outputs concatenated: frames
no longer see each other across chunks, so the result changes); ``torch.compile`` (Inductor; its first call is
bounded by ``--compile-timeout``); fxstream with fixed slicing, with a memory budget (weights + half the exported
graph's planned peak), with pipelining; Step Rehash and a DeepCache-style cache (``fxstream.StepRehash`` at its default
cache point and at the last up block's input), timed per step over a whole denoising loop.

Per method: peak memory measured (fxstream.memory.MemoryTracker; the CPU allocator through torch.profiler for
torch.compile, whose generated code allocates outside ATen ops; torch.cuda.max_memory_allocated on CUDA), peak
planned (fxstream.memory.plan_memory, through fxstream.explain or the compiled module's report; for a diffusers
method, the plan of its exported graph), latency (median, min and max of --repeats runs after a warm-up call), max
abs difference to the original UNet, first-call time (compile + one run). A method that fails becomes an error row.
Writes the "compare" section of docs/benchmarks.md and docs/benchmarks.json, and docs/img/bench-compare.png.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

import fxstream
from fxstream.bench import allocator_peak, cuda_peak, environment, provenance, timings, write_section
from fxstream.memory import measure_peak
from fxstream.models import MODELS, build_transformer, build_unet, example_inputs, transformer_inputs

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 2**20, 2**30
SLICES = 8  # fxstream's fixed slicing and pipelining
NAIVE_CHUNKS = 4  # naive slicing: chunks of frames through the whole UNet
FULL_EVERY = 3  # Step Rehash: a full step every 3 steps (and the last)
FREENOISE = {"spatial_split_size": 256, "temporal_split_size": 16}  # diffusers' defaults


@dataclass(frozen=True)
class Case:
    """One model at one input size: what is printed, which fxstream.models entry, and how it runs."""

    name: str
    model: str
    family: str  # svd, svd-xt or animatediff: a column of the chart
    frames: int | None = None  # None: the model's default
    meta: bool = False  # full size: built on the meta device in fp16 and planned, never run
    note: str = ""
    transformer: bool = False  # a video transformer of fxstream.models.TRANSFORMERS (not a UNet)


CASES = {c.name: c for c in [
    Case("svd-mid", "svd-mid", "svd"),
    Case("svd-xt-mid", "svd-mid", "svd-xt", frames=14,
         note="svd-xt-mid is svd-mid's architecture with 14 frames (SVD-XT is SVD's architecture at 25 frames)"),
    Case("animatediff-mid", "animatediff-mid", "animatediff"),
    Case("svd", "svd", "svd", meta=True),
    Case("svd-xt", "svd-xt", "svd-xt", meta=True),
    Case("animatediff", "animatediff", "animatediff", meta=True),
    Case("cogvideox-mid", "cogvideox-mid", "cogvideox", transformer=True,
         note="cogvideox-mid: CogVideoXTransformer3DModel, 4 layers, 4 heads of 16, 4 latent frames of 64x64 "
              "(4,096 tokens) and 16 text tokens, batch 2; the UNet-only methods do not apply (n/a rows)"),
    Case("svd-tiny", "svd-tiny", "svd"),
    Case("animatediff-tiny", "animatediff-tiny", "animatediff"),
]}
DEFAULT_MODELS = ["svd-mid", "svd-xt-mid", "animatediff-mid", "cogvideox-mid", "svd", "svd-xt", "animatediff"]
TRANSFORMER_METHODS = {"eager", "exported", "fxstream-slices", "fxstream-budget", "fxstream-pipeline", "torch-compile"}
QUICK_MODELS = ["svd-tiny", "animatediff-tiny"]


class NotApplicable(Exception):
    """The method does not apply to this model or device (a row that says why, not an error)."""


class CompileTimeout(Exception):
    pass


@dataclass
class Row:
    model: str
    device: str  # cpu, cuda, or meta (planned only)
    method: str
    label: str
    sample: str = ""  # the latent's shape and dtype
    status: str = "ok"  # ok, n/a, error
    peak_bytes: int | None = None
    peak_by: str = ""  # tracker, allocator (torch.profiler) or cuda
    planned_bytes: int | None = None
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    per: str = "call"  # latency of one call, or per step of a denoising loop
    max_abs_diff: float | None = None
    rerun_abs_diff: float | None = None  # the measured run's output against the first call's
    first_call_s: float | None = None
    plan_s: float | None = None  # meta rows: seconds to capture and plan
    note: str = ""


@dataclass
class Prepared:
    """A method made ready: ``fn`` runs one forward (or a whole denoising loop) and returns the output tensor."""

    fn: Callable | None  # None on the meta device
    planned: Callable | None = None  # -> planned peak bytes; called after the first call (at once on meta)
    label: str = ""
    loop_steps: int = 0  # > 0: fn is a loop of this many UNet calls; latency is per step
    peak_by: str = "tracker"
    time_limit: float | None = None  # seconds the first call (the compile) may take
    note: str = ""
    after: Callable | None = None  # -> more for the note, asked after the measurements (or the plan)


class Bench:
    """One case on one device: the UNet, its inputs, and the references every method is compared to."""

    def __init__(self, case: Case, device: str, repeats: int, steps: int, compile_timeout: float):
        self.case, self.repeats, self.steps, self.compile_timeout = case, repeats, steps, compile_timeout
        self.device = "meta" if case.meta else device
        dtype = torch.float16 if case.meta else torch.float32
        if case.transformer:  # the module is still called ``unet`` below: every method only calls it
            self.unet = build_transformer(case.model, device=self.device, dtype=dtype)
            self.kw = transformer_inputs(case.model, self.unet, frames=case.frames)
            self.kind = "transformer"
        else:
            self.unet = build_unet(case.model, device=self.device, dtype=dtype)
            self.kw = example_inputs(case.model, self.unet, frames=case.frames)
            self.kind = MODELS[case.model].kind
        self._ref = self._ref_loop = self._base = None

    @property
    def meta(self) -> bool:
        return self.device == "meta"

    def ref(self) -> torch.Tensor:
        if self._ref is None:
            with torch.no_grad():
                self._ref = self.unet(**self.kw)[0]
        return self._ref

    def ref_loop(self) -> torch.Tensor:
        if self._ref_loop is None:
            with torch.no_grad():
                self._ref_loop = denoise(self.unet, self)
        return self._ref_loop

    def base(self):
        """fxstream's report of the exported graph (nothing sliced)."""
        if self._base is None:
            self._base = fxstream.explain(self.unet, self.kw)
        return self._base


def denoise(unet, b: Bench) -> torch.Tensor:
    """The final latent of a DDIM loop of ``b.steps`` UNet calls, timesteps decreasing from 999 (AnimateDiff's
    scheduler settings; no guidance). SVD's extra input channels (the image latent) stay as they are."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                          steps_offset=1, set_alpha_to_one=False, timestep_spacing="linspace")
    sched.set_timesteps(b.steps)
    kw = dict(b.kw)
    out_ch = b.unet.config.out_channels
    x = kw["sample"][:, :, :out_ch] if b.kind == "svd" else kw["sample"]
    cond = kw["sample"][:, :, out_ch:] if b.kind == "svd" else None
    for t in sched.timesteps:
        kw["sample"] = x if cond is None else torch.cat([x, cond], dim=2)
        kw["timestep"] = t.to(device=x.device, dtype=torch.float32)
        x = sched.step(unet(**kw)[0], t, x).prev_sample
    return x


class FrameChunks(torch.nn.Module):
    """Naive slicing (the paper's baseline): the whole UNet on chunks of frames, outputs concatenated."""

    def __init__(self, unet, kind: str, chunks: int):
        super().__init__()
        self.unet, self.kind, self.chunks = unet, kind, chunks

    def forward(self, sample, encoder_hidden_states, **kw):
        dim = 1 if self.kind == "svd" else 2  # SVD: (B, F, C, H, W); AnimateDiff: (B, C, F, H, W)
        b, f = sample.shape[0], sample.shape[dim]
        n = min(self.chunks, f)
        outs = []
        for i in range(n):
            lo, hi = i * f // n, (i + 1) * f // n
            ehs = encoder_hidden_states
            if self.kind != "svd":  # AnimateDiff's text states are per frame: (B*F, tokens, dim)
                ehs = ehs.unflatten(0, (b, f))[:, lo:hi].flatten(0, 1)
            outs.append(self.unet(sample=sample.narrow(dim, lo, hi - lo), encoder_hidden_states=ehs, **kw)[0])
        return (torch.cat(outs, dim=dim),)


# --- methods: each turns a Bench into a Prepared, or raises NotApplicable ---

def _eager(b):
    if b.meta:
        raise NotApplicable("needs compute; its exported graph is planned in the 'exported' row")
    return Prepared(lambda: b.unet(**b.kw)[0])


def _exported(b):
    if b.meta:
        return Prepared(None, lambda: b.base().original_peak_bytes)
    cm = fxstream.compile(b.unet, policy=fxstream.Policy())

    def planned():
        b._base = b._base or cm.explain()  # the budget method needs this report too: one capture for both
        return cm.explain().original_peak_bytes
    return Prepared(lambda: cm(**b.kw)[0], planned)


def _diffusers_variant(b, module, plannable: bool, why_not: str = ""):
    planned = (lambda: fxstream.explain(module, b.kw).original_peak_bytes) if plannable else None
    if b.meta and not plannable:
        raise NotApplicable(why_not)
    note = "planned: its exported graph" if plannable else why_not
    return Prepared(None if b.meta else lambda: module(**b.kw)[0], planned, note=note)


def _forward_chunking(b):
    m = copy.deepcopy(b.unet)  # a fresh module: UNetSpatioTemporalConditionModel cannot disable it again
    m.enable_forward_chunking()
    return _diffusers_variant(b, m, b.kind == "svd",
                              "not planned: its exported graph holds one feed-forward call per (video, pixel) row")


def _freenoise(b):
    if b.kind != "animatediff":
        raise NotApplicable("AnimateDiff only (it wraps UNetMotionModel's blocks)")
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

    class _Holder(AnimateDiffFreeNoiseMixin):  # the mixin only touches self.unet: no pipeline is needed
        def __init__(self, unet):
            self.unet = unet

    m = copy.deepcopy(b.unet)
    _Holder(m).enable_free_noise_split_inference(**FREENOISE)
    return _diffusers_variant(b, m, True)


def _naive(b):
    prep = _diffusers_variant(b, FrameChunks(b.unet, b.kind, NAIVE_CHUNKS), True)
    prep.label = f"naive: whole UNet on {NAIVE_CHUNKS} chunks of frames"
    return prep


def _torch_compile(b):
    if b.meta:
        raise NotApplicable("needs compute (Inductor compiles for a real device)")
    torch._dynamo.reset()
    cm = torch.compile(b.unet)
    return Prepared(lambda: cm(**b.kw)[0], peak_by="cuda" if b.device == "cuda" else "allocator",
                    time_limit=b.compile_timeout)


def _rehash_note(report) -> str:
    """What the report says a rehash step skips (empty without Step Rehash)."""
    info = getattr(report, "rehash", None)
    if info is None:
        return ""
    return (f"; cache point {info.cache_point}, planned FLOPs skipped on a rehash step {info.skipped_share:.0%}, "
            f"rehash step planned {info.rehash_peak_bytes / MiB:.1f} MiB")


def _fx(b, policy, **extra):
    label = f"fxstream {policy.describe()}"
    if b.meta:
        report = {}

        def planned():
            report["r"] = fxstream.explain(b.unet, b.kw, policy)
            return report["r"].peak_bytes
        return Prepared(None, planned, label, after=lambda: _rehash_note(report.get("r")), **extra)
    cm = fxstream.compile(b.unet, policy=policy)
    loop = extra.get("loop_steps")

    def after():  # the last loop's schedule, as the compiled module logged it, and the plan of a rehash step
        log = list(getattr(cm, "step_log", None) or []) if loop else []
        ran = f"; steps run: {log.count('full')} full, {log.count('rehash')} rehash" if log else ""
        return ran + _rehash_note(cm.explain())
    fn = (lambda: denoise(cm, b)) if loop else (lambda: cm(**b.kw)[0])
    return Prepared(fn, lambda: cm.explain().peak_bytes, label, after=after, **extra)


def _budget(b):
    base = b.base()
    return _fx(b, fxstream.Policy(max_memory=base.weight_bytes + base.original_peak_bytes // 2),
               note="budget: weights + half the exported graph's planned peak")


def _rehash(b, cache_point: str | None = None):
    extra = {"cache_point": cache_point} if cache_point else {}
    policy = fxstream.Policy(rehash=fxstream.StepRehash(full_every=FULL_EVERY, steps=b.steps, **extra))
    return _fx(b, policy, loop_steps=b.steps,
               note=f"latency: mean per step over a {b.steps}-step DDIM loop; diff: the loop's final latent")


def _deepcache(b):
    # DeepCache's cache point: the input of the last up block, i.e. the output of the one before it
    return _rehash(b, cache_point=f"up_blocks.{len(b.unet.up_blocks) - 2}")


METHODS = {  # key: (label, how to prepare it)
    "eager": ("diffusers UNet (eager)", _eager),
    "exported": ("exported graph (torch.export)", _exported),
    "fwd-chunking": ("diffusers enable_forward_chunking()", _forward_chunking),
    "freenoise": (f"diffusers FreeNoise split inference {tuple(FREENOISE.values())}", _freenoise),
    "naive": (f"naive: whole UNet on {NAIVE_CHUNKS} chunks of frames", _naive),
    "torch-compile": ("torch.compile (Inductor)", _torch_compile),
    "fxstream-slices": (f"fxstream Policy(slices={SLICES})", lambda b: _fx(b, fxstream.Policy(slices=SLICES))),
    "fxstream-budget": ("fxstream Policy(max_memory=...)", _budget),
    "fxstream-pipeline": (f"fxstream Policy(slices={SLICES}, pipeline=2)",
                          lambda b: _fx(b, fxstream.Policy(slices=SLICES, pipeline=2))),
    "step-rehash": (f"fxstream Step Rehash (full_every={FULL_EVERY})", _rehash),
    "deepcache": ("DeepCache-style cache (StepRehash at the last up block's input)", _deepcache),
}
OURS = {"fxstream-slices", "fxstream-budget", "fxstream-pipeline", "step-rehash", "deepcache"}  # orange in the chart
CHANGES_OUTPUT = {"naive", "step-rehash", "deepcache"}  # by design: hatched in the chart
PEERS = """Methods and peers: diffusers' own memory options (`enable_forward_chunking()`; FreeNoise's split inference),
a naive split of the frames into chunks run through the whole UNet (a different video), torch.compile (Inductor),
fxstream's slicing, budget and pipelining, and two feature caches across denoising steps: Step Rehash (the
Streamlined Inference paper's: a temporal layer's output, `Policy(rehash=StepRehash(...))`) and DeepCache (Ma,
Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024: the up path's high-level
features, only the shallow branch recomputed). The DeepCache row is fxstream's StepRehash set up as DeepCache:
its cache point, the input of the last up block (`cache_point='up_blocks.N-2'`, the rows with
`cache_point='up_blocks.2'`), and its uniform schedule (`full_every=3`); it is not DeepCache's own code.
"""
QUICK_SKIP = {"torch-compile"}  # about 90 s of compile even for the tiny models


# --- running ---

@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise CompileTimeout in the main thread after ``seconds`` (no limit elsewhere, or without SIGALRM)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(*_):
        raise CompileTimeout(f"the first call (compile + run) ran past the limit of {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def describe_error(e: BaseException) -> str:
    """``Type: first line``, and the root cause when another exception wraps it (Dynamo and export do)."""
    def one(x):
        lines = str(x).strip().splitlines()
        return f"{type(x).__name__}: {lines[0] if lines else ''}"[:200]
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return one(e) if root is e else f"{one(e)} (cause: {one(root)})"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def measure(b: Bench, prep: Prepared, row: Row) -> None:
    """First call (timed, bounded), difference to the reference, peak of a second call, then timed repeats."""
    t = time.perf_counter()
    with time_limit(prep.time_limit), torch.no_grad():
        first = prep.fn()
        _sync(b.device)
    row.first_call_s = time.perf_counter() - t
    ref = b.ref_loop() if prep.loop_steps else b.ref()
    row.max_abs_diff = _diff(first, ref)
    if prep.loop_steps:
        row.note += f"; the reference's final latent: max |x| {ref.abs().max().item():.2g}"
    peak_fn = cuda_peak if b.device == "cuda" else allocator_peak if prep.peak_by == "allocator" else measure_peak
    again, row.peak_bytes = peak_fn(prep.fn)
    row.peak_by = "cuda" if b.device == "cuda" else prep.peak_by
    row.rerun_abs_diff = _diff(again, first)
    times = [s / max(1, prep.loop_steps) for s in timings(prep.fn, b.repeats, b.device)]
    row.median_s, row.min_s, row.max_s = statistics.median(times), min(times), max(times)
    if prep.loop_steps:
        row.per = f"step ({prep.loop_steps}-step loop)"
    if prep.planned:
        row.planned_bytes = prep.planned()
    if prep.after:
        row.note += prep.after()


def run_method(b: Bench, key: str, log=print) -> Row:
    label, make = METHODS[key]
    x = b.kw["hidden_states" if b.kind == "transformer" else "sample"]
    row = Row(b.case.name, b.device, key, label, f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}")
    log(f"{b.case.name} ({b.device}): {key}")
    try:
        if b.kind == "transformer" and key not in TRANSFORMER_METHODS:
            raise NotApplicable("a UNet method (its blocks, frames or cache points)")
        prep = make(b)
        row.label, row.note = prep.label or label, prep.note
        if b.kind == "transformer":
            row.label = row.label.replace("UNet", "transformer")
        if b.meta:
            t = time.perf_counter()
            row.planned_bytes = prep.planned()
            row.plan_s = time.perf_counter() - t
            row.note += prep.after() if prep.after else ""
        else:
            measure(b, prep, row)
    except NotApplicable as e:
        row.status, row.note = "n/a", str(e)
    except Exception as e:  # a method that fails is a row of the table, not the end of the benchmark
        row.status, row.note = "error", describe_error(e)
        log(f"{b.case.name} ({b.device}): {key} failed:\n{traceback.format_exc(limit=-3)}")
    finally:
        if key == "torch-compile":
            torch._dynamo.reset()  # drop its compiled code and caches before the next method
        gc.collect()
    return row


def run_case(case: Case, device: str, methods, repeats: int = 3, steps: int = 10, compile_timeout: float = 900,
             log=print) -> list:
    b = Bench(case, device, repeats, steps, compile_timeout)
    if not b.meta:
        b.ref()
    return [run_method(b, m, log) for m in methods]


# --- output ---

def _mib(n):
    return "-" if n is None else f"{n / MiB:.1f}"


def _baseline(rows, r):
    """The exported graph's row of the same model and device (ratios are '-' without one)."""
    return next((x for x in rows if x.model == r.model and x.device == r.device and x.method == "exported"
                 and x.status == "ok"), None)


def _ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _note(r: Row) -> str:
    return r.note if r.status == "ok" else f"{r.status}: {r.note}"


def measured_table(rows) -> str:
    body = []
    for r in rows:
        base = _baseline(rows, r)
        ok = r.status == "ok"
        body.append((r.model, r.label, _mib(r.peak_bytes), r.peak_by or "-", _mib(r.planned_bytes),
                     _ratio(r.peak_bytes, base and base.peak_bytes),
                     f"{r.median_s:.3f}" if ok else "-", f"{r.min_s:.3f}-{r.max_s:.3f}" if ok else "-",
                     r.per if ok else "-", _ratio(r.median_s, base and base.median_s),
                     f"{r.max_abs_diff:.1e}" if ok else "-", f"{r.first_call_s:.1f}" if ok else "-", _note(r)))
    return tabulate(body, headers=["model", "method", "peak MiB", "measured by", "planned MiB", "peak vs exported",
                                   "median s", "min-max s", "latency per", "latency vs exported", "max |diff|",
                                   "first call s", "note"])


def planned_table(rows) -> str:
    body = []
    for r in rows:
        base = _baseline(rows, r)
        body.append((r.model, r.label, "-" if r.planned_bytes is None else f"{r.planned_bytes / GiB:.2f}",
                     _ratio(r.planned_bytes, base and base.planned_bytes),
                     "-" if r.plan_s is None else f"{r.plan_s:.0f}", _note(r)))
    return tabulate(body, headers=["model", "method", "planned GiB", "vs exported", "plan s", "note"])


def draw_chart(rows, path: Path) -> Path:
    """Bars per method: measured peak and median latency per real-run model, planned peak per full-size model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = [("peak MiB (measured)", lambda r: r.device != "meta", lambda r: r.peak_bytes and r.peak_bytes / MiB),
              ("median latency s", lambda r: r.device != "meta", lambda r: r.median_s),
              ("planned GiB (full size, meta)", lambda r: r.device == "meta",
               lambda r: r.planned_bytes and r.planned_bytes / GiB)]
    panels = [p for p in panels if any(p[1](r) for r in rows)]
    groups = list(dict.fromkeys((r.model, r.device) for r in rows))
    cols = {p[0]: [g for g in groups if any(p[1](r) for r in rows if (r.model, r.device) == g)] for p in panels}
    ncols = max(len(v) for v in cols.values())
    fig, axes = plt.subplots(len(panels), ncols, figsize=(5.5 * ncols, 0.35 * len(METHODS) * len(panels) + 1.5),
                             squeeze=False)
    for i, (title, keep, value) in enumerate(panels):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(cols[title]):
                ax.axis("off")
                continue
            model, device = cols[title][j]
            sel = [r for r in rows if (r.model, r.device) == (model, device)]
            vals = [value(r) if r.status == "ok" else None for r in sel]
            bars = ax.barh(range(len(sel)), [v or 0 for v in vals],
                           color=["tab:orange" if r.method in OURS else "tab:blue" for r in sel])
            for bar, r in zip(bars, sel):
                if r.method in CHANGES_OUTPUT or (r.max_abs_diff or 0) > 1e-3:
                    bar.set_hatch("//")
            for k, (r, v) in enumerate(zip(sel, vals)):
                if v is None:
                    ax.text(0, k, f" {r.status}", va="center", fontsize=7, color="gray")
            ax.set_yticks(range(len(sel)), [r.method + ("" if r.per == "call" else " (per step)") for r in sel],
                          fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{model} ({device}): {title}", fontsize=9)
    fig.legend(handles=[Patch(color="tab:blue", label="diffusers / torch / baselines"),
                        Patch(color="tab:orange", label="fxstream"),
                        Patch(facecolor="white", edgecolor="black", hatch="//", label="changes the output")],
               loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section(rows, cmd: str, notes, chart: str = "img/bench-compare.png", title: str = "") -> str:
    inputs = "".join(f"- {m} ({d}): sample {x}\n" for m, d, x in dict.fromkeys((r.model, r.device, r.sample)
                                                                                for r in rows))
    doc = f"## Side by side: what users would use instead{title}\n\n" + provenance(cmd) + (
        "One process, the same inputs for every method; random weights; batch 2 (classifier-free guidance).\n"
        "Rows on the meta device are full-size models planned by fxstream.memory.plan_memory, nothing run.\n\n"
        f"{inputs}\n"
        "Peak: activations (weights and inputs excluded), measured by\n"
        "fxstream.memory.MemoryTracker ('tracker'), by the CPU allocator's total in torch.profiler for torch.compile\n"
        "('allocator': Inductor's code allocates outside ATen ops; on svd-tiny the two agree to the byte for the\n"
        "eager, exported and sliced forwards), or by\n"
        "torch.cuda.max_memory_allocated. Planned: fxstream's plan; for a diffusers method the plan of its exported\n"
        "graph. Latency: median (min-max) of the repeated runs after a warm-up call; Step Rehash rows: the mean per\n"
        "step over a whole DDIM loop, their difference the loop's final latent against the same loop with the\n"
        "original UNet. Max |diff|: against the original UNet. First call: compile + one run. Ratios: against the\n"
        "exported graph of the same model.\n\n" + PEERS + "\n")
    for device, title in (("cpu", "CPU, measured"), ("cuda", "CUDA, measured")):
        sel = [r for r in rows if r.device == device]
        if sel:
            doc += f"### {title}\n\n```\n{measured_table(sel)}\n```\n\n"
    sel = [r for r in rows if r.device == "meta"]
    if sel:
        doc += f"### Full size, planned\n\n```\n{planned_table(sel)}\n```\n\n"
    doc += f"![memory and latency per method]({chart})\n\n"
    return doc + "".join(f"- {n}\n" for n in notes)


def notes_for(rows, cases) -> list:
    out = [c.note for c in cases if c.note]
    for r in rows:
        if r.status == "ok" and r.rerun_abs_diff and r.per != "call":
            out.append(f"{r.model} {r.method}: two loops in a row differ by {r.rerun_abs_diff:.1e} "
                       "(state kept from one denoising loop to the next)")
    return out


# --- command line ---

def _count(lo: int):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    return parse


def _seconds(text):
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def _settings(args) -> dict:
    """What makes rows comparable: a partial file made with other settings is not reused."""
    return {"methods": list(args.methods), "repeats": args.repeats, "steps": args.steps,
            "compile_timeout": args.compile_timeout, "environment": environment()}


def load_partial(args) -> dict:
    """{"case/device": [Row]} from ``--partial`` when it was written with the same settings, else {}."""
    if args.partial is None or not args.partial.exists():
        return {}
    blob = json.loads(args.partial.read_text())
    if blob.get("settings") != json.loads(json.dumps(_settings(args))):
        print(f"{args.partial}: written with other settings, not reused", file=sys.stderr)
        return {}
    return {k: [Row(**r) for r in rows] for k, rows in blob["cases"].items()}


def save_partial(args, done: dict) -> None:
    if args.partial is None:
        return
    blob = {"settings": _settings(args), "cases": {k: [asdict(r) for r in rows] for k, rows in done.items()}}
    args.partial.write_text(json.dumps(blob, indent=1))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python tools/bench_compare.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(CASES), metavar="MODEL",
                    help=f"cases to run (default: {' '.join(DEFAULT_MODELS)}; with --quick: "
                         f"{' '.join(QUICK_MODELS)}); one of: {', '.join(CASES)}")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                    help=f"methods (default: all; --quick leaves out {', '.join(QUICK_SKIP)}); "
                         f"one of: {', '.join(METHODS)}")
    ap.add_argument("--repeats", type=_count(1), help="timed runs per method after the warm-up (default 3; --quick: 1)")
    ap.add_argument("--steps", type=_count(2), default=10,
                    help="denoising steps of the Step Rehash loops (default 10)")
    ap.add_argument("--compile-timeout", type=_seconds, default=900.0,
                    help="seconds torch.compile's first call may take (default 900)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 repeat, no torch.compile: a smoke test")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA runs even where CUDA is available")
    ap.add_argument("--no-write", action="store_true", help="print only: write no docs, JSON or chart")
    ap.add_argument("--partial", type=Path, metavar="FILE",
                    help="keep each finished case's rows in FILE (JSON) and, run again with the same settings, skip "
                         "the cases already there: a long run can be stopped and resumed")
    ap.add_argument("--section", default="compare", metavar="NAME",
                    help="the section of benchmarks.md (and key of benchmarks.json) written, its chart "
                         "img/bench-NAME.png (default: compare; another name leaves the main table as it is: a "
                         "model measured apart, e.g. --models cogvideox-mid --section compare-transformer)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs",
                    help="folder of benchmarks.md / benchmarks.json (section 'compare') and img/bench-compare.png "
                         "(default: docs/)")
    args = ap.parse_args(argv)
    args.models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    args.methods = args.methods or [m for m in METHODS if not (args.quick and m in QUICK_SKIP)]
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cases = [CASES[m] for m in args.models]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.no_cuda else [])
    done = load_partial(args)
    rows = []
    runs = [(case, device) for device in devices for case in cases if not case.meta] + \
        [(case, "meta") for case in cases if case.meta]
    for case, device in runs:
        key = f"{case.name}/{device}"
        if key in done:
            log(f"{key}: rows from {args.partial}")
            rows += done[key]
            continue
        got = run_case(case, device, args.methods, args.repeats, args.steps, args.compile_timeout, log)
        rows += got
        done[key] = got
        save_partial(args, done)
    notes = notes_for(rows, cases)
    for device, show in (("cpu", measured_table), ("cuda", measured_table), ("meta", planned_table)):
        sel = [r for r in rows if r.device == device]
        if sel:
            print(f"\n{device}:\n{show(sel)}")
    for n in notes:
        print(f"- {n}")
    if args.no_write:
        return 0
    chart = draw_chart(rows, args.out / "img" / f"bench-{args.section}.png")
    cmd = "python tools/bench_compare.py " + " ".join(argv)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "section")}
    data = {"environment": environment(), "settings": settings,
            "rows": [asdict(r) for r in rows]}
    title = "" if args.section == "compare" else f" ({', '.join(args.models)})"
    write_section(args.out, args.section, section(rows, cmd, notes, f"img/bench-{args.section}.png", title), data)
    print(f"wrote {args.out / 'benchmarks.md'} (section: {args.section}), {args.out / 'benchmarks.json'}, {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
