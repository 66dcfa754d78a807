"""Cuts: how one tensor is sliced along a region's axis, and the dimension-map algebra of view ops.

A region slices a logical axis of length ``L`` (for example the height of the latent) into slices. In one tensor
that axis sits inside dimension ``dim``, whose size factors as ``outer * L * inner``: in a tensor laid out
``(B*H*W, F, C)`` the height is ``Cut(dim=0, outer=B, inner=W)``. A slice ``[s, s+n)`` of the axis is the set of
indices along ``dim`` whose middle digit lies in ``[s, s+n)``. With ``outer == 1`` that is a plain ``narrow``.

NOTE [View algebra]
Reshapes never move elements of a contiguous row-major tensor, only regroup their flat index. The axis occupies
the digit ``(flat // stride) % L`` of the flat index, with ``stride = inner * prod(shape[dim+1:])``. After any
reshape the same digit must fall inside one dimension ``e`` of the new shape: ``prod(new[e+1:])`` must divide
``stride`` and ``stride * L`` must divide ``prod(new[e:])``. Flatten, unflatten, view, unsqueeze and squeeze all go
through :func:`map_view_cut`; none is a special case.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CantSlice

__all__ = ["Cut", "PARTIAL", "map_view_cut", "cut_size", "slice_bounds"]


@dataclass(frozen=True)
class Cut:
    """The region axis sits in ``dim`` of this tensor, with ``outer`` elements of that dim before it, ``inner``
    after (``size[dim] == outer * L * inner``)."""

    dim: int
    outer: int = 1
    inner: int = 1

    def __post_init__(self):
        if self.dim < 0 or self.outer < 1 or self.inner < 1:
            raise ValueError(f"Cut: dim must be >= 0 and outer, inner >= 1, got {self}")

    def size(self, length: int) -> int:
        """Size of ``dim`` when the axis has ``length`` elements."""
        return self.outer * length * self.inner


class _Partial:
    """Marker cut: the value is a sum over the axis; each slice gives a partial sum, accumulated by addition."""

    def __repr__(self) -> str:
        return "PARTIAL"

    def __reduce__(self):  # one marker, compared with ``is``: copies and pickles give it back
        return "PARTIAL"


PARTIAL = _Partial()


def cut_size(shape, cut: Cut, length: int) -> list[int]:
    """``shape`` with the cut dim resized for an axis of ``length`` elements."""
    out = list(shape)
    out[cut.dim] = cut.size(length)
    return out


def map_view_cut(src_shape, dst_shape, cut: Cut, length: int) -> Cut:
    """The cut of ``dst`` (a reshape of ``src``) holding the same axis digit as ``cut`` holds in ``src``."""
    src_shape, dst_shape = list(src_shape), list(dst_shape)
    if 0 in src_shape or 0 in dst_shape:  # strides of an empty tensor say nothing about where the axis is
        raise CantSlice(f"reshape {src_shape} -> {dst_shape} of an empty tensor")
    if math.prod(src_shape) != math.prod(dst_shape):
        raise CantSlice(f"reshape {src_shape} -> {dst_shape} changes the element count")
    if src_shape[cut.dim] != cut.size(length):
        raise CantSlice(f"dim {cut.dim} of {src_shape} is not {cut.outer}*{length}*{cut.inner}")
    stride = cut.inner * math.prod(src_shape[cut.dim + 1:])
    span = stride * length
    for e in range(len(dst_shape)):
        below = math.prod(dst_shape[e + 1:])
        upto = below * dst_shape[e]
        if stride % below == 0 and upto % span == 0 and dst_shape[e] > 1:
            return Cut(e, upto // span, stride // below)
    raise CantSlice(f"reshape {src_shape} -> {dst_shape} splits the sliced axis across dims")


def slice_bounds(length: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous (start, size) slices covering ``range(length)``, sizes differing by at most one; slice
    ``i`` starts at ``i * length // count``, so the longer slices are spread along the axis and any run of
    ``count / N`` consecutive slices holds ``length / N`` elements give or take one (a rank's run: NOTE [Slices per
    rank] in ``fxstream.distributed``)."""
    if count < 1:
        raise ValueError(f"count: expected >= 1, got {count}")
    count = min(count, length)
    starts = [i * length // count for i in range(count + 1)]
    return [(starts[i], starts[i + 1] - starts[i]) for i in range(count)]
