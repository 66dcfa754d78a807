"""Buffer reuse: a loop region writes an output into the storage of a sliced input that dies at the region.

A region boundary costs two full-size tensors while the region runs: the input it reads and the output it
writes. When the input's storage has no use after the region (no later reader, no alias, not the caller's, not
a graph output), no body returns a view of it, and slice ``i`` of the output occupies exactly the bytes slice
``i`` of the input occupies (checked on the fake tensors' layouts, slice by slice, as canonical strided
layouts), the output takes the input's storage over: each slice overwrites only bytes it has already read, and
slices are disjoint, so the result is the same. The boundary then costs one tensor. ``LoopRegion.reuse``
records the choice; the values of those regions' outputs, and of what depends on them, are computed again
(``graph_utils.refresh_values``) so the planner sees the shared storage.
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from fxstream.analysis.cuts import Cut
from fxstream.graph_utils import fake_mode_of, refresh_values, storage_refs
from fxstream.runtime import LoopRegion, slice_view

__all__ = ["reuse_region_buffers", "canonical_layout"]


def canonical_layout(t: torch.Tensor) -> tuple:
    """(storage offset, ((size, stride), ...)) with size-1 dims dropped, dims ordered by stride and mergeable
    dims merged: two non-overlapping views of one storage cover the same bytes in the same order iff equal."""
    return _canonical(t.shape, t.stride(), t.storage_offset())


def _canonical(shape, stride, offset) -> tuple:
    dims = sorted(((int(s), int(st)) for s, st in zip(shape, stride) if s != 1), key=lambda d: -d[1])
    merged: list = []
    for size, st in dims:
        if merged and merged[-1][1] == size * st:
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    return int(offset), tuple(merged)


def _slice_layout(shape, stride, offset: int, cut: Cut, start: int, n: int, length: int) -> tuple:
    """(storage offset, ((size, stride), ...)) of ``slice_view(x, cut, start, n, length)`` for ``x`` of this
    layout, computed from the layout (``unflatten`` splits the dim's stride, ``narrow`` moves the offset) rather
    than by making the fake view: :func:`canonical_layout` of it."""
    shape, stride = [int(s) for s in shape], [int(s) for s in stride]
    d = cut.dim
    if cut.outer > 1:
        st = stride[d]
        shape[d:d + 1] = [cut.outer, length * cut.inner]
        stride[d:d + 1] = [st * length * cut.inner, st]
        d += 1
    offset += start * cut.inner * stride[d]
    shape[d] = n * cut.inner
    return _canonical(shape, stride, offset)


def _fits(val: torch.Tensor, in_cut: Cut, layout, out_cut: Cut, loop: LoopRegion, mode) -> bool:
    shape, stride, dtype = layout
    if val.dtype != dtype or val.untyped_storage().nbytes() != math.prod(shape) * val.element_size():
        return False
    vshape, vstride, voffset = tuple(val.shape), tuple(val.stride()), val.storage_offset()
    if not all(type(x) is int for x in (*vshape, *vstride, voffset, *shape, *stride)) or 0 in vshape \
            or 0 in shape:  # symbolic sizes, empty views: ask the fake tensors
        with mode:
            buf = val.as_strided(shape, stride, 0)
            return all(canonical_layout(slice_view(val, in_cut, s, n, loop.length))
                       == canonical_layout(slice_view(buf, out_cut, s, n, loop.length)) for s, n in loop.bounds)
    return all(_slice_layout(vshape, vstride, voffset, in_cut, s, n, loop.length)
               == _slice_layout(shape, stride, 0, out_cut, s, n, loop.length) for s, n in loop.bounds)


def _passed_through(loop: LoopRegion, i: int) -> bool:
    """Whether some body returns a view of its argument ``i``: overwriting that argument's slice would then
    change a result not yet copied out."""
    for body in loop.bodies.values():
        ph = [n for n in body.graph.nodes if n.op == "placeholder"][i]
        mine = set(storage_refs(ph.meta.get("val")))
        out = next(n for n in body.graph.nodes if n.op == "output")
        if any(mine & set(storage_refs(o.meta.get("val"))) for o in out.all_input_nodes):
            return True
    return False


def reuse_region_buffers(gm: GraphModule) -> GraphModule:
    """Let each loop region of ``gm`` write outputs into dying inputs' storages where that is safe, in place."""
    mode = fake_mode_of(gm)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last: dict = {}  # storage -> index of the last node that uses a value holding it
    for n in nodes:
        end = max((index[u] for u in n.users), default=index[n])
        for s in storage_refs(n.meta.get("val")):
            last[s] = max(last.get(s, -1), end)
    pinned = {s for n in nodes if n.op == "placeholder" for s in storage_refs(n.meta.get("val"))}
    pinned |= {s for p in nodes[-1].all_input_nodes for s in storage_refs(p.meta.get("val"))}
    moved: dict = {}  # storage -> the storage it now lives in

    def home(s):
        while s in moved:
            s = moved[s]
        return s

    changed = set()  # the region nodes whose outputs take over an input's storage now
    for n in nodes:
        loop = gm.get_submodule(n.target) if n.op == "call_module" else None
        if not isinstance(loop, LoopRegion):
            continue
        arg_storages = [[home(s) for s in storage_refs(a.meta.get("val"))] if isinstance(a, Node) else []
                        for a in n.args]
        taken = set()
        for j, (out_cut, layout) in enumerate(zip(loop.out_cuts, loop.out_meta)):
            if not isinstance(out_cut, Cut):
                continue
            for i, (a, in_cut) in enumerate(zip(n.args, loop.in_cuts)):
                sts = arg_storages[i]
                if in_cut is None or i in taken or len(sts) != 1:
                    continue
                s = sts[0]
                if s in pinned or last[s] > index[n] or any(s in arg_storages[k] for k in range(len(n.args)) if k != i):
                    continue
                if _passed_through(loop, i) or not _fits(a.meta["val"], in_cut, layout, out_cut, loop, mode):
                    continue
                loop.reuse[j] = i
                taken.add(i)
                fresh = home(storage_refs(n.meta["val"][j])[0])
                moved[fresh] = s
                last[s] = max(last[s], last.get(fresh, index[n]))
                if fresh in pinned:
                    pinned.add(s)
                changed.add(n)
                break
    if changed:
        # those regions' outputs, and what depends on them, as whole-graph propagation would give them
        refresh_values(gm.graph, {}, mode, gm, changed)
    return gm
