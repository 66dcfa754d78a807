"""The runtime of a loop-tiled region: run a body GraphModule once per slice.

Sliced inputs reach the body as views of the full tensors (``narrow``; a cut with ``outer > 1`` is a strided view
that the body reshapes). Cut outputs are written into full-size buffers allocated once, or into the buffer of an
input that dies at the region (``reuse``: slice ``i`` of the output occupies exactly the bytes slice ``i`` of the
input did, so each slice overwrites only what it has read); partial outputs (sums over the axis) are accumulated.
No full-size intermediate of the body ever exists.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .analysis.cuts import PARTIAL, Cut

__all__ = ["LoopRegion", "slice_view", "body_input", "contiguous_strides", "buffer_layout"]


def slice_view(x: torch.Tensor, cut: Cut, start: int, n: int, length: int) -> torch.Tensor:
    """The view of ``x`` holding elements ``[start, start+n)`` of the axis that ``cut`` locates in ``x``."""
    if cut.outer == 1:
        return x.narrow(cut.dim, start * cut.inner, n * cut.inner)
    x = x.unflatten(cut.dim, (cut.outer, length * cut.inner))
    return x.narrow(cut.dim + 1, start * cut.inner, n * cut.inner)


def body_input(x: torch.Tensor, cut: Cut, start: int, n: int, length: int) -> torch.Tensor:
    """The slice as an op inside a body sees it: the slice view, with ``outer > 1`` merged back into one dim."""
    v = slice_view(x, cut, start, n, length)
    return v if cut.outer == 1 else v.flatten(cut.dim, cut.dim + 1)


def contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(list(shape)):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def buffer_layout(val: torch.Tensor) -> tuple:
    """(shape, strides, dtype) of the buffer a region allocates for a value: the value's own strides when they
    are dense (the layout eager mode gives it, so later views stay valid), else contiguous."""
    shape = tuple(int(s) for s in val.shape)
    stride = tuple(int(s) for s in val.stride())
    dims = sorted((st, sz) for sz, st in zip(shape, stride) if sz != 1)
    expect, dense = 1, True
    for st, sz in dims:  # innermost first: each stride is the product of the sizes inside it
        dense = dense and st == expect
        expect *= sz
    return shape, stride if dense else contiguous_strides(shape), val.dtype


class LoopRegion(torch.nn.Module):
    """A region sliced along one axis of ``length`` elements, as ``bounds`` (start, size) pairs.

    ``bodies[str(size)]`` is the region's GraphModule for a slice of ``size`` elements. ``in_cuts[i]`` says how
    argument ``i`` is sliced (None: passed whole); ``out_cuts[j]`` how output ``j`` is assembled; ``reuse[j]``
    is the index of the argument whose storage output ``j`` takes over (None: a buffer of its own).
    """

    def __init__(self, bodies: dict, length: int, bounds, in_cuts, out_cuts, out_meta, axis: str = ""):
        super().__init__()
        self.bodies = torch.nn.ModuleDict({str(k): v for k, v in bodies.items()})
        self.length = length
        self.bounds = list(bounds)
        self.in_cuts = list(in_cuts)
        self.out_cuts = list(out_cuts)
        self.out_meta = list(out_meta)  # (shape, strides, dtype) of each full output (see buffer_layout)
        self.reuse = [None] * len(self.out_cuts)
        self.axis = axis

    def extra_repr(self) -> str:
        return f"axis={self.axis}, length={self.length}, slices={len(self.bounds)}"

    def _out_buffers(self, args, device) -> list:
        outs = []
        for c, (shape, stride, dtype), i in zip(self.out_cuts, self.out_meta, self.reuse):
            if not isinstance(c, Cut):
                outs.append(None)
            elif i is None:
                outs.append(torch.empty_strided(shape, stride, dtype=dtype, device=device))
            else:
                outs.append(args[i].as_strided(shape, stride, 0))
        return outs

    def forward(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        outs = self._out_buffers(args, tensors[0].device)
        if any(is_fake(a) for a in tensors):
            # fake-tensor propagation of the enclosing graph: the outputs' shapes and storages, without the loop
            return tuple(torch.empty_strided(shape, stride, dtype=dtype, device=tensors[0].device) if o is None else o
                         for o, (shape, stride, dtype) in zip(outs, self.out_meta))
        for start, n in self.bounds:
            body_args = [a if c is None else slice_view(a, c, start, n, self.length)
                         for a, c in zip(args, self.in_cuts)]
            results = self.bodies[str(n)](*body_args)
            for j, (r, c) in enumerate(zip(results, self.out_cuts)):
                if c is PARTIAL:
                    outs[j] = r if outs[j] is None else outs[j].add_(r)
                    continue
                dst = slice_view(outs[j], c, start, n, self.length)
                if c.outer > 1:
                    r = r.unflatten(c.dim, (c.outer, n * c.inner))
                dst.copy_(r)
            # drop this slice's results before the next body runs: holding them would add a slice to the peak
            del results, r, body_args
        return tuple(outs)
