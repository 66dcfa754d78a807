"""The runtime of a loop-tiled region: run a body GraphModule once per slice.

Sliced inputs reach the body as views of the full tensors (``narrow``; a cut with ``outer > 1`` is a strided view
that the body reshapes). Cut outputs are written into full-size buffers allocated once; partial outputs (sums over
the axis) are accumulated. No full-size intermediate of the body ever exists.
"""
from __future__ import annotations

import torch

from .analysis.cuts import PARTIAL, Cut

__all__ = ["LoopRegion", "slice_view", "body_input"]


def slice_view(x: torch.Tensor, cut: Cut, start: int, n: int, length: int) -> torch.Tensor:
    """The view of ``x`` holding elements ``[start, start+n)`` of the axis that ``cut`` locates in ``x``."""
    if cut.outer == 1:
        return x.narrow(cut.dim, start * cut.inner, n * cut.inner)
    x = x.unflatten(cut.dim, (cut.outer, length * cut.inner))
    return x.narrow(cut.dim + 1, start * cut.inner, n * cut.inner)


def body_input(x: torch.Tensor, cut: Cut, start: int, n: int, length: int) -> torch.Tensor:
    """What a body receives for a sliced input: the slice view, with ``outer > 1`` merged back into one dim."""
    v = slice_view(x, cut, start, n, length)
    return v if cut.outer == 1 else v.flatten(cut.dim, cut.dim + 1)


class LoopRegion(torch.nn.Module):
    """A region sliced along one axis of ``length`` elements, as ``bounds`` (start, size) pairs.

    ``bodies[str(size)]`` is the region's GraphModule for a slice of ``size`` elements. ``in_cuts[i]`` says how
    argument ``i`` is sliced (None: passed whole); ``out_cuts[j]`` how output ``j`` is assembled.
    """

    def __init__(self, bodies: dict, length: int, bounds, in_cuts, out_cuts, out_meta, axis: str = ""):
        super().__init__()
        self.bodies = torch.nn.ModuleDict({str(k): v for k, v in bodies.items()})
        self.length = length
        self.bounds = list(bounds)
        self.in_cuts = list(in_cuts)
        self.out_cuts = list(out_cuts)
        self.out_meta = list(out_meta)  # (shape, dtype) of each full output
        self.axis = axis

    def extra_repr(self) -> str:
        return f"axis={self.axis}, length={self.length}, slices={len(self.bounds)}"

    def forward(self, *args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        outs = [torch.empty(shape, dtype=dtype, device=device) if isinstance(c, Cut) else None
                for c, (shape, dtype) in zip(self.out_cuts, self.out_meta)]
        for start, n in self.bounds:
            body_args = [a if c is None else body_input(a, c, start, n, self.length)
                         for a, c in zip(args, self.in_cuts)]
            results = self.bodies[str(n)](*body_args)
            for j, (r, c) in enumerate(zip(results, self.out_cuts)):
                if c is PARTIAL:
                    outs[j] = r if outs[j] is None else outs[j].add_(r)
                else:
                    dst = slice_view(outs[j], c, start, n, self.length)
                    dst.copy_(r if c.outer == 1 else r.unflatten(c.dim, (c.outer, n * c.inner)))
        return tuple(outs)
