"""The view algebra: a cut mapped through any reshape selects the same elements."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxstream.analysis.cuts import Cut, map_view_cut, slice_bounds
from fxstream.errors import CantSlice
from fxstream.runtime import slice_view


def test_flatten_of_outer_dims_gives_outer_factor():
    # (B, HW, F, C) -> (B*HW, F, C): height inside HW=(H, W) becomes outer=B, inner=W
    cut = map_view_cut([2, 16 * 8, 4, 3], [2 * 16 * 8, 4, 3], Cut(1, 1, 8), 16)
    assert cut == Cut(0, 2, 8)


def test_split_across_dims_is_refused():
    with pytest.raises(CantSlice):
        map_view_cut([8, 5], [2, 4, 5], Cut(0), 8)  # B*F -> (B, F) with the whole B*F as the axis


@st.composite
def reshapes(draw):
    factors = draw(st.lists(st.integers(1, 4), min_size=2, max_size=5))
    length = draw(st.integers(2, 5))
    pos = draw(st.integers(0, len(factors)))
    flat = factors[:pos] + [length] + factors[pos:]

    def group(xs):
        out, i = [], 0
        while i < len(xs):
            j = draw(st.integers(i + 1, len(xs)))
            out.append(math.prod(xs[i:j]))
            i = j
        return out

    a = group(flat)
    b = group(flat)
    return a, b, flat, pos, length


def _cut_in(shape, flat, pos, length):
    """The cut locating factor ``pos`` of ``flat`` inside ``shape`` (a grouping of ``flat``), or None."""
    try:
        return map_view_cut(flat, shape, Cut(pos), length)
    except CantSlice:
        return None


@given(reshapes(), st.integers(1, 5))
def test_mapped_cut_selects_same_elements(case, count):
    a, b, flat, pos, length = case
    ca, cb = _cut_in(a, flat, pos, length), _cut_in(b, flat, pos, length)
    if ca is None or cb is None:
        return
    assert map_view_cut(a, b, ca, length) == cb
    x = torch.arange(math.prod(flat)).reshape(a)
    for start, n in slice_bounds(length, count):
        va = slice_view(x, ca, start, n, length)
        vb = slice_view(x.reshape(b), cb, start, n, length)
        assert sorted(va.flatten().tolist()) == sorted(vb.flatten().tolist())


@given(st.integers(1, 50), st.integers(1, 60))
def test_slice_bounds_cover_the_axis(length, count):
    b = slice_bounds(length, count)
    assert sum(n for _, n in b) == length
    assert [s for s, _ in b] == [sum(n for _, n in b[:i]) for i in range(len(b))]
    assert max(n for _, n in b) - min(n for _, n in b) <= 1


@given(st.integers(1, 200), st.integers(1, 16), st.integers(1, 8))
def test_slice_bounds_split_evenly_into_runs_of_equal_counts(length, per_rank, ranks):
    """NOTE [Slices per rank]: a compile for N ranks cuts an axis in k * N slices and each rank runs k of them;
    every rank's run then holds length / N elements give or take one (not the first ranks the longer slices)."""
    b = slice_bounds(length, per_rank * ranks)
    if len(b) < per_rank * ranks:
        return  # the axis is shorter than the count: one element per slice
    runs = [sum(n for _, n in b[r * per_rank:(r + 1) * per_rank]) for r in range(ranks)]
    assert max(runs) - min(runs) <= 1, runs
