"""Halo slicing along height (``Policy(halo=N)``): rules, regions, runtime, planner and the public API.

Checked here:

- every convolution rule's ``need`` band on real tensors: the op on the needed input rows (zero rows where the
  band leaves the tensor, no padding along height) is exactly rows ``[lo, hi)`` of the whole op;
- random conv2d/conv3d chains and random chains of 3x3 convs, nearest x2 upsamplings, SiLU, residual adds and
  GroupNorms (4-D, and 5-D through the reshape/permute of diffusers' TemporalResnetBlock), sliced 2-6 ways
  (counts that do not divide the height included), equal the eager module within 1e-5 of the output's scale;
- a reshape that merges height with width stays outside every region, with a reason;
- ``transfers`` (the integer band maps) equal the rules' ``need`` on every range of every region op, ``needs``
  equals a walk of the rules; a planted wrong rule or wrong transfer is caught by that checker;
- the planner's peak (``plan_memory`` of the grouped graph) against ``measure_peak`` of running it;
- ``keep_bytes`` checkpoints: more regions, fewer passes, lower planned compute, same results;
- edge cases: non-power-of-two upsampling, counts larger than the height, bad ``Policy.halo``;
- end to end: ``fxstream.compile``/``explain`` on tiny diffusers VAE decoders.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from torch.export.graph_signature import InputKind

import fxstream
from fxstream.analysis.cost import node_flops
from fxstream.analysis.halo import (HALO_RULES, WHOLE, HaloRule, find_halo_regions, needs, passes, plan_halo,
                                    transfers)
from fxstream.analysis.rules import val_shape
from fxstream.errors import CantSlice
from fxstream.graph_utils import strip_asserts
from fxstream.halo_runtime import HaloLoop
from fxstream.memory import measure_peak, plan_memory
from fxstream.passes.halo_regions import group_halo_regions

aten = torch.ops.aten

# the loaded profile's example count (ci: 25, long: 500; see tests/conftest.py), as in tests/test_properties.py
N = settings.default.max_examples
FEW = settings(max_examples=max(4, N * 3 // 5), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=2 * N, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------------------
# helpers


class Exported:
    """A module run eagerly and exported once; its lifted graph's inputs in order (weights, then the kwargs)."""

    def __init__(self, module: nn.Module, kwargs: dict):
        self.module = module.eval()
        self.kwargs = kwargs
        with torch.no_grad():
            self.expected = module(**kwargs)
            self.program = torch.export.export(module, (), kwargs, strict=False)
        self.gm = strip_asserts(self.program.graph_module)
        flat = iter(pytree.tree_flatten(((), kwargs))[0])
        p = self.program
        self.inputs = [next(flat) if s.kind == InputKind.USER_INPUT else
                       p.state_dict[s.target] if s.target in p.state_dict else p.constants[s.target]
                       for s in p.graph_signature.input_specs]

    def run(self, gm):
        with torch.no_grad():
            return gm(*self.inputs)[0]

    def halo(self, count: int, **kw):
        """(regions, reasons, grouped graph) at ``count`` slices, every region kept (min_fraction 0)."""
        regions, reasons = find_halo_regions(self.gm, count, 0.0, **kw)
        return regions, reasons, group_halo_regions(self.gm, regions)


def assert_matches(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= tol * scale, f"max diff {err:.3g} over scale {scale:.3g}"


def halo_loops(gm) -> list:
    return [m for m in gm.modules() if isinstance(m, HaloLoop)]


def ranges(length: int):
    """Every ``[lo, hi)`` of a short axis; for a long one the slices of a few counts and their neighbours."""
    if length <= 12:
        return [(lo, hi) for lo in range(length) for hi in range(lo + 1, length + 1)]
    out = set()
    for c in (2, 3, 5, 7):
        q = length // c
        out |= {(i * q, min(length, (i + 1) * q + 1)) for i in range(c)}
    return sorted(out | {(0, 1), (length - 1, length), (0, length)})


def check_transfers(region, axis: int = 0) -> int:
    """``transfers(region, axis)`` against the rules' ``need`` on every range of every region op (AssertionError
    on a difference); returns the number of bands compared."""
    tr = transfers(region, axis)
    dims = region.axes[axis]
    assert set(tr) == set(region.nodes)
    compared = 0
    for n in region.nodes:
        d = dims[n]
        rule = HALO_RULES[n.target]
        for p, length, *_ in tr[n]:
            assert length == val_shape(p)[dims[p]], (n.name, p.name, length)
        for lo, hi in ranges(region.length(n, axis)):
            want = {p: r for p, r in rule.need(n, d, lo, hi).items() if r is not WHOLE}
            got = {p: (dims[p], lo * num // den + olo, (hi - 1) * num // den + ohi + 1)
                   for p, _, num, den, olo, ohi in tr[n]}
            assert got == want, f"{n.name} rows [{lo}, {hi}): transfers {got} != need {want}"
            compared += 1
    return compared


def walk_needs(region, targets: dict, axis: int = 0) -> dict:
    """What ``needs`` should return, walked with the rules' ``need`` (clipped, unions of the users' bands)."""
    want = dict(targets)
    for n in reversed(region.nodes):
        band = want.get(n)
        if band is None or band[0] >= band[1]:
            continue
        for p, r in HALO_RULES[n.target].need(n, region.axes[axis][n], *band).items():
            if r is WHOLE:
                continue
            a, b = max(r[1], 0), min(r[2], val_shape(p)[r[0]])
            if a < b:
                old = want.get(p)
                want[p] = (a, b) if old is None or old[0] >= old[1] else (min(old[0], a), max(old[1], b))
    return want


def nonempty(d: dict) -> dict:
    return {k: v for k, v in d.items() if v[0] < v[1]}


# ---------------------------------------------------------------------------------------------------------------
# 1. convolution rules against the unsliced op


@st.composite
def conv_geometry(draw, sane: bool = True):
    """(kernel, stride, padding, dilation, groups, height): an output of at least one row. ``sane``: no output
    row lies wholly in the zero padding (padding <= dilation*(kernel-1), as in real models; see
    ``test_output_rows_wholly_in_the_padding``)."""
    k = draw(st.integers(1, 5), label="kernel")
    s = draw(st.integers(1, 3), label="stride")
    dil = draw(st.integers(1, 2), label="dilation")
    p = draw(st.integers(0, min(3, dil * (k - 1)) if sane else 3), label="padding")
    g = draw(st.sampled_from([1, 2]), label="groups")
    span = dil * (k - 1) + 1
    h_min = max(2, span - 2 * p)  # an input dim of 1 is no axis (analysis/axes.py): nothing to slice
    h = draw(st.integers(h_min, h_min + 10), label="height")
    return k, s, p, dil, g, h


def out_len(h, k, s, p, dil):
    return (h + 2 * p - dil * (k - 1) - 1) // s + 1


class ConvChain(nn.Module):
    """conv a (drawn) -> SiLU -> conv b (drawn): a region with an interior value, convs at both ends."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


def conv2d_of(geo, c=4):
    k, s, p, dil, g, _ = geo
    return nn.Conv2d(c, c, (k, 3), stride=(s, 1), padding=(p, 1), dilation=(dil, 1), groups=g)


def conv3d_of(geo, kt, c=4):
    k, s, p, dil, g, _ = geo
    return nn.Conv3d(c, c, (kt, k, 3), stride=(1, s, 1), padding=(kt // 2, p, 1), dilation=(1, dil, 1), groups=g)


def check_need_band(conv: nn.Module, x: torch.Tensor, node, height_dim: int) -> int:
    """The rule's band for every output range: the conv on those input rows (zeros outside the tensor, padding
    0 along height) is exactly those output rows of the whole conv."""
    full = conv(x)
    length = full.shape[height_dim]
    h = x.shape[height_dim]
    pad = list(conv.padding)
    pad[height_dim - 2] = 0
    fn = F.conv2d if x.dim() == 4 else F.conv3d
    checked = 0
    for lo, hi in ranges(length):
        req = HALO_RULES[node.target].need(node, height_dim, lo, hi)
        assert req[node.args[1]] is WHOLE and (node.args[2] is None or req[node.args[2]] is WHOLE)
        d, a, b = req[node.args[0]]
        assert d == height_dim
        margin = max(0, -a, b - h)  # zero rows on both sides, then the band (it may lie wholly outside)
        band = F.pad(x, [0, 0] * (x.dim() - 1 - d) + [margin, margin]).narrow(d, a + margin, b - a)
        part = fn(band, conv.weight, conv.bias, conv.stride, pad, conv.dilation, conv.groups)
        want = full.narrow(d, lo, hi - lo)
        assert part.shape == want.shape, (lo, hi, (a, b), part.shape, want.shape)
        assert torch.allclose(part, want, rtol=1e-5, atol=1e-5), (lo, hi, (a, b))
        checked += 1
    return checked


def conv_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (aten.conv2d.default,
                                                                                    aten.conv3d.default)]


def run_chain_and_check(e: Exported, count: int):
    regions, reasons, grouped = e.halo(count)
    assert len(regions) == 1, reasons
    assert {n.name for n in conv_nodes(e.gm)} <= {n.name for n in regions[0].nodes}
    assert_matches(e.run(grouped), e.expected)
    check_transfers(regions[0])
    return regions[0]


@SOME
@given(geo_a=conv_geometry(), geo_b=conv_geometry(), count=st.integers(2, 6), width=st.integers(1, 4))
@example(geo_a=(3, 1, 1, 1, 1, 7), geo_b=(3, 2, 1, 1, 2, 4), count=3, width=2)  # count divides neither height
@example(geo_a=(5, 3, 3, 2, 2, 6), geo_b=(1, 1, 0, 1, 1, 2), count=6, width=1)  # count > every height
def test_conv2d_chain_sliced_equals_eager(geo_a, geo_b, count, width):
    h_mid = out_len(geo_a[5], *geo_a[:3], geo_a[3])
    geo_b = geo_b[:5] + (h_mid,)
    span_b = geo_b[3] * (geo_b[0] - 1) + 1
    if h_mid + 2 * geo_b[2] < span_b:  # conv b would have no output row: use a 1x1 instead
        geo_b = (1, 1, 0, 1, geo_b[4], h_mid)
    torch.manual_seed(0)
    a, b = conv2d_of(geo_a), conv2d_of(geo_b)
    e = Exported(ConvChain(a, b), dict(x=torch.randn(1, 4, geo_a[5], width)))
    note(f"heights {geo_a[5]} -> {h_mid} -> {e.expected.shape[2]}")
    run_chain_and_check(e, count)
    na, nb = conv_nodes(e.gm)
    with torch.no_grad():
        x = e.kwargs["x"]
        check_need_band(a, x, na, 2)
        check_need_band(b, F.silu(a(x)), nb, 2)


@FEW
@given(geo=conv_geometry(), kt=st.sampled_from([1, 3]), frames=st.integers(1, 3), count=st.integers(2, 6))
@example(geo=(3, 1, 1, 1, 1, 5), kt=3, frames=2, count=4)  # TemporalResnetBlock's (3,1,1) conv after a 3x3
def test_conv3d_chain_sliced_equals_eager(geo, kt, frames, count):
    torch.manual_seed(0)
    a = conv3d_of(geo, kt)
    b = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))  # a temporal conv: no halo along height
    e = Exported(ConvChain(a, b), dict(x=torch.randn(1, 4, frames, geo[5], 3)))
    region = run_chain_and_check(e, count)
    assert all(region.dims[n] == 3 for n in region.nodes)
    na, nb = conv_nodes(e.gm)
    with torch.no_grad():
        x = e.kwargs["x"]
        check_need_band(a, x, na, 3)
        check_need_band(b, F.silu(a(x)), nb, 3)


@pytest.mark.parametrize("k,p,h,count", [(1, 3, 2, 3), (1, 2, 2, 5)])
def test_output_rows_wholly_in_the_padding(k, p, h, count):
    """The rule itself is right here (``check_need_band`` passes); the runtime fails on the empty band."""
    torch.manual_seed(0)
    a = nn.Conv2d(2, 2, (k, 3), padding=(p, 1))
    e = Exported(ConvChain(a, nn.Conv2d(2, 2, 1)), dict(x=torch.randn(1, 2, h, 3)))
    with torch.no_grad():
        check_need_band(a, e.kwargs["x"], conv_nodes(e.gm)[0], 2)
    regions, _, grouped = e.halo(count)
    assert len(regions) == 1
    assert_matches(e.run(grouped), e.expected)


# ---------------------------------------------------------------------------------------------------------------
# 2. chains that grow the halo, GroupNorm statistics passes, and what stays outside


FRAMES = 2


class Conv3(nn.Module):
    def __init__(self, c, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=1)

    def forward(self, x):
        return self.conv(x)


class Up2(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Silu(nn.Module):
    def forward(self, x):
        return F.silu(x)


class Res(nn.Module):
    """ResnetBlock2D's shape: GroupNorm, SiLU, 3x3 conv, twice, plus the input."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(2, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(2, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class GN4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(2, c)

    def forward(self, x):
        return self.norm(x)


class Temporal(nn.Module):
    """diffusers' TemporalResnetBlock inside a SpatioTemporalResBlock: (B*F, C, H, W) -> (B, C, F, H, W), a 5-D
    GroupNorm, SiLU, a (3,1,1) conv, a residual add, and back."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(2, c)
        self.conv = nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):
        bf, c, h, w = x.shape
        v = x.reshape(bf // FRAMES, FRAMES, c, h, w).permute(0, 2, 1, 3, 4)
        v = v + self.conv(F.silu(self.norm(v)))
        return v.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)


class MergeHW(nn.Module):
    """A reshape that merges height with width (a softmax over H*W): no halo region may take it."""

    def forward(self, x):
        n, c, h, w = x.shape
        return torch.softmax(x.reshape(n, c, h * w), dim=-1).reshape(n, c, h, w)


BLOCKS = {
    "conv3": lambda c: Conv3(c), "conv_s2": lambda c: Conv3(c, 2), "up2": lambda c: Up2(), "silu": lambda c: Silu(),
    "res": Res, "gn4": GN4, "temporal": Temporal, "merge": lambda c: MergeHW(),
}


class Chain(nn.Module):
    def __init__(self, blocks, c=4):
        super().__init__()
        self.conv_in = nn.Conv2d(c, c, 3, padding=1)
        self.blocks = nn.ModuleList(BLOCKS[b](c) for b in blocks)

    def forward(self, x):
        h = self.conv_in(x)
        for b in self.blocks:
            h = b(h)
        return h


@st.composite
def chains(draw):
    """1-4 blocks that can take height (at most two upsamplings), and a height/width merge after one of them in
    about a third of the chains."""
    block = st.sampled_from(["res", "temporal", "up2", "gn4", "conv_s2", "conv3", "silu"])
    blocks = draw(st.lists(block, min_size=1, max_size=4).filter(lambda bs: bs.count("up2") <= 2), label="blocks")
    if draw(st.integers(0, 2), label="merge?") == 0:
        blocks.insert(draw(st.integers(1, len(blocks)), label="merge at"), "merge")
    return blocks


def merge_nodes(gm) -> list:
    """The reshapes of MergeHW: 4-D in, 3-D out."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (aten.view.default,
            aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)
            and len(val_shape(n)) == 3 and len(val_shape(n.args[0])) == 4]


@SOME
@given(blocks=chains(), height=st.integers(2, 9), count=st.integers(2, 6))  # a dim of 1 is no axis
@example(blocks=["res", "up2", "temporal", "conv3"], height=5, count=4)
@example(blocks=["gn4", "silu", "merge", "conv3"], height=4, count=3)
@example(blocks=["res", "conv_s2", "up2", "up2", "res"], height=3, count=5)
@example(blocks=["temporal", "up2", "temporal"], height=2, count=2)
def test_chain_sliced_equals_eager(blocks, height, count):
    torch.manual_seed(0)
    e = Exported(Chain(blocks), dict(x=torch.randn(FRAMES, 4, height, 3)))
    regions, reasons, grouped = e.halo(count)
    got, measured = measure_peak(grouped, *e.inputs)
    assert_matches(got[0], e.expected)
    assert len(halo_loops(grouped)) == len(regions)
    assert regions, reasons  # conv_in and the first block make one at least
    for r in regions:
        check_transfers(r)
        for p in passes(r):
            for assign, need in zip(p.assign, p.slices):
                assert need == needs(r, assign)
                assert nonempty(need) == nonempty(walk_needs(r, assign)), assign
    in_region = {n for r in regions for n in r.nodes}
    ops = [n for n in e.gm.graph.nodes if n.op == "call_function"]
    if "merge" not in blocks:  # every op can take height: one region holds them all
        assert len(regions) == 1 and set(ops) == in_region, [n.name for n in ops if n not in in_region]
        if "temporal" in blocks:
            assert any(n.target is aten.group_norm.default and len(val_shape(n)) == 5 for n in in_region)
            event("5-D GroupNorm sliced")
    event(f"{len(regions)} regions, up to {max((len(passes(r)) for r in regions), default=0)} passes")
    merges = merge_nodes(e.gm)
    assert len(merges) == blocks.count("merge")
    for m in merges:
        # a real merge stays outside with a reason; with one row or one column left it only drops a dim of size 1
        # (height 1: a squeeze of height, left outside without a reason; width 1: height kept, may be sliced)
        h, w = val_shape(m.args[0])[2:]
        if h > 1 and w > 1:
            assert m not in in_region
            if m.args[0] in in_region:
                assert re.search("merges|splits", reasons[m]), reasons.get(m)
    # The planner against the tracker: at these sizes only an upper bound is checked (ratios seen 0.6-1.0). The 5%
    # bound, and the two runtime/planner mismatches that make the plan low here (the previous slice's output band
    # kept alive, upsampling bands held whole), are in test_planner_against_measured_peak and
    # test_planner_counts_an_upsampling_band_as_held.
    planned = plan_memory(grouped).peak_bytes
    note(f"planned {planned} measured {measured} ratio {planned / measured:.3f}")
    assert planned <= 1.05 * measured, (planned, measured)


def test_explain_gives_the_halo_reason_for_a_merge():
    torch.manual_seed(0)
    m = Chain(["conv3", "silu", "merge", "conv3"]).eval()
    rep = fxstream.explain(m, dict(x=torch.randn(FRAMES, 4, 6, 5)), fxstream.Policy(halo=2))
    assert [r.dim for r in rep.regions] == ["height (halo)"]
    merge = next(u for u in rep.unsliced if u.op == "aten.reshape.default")
    assert re.search("merges|splits", merge.reason), merge


# ---------------------------------------------------------------------------------------------------------------
# 3. transfers against the rules; a planted error is caught


def region_of(blocks, height=6, count=3):
    torch.manual_seed(0)
    e = Exported(Chain(blocks), dict(x=torch.randn(FRAMES, 4, height, 3)))
    regions, _ = find_halo_regions(e.gm, count, 0.0)
    assert len(regions) == 1
    return e, regions[0]


PLANT_BLOCKS = ["conv_s2", "res", "up2", "temporal", "conv3"]


def test_transfers_cover_every_rule_kind():
    _, r = region_of(PLANT_BLOCKS)
    kinds = {HALO_RULES[n.target].kind for n in r.nodes}
    assert kinds == {"rows", "view", "conv", "upsample", "stats"}
    assert check_transfers(r) > 200


_BIG_REGION: list = []


@MANY
@given(data=st.data())
def test_transfers_equal_need_on_random_ranges(data):
    """Random ranges of every op of a region whose values are 11 to 22 rows long (strided conv, upsampling,
    5-D GroupNorm, views): the integer maps give the rules' bands."""
    if not _BIG_REGION:
        _BIG_REGION.append(region_of(PLANT_BLOCKS, height=22)[1])
    r = _BIG_REGION[0]
    tr = transfers(r)
    for n in r.nodes:
        length = r.length(n)
        lo = data.draw(st.integers(0, length - 1))
        hi = data.draw(st.integers(lo + 1, length))
        want = {p: b for p, b in HALO_RULES[n.target].need(n, r.dims[n], lo, hi).items() if b is not WHOLE}
        got = {p: (r.dims[p], lo * num // den + olo, (hi - 1) * num // den + ohi + 1)
               for p, _, num, den, olo, ohi in tr[n]}
        assert got == want, (n.name, lo, hi)


def _no_halo(node, d, lo, hi):
    req = {node.args[0]: (d, lo, hi)}
    req.update({a: WHOLE for a in node.args[1:3] if isinstance(a, torch.fx.Node)})
    return req


def test_planted_rule_without_halo_is_caught(monkeypatch):
    """A conv rule that forgets its halo disagrees with the transfers (which read the conv's geometry)."""
    _, r = region_of(PLANT_BLOCKS)
    monkeypatch.setitem(HALO_RULES, aten.conv2d.default, HaloRule(_no_halo, "conv"))
    with pytest.raises(AssertionError, match="transfers"):
        check_transfers(r)


@pytest.mark.parametrize("field", [3, 4, 5])  # den, off_lo, off_hi of one map
def test_planted_wrong_transfer_is_caught(field):
    _, r = region_of(PLANT_BLOCKS)
    tr = transfers(r)
    n = next(n for n in r.nodes if HALO_RULES[n.target].kind == ("upsample" if field == 3 else "conv"))
    edge = list(tr[n][0])
    edge[field] += 1
    tr[n] = [tuple(edge)] + tr[n][1:]
    with pytest.raises(AssertionError, match="transfers"):
        check_transfers(r)


# ---------------------------------------------------------------------------------------------------------------
# 4. planner against measurement


@pytest.mark.parametrize("blocks,cols", [(["conv3", "silu", "conv3"], 1), (["up2", "conv3", "up2", "conv3"], 1),
                                         (["res", "up2", "temporal", "conv3"], 1),
                                         (["res", "up2", "temporal", "conv3"], 2)])
def test_planner_against_measured_peak(blocks, cols):
    """At a size where a few bytes of statistics do not matter (C=16, 32x32): the planned peak of the grouped graph
    within 5% of the measured one, as the other regions' planner (tests/test_memory.py), for 2 bands of rows and
    for 2x2 tiles. Observed, count 2: 0.843, 0.832, 0.856 (planned/measured); with the band released after its
    copy: 1.000, 0.997, 0.995."""
    torch.manual_seed(0)
    e = Exported(Chain(blocks, 16), dict(x=torch.randn(FRAMES, 16, 32, 32)))
    regions, _, grouped = e.halo(2, cols=cols)
    assert regions
    got, measured = measure_peak(grouped, *e.inputs)
    assert_matches(got[0], e.expected)
    planned = plan_memory(grouped).peak_bytes
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured, planned / measured)


def test_more_slices_lower_the_planned_and_measured_peak():
    """More slices, less memory, planned and measured alike; 8 slices below the unsliced graph.

    Not 2: planned and measured 176128 against 131072 unsliced here. The runtime copies a conv band
    through ``constant_pad_nd`` where it reaches the padding while the unsliced conv
    pads inside its kernel, so a slice holds its input band, that copy and its output, on top of the full output
    buffer: about 2.5 full tensors at 2 slices against 2 unsliced. Planned (the band plan counts the pad copy), so not a planner
    error; a cost of the runtime's design."""
    torch.manual_seed(0)
    e = Exported(Chain(["up2", "conv3", "silu", "conv3"], 8), dict(x=torch.randn(FRAMES, 8, 16, 16)))
    unsliced = plan_memory(e.gm).peak_bytes
    assert measure_peak(e.gm, *e.inputs)[1] == unsliced
    planned, measured = [], []
    for count in (2, 4, 8):
        _, _, g = e.halo(count)
        got, m = measure_peak(g, *e.inputs)
        assert_matches(got[0], e.expected)
        planned.append(plan_memory(g).peak_bytes)
        measured.append(m)
    assert planned[0] > planned[1] > planned[2], planned
    assert measured[0] > measured[1] > measured[2], measured
    assert planned[2] < unsliced and measured[2] < unsliced, (planned, measured, unsliced)


def test_planner_counts_an_upsampling_band_as_held(monkeypatch):
    """The bytes the runtime holds for each upsampling band (its storage) against what the planner counts."""
    torch.manual_seed(0)
    e = Exported(Upsampled(scale_factor=2.0), dict(x=torch.randn(2, 4, 3, 3)))
    regions, _, grouped = e.halo(4)  # upsampling bands (conv b's halo included): [0,3) [1,5) [3,6) [4,6)
    seen = []
    original = HaloLoop._upsample

    def recording(self, n, ds, bands, reqs, env):
        y = original(self, n, ds, bands, reqs, env)
        (lo, hi), = bands
        seen.append((lo, hi, y.untyped_storage().nbytes(), y.numel() * y.element_size()))
        return y

    monkeypatch.setattr(HaloLoop, "_upsample", recording)
    assert_matches(e.run(grouped), e.expected)
    assert len(seen) == 4
    # the runtime upsamples every input row the band touches and narrows: the planner counts that whole block
    f = 2
    counted = [band // (hi - lo) * (((hi - 1) // f + 1 - lo // f) * f) for lo, hi, _, band in seen]
    assert [held for _, _, held, _ in seen] == counted, seen
    assert any(held > band for _, _, held, band in seen)  # the case this checks does occur


# ---------------------------------------------------------------------------------------------------------------
# 5. keep_bytes checkpoints


def planned_compute(gm, regions) -> float:
    """Planned FLOPs of the graph with these regions over the unsliced graph's."""
    flops = node_flops(gm)
    total = sum(flops.get(n.name, 0) for n in gm.graph.nodes if n.op == "call_function")
    inside = {n for r in regions for n in r.nodes}
    work = sum(flops.get(n.name, 0) for n in gm.graph.nodes if n.op == "call_function" and n not in inside)
    for r in regions:
        work += plan_halo(r, flops).compute_factor * sum(flops.get(n.name, 0) for n in r.nodes)
    return work / total


def test_keep_bytes_checkpoints():
    torch.manual_seed(0)
    e = Exported(Chain(["res", "up2", "res", "res"]), dict(x=torch.randn(FRAMES, 4, 6, 3)))
    small = math.prod(e.kwargs["x"].shape) * 4  # a block output before the upsampling; after it: 4x
    results = []
    for keep in (0, small, 4 * small):
        regions, _, grouped = e.halo(3, keep_bytes=keep)
        assert_matches(e.run(grouped), e.expected)
        for r in regions:
            check_transfers(r)
        results.append((len(regions), max(len(passes(r)) for r in regions), planned_compute(e.gm, regions)))
    counts, most_passes, compute = zip(*results)
    assert counts[0] == 1 and counts[0] < counts[1] < counts[2], results
    assert most_passes[0] == 7 and most_passes[0] > most_passes[1] >= most_passes[2] == 3, results
    assert compute[0] > compute[1] > compute[2] > 1.0, results


# ---------------------------------------------------------------------------------------------------------------
# 6. bad input and edge cases


class Upsampled(nn.Module):
    def __init__(self, **up):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.up = up

    def forward(self, x):
        return self.b(F.interpolate(F.silu(self.a(x)), mode="nearest", **self.up))


def upsample_node(gm):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and "upsample" in str(n.target))


@pytest.mark.parametrize("up,sliced", [
    (dict(scale_factor=3.0), False),
    (dict(scale_factor=(3.0, 2.0)), False),
    (dict(size=(5, 6)), False),  # 3 -> 5 rows: no integer factor
    (dict(scale_factor=(2.0, 3.0)), True),  # only the factor along height matters
    (dict(scale_factor=4.0), True),
    (dict(size=(12, 3)), True),
])
def test_upsampling_factor(up, sliced):
    torch.manual_seed(0)
    e = Exported(Upsampled(**up), dict(x=torch.randn(2, 4, 3, 3)))
    regions, reasons, grouped = e.halo(2)
    assert_matches(e.run(grouped), e.expected)
    node = upsample_node(e.gm)
    inside = {n for r in regions for n in r.nodes}
    if sliced:
        assert len(regions) == 1 and node in inside
        check_transfers(regions[0])
    else:
        assert node not in inside and "power-of-two" in reasons[node], reasons.get(node)


@pytest.mark.parametrize("blocks,height,count", [
    (["conv3", "silu", "conv3"], 2, 6),
    (["res", "up2", "conv3"], 2, 5),  # an input dim of 1 is no axis (analysis/axes.py)
    (["conv_s2", "conv3"], 3, 4),
])
def test_count_larger_than_the_height(blocks, height, count):
    torch.manual_seed(0)
    e = Exported(Chain(blocks), dict(x=torch.randn(FRAMES, 4, height, 3)))
    regions, _, grouped = e.halo(count)
    assert len(regions) == 1 and regions[0].count == count
    assert_matches(e.run(grouped), e.expected)
    out = regions[0].outputs[0]
    assert len(passes(regions[0])[-1].slices) == count
    assert sum(1 for a in passes(regions[0])[-1].assign if out in a) == min(count, regions[0].length(out))


def test_count_one_makes_no_region():
    torch.manual_seed(0)
    e = Exported(Chain(["conv3", "silu"]), dict(x=torch.randn(FRAMES, 4, 5, 3)))
    regions, reasons = find_halo_regions(e.gm, 1, 0.0)
    assert regions == [] and any("too small" in v for v in reasons.values())


@pytest.mark.parametrize("bad", [0, -2, "x", "3", 2.0, True, [2]])
def test_bad_policy_halo(bad):
    with pytest.raises(ValueError, match=r"Policy\.halo"):
        fxstream.Policy(halo=bad)


def test_policy_halo_one_slices_nothing():
    torch.manual_seed(0)
    m = Chain(["conv3", "silu", "conv3"]).eval()
    kw = dict(x=torch.randn(FRAMES, 4, 5, 3))
    assert not fxstream.Policy(halo=1).slices_anything
    rep = fxstream.explain(m, kw, fxstream.Policy(halo=1))
    assert rep.regions == []


# ---------------------------------------------------------------------------------------------------------------
# 7. end to end through the public API on tiny diffusers VAE decoders


def tiny_kl():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2).eval()
    return vae.decoder, dict(sample=torch.randn(2, 4, 4, 4))


def tiny_svd(frames=2, h=4, w=4):
    from diffusers import AutoencoderKLTemporalDecoder
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4).eval()
    return vae.decoder, dict(sample=torch.randn(frames, 4, h, w), image_only_indicator=torch.zeros(1, frames),
                             num_frames=frames)


def check_end_to_end(decoder, kw, count=3):
    with torch.no_grad():
        want = decoder(**kw)
        compiled = fxstream.compile(decoder, fxstream.Policy(halo=count))
        got = compiled(**kw)
    assert_matches(got, want)
    rep = compiled.explain()
    halo = [r for r in rep.regions if r.dim == "height (halo)"]
    assert halo and all(r.slices == count and r.passes >= 1 and r.compute >= 1.0 for r in halo)
    assert "height (halo)" in str(rep)
    # No memory claim at this size: the decoder's halo spans its whole height. Planned for AutoencoderKL's
    # decoder, latent 1x4x4: 70400 bytes sliced (any count) vs 49152 unsliced; 8x8: 203776-246784 vs 196608;
    # 16x16: 749568 (2 slices) .. 536576 (8 slices) vs 786432.
    return compiled


def test_autoencoder_kl_decoder_end_to_end():
    decoder, kw = tiny_kl()
    check_end_to_end(decoder, kw)
    rep = fxstream.explain(decoder, kw, fxstream.Policy(halo=3))
    assert any(r.dim == "height (halo)" for r in rep.regions)


def test_temporal_decoder_explain_lists_a_halo_region():
    decoder, kw = tiny_svd()
    rep = fxstream.explain(decoder, kw, fxstream.Policy(halo=3))
    halo = [r for r in rep.regions if r.dim == "height (halo)"]
    assert halo and "height (halo)" in str(rep)
    assert max(r.passes for r in halo) > 1  # its GroupNorms' statistics passes


def test_temporal_decoder_end_to_end_small():
    """Latent 2x2 in 2 slices: one region of 154 ops in 22 passes (4 s on 2 cores)."""
    decoder, kw = tiny_svd(frames=2, h=2, w=2)
    check_end_to_end(decoder, kw, count=2)


@pytest.mark.slow
def test_temporal_decoder_end_to_end():
    """Slow: latent 4x4 in 3 slices, 22 passes (about 12-20 s on 2 cores)."""
    decoder, kw = tiny_svd()
    check_end_to_end(decoder, kw)


# ---------------------------------------------------------------------------------------------------------------
# 8. grids (height x width tiles) and frames


@SOME
@given(blocks=chains(), height=st.integers(2, 7), width=st.integers(2, 7), rows=st.integers(1, 4),
       cols=st.integers(2, 4))
@example(blocks=["res", "up2", "temporal", "conv3"], height=5, width=6, rows=2, cols=3)
@example(blocks=["conv_s2", "gn4", "up2", "res"], height=4, width=5, rows=3, cols=4)
@example(blocks=["gn4", "silu", "merge", "conv3"], height=4, width=4, rows=2, cols=2)
def test_grid_sliced_equals_eager(blocks, height, width, rows, cols):
    """Tiles of ``rows`` x ``cols`` with halos along both axes: the same numbers as the unsliced graph; each
    axis's bands are the rules' (walked independently: a band along one axis depends only on that axis)."""
    torch.manual_seed(0)
    e = Exported(Chain(blocks), dict(x=torch.randn(FRAMES, 4, height, width)))
    regions, reasons, grouped = e.halo(rows, cols=cols)
    got, measured = measure_peak(grouped, *e.inputs)
    assert_matches(got[0], e.expected)
    assert regions, reasons  # conv_in and the first block make one at least
    for r in regions:
        assert (r.rows, r.cols, r.count) == (rows, cols, rows * cols)
        check_transfers(r, 0)
        check_transfers(r, 1)
        for p in passes(r):
            assert len(p.slices) == len(p.wslices) == rows * cols
            for i in range(rows * cols):
                assert p.wslices[i] == needs(r, p.wassign[i], 1)
                assert nonempty(p.wslices[i]) == nonempty(walk_needs(r, p.wassign[i], 1))
                need, assign = p.tile(i)
                assert all(len(b) == 2 and all(lo < hi for lo, hi in b) for b in need.values())
    for m in merge_nodes(e.gm):
        h, w = val_shape(m.args[0])[2:]
        if h > 1 and w > 1:
            assert all(m not in r.inside for r in regions)
    planned = plan_memory(grouped).peak_bytes
    note(f"planned {planned} measured {measured}")
    assert planned <= 1.05 * measured, (planned, measured)


def test_square_tiles_hold_less_than_thin_bands():
    """16 tiles: 4x4 squares plan a smaller working set and fewer recomputed FLOPs than 16 bands of rows (the
    halo of a thin band is most of it)."""
    torch.manual_seed(0)
    e = Exported(Chain(["res", "res", "up2", "conv3"], 8), dict(x=torch.randn(FRAMES, 8, 32, 32)))
    flops = node_flops(e.gm)
    (band,), _, _ = e.halo(16)
    (grid,), _, _ = e.halo(4, cols=4)
    pb, pg = plan_halo(band, flops), plan_halo(grid, flops)
    assert pg.working_bytes < pb.working_bytes and pg.compute_factor < pb.compute_factor, (pb, pg)


def test_a_width_merge_stays_outside_a_grid():
    """A reshape that keeps height but merges width with channels: bands of rows take it, a grid does not, and
    says why."""

    class MergeW(nn.Module):
        def forward(self, x):
            n, c, h, w = x.shape
            return torch.sigmoid(x.permute(0, 2, 1, 3).reshape(n, h, c * w)).reshape(n, h, c, w).permute(0, 2, 1, 3)

    def merged(nodes):
        return [n for n in nodes if n.target in (aten.reshape.default, aten.view.default) and len(val_shape(n)) == 3]

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), MergeW(), nn.Conv2d(4, 4, 3, padding=1))
    e = Exported(m, dict(input=torch.randn(FRAMES, 4, 6, 5)))
    rows_only, _, grouped = e.halo(2)
    assert len(rows_only) == 1 and merged(rows_only[0].nodes)
    assert_matches(e.run(grouped), e.expected)
    regions, reasons, grouped = e.halo(2, cols=2)
    assert_matches(e.run(grouped), e.expected)
    assert not any(merged(r.nodes) for r in regions)
    assert any(v.startswith("width:") for v in reasons.values()), reasons


def tiny_svd_attention(frames=4, h=4, w=4):
    """SVD's temporal decoder with two layers per block: its mid block has the attention over each frame's
    pixels (one layer per block, the tiny default, has none)."""
    from diffusers import AutoencoderKLTemporalDecoder
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4,
                                       layers_per_block=2).eval()
    return vae.decoder, dict(sample=torch.randn(frames, 4, h, w), image_only_indicator=torch.zeros(1, frames),
                             num_frames=frames)


def test_decoder_attention_sliced_along_frames():
    """``Policy(halo=(2, 2), spatial=2)`` on a decoder: height x width tiles where halos reach, and the mid block's
    attention (over each frame's pixels: no halo can take it) in slices of frames. The same frames within float
    rounding; the attention is inside a frames region; a temporal convolution there gets a halo of frames."""
    decoder, kw = tiny_svd_attention()
    with torch.no_grad():
        want = decoder(**kw)
        compiled = fxstream.compile(decoder, fxstream.Policy(halo=(2, 2), spatial=2, min_region_fraction=0.0))
        got = compiled(**kw)
    assert_matches(got, want)
    rep = compiled.explain()
    dims = {r.dim for r in rep.regions}
    assert {"height x width (halo)", "frames (halo)"} <= dims, dims
    loops = halo_loops(next(iter(compiled._entries.values())).compiled.graph_module)
    frames = [lp for lp in loops if lp.along == "frames"]
    assert any(n.target is aten.scaled_dot_product_attention.default for lp in frames for n in lp.region.nodes)
    assert "frames" in repr(frames[0])


def test_frames_rule_kinds():
    """Along the batch dim (0) a convolution, an upsampling and a GroupNorm run sample by sample; dim 1 (the
    channels) is refused; an attention slices along its batch and heads, not its sequence."""
    decoder, kw = tiny_svd_attention(frames=2, h=2, w=2)
    e = Exported(decoder, kw)
    by = {}
    for n in e.gm.graph.nodes:
        if n.op == "call_function" and n.target in HALO_RULES:
            by.setdefault(n.target, n)
    for op in (aten.conv2d.default, aten.group_norm.default, aten.upsample_nearest2d.vec):
        n = by[op]
        assert HALO_RULES[op].kind_at(0) == "rows" and HALO_RULES[op].kind_at(2) != "rows"
        assert HALO_RULES[op].need(n, 0, 0, 1)[n.args[0]] == (0, 0, 1)
        with pytest.raises(CantSlice, match="channels"):
            HALO_RULES[op].need(n, 1, 0, 1)
    sdpa = by[aten.scaled_dot_product_attention.default]
    assert HALO_RULES[sdpa.target].need(sdpa, 0, 0, 1)[sdpa.args[0]] == (0, 0, 1)
    with pytest.raises(CantSlice, match="sequence"):
        HALO_RULES[sdpa.target].need(sdpa, 2, 0, 1)


@pytest.mark.parametrize("halo", [(2, 3), [3, 1], (1, 2)])
def test_policy_halo_grid(halo):
    p = fxstream.Policy(halo=halo)
    assert p.halo == tuple(halo) and p.halo_grid == tuple(halo) and p.halo_tiles == halo[0] * halo[1]
    assert p.slices_anything


@pytest.mark.parametrize("bad", [(0, 2), (2,), (2, 2, 2), (2, "3"), (True, 2), (2.0, 2)])
def test_bad_policy_halo_grid(bad):
    with pytest.raises(ValueError, match=r"Policy\.halo: expected None, an int >= 1 .* or a pair"):
        fxstream.Policy(halo=bad)


def test_half_precision_group_norm_in_chunks():
    """A float16 band is normalised a few groups at a time (float32 arithmetic, one rounding, as the unsliced
    op): the same numbers as a single float32 pass over the band, and the planner counts a chunk's copy."""
    from fxstream.analysis.halo import NORM_CHUNKS, norm_chunks
    assert norm_chunks(torch.float32, 32) == 1 and norm_chunks(torch.float16, 32) == NORM_CHUNKS
    assert norm_chunks(torch.bfloat16, 3) == 3
    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 4).half()
    w, b = torch.randn(32).half(), torch.randn(32).half()
    xf = x.float().unflatten(1, (8, 4))
    mean, rstd = xf.mean((2, 3, 4)), torch.rsqrt(xf.var((2, 3, 4), correction=0) + 1e-5)

    class N:  # the node's only use in _norm: none
        pass

    got = HaloLoop._norm(N(), (x, 8, w, b), (mean, rstd))
    want = ((xf - mean[..., None, None, None]) * rstd[..., None, None, None]).flatten(1, 2)
    want = (want * w.reshape(32, 1, 1) + b.reshape(32, 1, 1)).half()
    assert got.dtype == torch.float16 and torch.equal(got, want)


class ChannelsLast(nn.Module):
    """A decoder fed (B, H, W, C): the dims its convolutions take as height and width are its input's 1 and 2."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = self.a(x.permute(0, 3, 1, 2))
        return self.b(F.silu(self.norm(h))) + h[:, :4]


def test_halo_axes_are_the_dims_the_ops_name_not_the_layout():
    """Halo floods start at the input dims the ops name height and width (analysis/axes.py), wherever the layout
    puts them: an input's last two dims here are width and channels (a guess from the layout would band along
    width and find no width to tile)."""
    torch.manual_seed(0)
    e = Exported(ChannelsLast(), dict(x=torch.randn(2, 11, 7, 4)))
    x = next(n for n in e.gm.graph.nodes if n.op == "placeholder" and n.name == "x")
    for cols in (1, 2):
        regions, reasons, grouped = e.halo(3, cols=cols)
        assert regions, reasons
        assert any(x in r.dims for r in regions)
        for r in regions:
            assert r.along == "height" and r.cols == cols
            if x in r.dims:
                assert r.dims[x] == 1 and (cols == 1 or r.wdims[x] == 2)
        assert_matches(e.run(grouped), e.expected)


def test_band_rules_of_cut_like_ops_are_their_cut_rules():
    """NOTE [One rule table]: pointwise ops, views, permutes, linear and cat band as they cut (their halo rule is
    derived from the cut rule); only the ops whose bands differ from cuts keep rules of their own."""
    from fxstream.analysis.rules import POINTWISE, VIEWS
    aten = torch.ops.aten
    derived = {op for op, r in HALO_RULES.items() if r.need.__qualname__.startswith("from_cut_rule")}
    assert set(POINTWISE) | set(VIEWS) | {aten.permute.default, aten.transpose.int, aten.t.default,
                                          aten.linear.default, aten.cat.default} == derived
    assert set(HALO_RULES) - derived == {
        aten.type_as.default, aten.conv2d.default, aten.conv3d.default, aten.upsample_nearest2d.vec,
        aten.upsample_nearest2d.default, aten.group_norm.default, aten.scaled_dot_product_attention.default}
