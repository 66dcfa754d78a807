"""Step Rehash at run time: one signature's graphs and cached feature, and what one denoising step runs.

The schedules (which steps are full) are :mod:`fxstream.rehash.schedule`; the graphs are cut by
``passes/step_rehash.py``; :class:`fxstream.CompiledModule` counts the steps of a generation and calls
:func:`run_step`.
"""
from __future__ import annotations


import torch

from ..analysis.cost import node_flops
from ..catalog import TIMESTEP_ARG
from ..analysis.slicer import module_path
from ..distributed import gather_parts
from ..errors import FxstreamError
from ..graph_utils import strip_asserts
from ..memory import plan_memory
from ..meta import Marks, set_meta
from ..passes.step_rehash import split_for_rehash
from ..report import RehashInfo
from .schedule import StepRehash, with_cache_point

__all__ = ["RehashState", "Slot", "run_step", "timestep_of"]


class Slot:
    """What one call of each denoising step keeps between steps: the feature of its last full step, the probe then,
    and the rehash steps since."""

    def __init__(self):
        self.cache = None
        self.probe_ref = None
        self.since_full = 0


class RehashState:
    """Step Rehash for one signature: the graphs, and the feature cached by the last full step."""

    def __init__(self, module: torch.nn.Module, gm, rehash: StepRehash):
        self.schedule = with_cache_point(rehash, module)
        self.base = strip_asserts(gm)  # the graph the others are cut from
        self.graphs = split_for_rehash(self.base, self.schedule.cache_point, self.schedule.probe_point)
        _mark(self.graphs.full, self.graphs)
        nodes = {n.name: n for n in gm.graph.nodes}
        self.cache_val = nodes[self.graphs.cache_node].meta["val"]
        probe_val = nodes[self.graphs.probe_node].meta["val"] if self.graphs.probe_node else None
        self.resident_bytes = sum(v.numel() * v.element_size() for v in (self.cache_val, probe_val) if v is not None)
        self.compiled = None  # the rehash graph, compiled (set by fxstream.entry.Entry)
        self.clear()

    def clear(self) -> None:
        self.slots: dict = {}  # call within a step -> its Slot (one per call when a step calls the UNet twice)

    def slot(self, i: int) -> "Slot":
        return self.slots.setdefault(i, Slot())

    @property
    def cache(self):
        """The first call's cached feature (None before its first full step)."""
        return self.slots[0].cache if 0 in self.slots else None

    def info(self, compiled_rehash) -> RehashInfo:
        flops = node_flops(self.base)
        kept = {n.name for n in self.graphs.rehash.graph.nodes if n.op == "call_function"}
        if self.graphs.probe is not None:
            kept |= {n.name for n in self.graphs.probe.graph.nodes if n.op == "call_function"}
        total = sum(flops.values())
        v = self.cache_val
        return RehashInfo(
            schedule=self.schedule.describe(), cache_point=self.schedule.cache_point, cache_node=self.graphs.cache_node,
            cache_shape=tuple(v.shape), cache_bytes=self.resident_bytes, probe=self.schedule.probe_point,
            ops=len(flops), ops_skipped=len(self.graphs.skipped), flops=total,
            flops_rehash=sum(f for name, f in flops.items() if name in kept),
            skipped_modules=_top_modules(self.base, set(self.graphs.skipped)),
            rehash_peak_bytes=plan_memory(compiled_rehash.graph_module).peak_bytes,
        )


def _mark(gm, graphs) -> None:
    """Marks for the drawing (``fxstream.viz``): the cached node, and the ops a rehash step skips."""
    skipped = set(graphs.skipped)
    for n in gm.graph.nodes:
        if n.name == graphs.cache_node:
            set_meta(n, Marks(cache=True, skip=True))
        elif n.name in skipped:
            set_meta(n, Marks(skip=True))


def _top_modules(gm, names: set, depth: int = 2) -> list:
    """The outermost module paths (at most ``depth`` levels deep) all of whose ops are in ``names``."""
    whole: dict = {}  # path prefix -> all its ops in names (graph order kept)
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        parts = module_path(n).split(".")
        for d in range(1, min(depth, len(parts)) + 1):
            p = ".".join(parts[:d])
            whole[p] = whole.get(p, True) and n.name in names
    return [p for p, all_in in whole.items()
            if p and all_in and not (p.rpartition(".")[0] and whole.get(p.rpartition(".")[0]))]


def timestep_of(kwargs: dict) -> float:
    t = kwargs.get(TIMESTEP_ARG)
    if isinstance(t, torch.Tensor) and t.numel() >= 1:
        return float(t.reshape(-1)[0])
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    raise FxstreamError(f"timestep: Step Rehash counts denoising steps by the timestep argument, got {t!r}; pass "
                        "the scheduler's timestep (a number or a tensor) as diffusers pipelines do")


def run_step(entry, module: torch.nn.Module, kwargs: dict, step: int, slot: int = 0, stamp=None, recording=None):
    """Run denoising step ``step`` (0-based, of the current generation) of ``entry``'s signature, as call ``slot``
    of that step (0 unless the step calls the module more than once at one timestep): the full graph (which also
    returns the feature to cache) or the rehash graph on that call's cached feature. Returns the output and
    whether it ran full. ``recording`` (a :class:`~fxstream.rehash.Recording`) keeps each full step's feature of
    the first call."""
    r = entry.rehash
    sched, s = r.schedule, r.slot(slot)
    full = sched.is_full(step) or s.cache is None
    extra = []
    if r.graphs.probe is not None:
        probe = entry.call(r.graphs.probe, module, kwargs, stamp=stamp)[0]
        extra = [probe]
        if not full:
            change = float(torch.linalg.vector_norm((probe - s.probe_ref).double())
                           / torch.linalg.vector_norm(s.probe_ref.double()).clamp_min(1e-30))
            full = change > sched.adaptive or s.since_full >= sched.max_rehash
    if full:
        s.cache = None  # the old feature goes before the full graph runs: it is planned without it
        out = entry.call(entry.compiled.graph_module, module, kwargs, extra, stamp)
        s.cache, s.since_full = out.pop(), 0
        s.probe_ref = extra[0] if extra else None
        if recording is not None and slot == 0:  # the whole feature, where each rank caches its part
            held = getattr(entry, "cache_parts", None)
            recording.add(step, s.cache if held is None else
                          gather_parts(entry.shards, s.cache, held, "the recorded feature's parts"))
    else:
        out = entry.call(r.compiled.graph_module, module, kwargs, extra + [s.cache], stamp)
        s.since_full += 1
    return entry.unflatten(out), full
