"""Memory: a static liveness planner over ``meta["val"]`` and a measuring tracker of live storages.

Planner: walk the graph in order; a node's output costs its storage's bytes unless it aliases a storage that is
already live (views, ``to`` without a change); a storage is freed after the last use of every value holding it.
Placeholders (inputs and weights) are held by the caller and cost nothing; graph outputs stay. A loop region
costs its full-size outputs plus the planned peak of its body for the largest slice.

Tracker: a TorchDispatchMode that records every storage an op creates and counts it freed once its
``StorageWeakRef`` expires. It measures the real peak of running any module on the CPU.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["planned_peak", "MemoryTracker", "measure_peak"]


def _storages(val):
    for t in tree_leaves(val):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            yield StorageWeakRef(st), st.nbytes()


def planned_peak(gm: GraphModule) -> tuple[int, str]:
    """Planned peak bytes of running ``gm`` (activations only) and the name of the node where it happens."""
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, n in enumerate(nodes):
        for p in n.all_input_nodes:
            last_use[p] = i
    held_by_caller = set()
    owner_count: dict = {}  # storage -> number of live values holding it
    size: dict = {}
    values: dict = {}
    live = peak = 0
    peak_at = ""

    def release(node):
        nonlocal live
        for s in values.get(node, []):
            if s in owner_count:
                owner_count[s] -= 1
                if owner_count[s] == 0:
                    live -= size[s]

    for i, n in enumerate(nodes):
        sts = list(_storages(n.meta.get("val")))
        extra = 0
        if n.op == "placeholder":
            held_by_caller.update(s for s, _ in sts)
        elif n.op == "call_module":
            sub = gm.get_submodule(n.target)
            extra = max((planned_peak(b)[0] for b in getattr(sub, "bodies", {}).values()), default=0)
        values[n] = [s for s, _ in sts]
        for s, b in sts:
            if s in held_by_caller:
                continue
            if owner_count.get(s, 0) == 0:
                live += b
                size[s] = b
            owner_count[s] = owner_count.get(s, 0) + 1
        if live + extra > peak:
            peak, peak_at = live + extra, n.name
        if n.op == "output":
            break
        for p in set(n.all_input_nodes):  # graph outputs stay live
            if last_use.get(p) == i and nodes[-1] not in p.users:
                release(p)
        if not n.users:
            release(n)
    return peak, peak_at


class MemoryTracker(TorchDispatchMode):
    """Peak bytes of storages created while active (inputs and weights made before are not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.external: set = set()
        self.current = 0
        self.peak = 0

    def _sweep(self):
        dead = [k for k in self.live if k.expired()]
        for k in dead:
            self.current -= self.live.pop(k)
        self.external = {k for k in self.external if not k.expired()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.live:
                    self.external.add(ref)
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                if ref not in self.live and ref not in self.external:
                    self.live[ref] = st.nbytes()
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure_peak(fn, *args, **kwargs):
    """Run ``fn`` under a :class:`MemoryTracker`; return (result, peak bytes)."""
    with torch.no_grad(), MemoryTracker() as tracker:
        out = fn(*args, **kwargs)
    return out, tracker.peak
