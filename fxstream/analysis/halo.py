"""Halo slicing: regions cut along height where an op's output rows need a band of input rows around them.

A 3x3 convolution's output rows ``[lo, hi)`` need input rows ``[lo*s - p, (hi-1)*s - p + d*(k-1] + 1)``: the slice
plus a *halo*, possibly outside the tensor, where the convolution's zero padding applies. ``HALO_RULES`` maps an
OpOverload to a :class:`HaloRule` whose ``need`` says, for output rows ``[lo, hi)`` along ``dim``, which rows
of each tensor input are needed (``(dim, lo, hi)``, unclipped) or ``WHOLE``. A chain of convolutions grows the
halo: each slice asks its last op for its rows and walks the chain backwards, each op widening the band
(:func:`needs`). Nothing here runs a tensor; the runtime (:mod:`fxstream.halo_runtime`) executes the bands.

NOTE [Statistics passes]
A GroupNorm's statistics span every row. Inside a region its input is never whole, so the region runs a
*statistics pass* first: the slices of that input computed again (halos included, each row counted once) and
summed into per-group float64 sums. A GroupNorm downstream of another needs the first one's statistics to
compute its own input, so GroupNorms are grouped by *level* (how many GroupNorms of the region lie upstream) and
the region runs one pass per level, then the output pass. Each pass recomputes what feeds its targets: the
planner reports that extra compute (``HaloPlan.compute_factor``), and the budget weighs it against memory.

NOTE [Host checkpoints]
With host memory to spend (``Policy(host_memory=...)``), a region may *park* the inputs of its GroupNorms: the
pass whose targets they are (their statistics pass) also copies each slice's assigned rows of them, each row
once, into a buffer of the whole value in host memory (pinned CPU memory when the region runs on CUDA; on a
CPU the host is the CPU and the tracker counts these storages apart). Every later pass reads the bands it needs
of a parked value from that buffer instead of computing them: its walk back (:func:`needs`) stops there, so a
statistics level is computed once and each pass recomputes only the ops since the nearest parked values (halo
rows of the convolutions between them). The rows read back are the rows the statistics pass computed, so the
results equal recomputing them within float rounding. A slice's bands of parked values come back at its start
(on CUDA on a copy stream, overlapping its first ops; the compute stream waits for each band where it is first
used). A buffer lives from its statistics pass to the last pass that reads it; the plan counts the host bytes
(the peak of buffers alive at once) and the traffic (every row written once, every band
read back) apart from the device bytes, where a band read back is a band made.

NOTE [Line buffers]
A pass runs its slices in order, so the band of a convolution's output in one slice mostly overlaps the band
of the slice before in the same column (the halo rows the next convolution needs). Each convolution keeps the
rows of its band that the next slice of its column starts with (a copy: the *tail*, :func:`kept_rows`); the
next slice computes only the rows past them (:func:`carried_rows`) and joins the two, so along height a
convolution computes each row once per pass, whatever the halos. Only convolutions carry (their FLOPs are the
decoder's; the pointwise ops and GroupNorms between them recompute their few halo rows). The tails of a grid's
other columns wait while a row of tiles runs: a line of the whole width. The first slice of a run of slices
(a rank's, under ``distributed``) computes its band whole. The carried rows are the same rows computed once,
so results equal recomputing them within float rounding (another band shape may round differently). The plan
counts the tails, the new rows before they are joined, and only the new rows as computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import numpy as np
import torch
from torch.fx import GraphModule, Node

from ..errors import CantSlice
from .axes import halo_sources
from .effects import find_effects
from .cuts import Cut, slice_bounds
from .rules import POINTWISE, RULES, VIEWS, RuleContext, tensor_args, val_shape

aten = torch.ops.aten
WHOLE = None

__all__ = ["HALO_RULES", "HaloRule", "HaloRegion", "HaloPlan", "find_halo_regions", "conv_band", "needs",
           "plan_halo", "simulate_halo", "HaloSimulation", "upsample_factor", "WHOLE"]


@dataclass(frozen=True)
class HaloRule:
    """``need(node, dim, lo, hi) -> {input: (dim, lo, hi) | WHOLE}``; ``kind`` tells the runtime how to run it
    ("rows": the op on row bands as it is, "view": shape arguments rewritten, "conv", "upsample", "stats")."""

    need: Callable
    kind: str

    def kind_at(self, d: int) -> str:
        """How the runtime runs the op sliced along its dim ``d``: along the batch dim (0) a convolution, an
        upsampling or a GroupNorm works sample by sample, so it runs on the band as it is ("rows")."""
        return "rows" if d == 0 and self.kind in ("conv", "upsample", "stats") else self.kind


def kind_at(n: Node, d: int) -> str:
    return HALO_RULES[n.target].kind_at(d)


def _shape(n) -> list[int]:
    return val_shape(n)


def _broadcast_need(node: Node, d: int, lo: int, hi: int, inputs) -> dict:
    out = _shape(node)
    req = {}
    for x in inputs:
        xs = _shape(x)
        xd = d - (len(out) - len(xs))
        if xd < 0 or (xs[xd] == 1 and out[d] != 1):
            want = WHOLE
        elif xs[xd] == out[d]:
            want = (xd, lo, hi)
        else:
            raise CantSlice(f"input {x.name} dim {xd} has size {xs[xd]}, output {out[d]}")
        if x in req and req[x] != want:
            raise CantSlice(f"input {x.name} is needed two ways")
        req[x] = want
    return req


def rows(node, d, lo, hi):
    return _broadcast_need(node, d, lo, hi, tensor_args(node))


def from_cut_rule(cut_rule: Callable) -> Callable:
    """The halo ``need`` of an op whose cut rule (analysis/rules.py) already says where each input holds the
    output's dim ``d``: rows ``[lo, hi)`` of the output need the same rows of that input dim, where it is a dim of
    its own (a cut with ``outer == inner == 1``); an input the cut rule takes whole is needed whole. So the
    pointwise, view, permute, linear and cat ops have one rule for cuts and bands (NOTE [One rule table])."""
    def need(node, d, lo, hi):
        req = cut_rule(node, Cut(d, 1, 1), RuleContext(_shape(node)[d], lambda p: None))
        out = {}
        for p, c in req.items():
            if c is WHOLE:
                out[p] = WHOLE
            elif isinstance(c, Cut) and c.outer == 1 and c.inner == 1:
                out[p] = (c.dim, lo, hi)
            else:
                raise CantSlice(f"{node.target}: dim {d} is merged with others in {p.name} ({c})")
        return out
    return need


def group_norm(node, d, lo, hi):
    if d == 1:
        raise CantSlice("group_norm: dim 1 holds the channels")
    req = {node.args[0]: (d, lo, hi)}
    for a in node.args[2:4]:
        if isinstance(a, Node):
            req[a] = WHOLE
    return req


def conv_params(node: Node, i: int) -> tuple[int, int, int, int]:
    """(kernel, stride, padding, dilation) of a convolution node along spatial dim ``i``."""
    args = list(node.args) + [None] * (7 - len(node.args))
    nsp = len(_shape(node)) - 2
    stride, padding, dilation = args[3] or [1] * nsp, args[4] if args[4] is not None else [0] * nsp, args[5] or [1] * nsp
    if isinstance(padding, str):
        raise CantSlice(f"convolution: padding={padding!r} is not sliced along height")

    def at(v):
        return v[i] if len(v) > 1 else v[0]

    return _shape(node.args[1])[2 + i], at(stride), at(padding), at(dilation)


def conv_band(k: int, s: int, p: int, dil: int, lo: int, hi: int) -> tuple[int, int]:
    """Input rows (unclipped) a convolution needs for output rows ``[lo, hi)``."""
    return lo * s - p, (hi - 1) * s - p + dil * (k - 1) + 1


def conv(node, d, lo, hi):
    if d == 1:
        raise CantSlice("convolution: dim 1 holds the channels")
    req = {node.args[0]: (0, lo, hi) if d == 0 else (d, *conv_band(*conv_params(node, d - 2), lo, hi))}
    for a in node.args[1:3]:
        if isinstance(a, Node):
            req[a] = WHOLE
    return req


def upsample_factor(node: Node, d: int) -> int:
    """The integer factor a nearest upsampling grows dim ``d`` by; only powers of two slice exactly (the source
    index is ``floor(row * 1/f)``, exact in binary only then)."""
    i, o = _shape(node.args[0])[d], _shape(node)[d]
    f = o // i if i else 0
    if f < 1 or f * i != o or f & (f - 1):
        raise CantSlice(f"upsample: {i} -> {o} rows is not a power-of-two factor")
    return f


def upsample(node, d, lo, hi):
    if d == 1:
        raise CantSlice("upsample: dim 1 holds the channels")
    if d == 0:
        return {node.args[0]: (0, lo, hi)}
    f = upsample_factor(node, d)
    return {node.args[0]: (d, lo // f, (hi - 1) // f + 1)}


def attention(node, d, lo, hi):
    if d >= len(_shape(node)) - 2:
        raise CantSlice("attention: its sequence and features are not sliced")
    return _broadcast_need(node, d, lo, hi, [a for a in [*node.args[:4], node.kwargs.get("attn_mask")]
                                             if isinstance(a, Node)])


# NOTE [One rule table]: an op whose bands are its cut's rows (pointwise, views, permutes, linear, cat) takes its
# halo rule from its cut rule (from_cut_rule); the ops below have rules of their own because bands differ from
# cuts there: a convolution and an upsampling need other rows than they make, a GroupNorm's statistics span the
# band's dim (a statistics pass), an attention slices only its batch dims (its sequence is no band), and type_as
# takes ``other``'s band along with its own (its cut rule leaves ``other`` out: NOTE [Arguments read for their
# dtype]).
HALO_RULES: dict = {}
for _op in POINTWISE:
    HALO_RULES[_op] = HaloRule(from_cut_rule(RULES[_op].inputs), "rows")
for _op in VIEWS:
    HALO_RULES[_op] = HaloRule(from_cut_rule(RULES[_op].inputs), "view")
for _op in (aten.permute.default, aten.transpose.int, aten.t.default, aten.linear.default, aten.cat.default):
    HALO_RULES[_op] = HaloRule(from_cut_rule(RULES[_op].inputs), "rows")
HALO_RULES.update({
    aten.type_as.default: HaloRule(rows, "rows"),
    aten.conv2d.default: HaloRule(conv, "conv"),
    aten.conv3d.default: HaloRule(conv, "conv"),
    aten.upsample_nearest2d.vec: HaloRule(upsample, "upsample"),
    aten.upsample_nearest2d.default: HaloRule(upsample, "upsample"),
    aten.group_norm.default: HaloRule(group_norm, "stats"),
    aten.scaled_dot_product_attention.default: HaloRule(attention, "rows"),
})


def halo_rule(node: Node) -> HaloRule | None:
    return HALO_RULES.get(node.target) if node.op == "call_function" else None


def _tensor_valued(n: Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


@dataclass
class HaloRegion:
    """Ops sliced together along height with halos: ``dims`` names the height dim of every value it touches.
    A grid (``cols > 1``) also cuts every band of rows into ``cols`` tiles along width (``wdims``): ``count`` is
    rows * cols tiles, each computed with its halo along both axes."""

    nodes: list  # in graph order
    dims: dict  # node (region op or input) -> height dim
    inputs: list  # nodes outside the region it reads, in order
    outputs: list  # its nodes used outside it
    count: int = 1  # tiles in all: rows * cols
    largest_interior_bytes: int = 0
    wdims: dict = field(default_factory=dict)  # node -> width dim (tiles of a grid: cols > 1)
    cols: int = 1
    along: str = "height"  # what ``dims`` names: "height", or "frames" (the first input's dim 0)
    parked: frozenset = frozenset()  # GroupNorm inputs parked in host memory (NOTE [Host checkpoints])
    _transfers: dict = field(default_factory=dict, repr=False)
    _inside: set | None = field(default=None, repr=False)
    _static: dict | None = field(default=None, repr=False)

    @property
    def inside(self) -> set:
        if self._inside is None:
            self._inside = set(self.nodes)
        return self._inside

    @property
    def module(self) -> str:
        from .slicer import common_module_path
        return common_module_path(self.nodes)

    @property
    def saved_bytes(self) -> int:
        """Bytes of its interior values, which never exist whole (as :attr:`Region.saved_bytes`)."""
        return sum(_tensor_bytes(n) for n in self.nodes if n not in self.outputs)

    @property
    def rows(self) -> int:
        return self.count // self.cols

    @property
    def axes(self) -> list[dict]:
        """The dims of each sliced axis: [height] or, for a grid, [height, width]."""
        return [self.dims, self.wdims] if self.cols > 1 else [self.dims]

    def length(self, n: Node, axis: int = 0) -> int:
        return _shape(n)[self.axes[axis][n]]

    def lengths(self, n: Node) -> tuple:
        return tuple(_shape(n)[ax[n]] for ax in self.axes)


def _name_heights(gm: GraphModule, along: str = "height", axes: list | None = None) -> tuple[dict, dict]:
    """:func:`_flood_heights`, kept per graph and axis while the graph has the same nodes holding the same values.

    NOTE [Heights named once per graph]: a decoder under a budget is planned for halos many times on one graph
    (the stripped graph every compile of a capture shares: ``NOTE [One stripped graph per capture]``), and the
    flood reads only the graph's nodes, their names, arguments and values. A graph where any of those changed
    (another node list; a name, ``args``, ``kwargs`` or ``meta["val"]`` not the same object) is flooded again.
    The floods are kept on the Graph object (they die with it; a copy of the graph starts without them). Copies
    are returned: the callers add reasons."""
    source = halo_sources(gm, axes).get(along)
    state = [(n, n.name, n.args, n.kwargs, n.meta.get("val")) for n in gm.graph.nodes]
    kept = gm.graph.__dict__.setdefault("_fxstream_heights", {})  # (along, input, dim) -> (state, (dims, reasons))
    key = (along, None if source is None else (source.source, source.dim))
    hit = kept.get(key)
    if hit is None or len(hit[0]) != len(state) or \
            any(a is not b for old, now in zip(hit[0], state) for a, b in zip(old, now)):
        hit = kept[key] = (state, _flood_heights(gm, source))
    dims, reasons = hit[1]
    return dict(dims), dict(reasons)


def _flood_heights(gm: GraphModule, source) -> tuple[dict, dict]:
    """Flood a halo axis from the input dim ``source`` (an :class:`~fxstream.analysis.axes.Axis`: the dim the ops
    name height, width or frames, :func:`~fxstream.analysis.axes.halo_sources`; None: nothing to flood): forwards
    through every op a rule accepts, and backwards into inputs a rule needs in rows (an attention's output that
    a residual adds back). Returns (dims, reasons)."""
    dims, reasons = {}, {}
    src = None if source is None else next(
        (n for n in gm.graph.nodes if n.op == "placeholder" and n.name == source.source), None)
    if src is None or not _tensor_valued(src):
        return dims, reasons
    dims[src] = source.dim
    work = [src]

    def try_node(u: Node) -> int | None:
        """The dim of ``u`` holding the height, if its rule takes every named input where it is named."""
        rule = halo_rule(u)
        if rule is None:
            reasons[u] = f"no halo rule for {u.target}"
            return None
        for e in range(len(_shape(u))):
            try:
                req = rule.need(u, e, 0, _shape(u)[e])
            except CantSlice as err:
                reasons[u] = str(err)
                continue
            named = [(p, r) for p, r in req.items() if r is not WHOLE and p in dims]
            if named and all(dims[p] == r[0] for p, r in named):
                return e
        return None

    while work:
        n = work.pop()
        for u in n.users:
            if u in dims or u.op != "call_function" or not _tensor_valued(u):
                continue
            found = try_node(u)
            if found is not None:
                dims[u] = found
                reasons.pop(u, None)
                work.append(u)
        # backwards: inputs of a named op that its rule needs in rows get the height named too
        rule = halo_rule(n) if n.op == "call_function" else None
        if rule is not None and n in dims:
            try:
                req = rule.need(n, dims[n], 0, _shape(n)[dims[n]])
            except CantSlice:
                req = {}
            for p, r in req.items():
                if r is not WHOLE and p not in dims and _tensor_valued(p):
                    dims[p] = r[0]
                    work.append(p)
    return dims, reasons


def _accepted(gm: GraphModule, dims: dict, reasons: dict) -> dict:
    """Named ops whose rule takes every named input in its named dim: {node: requirement}."""
    ok = {}
    for n in gm.graph.nodes:
        if n not in dims or n.op != "call_function":
            continue
        rule = halo_rule(n)
        if rule is None:
            reasons.setdefault(n, f"no halo rule for {n.target}")
            continue
        try:
            req = rule.need(n, dims[n], 0, _shape(n)[dims[n]])
        except CantSlice as e:
            reasons[n] = str(e)
            continue
        bad = [p for p, r in req.items() if r is not WHOLE and dims.get(p) != r[0]]
        if bad:
            reasons[n] = f"input {bad[0].name} has height elsewhere"
            continue
        ok[n] = req
    return ok


def _tensor_bytes(n: Node) -> int:
    v = n.meta.get("val")
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def checkpoints(nodes: list, inside: set, keep_bytes: int) -> list:
    """Region ops after which the region can be cut: the one region value still needed later is that op's own
    output (a chain of blocks: each block's output), and it takes at most ``keep_bytes`` whole."""
    index = {n: i for i, n in enumerate(nodes)}
    last = {n: max((index[u] for u in n.users if u in inside), default=-1) for n in nodes}
    open_, cuts = set(), []
    for i, n in enumerate(nodes):
        open_ = {m for m in open_ if last[m] > i}
        if last[n] > i:
            open_.add(n)
        if open_ == {n} and i < len(nodes) - 1 and _tensor_bytes(n) <= keep_bytes:
            cuts.append(n)
    return cuts


def _trim_entries(comp: set, order: dict) -> set:
    """``comp`` less the ops that read only values from outside it and whose own value is smaller than the
    activations they read last: run before the region, such an op frees those (a residual add of two whole
    values leaves one whole value for the region to hold; the caller's inputs and weights stay alive anyway)."""
    comp = set(comp)
    changed = True
    while changed:
        changed = False
        for n in list(comp):
            ins = n.all_input_nodes
            if any(p in comp for p in ins) or not any(u in comp for u in n.users):
                continue
            freed = sum(_tensor_bytes(p) for p in set(ins) if p.op == "call_function"
                        and all(u is n or (u not in comp and order[u] < order[n]) for u in p.users))
            if freed > _tensor_bytes(n):
                comp.discard(n)
                changed = True
    return comp


def _join_bare(pieces: list) -> list:
    """NOTE [Bare pieces]: of the consecutive pieces of a region cut at its checkpoints, each piece that holds no
    value of its own (no op whose value only the piece reads, as a region's interior: a lone residual ``div``, a
    ``permute`` and ``reshape`` between a spatial and a temporal block) is joined to the piece after it (the last one: to the piece before). Alone, such
    a piece is no region (nothing inside it to slice) and its ops would run whole between two regions: one more
    whole value, and one that a region spread over ranks could not hold in parts (NOTE [Rows held in parts])."""
    out: list = []
    carry: list = []
    for i, piece in enumerate(pieces):
        inside = set(piece)
        bare = not any(_tensor_bytes(n) for n in piece if all(u in inside for u in n.users))
        if bare and i < len(pieces) - 1:
            carry += piece
            continue
        if bare and out:
            out[-1] = out[-1] + carry + piece
        else:
            out.append(carry + piece)
        carry = []
    return out


def find_halo_regions(gm: GraphModule, count: int, min_fraction: float = 0.05, exclude=(),
                      keep_bytes: int = 0, cols: int = 1, along: str = "height",
                      axes: list | None = None) -> tuple[list, dict]:
    """Regions sliced ``count`` ways along height with halos, and why other named ops are not sliced. ``cols > 1``:
    grids of ``count`` rows by ``cols`` columns of tiles, with halos along height and width (ops must take both).
    ``along="frames"``: regions along the frames riding in dim 0 of the height's input instead (a decoder's
    frames: per-frame ops such as an attention over each frame's pixels slice as they are, a temporal convolution
    with a halo of frames). Each axis starts at the input dim the ops name so (``axes``: the graph's axes if
    already found, :func:`~fxstream.analysis.axes.halo_sources`); a graph without one gets no regions along it.

    A region is a connected set of accepted ops joined by edges along which the height passes; an op needing a
    region value whole leaves it; a region must be convex (nothing leaves it and comes back: what does starts
    a region of its own); regions whose largest interior value is under ``min_fraction`` of the graph's
    largest activation outside ``exclude`` are dropped. ``exclude``: nodes that must stay outside (already in
    other regions).
    ``keep_bytes``: a region is cut after every :func:`checkpoints` op whose value takes at most this many
    bytes whole. Each cut keeps that value whole and saves the passes downstream of it from recomputing what
    fed it (see NOTE [Statistics passes]); 0 keeps nothing whole."""
    from .slicer import nonconvex

    dims, reasons = _name_heights(gm, along, axes)
    effects = find_effects(gm)
    reasons.update({n: why for n, why in effects.pinned.items() if n in dims})
    ok = {n: r for n, r in _accepted(gm, dims, reasons).items() if n not in exclude and n not in effects.pinned}
    wdims = {}
    if cols > 1:
        wdims, wreasons = _name_heights(gm, "width", axes)
        wok = _accepted(gm, wdims, wreasons)
        for n in list(ok):
            why = wreasons.get(n, "width is not named here") if n not in wok else None
            if why is None and any((r is WHOLE) != (wok[n].get(p) is WHOLE) for p, r in ok[n].items()):
                why = "needs an input whole along one axis and in rows along the other"
            if why is not None:
                reasons[n] = f"width: {why}"
                del ok[n]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    # the largest activation left to slice (what other regions took is theirs)
    biggest = max((_tensor_bytes(n) for n in gm.graph.nodes if n.op == "call_function" and n not in exclude),
                  default=0)
    g = nx.Graph()
    g.add_nodes_from(ok)
    for n, req in ok.items():
        for p, r in req.items():
            if p in ok and r is not WHOLE:
                g.add_edge(p, n)
    pending, done = [set(c) for c in nx.connected_components(g)], []
    while pending:
        comp = pending.pop()
        bad = {n for n in comp for p, r in ok[n].items() if p in comp and r is WHOLE}
        if bad:
            for b in bad:
                reasons[b] = "needs a value of its region whole"
            pending.extend(set(c) for c in nx.connected_components(g.subgraph(comp - bad)))
            continue
        later = nonconvex(comp, order, effects)
        if later:
            pending.extend(set(c) for c in nx.connected_components(g.subgraph(comp - later)))
            pending.extend(set(c) for c in nx.connected_components(g.subgraph(later)))
            continue
        done.append(comp)
    done = [_trim_entries(comp, order) for comp in done]
    if keep_bytes:
        cut_up = []
        for comp in done:
            nodes = sorted(comp, key=order.get)
            start, pieces = 0, []
            for c in checkpoints(nodes, comp, keep_bytes):
                end = nodes.index(c) + 1
                pieces.append(nodes[start:end])
                start = end
            pieces.append(nodes[start:])
            cut_up += [set(p) for p in _join_bare([p for p in pieces if p])]
        done = [c for c in cut_up if c]
    regions = []
    for comp in done:
        nodes = sorted(comp, key=order.get)
        inputs = []
        for n in nodes:
            for p in n.all_input_nodes:
                if p not in comp and p not in inputs:
                    inputs.append(p)
        outputs = [n for n in nodes if any(u not in comp for u in n.users) or out_node in n.users]
        interior = [_tensor_bytes(n) for n in nodes if n not in outputs]
        largest = max(interior, default=0)
        if count * cols < 2 or largest == 0 or largest < min_fraction * biggest:
            for n in nodes:
                reasons.setdefault(n, f"{along}: region too small to pay for its loop")
            continue
        region_dims = {n: dims[n] for n in nodes}
        region_dims.update({p: dims[p] for p in inputs if p in dims})
        region_wdims = {n: wdims[n] for n in [*nodes, *inputs] if n in wdims and (n in comp or n in region_dims)}
        regions.append(HaloRegion(nodes, region_dims, inputs, outputs, count * cols, largest, region_wdims, cols,
                                  along))
        for n in nodes:
            reasons.pop(n, None)
    regions.sort(key=lambda r: order[r.nodes[0]])
    return regions, reasons


# --- the slices of one region: which rows of which value each pass computes (integers only) -----------------


def carried_rows(prev, band) -> int:
    """Rows at the start of ``band`` ((lo, hi) along height) that the tail ``prev`` ((lo, hi), or None) holds: 0
    unless the tail starts at or before the band and reaches into it (NOTE [Line buffers])."""
    if prev is None or not prev[0] <= band[0] < prev[1]:
        return 0
    return min(prev[1], band[1]) - band[0]


def kept_rows(band, nxt):
    """The rows of ``band`` a convolution keeps for the next slice of its column, whose band is ``nxt`` (None:
    none), as (lo, hi), or None."""
    if nxt is None or not band[0] <= nxt[0] < band[1]:
        return None
    return nxt[0], min(band[1], nxt[1])


def _hull(a, b):
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def transfers(region: HaloRegion, axis: int = 0) -> dict:
    """For each region op, its inputs' bands along ``axis`` (0: height, 1: a grid's width) as integer maps
    ``(input, length, num, den, off_lo, off_hi)``: output rows ``[lo, hi)`` need ``[floor(lo*num/den) + off_lo,
    floor((hi-1)*num/den) + off_hi + 1)``. The same bands as the rules' ``need`` (a test checks), without
    building dicts per slice."""
    if axis not in region._transfers:
        dims = region.axes[axis]
        out = {}
        for n in region.nodes:
            d = dims[n]
            kind = kind_at(n, d)
            edges = []
            for p, r in HALO_RULES[n.target].need(n, d, 0, region.length(n, axis)).items():
                if r is WHOLE:
                    continue
                if kind == "conv" and p is n.args[0]:
                    k, st, pad, dil = conv_params(n, d - 2)
                    m = (st, 1, -pad, -pad + dil * (k - 1))
                elif kind == "upsample" and p is n.args[0]:
                    m = (1, upsample_factor(n, d), 0, 0)
                else:
                    m = (1, 1, 0, 0)
                edges.append((p, _shape(p)[r[0]], *m))
            out[n] = edges
        region._transfers[axis] = out
    return region._transfers[axis]


def needs(region: HaloRegion, targets: dict, axis: int = 0, read: frozenset = frozenset()) -> dict:
    """Rows (``axis`` 1: columns) of every region value and input needed to compute ``targets`` ({node: (lo,
    hi)}), clipped to the tensor: each op asked for the union of what its users need, walking the region
    backwards. Along the two axes of a grid the walks are independent: every rule's band along one axis depends
    only on the band along that axis. Values in ``read`` (parked in host memory by an earlier pass) are read, not
    computed: the walk stops at them."""
    need = dict(targets)
    tr = transfers(region, axis)
    for n in reversed(region.nodes):
        band = need.get(n)
        if band is None or band[0] >= band[1] or n in read:
            continue
        lo, hi = band
        for p, length, num, den, olo, ohi in tr[n]:
            a = max(lo * num // den + olo, 0)
            b = min((hi - 1) * num // den + ohi + 1, length)
            old = need.get(p)
            if old is None:
                if a < b or p in region.inside:
                    need[p] = (a, b)
            elif a < b:
                need[p] = (min(old[0], a), max(old[1], b))
    return need


def stat_levels(region: HaloRegion) -> dict:
    """{GroupNorm node: level}: how many GroupNorms of the region lie upstream of it (see NOTE [Statistics
    passes])."""
    inside = set(region.nodes)
    depth, levels = {}, {}
    for n in region.nodes:
        d = 0
        for p in n.all_input_nodes:
            if p in inside:
                d = max(d, depth[p] + (1 if p in levels else 0))
        depth[n] = d
        if kind_at(n, region.dims[n]) == "stats":
            levels[n] = d
    return levels


@dataclass
class Pass:
    """One sweep over the slices: ``slices[i]`` is {node: (lo, hi)}, the rows to compute (inputs: rows to read);
    ``assign[i]`` the rows each target (a GroupNorm's input, or a region output) takes from slice ``i``. A grid's
    ``wslices`` and ``wassign`` give the columns the same way (empty lists otherwise); :meth:`tile` joins them."""

    stats: list  # GroupNorm nodes whose statistics this pass gathers (empty: the output pass)
    read: frozenset = frozenset()  # values parked by an earlier pass: read from host memory, not computed
    park: tuple = ()  # values this pass parks in host memory: each slice writes the rows it is assigned
    free: tuple = ()  # parked values no later pass reads: their host buffers go after this pass
    slices: list = field(default_factory=list)
    assign: list = field(default_factory=list)
    wslices: list = field(default_factory=list)
    wassign: list = field(default_factory=list)

    def tile(self, i: int) -> tuple[dict, dict]:
        """Slice ``i``'s bands as {node: ((lo, hi), ...)} per axis: what to compute (values with an empty band
        along any axis left out) and what each target takes."""
        if not self.wslices:
            return ({n: (b,) for n, b in self.slices[i].items() if b[0] < b[1]},
                    {n: (b,) for n, b in self.assign[i].items()})
        h, w, ha, wa = self.slices[i], self.wslices[i], self.assign[i], self.wassign[i]
        need = {n: (b, w[n]) for n, b in h.items() if n in w and b[0] < b[1] and w[n][0] < w[n][1]}
        return need, {n: (b, wa[n]) for n, b in ha.items() if n in wa}


def _assign(region: HaloRegion, targets: list, i: int, count: int, axis: int) -> dict:
    assign = {}
    for t in dict.fromkeys(targets):
        length = region.length(t, axis)
        bounds = slice_bounds(length, min(count, length))
        if i < len(bounds):
            s, k = bounds[i]
            assign[t] = (s, s + k)
    return assign


def park_root(region: HaloRegion, x: Node) -> Node:
    """What a region parks for a GroupNorm input ``x``: the value whose storage ``x`` views (back through
    reshapes and permutes inside the region), so that the passes after read that value back too, not only its
    view (a residual add whose permuted view feeds a temporal GroupNorm, read again by the mix after it)."""
    while x.args and isinstance(x.args[0], Node) and x.args[0] in region.inside and aliases(x) and \
            region.lengths(x.args[0]) == region.lengths(x):
        x = x.args[0]
    return x


def parkable(region: HaloRegion) -> list:
    """The values a region may park in host memory (NOTE [Host checkpoints]): for the inputs of its GroupNorms
    that it computes (a region input is read, not computed), the values they view (:func:`park_root`), by level
    then graph order."""
    levels = stat_levels(region)
    out = []
    for g in sorted(levels, key=lambda g: levels[g]):
        x = g.args[0]
        if x in region.inside:
            r = park_root(region, x)
            if r not in out:
                out.append(r)
    return out


def passes(region: HaloRegion) -> list[Pass]:
    """The statistics passes (one per level) and the output pass, each with every slice's bands (a grid's
    slices run row by row: slice ``i`` is row ``i // cols``, column ``i % cols``). A parked value (NOTE [Host
    checkpoints]) is written by the pass whose targets it is and read by every later pass that needs it."""
    levels = stat_levels(region)
    out = []
    for lv in range(max(levels.values(), default=-1) + 1):
        gns = [g for g, v in levels.items() if v == lv]
        out.append(Pass(gns))
    out.append(Pass([]))
    bad = set(region.parked) - set(parkable(region))
    if bad:
        raise ValueError(f"parked values {sorted(n.name for n in bad)} are not GroupNorm inputs this region computes")
    rows, cols = region.rows, region.cols
    read: frozenset = frozenset()
    last: dict = {}  # parked value -> the last pass that reads it
    for k, ps in enumerate(out):
        targets = [g.args[0] for g in ps.stats] if ps.stats else list(region.outputs)
        ps.read = read
        if ps.stats:
            roots = (park_root(region, t) for t in targets if t in region.inside)
            ps.park = tuple(r for r in dict.fromkeys(roots) if r in region.parked)
            targets += [r for r in ps.park if r not in targets]  # each slice writes its assigned rows
        hcache, wcache = {}, {}
        for i in range(region.count):
            r, c = divmod(i, cols)
            if r not in hcache:
                a = _assign(region, targets, r, rows, 0)
                hcache[r] = (a, needs(region, a, 0, read))
            ps.assign.append(hcache[r][0])
            ps.slices.append(hcache[r][1])
            if cols > 1:
                if c not in wcache:
                    a = _assign(region, targets, c, cols, 1)
                    wcache[c] = (a, needs(region, a, 1, read))
                ps.wassign.append(wcache[c][0])
                ps.wslices.append(wcache[c][1])
        for v in read:
            if any(v in need for need, _ in (ps.tile(i) for i in range(len(ps.slices)))):
                last[v] = k
        for v in ps.park:
            last[v] = k
        read = read | frozenset(ps.park)
    for k, ps in enumerate(out):
        ps.free = tuple(v for v in region.parked if last.get(v) == k)
    return out


def host_peak(ps: list) -> int:
    """The most host memory a region's parked values take at once over its passes ``ps``."""
    live = peak = 0
    for p in ps:
        live += sum(_tensor_bytes(v) for v in p.park)
        peak = max(peak, live)
        live -= sum(_tensor_bytes(v) for v in p.free)
    return peak


def choose_parked(region: HaloRegion, host_bytes: int) -> frozenset:
    """The values ``region`` parks in host memory within ``host_bytes`` (NOTE [Host checkpoints]): every
    :func:`parkable` value if they fit at once, else every second one (by level), every third, ...: the
    smallest stride whose host peak fits (none if even one value does not). Returns the set; the region is
    left as it was."""
    cands = parkable(region)
    before = region.parked
    try:
        for stride in range(1, len(cands) + 1):
            region.parked = frozenset(cands[::stride])
            if host_peak(passes(region)) <= host_bytes:
                return region.parked
    finally:
        region.parked = before
    return frozenset()


@dataclass
class HaloPlan:
    """What a region holds and computes: the peak of its slices' bands (``working_bytes``, on top of its full
    outputs), its passes, and its FLOPs over the unsliced ops' (``compute_factor``: halos and statistics
    passes recomputed)."""

    working_bytes: int
    passes: int
    compute_factor: float
    peak_pass: int = 0
    host_bytes: int = 0  # host memory its parked values take at once (NOTE [Host checkpoints])
    host_traffic: int = 0  # bytes copied between device and host per call: parked rows written, bands read back


def aliases(n: Node) -> bool:
    """Whether a view-like op's result shares its input's storage (read off the full-size values)."""
    if n.target not in _ALIAS_OPS:
        return False
    v, x = n.meta.get("val"), n.args[0].meta.get("val")
    return isinstance(v, torch.Tensor) and isinstance(x, torch.Tensor) and _same_storage(v, x)


def _same_storage(a, b) -> bool:
    from torch.multiprocessing.reductions import StorageWeakRef
    try:
        return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())
    except (AttributeError, RuntimeError):
        return False


_ALIAS_OPS = set(VIEWS) | {aten.permute.default, aten.transpose.int, aten.alias.default, aten.detach.default,
                            aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.contiguous.default,
                            aten.dropout.default}


def _static(region: HaloRegion) -> dict:
    """Per region op, what the plan needs of it: (its bytes, its lengths along the sliced axes, whether it aliases
    its first input, a convolution's per-axis band parameters with its input's bytes and lengths, the factor of a
    float32 working copy (0: none), the per-axis upsampling factors (0: none))."""
    if region._static is None:
        out = {}
        for n in region.nodes:
            ds = [ax[n] for ax in region.axes]
            alias = n.args[0] in region.inside and aliases(n)
            conv = None
            kind = kind_at(n, ds[0])
            if kind == "conv":
                x = n.args[0]
                conv = ([conv_params(n, d - 2) for d in ds], _tensor_bytes(x), [_shape(x)[d] for d in ds])
            v = n.meta["val"]
            f32 = 0.0
            if kind == "stats" and v.dtype not in (torch.float32, torch.float64):
                g = n.args[1]
                f32 = 4 / v.element_size() * math.ceil(g / norm_chunks(v.dtype, g)) / g
            up = [upsample_factor(n, d) for d in ds] if kind == "upsample" else None
            out[n] = (_tensor_bytes(n), math.prod(region.lengths(n)), alias, conv, f32, up)
        region._static = out
    return region._static


NORM_CHUNKS = 8  # a half-precision band is normalised in this many chunks of groups (float32 working copies)


def norm_chunks(dtype: torch.dtype, groups: int) -> int:
    """How many chunks of groups the runtime normalises a GroupNorm band in: 1 in float32 (its working copy is
    its output), else up to ``NORM_CHUNKS``."""
    return 1 if dtype in (torch.float32, torch.float64) else min(NORM_CHUNKS, groups)


def _copy_factor(n: Node) -> int:
    """A statistics pass's float32 copy of a GroupNorm input band over the band's bytes (0: none, float32)."""
    v = n.meta["val"]
    return 0 if v.dtype in (torch.float32, torch.float64) else 4 // v.element_size()


def _cells(bands) -> int:
    return math.prod(hi - lo for lo, hi in bands)


def plan_halo(region: HaloRegion, flops: dict | None = None, ps: list | None = None, carry: bool = False) -> HaloPlan:
    """Simulate every pass and slice: bands made in order, freed after their last use in the slice (a view
    keeps its input's storage), transients while their op runs (a convolution's padded input, a GroupNorm's
    float32 working copy, a statistics pass's float32 copy of the band it sums). Inputs are views of the
    caller's values. ``ps``: the region's :func:`passes`, if already made.

    NOTE [Slices simulated together]: which values a slice makes, which one each view keeps alive, and when each
    is freed depend only on which values the slice computes, not on its rows; the slices of a pass mostly compute
    the same values. So the slices are grouped by that set, the schedule is made once per group, and the bytes of
    every slice of the group are computed at once (integer arrays, slices x values): live bytes at each op are
    the running sum of what was made minus what was freed before it; the op's transients add on top. ``carry``:
    the convolutions keep line buffers (NOTE [Line buffers])."""
    return simulate_halo(region, ps, carry).plan(region, flops)


@dataclass(frozen=True)
class HaloSimulation:
    """What :func:`plan_halo` simulates, before FLOPs weigh it: the peak, the passes, the pass of the peak, and
    per region op (in order) the rows (cells) computed over all slices and passes and its rows whole."""

    working_bytes: int
    passes: int
    peak_pass: int
    cells: tuple
    whole_cells: tuple
    host_bytes: int = 0
    host_traffic: int = 0

    def plan(self, region: HaloRegion, flops: dict | None = None) -> HaloPlan:
        """The :class:`HaloPlan` of ``region`` (the region simulated, or one with the same ops in the same order)
        with planned compute from ``flops`` (by node name)."""
        total = sum((flops or {}).get(n.name, 0) for n in region.nodes)
        work = sum(flops.get(n.name, 0) / max(w, 1) * c
                   for n, w, c in zip(region.nodes, self.whole_cells, self.cells)) if flops else 0.0
        return HaloPlan(self.working_bytes, self.passes, work / total if total else 1.0, self.peak_pass,
                        self.host_bytes, self.host_traffic)


def simulate_halo(region: HaloRegion, ps: list | None = None, carry: bool = False) -> HaloSimulation:
    """:func:`plan_halo`'s simulation of every pass and slice, which FLOPs do not change; ``carry``: the
    convolutions keep line buffers (NOTE [Line buffers])."""
    ps = passes(region) if ps is None else ps
    static = _static(region)
    cols, carry_on = region.cols, carry
    peaks = []
    cells_made = dict.fromkeys(region.nodes, 0)  # per value, its rows (cells) computed over all slices and passes
    host, host_peak, traffic = 0, 0, 0
    for p in ps:
        targets = {g.args[0] for g in p.stats}
        copy = {t: (_copy_factor(t) * _tensor_bytes(t), max(math.prod(region.lengths(t)), 1)) for t in targets}
        host += sum(_tensor_bytes(v) for v in p.park)
        host_peak = max(host_peak, host)
        traffic += sum(_tensor_bytes(v) for v in p.park)
        groups: dict = {}
        tiles = [p.tile(i) for i in range(len(p.slices))]
        carry = [n for n in region.nodes if carry_on and HALO_RULES[n.target].kind == "conv" and n not in p.read]
        waiting = []  # per tile, the bytes of the tails it makes (they wait for the next tile of its column)
        for i, (need, assign) in enumerate(tiles):
            traffic += sum(static[v][0] * _cells(need[v]) // max(static[v][1], 1) for v in p.read if v in need)
            prev = tiles[i - cols][0] if i >= cols else {}
            nxt = tiles[i + cols][0] if i + cols < len(tiles) else {}
            kin, kout = {}, {}
            for n in carry:
                b = need.get(n)
                if b is None:
                    continue
                if n in prev:
                    kin[n] = carried_rows(prev[n][0], b[0])
                if n in nxt:
                    k = kept_rows(b[0], nxt[n][0])
                    if k is not None:
                        kout[n] = k[1] - k[0]
            made = sum(static[n][0] * r * _cells(need[n][1:]) // max(static[n][1], 1) for n, r in kout.items())
            waiting.append(made)
            others = sum(waiting[max(0, i - cols + 1):i])  # the other columns' tails, made before this tile
            groups.setdefault(frozenset(need), []).append((need, assign, kin, kout, others))
        peak = 0
        for t in targets:  # a region input is summed straight away
            if t not in region.inside:
                peak = max([peak] + [copy[t][0] * _cells(tile[1][t]) // copy[t][1]
                                     for group in groups.values() for tile in group if t in tile[1]])
        for group in groups.values():
            peak = max(peak, _group_peak(region, static, group, targets, copy, cells_made, p.read))
        peaks.append(peak)
        host -= sum(_tensor_bytes(v) for v in p.free)
    best = max(peaks, default=0)
    best_pass = peaks.index(best) if best > 0 else 0
    return HaloSimulation(best, len(ps), best_pass, tuple(cells_made[n] for n in region.nodes),
                          tuple(static[n][1] for n in region.nodes), host_peak, traffic)


def _schedule(region: HaloRegion, need, read: frozenset = frozenset()) -> tuple[list, list, list]:
    """For a slice computing the values in ``need``: those values in order, whether each is a root (it holds
    storage; else a view of an earlier root), and the step after which each root is freed (its last use, or
    its views' last use). A value in ``read`` is read back from host memory: a root, whose inputs it does not
    use."""
    static = _static(region)
    todo = [n for n in region.nodes if n in need]
    last = {}
    for j, n in enumerate(todo):
        if n in read:
            continue
        for a in n.all_input_nodes:
            if a in region.inside:
                last[a] = j
    root, free = {}, {}
    for j, n in enumerate(todo):
        base = root.get(n.args[0]) if static[n][2] and n not in read else None
        root[n] = n if base is None else base
        free[root[n]] = max(free.get(root[n], j), last.get(n, j))
    return todo, [root[n] is n for n in todo], [free.get(n, -1) for n in todo]


def _group_peak(region: HaloRegion, static: dict, tiles: list, targets: set, copy: dict, cells_made: dict,
                read: frozenset = frozenset()) -> int:
    """The peak bytes of the slices ``tiles`` ((need, assign, rows carried in, rows kept, other columns' tails)
    of slices computing the same values) in one array computation (see NOTE [Slices simulated together] and NOTE
    [Line buffers]); adds each value's computed cells to ``cells_made`` (a value in ``read``, parked in host
    memory, is a band made by a copy: no cells, no transients)."""
    todo, is_root, free = _schedule(region, tiles[0][0], read)
    if not todo:
        return 0
    carries = {n for tile in tiles for n in tile[2]} | {n for tile in tiles for n in tile[3]}
    s, t = len(tiles), len(todo)
    bands = np.array([[tile[0][n] for n in todo] for tile in tiles], dtype=np.int64)  # (slices, values, axes, 2)
    lo, hi = bands[..., 0], bands[..., 1]
    cells = np.prod(hi - lo, axis=2)  # (slices, values)
    rows = hi[..., 0] - lo[..., 0]  # along height
    across = np.prod(hi[..., 1:] - lo[..., 1:], axis=2)  # cells per row (1 for bands of rows)
    kin = np.array([[tile[2].get(n, 0) for n in todo] for tile in tiles], dtype=np.int64)
    kout = np.array([[tile[3].get(n, 0) for n in todo] for tile in tiles], dtype=np.int64)
    made = np.zeros((s, t), dtype=np.int64)  # bytes a root makes
    extra = np.zeros((s, t), dtype=np.int64)  # transients while the op runs
    old = np.zeros((s, t), dtype=np.int64)  # the tail carried in: live from the slice's start to its step
    new = np.zeros((s, t), dtype=np.int64)  # the tail kept: live from its step to the slice's end
    for j, n in enumerate(todo):
        size, ncells, _, conv, f32, up = static[n]
        c = cells[:, j]
        if n in read:
            made[:, j] = size * c // max(ncells, 1)
            continue
        if n in carries:
            c = (rows[:, j] - kin[:, j]) * across[:, j]  # the rows past the tail
        cells_made[n] += int(c.sum())
        if is_root[j]:
            if up is not None:  # an upsampled band is made whole from its input rows, then narrowed
                f = np.array(up, dtype=np.int64)
                c = np.prod(((hi[:, j] - 1) // f + 1 - lo[:, j] // f) * f, axis=1)
            made[:, j] = size * cells[:, j] // max(ncells, 1) if n in carries else size * c // max(ncells, 1)
        if f32:
            extra[:, j] = ((size * f32) * cells[:, j] / max(ncells, 1)).astype(np.int64)
        pad_bytes = 0
        if conv is not None:  # the padded copy of its input band, where the band reaches the padding
            params, xsize, xlens = conv
            k, st, pad, dil = (np.array(v, dtype=np.int64) for v in zip(*params))
            start = lo[:, j].copy()
            start[:, 0] += kin[:, j]
            a = start * st - pad
            b = (hi[:, j] - 1) * st - pad + dil * (k - 1) + 1
            padded = ((a < 0) | (b > np.array(xlens, dtype=np.int64))).any(axis=1) & (start[:, 0] < hi[:, j, 0])
            pad_bytes = np.where(padded, xsize * np.prod(b - a, axis=1) // max(math.prod(xlens), 1), 0)
            extra[:, j] = pad_bytes
        if n in carries:
            whole = size * cells[:, j] // max(ncells, 1)
            part = (0 < kin[:, j]) & (kin[:, j] < rows[:, j])  # new rows made, then joined to the tail
            new_bytes = size * c // max(ncells, 1)
            extra[:, j] = np.where(part, new_bytes + np.maximum(pad_bytes - whole, 0), pad_bytes)
            old[:, j] = np.where(kin[:, j] < rows[:, j], size * kin[:, j] * across[:, j] // max(ncells, 1), 0)
            new[:, j] = size * kout[:, j] * across[:, j] // max(ncells, 1)
        if n in targets:
            summed = np.array([copy[n][0] * _cells(tile[1][n]) // copy[n][1] if n in tile[1] else 0
                               for tile in tiles], dtype=np.int64)
            extra[:, j] = np.maximum(extra[:, j], summed)
    freed = np.zeros((s, t + 1), dtype=np.int64)  # bytes freed after step j, counted from step j + 1
    for j in range(t):
        if is_root[j]:
            freed[:, free[j] + 1] += made[:, j]
    alloc = made.copy()  # bands read back from host memory are made at the slice's start (prefetched)
    back = [j for j, n in enumerate(todo) if n in read]
    if back:
        alloc[:, back] = 0
        alloc[:, 0] += made[:, back].sum(axis=1)
    live = np.cumsum(alloc, axis=1) - np.cumsum(freed[:, :t], axis=1)
    tails = old[:, ::-1].cumsum(axis=1)[:, ::-1] + np.cumsum(new, axis=1) - new  # a tail is kept after its step
    tails += np.array([tile[4] for tile in tiles], dtype=np.int64)[:, None]
    return int((live + extra + tails).max())


__all__ += ["stat_levels", "passes", "parkable", "carried_rows", "kept_rows", "choose_parked", "host_peak", "Pass", "halo_rule", "aliases", "transfers"]
