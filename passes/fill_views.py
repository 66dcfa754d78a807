"""Write a fresh buffer filled through views as the value it ends up holding (a ``cat`` or an interleaving ``stack``).

NOTE [Fresh buffers filled through views]
Code that builds a tensor piece by piece writes into an empty one through strided views; Wan's rotary embedding::

    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos

export keeps ``empty_like``, two ``aten.slice`` views and two ``aten.copy_`` writes. In-place writes pin every value
sharing the written storage (NOTE [In-place writes pin their storage], analysis/effects.py), so the attention that
reads ``out`` could not be sliced at all. When the writes fill the whole buffer, the buffer is a pure function of
the written values, and the pass writes it as one: ``stack([a, b], d + 1).flatten(d, d + 1)`` for the
interleaving above (element ``i*k + j`` of dim ``d`` is element ``i`` of the ``j``-th write), ``cat([a, b], d)`` for
writes into consecutive ranges. Both copy the values unchanged, so the result is bitwise the buffer's, and the
slicer's rules for ``stack``, ``cat`` and ``flatten`` take it from there.

Rewritten only when all of these hold (anything else keeps the writes and their pins):
- the buffer is made by an op that allocates it uninitialised (``empty_like``, ``empty``, ``new_empty``), shares
  its storage with nothing, and is contiguous (the replacement is contiguous: same layout, same kernels after it);
- every use of the buffer before the last write is an ``aten.slice`` of it along one dim, used only by one
  ``aten.copy_`` whose result is unused, writing a value of the view's shape, dtype and device (no broadcast,
  no cast: the copy is exact);
- the slices cover the dim exactly once: consecutive ranges with step 1, or ``k`` writes with step ``k`` starting
  at ``0 .. k-1`` over a dim of ``k`` times their length;
- every other use of the buffer comes after the last write, and nothing else writes in place between the first
  write and the last (the copies move to the last write's place).
Which ops allocate, view and write is keyed by ATen op, never by a module or model name.
"""
from __future__ import annotations

import torch
from torch.fx import Graph, Node

from fxstream.analysis.effects import written_args
from fxstream.graph_utils import copy_meta

aten = torch.ops.aten

__all__ = ["functionalize_fills", "FRESH"]

# ops whose result is a new, uninitialised buffer that nothing else shares
FRESH = frozenset({aten.empty_like.default, aten.empty.memory_format, aten.new_empty.default})
_BIG = 2 ** 62


def _val(n):
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _slice_args(view: Node, ndim: int):
    """(dim, start, end, step) of ``aten.slice.Tensor(base, dim, start, end, step)``, normalised, or None."""
    args = list(view.args) + [None] * (5 - len(view.args))
    dim = args[1] if args[1] is not None else view.kwargs.get("dim", 0)
    start = args[2] if args[2] is not None else view.kwargs.get("start")
    end = args[3] if args[3] is not None else view.kwargs.get("end")
    step = args[4] if args[4] is not None else view.kwargs.get("step", 1)
    if not all(isinstance(x, int) or x is None for x in (dim, start, end, step)):
        return None  # symbolic bounds: leave the writes alone
    return dim % ndim, start, end, step


def _writes(buf: Node, order: dict, nodes: list):
    """The (dim, start, step, source, view, copy) of each write into ``buf`` if they fill it as NOTE [Fresh
    buffers filled through views] requires, and the last write; else None."""
    val = _val(buf)
    if val is None or not val.is_contiguous() or val.dim() == 0:
        return None
    writes, readers = [], []
    for u in buf.users:
        if u.op == "call_function" and u.target is aten.slice.Tensor and u.args[0] is buf and len(u.users) == 1:
            (cp,) = u.users
            if cp.op == "call_function" and cp.target is aten.copy_.default and cp.args[0] is u \
                    and len(cp.args) == 2 and not cp.kwargs and not cp.users:
                writes.append((u, cp))
                continue
        readers.append(u)
    if not writes:
        return None
    first, last = min(order[cp] for _, cp in writes), max(order[cp] for _, cp in writes)
    if any(order[r] < last for r in readers):
        return None
    ours = {cp for _, cp in writes}
    if any(written_args(n) for n in nodes[first:last + 1] if n not in ours):
        return None  # another write meanwhile could change a value before the rewritten copy reads it
    out = []
    for view, cp in writes:
        sl = _slice_args(view, val.dim())
        src, vv = _val(cp.args[1]), _val(view)
        if sl is None or src is None or vv is None or tuple(src.shape) != tuple(vv.shape) or \
                src.dtype != vv.dtype or src.device != vv.device:
            return None
        dim, start, _end, step = sl
        size = val.shape[dim]
        start = 0 if start is None else start + size if start < 0 else start
        out.append((dim, min(start, size), step, cp.args[1], view, cp, vv.shape[dim]))
    dims = {w[0] for w in out}
    if len(dims) != 1:
        return None
    (dim,) = dims
    size, steps = val.shape[dim], {w[2] for w in out}
    if steps == {1}:  # consecutive ranges
        pos = 0
        for w in sorted(out, key=lambda w: w[1]):
            if w[1] != pos or w[6] == 0:
                return None
            pos += w[6]
        return ("cat", dim, sorted(out, key=lambda w: w[1])) if pos == size else None
    k = len(out)
    if steps == {k} and sorted(w[1] for w in out) == list(range(k)) and size % k == 0 \
            and all(w[6] == size // k for w in out):
        return ("interleave", dim, sorted(out, key=lambda w: w[1]))
    return None


def functionalize_fills(graph: Graph) -> int:
    """Rewrite, in place, every fresh buffer that in-place writes fill through views as the value it ends up
    holding (NOTE [Fresh buffers filled through views]); returns how many. New nodes carry the buffer's module
    path; their ``meta["val"]`` is left for the caller's propagation."""
    done = 0
    for buf in [n for n in graph.nodes if n.op == "call_function" and n.target in FRESH]:
        nodes = list(graph.nodes)
        found = _writes(buf, {n: i for i, n in enumerate(nodes)}, nodes)
        if found is None:
            continue
        kind, dim, writes = found
        srcs = [w[3] for w in writes]
        last = max((w[5] for w in writes), key=nodes.index)
        with graph.inserting_after(last):
            if kind == "cat":
                value = graph.call_function(aten.cat.default, (srcs, dim))
                made = [value]
            else:
                stacked = graph.call_function(aten.stack.default, (srcs, dim + 1))
                with graph.inserting_after(stacked):
                    value = graph.call_function(aten.flatten.using_ints, (stacked, dim, dim + 1))
                made = [stacked, value]
        for n in made:
            copy_meta(buf, n)
        buf.replace_all_uses_with(value, delete_user_cb=lambda u: not any(u is w[4] for w in writes))
        for w in writes:
            graph.erase_node(w[5])
            graph.erase_node(w[4])
        graph.erase_node(buf)
        done += 1
    return done
