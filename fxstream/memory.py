"""Memory: a static liveness planner over ``meta["val"]`` and a measuring tracker of live storages.

Planner: walk the graph in order; a node's output costs its storage's bytes unless it aliases a storage that is
already live (views, ``to`` without a change); a storage is freed after the last use of every value holding it.
Placeholders (inputs and weights) are held by the caller and cost nothing; graph outputs stay. A loop region
costs its full-size outputs plus the planned peak of its body for the largest slice, times the slices it keeps
in flight (``Policy(pipeline=k)``: each slice in flight holds a working set of its own).

Tracker: a TorchDispatchMode that records every storage an op creates and counts it freed once its
``StorageWeakRef`` expires. It measures the real peak of running any module on the CPU. Storages made inside
:func:`host_storage` (a halo region's values parked in host memory, NOTE [Host checkpoints]) are counted apart
(``host_peak``): on a CPU the host is the same memory, but the plan counts them apart from the device's.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .region_loop import RegionLoop

__all__ = ["plan_memory", "MemoryPlan", "TimelinePoint", "planned_peak", "weight_bytes", "MemoryTracker", "measure_peak",
           "host_storage"]

_HOST = threading.local()


@contextlib.contextmanager
def host_storage():
    """Storages made in this block (on this thread) are host memory: a :class:`MemoryTracker` counts them in
    ``host_peak``, not ``peak``."""
    before = getattr(_HOST, "on", False)
    _HOST.on = True
    try:
        yield
    finally:
        _HOST.on = before


def _storages(val):
    for t in tree_leaves(val):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            yield StorageWeakRef(st), st.nbytes()


@dataclass(frozen=True)
class TimelinePoint:
    """Planned bytes live at one node of a graph (activations only; inputs and weights are the caller's)."""

    node: str
    module: str  # module path of the node ("" for the top level)
    live_bytes: int  # live after the node ran
    peak_bytes: int  # the most live while it ran (a region: its outputs plus the slices' working set)


@dataclass
class MemoryPlan:
    """The static plan of one graph: its peak, where it happens, and the bytes live after every node."""

    peak_bytes: int
    peak_node: str
    peak_module: str
    timeline: list = field(default_factory=list)  # [TimelinePoint], in execution order
    region_peaks: dict = field(default_factory=dict)  # region node name -> bytes live at its own peak
    region_working_bytes: dict = field(default_factory=dict)  # region node name -> working set of its slices


# Ops that make a whole contiguous copy of an argument inside the kernel when it is not contiguous (argument
# index): the copy is live while the op runs, never a graph value. On the CPU, GroupNorm takes an input
# contiguous in channels-last order as it is (ATen's group_norm makes it contiguous in its suggested memory
# format there, plain contiguous elsewhere; measured: no copy on the CPU).
_COPIES_STRIDED_ARG = {
    torch.ops.aten.group_norm.default: 0,
    torch.ops.aten.native_group_norm.default: 0,
}


def _transient_bytes(n) -> int:
    """Bytes an op holds only while it runs (see ``_COPIES_STRIDED_ARG``)."""
    i = _COPIES_STRIDED_ARG.get(n.target) if n.op == "call_function" else None
    if i is None or i >= len(n.args) or not hasattr(n.args[i], "meta"):
        return 0
    val = n.args[i].meta.get("val")
    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return 0
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(val.dim())
    if val.device.type == "cpu" and last is not None and val.is_contiguous(memory_format=last):
        return 0
    return val.numel() * val.element_size()


def _node_module(n) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _body_plans(gm: GraphModule, node, in_flight: int | None, parts=None) -> tuple:
    """Plans of a ``call_module`` node's loop bodies by slice size (none for other modules) and its slices in
    flight."""
    loop = gm.get_submodule(node.target)
    if not isinstance(loop, RegionLoop) or not loop.bodies:
        return {}, 1
    bodies = loop.bodies
    k = 1 if loop.holds_loops else loop.in_flight if in_flight is None else max(1, min(in_flight, len(loop.bounds)))
    return {key: plan_memory(b, in_flight, parts) for key, b in bodies.items()}, k


def _working_bytes(module) -> int:
    """What a region's module holds on top of its outputs beyond its bodies' plans (NOTE [One region model]); 0
    for any other module."""
    return module.working_bytes if isinstance(module, RegionLoop) else 0


def _working_set(loop, plans: dict, k: int, partial_bytes: int) -> int:
    """Bytes a region holds on top of its cut outputs while it runs, its partial sums included.

    NOTE [Partial sums]: the runtime keeps the first slice's sum as the accumulator (made at the end of that
    slice) and adds the others into it. One slice at a time, the first slice's body runs without it and every
    later one with it: max(peak of the first, sums + peak of the largest later one). With k in flight the plan
    stays an upper bound: the sums and k working sets of the largest slice."""
    largest = max(p.peak_bytes for p in plans.values())
    if k > 1 or not partial_bytes:
        return partial_bytes + k * largest
    sizes = [str(n) for _, n in loop.bounds]
    later = max((plans[s].peak_bytes for s in sizes[1:]), default=0)
    return max(plans[sizes[0]].peak_bytes, partial_bytes + later if later else 0)


def plan_memory(gm: GraphModule, in_flight: int | None = None, parts=None) -> MemoryPlan:
    """Walk ``gm`` in order with liveness per storage (``meta["val"]``) and return its :class:`MemoryPlan`.

    A node's output costs its storage's bytes unless the storage is already live (views, aliases, in-place
    results); a storage is freed after the last use of every value holding it; placeholders are the caller's;
    graph outputs stay. A loop region costs its full-size outputs plus its body's peak times the slices it keeps
    in flight (its own ``in_flight``; the argument overrides it for every region whose body holds no regions).
    A region whose body holds regions of its own (a batch split) is expanded in the timeline, and a peak inside
    it is named ``outer/inner``.

    ``parts``: what one rank holds under ``Policy(distributed=...)`` where that is not the whole values of
    ``meta["val"]`` (``fxstream.distributed.RankParts``: ``storages(node)``, a node's (storage key, bytes) or None
    for its values' own; ``working(node, bytes, made)``, a region's working set on this rank, given the bytes of
    its outputs counted live at it that it allocates itself).
    """
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, n in enumerate(nodes):
        for p in n.all_input_nodes:
            last_use[p] = i
    held_by_caller = set()
    owner_count: dict = {}  # storage -> number of live values holding it
    size: dict = {}
    values: dict = {}
    live = 0
    plan = MemoryPlan(0, "", "")

    def release(node):
        nonlocal live
        for s in values.get(node, []):
            if s in owner_count:
                owner_count[s] -= 1
                if owner_count[s] == 0:
                    live -= size[s]

    for i, n in enumerate(nodes):
        sts = parts.storages(n) if parts is not None else None
        sts = list(_storages(n.meta.get("val"))) if sts is None else sts
        body, k, plans, partial = None, 1, {}, 0
        if n.op == "placeholder":
            held_by_caller.update(s for s, _ in sts)
        elif n.op == "call_module":
            plans, k = _body_plans(gm, n, in_flight, parts)
            body = max(plans.values(), key=lambda b: b.peak_bytes, default=None)
        values[n] = [s for s, _ in sts]
        if plans:  # partial sums (see NOTE [Partial sums]) are part of the working set, not made up front
            loop = gm.get_submodule(n.target)
            outs = n.meta.get("val")
            partial_sts = {next(_storages(outs[j]))[0] for j in loop.partial}
            partial = sum(b for s, b in sts if s in partial_sts and owner_count.get(s, 0) == 0)
        made = 0  # bytes of storages this node makes (a region's outputs: allocated after its exchanges)
        for s, b in sts:
            if s in held_by_caller:
                continue
            if owner_count.get(s, 0) == 0:
                live += b
                size[s] = b
                made += b
            owner_count[s] = owner_count.get(s, 0) + 1
        extra = _working_set(loop, plans, k, partial) if plans else _transient_bytes(n) if n.op != "call_module" \
            else _working_bytes(gm.get_submodule(n.target))  # a halo region's bands
        if parts is not None and n.op == "call_module":
            extra = parts.working(n, extra, made - partial)
        during = live - partial + extra
        if n.op == "call_module":
            plan.region_peaks[n.name] = during
            plan.region_working_bytes[n.name] = extra
        if during > plan.peak_bytes:
            plan.peak_bytes, plan.peak_node, plan.peak_module = during, n.name, _node_module(n)
            if body is not None and body.region_peaks:  # a graph with regions inside: name the inner peak
                plan.peak_node, plan.peak_module = f"{n.name}/{body.peak_node}", body.peak_module
        if n.op == "output":
            plan.timeline.append(TimelinePoint(n.name, "", live, live))
            break
        if body is not None and body.region_peaks:
            plan.timeline += [TimelinePoint(f"{n.name}/{t.node}", t.module, live + t.live_bytes, live + t.peak_bytes)
                              for t in body.timeline]
        for p in set(n.all_input_nodes):  # graph outputs stay live
            if last_use.get(p) == i and nodes[-1] not in p.users:
                release(p)
        if not n.users:
            release(n)
        if n.op != "placeholder":
            plan.timeline.append(TimelinePoint(n.name, _node_module(n), live, during))
    return plan


def weight_bytes(program) -> int:
    """Bytes of the parameters, buffers and constant tensors an exported program lifts into inputs."""
    from torch.export.graph_signature import InputKind
    placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"]
    seen = {}  # tied weights share one storage
    for spec, node in zip(program.graph_signature.input_specs, placeholders):
        if spec.kind != InputKind.USER_INPUT:
            seen.update(_storages(node.meta.get("val")))
    return sum(seen.values())


def planned_peak(gm: GraphModule) -> tuple[int, str]:
    """Planned peak bytes of running ``gm`` (activations only) and the name of the node where it happens."""
    plan = plan_memory(gm)
    return plan.peak_bytes, plan.peak_node


def release_storage(t: torch.Tensor) -> None:
    """Drop ``t``'s storage now, while references to ``t`` remain (NOTE [An exchange frees its source] in
    ``fxstream.distributed``): ``t`` becomes an empty tensor in place (``set_()``), so every reference to it sees
    no elements, and its bytes are freed with the storage's last tensor (a :class:`MemoryTracker` counts them
    freed then). Only for a value no later node reads."""
    t.set_()


class MemoryTracker(TorchDispatchMode):
    """Peak bytes of storages created while active (inputs and weights made before are not counted).

    Safe to share between threads (a region's CPU workers enter the caller's modes)."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self.live: dict = {}
        self.external: set = set()
        self.current = 0
        self.peak = 0
        self.host: dict = {}  # storages made under host_storage(), counted apart
        self.host_current = 0
        self.host_peak = 0

    def _sweep(self):
        dead = [k for k in self.live if k.expired()]
        for k in dead:
            self.current -= self.live.pop(k)
        for k in [k for k in self.host if k.expired()]:
            self.host_current -= self.host.pop(k)
        self.external = {k for k in self.external if not k.expired()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with self._lock:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref not in self.live and ref not in self.host:
                        self.external.add(ref)
        out = func(*args, **(kwargs or {}))
        with self._lock:
            self._sweep()
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":  # (a meta tensor holds no bytes)
                    st = t.untyped_storage()
                    ref = StorageWeakRef(st)
                    if ref in self.live or ref in self.external or ref in self.host:
                        continue
                    if getattr(_HOST, "on", False):
                        self.host[ref] = st.nbytes()
                        self.host_current += st.nbytes()
                    else:
                        self.live[ref] = st.nbytes()
                        self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
            self.host_peak = max(self.host_peak, self.host_current)
        return out


def measure_peak(fn, *args, **kwargs):
    """Run ``fn`` under a :class:`MemoryTracker`; return (result, peak bytes)."""
    with torch.no_grad(), MemoryTracker() as tracker:
        out = fn(*args, **kwargs)
    return out, tracker.peak
