"""Feature Slicer: decide which chains of ops are sliced along which axis. Analysis only; nothing is rewritten.

For each axis found in the graph (analysis/axes.py: a dim of an input, named from the ops, such as batch,
frames, height, width or tokens) whose name the policy gives a slice count, the slicer floods the graph from
that input: every op reached gets the cut its rule allows (``Flood``, analysis/flood.py). Each op that could be cut along
several axes is given one (``_anchor_bans``, see NOTE [Outermost axis first]). Ops connected by edges whose cuts
agree form candidate regions (``_components``); a region must not need its own values whole, and must be convex
(no path leaves it and comes back), so both are enforced. Candidates that still overlap (ops no anchor claims)
are settled greedily by the bytes they keep from ever being materialised; a node belongs to at most one region.

NOTE [Queries only]
An attention cut along its sequence slices its queries and needs its keys and values whole. In self-attention all
three come from the same normed tokens, so the flood puts the key and value projections in the attention's own
region, cut; the region would then need its own values whole. The attention's rule says its producers leave
(``Rule.producers_leave``): the keys, the values and everything they are made from inside the region (the norm,
the blocks before it) are split off, run whole (or as a region of their own) before it, and the attention, its
query projection and what follows (output projection, feed-forward) stay sliced along the queries.

NOTE [Why flood from the input]
An axis is a fact about the data (the height of the video), not about one tensor. Starting from the input and
following rules forwards and backwards names every tensor's copy of that axis, however it is reshaped
(``(B*F, C, H, W)``, ``(B*H*W, F, C)``, ...), so the report can say "height" instead of "dim 0".
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from .axes import Axis, axis_floods, find_axes
from .cuts import PARTIAL, Cut, slice_bounds
from .effects import Effects, find_effects
from .flood import Flood
from .rules import WHOLE, rule_for

log = logging.getLogger(__name__)

__all__ = ["Axis", "Region", "SlicePlan", "plan_slicing", "find_axes", "tensor_bytes",
           "nonconvex"]



@dataclass
class Region:
    """A connected chain of ops that share one slicing along ``axis``."""

    axis: Axis
    count: int
    nodes: list  # in graph order
    cuts: dict  # node -> Cut | PARTIAL
    inputs: list = field(default_factory=list)  # [(node, Cut | None)]
    outputs: list = field(default_factory=list)  # [(node, Cut | PARTIAL)]
    saved_bytes: int = 0
    largest_interior_bytes: int = 0
    reqs: dict = field(default_factory=dict)  # node -> {input: Cut | PARTIAL | WHOLE} from its rule

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return slice_bounds(self.axis.length, self.count)

    @property
    def module(self) -> str:
        return common_module_path(self.nodes)


@dataclass
class SlicePlan:
    regions: list
    reasons: dict  # node -> why it is not sliced
    axes: list = field(default_factory=list)  # every axis of the graph's inputs (analysis/axes.py), sliced or not


def tensor_bytes(n: Node) -> int:
    v = n.meta.get("val")
    vs = v if isinstance(v, (list, tuple)) else [v]
    return sum(t.numel() * t.element_size() for t in vs if isinstance(t, torch.Tensor))


def module_path(n: Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def common_module_path(nodes) -> str:
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(common), len(p)) and common[i] == p[i]:
            i += 1
        common = common[:i]
    return ".".join(common)


def _components(flood: Flood, allowed: set) -> list[set]:
    g = nx.Graph()
    g.add_nodes_from(allowed)
    for n in allowed:
        for p, c in flood.req[n].items():
            if p in allowed and c == flood.cut[p]:
                g.add_edge(p, n)
    return [set(c) for c in nx.connected_components(g)]


def _ancestors_in(node: Node, comp: set) -> set:
    out, work = set(), [node]
    while work:
        n = work.pop()
        if n in comp and n not in out:
            out.add(n)
            work.extend(n.all_input_nodes)
    return out


def _conflicts(flood: Flood, comp: set) -> tuple[set, set]:
    """(nodes, producers): nodes needing a value of their own region whole (or cut otherwise) must leave it; where
    the node's rule says so (``Rule.producers_leave``: an attention sliced along its queries needs its keys and
    values whole), the value and what it is made from within the region leave instead."""
    bad, leave = set(), set()
    for n in comp:
        for p, c in flood.req[n].items():
            if p in comp and c != flood.cut[p]:
                rule = rule_for(n)
                if rule is not None and rule.producers_leave and c is WHOLE:
                    leave |= _ancestors_in(p, comp)
                else:
                    bad.add(n)
        if flood.cut[n] is PARTIAL and any(u in comp for u in n.users):
            bad.update(u for u in n.users if u in comp)
        # a list (chunk, split) is sliced only together with every getitem of it
        if isinstance(n.meta.get("val"), (list, tuple)) and any(u not in comp for u in n.users):
            bad.add(n)
            bad.update(u for u in n.users if u in comp)
        if n.target is operator.getitem and n.args[0] not in comp:
            bad.add(n)
    return bad, leave


def nonconvex(comp: set, order: dict, effects: Effects | None = None) -> set:
    """Region nodes reached from the region through a node outside it: they must leave it. Paths follow data
    edges and the ordering edges of in-place writes (``effects``)."""
    lo, hi = min(order[n] for n in comp), max(order[n] for n in comp)
    tainted, bad = set(), set()
    effects = effects or Effects()
    for n in sorted((m for m in order if lo <= order[m] <= hi), key=order.get):
        inputs = effects.inputs(n)
        if n in comp:
            if any(p in tainted for p in inputs):
                bad.add(n)
                tainted.add(n)
        elif any(p in tainted or (p in comp and p not in bad) for p in inputs):
            tainted.add(n)
    return bad


def _regions_of(flood: Flood, allowed: set, order: dict, effects: Effects) -> list[set]:
    pending, done = [set(allowed)], []
    while pending:
        s = pending.pop()
        for comp in _components(flood, s):
            bad, leave = _conflicts(flood, comp)
            if leave and leave != comp:  # keys and values run whole before the region (NOTE [Queries only])
                pending.extend([comp - leave, leave])
                continue
            if bad:  # these need a value of their own region whole: they stay outside
                for b in bad:
                    flood.reason[b] = "needs a value of the region it would join whole"
                pending.append(comp - bad)
                continue
            later = nonconvex(comp, order, effects)
            if later:  # a path leaves the region and comes back: what it reaches starts a region of its own
                pending.extend([comp - later, later])
            else:
                done.append(comp)
    return done


def _make_region(axis: Axis, count: int, comp: set, flood: Flood, order: dict, output_nodes: set) -> Region:
    nodes = sorted(comp, key=order.get)
    inputs = []  # (node, cut): a value needed both sliced and whole enters twice
    for n in nodes:
        for p in n.all_input_nodes:
            if p not in comp and (p, flood.req[n].get(p, WHOLE)) not in inputs:
                inputs.append((p, flood.req[n].get(p, WHOLE)))
    outputs, interior = [], []
    for n in nodes:
        if any(u not in comp for u in n.users) or n in output_nodes:
            outputs.append((n, flood.cut[n]))
        else:
            interior.append(tensor_bytes(n))
    return Region(axis, count, nodes, {n: flood.cut[n] for n in nodes}, inputs, outputs,
                  sum(interior), max(interior, default=0), {n: flood.req[n] for n in nodes})


def _sub_region(r: Region, nodes: list, output_nodes: set) -> Region:
    """The part ``nodes`` (in graph order) of region ``r`` as a region of its own: what the other parts make
    enters whole or cut as its rule asks (a cut value leaves its part as a full-size output)."""
    comp = set(nodes)
    inputs = []
    for n in nodes:
        for p in n.all_input_nodes:
            c = r.reqs[n].get(p, WHOLE)
            if p not in comp and (p, c) not in inputs:
                inputs.append((p, c))
    outputs, interior = [], []
    for n in nodes:
        if any(u not in comp for u in n.users) or n in output_nodes:
            outputs.append((n, r.cuts[n]))
        else:
            interior.append(tensor_bytes(n))
    return Region(r.axis, r.count, nodes, {n: r.cuts[n] for n in nodes}, inputs, outputs, sum(interior),
                  max(interior, default=0), {n: r.reqs[n] for n in nodes})


def _part_peaks(parts: list, order: dict, output_nodes: set, count: int) -> list:
    """Estimated bytes live while each part of a region runs (NOTE [Regions split where they hold too much]):
    every whole value some later part or a later op still needs (activations only), the part's outputs, and
    two of its largest interior values per slice."""
    where = {n: i for i, part in enumerate(parts) for n in part}
    last = max(order[n] for part in parts for n in part)
    need_until: dict = {}  # value -> index of the last part that needs it (len(parts): needed after the region)
    for i, part in enumerate(parts):
        for n in part:
            for p in n.all_input_nodes:
                if p.op != "placeholder" and where.get(p) != i:
                    need_until[p] = max(need_until.get(p, -1), i)
    for part in parts:
        for n in part:
            if n in output_nodes or any(u not in where and order[u] > last for u in n.users):
                need_until[n] = len(parts)
    peaks = []
    for i, part in enumerate(parts):
        held = sum(tensor_bytes(v) for v, j in need_until.items() if j >= i and (v not in where or where[v] <= i))
        interior = sorted((tensor_bytes(n) for n in part if n not in need_until), reverse=True)
        peaks.append(held + sum(interior[:2]) // count)
    return peaks


def _split_points(nodes: list) -> list:
    """Indices ``i`` where ``nodes[:i]`` / ``nodes[i:]`` may be two regions: no list value (chunk, unbind) is
    separated from its items."""
    pos = {n: i for i, n in enumerate(nodes)}
    bad = set()
    for n in nodes:
        if isinstance(n.meta.get("val"), (list, tuple)):
            items = [pos[u] for u in n.users if u in pos]
            bad.update(range(pos[n] + 1, max(items, default=pos[n]) + 1))
    return [i for i in range(1, len(nodes)) if i not in bad]


def _split_for_peak(r: Region, order: dict, output_nodes: set, floor: float) -> list:
    """NOTE [Regions split where they hold too much]
    A region holds every whole value it reads and every output it makes for as long as it runs: the outputs are
    allocated when it starts, and an input it reads only at its beginning stays alive to its end. A transformer
    block sliced along its queries reads the keys, values, normed tokens and rotary tables whole, and the same
    region goes on through the feed-forward into the next block's key and value projections, whose whole outputs
    it makes: all of them live at once. So a region is cut, in graph order (each part stays convex: edges go
    forward), where that lowers the estimated bytes live while its parts run (``_part_peaks``: the values some
    later part or a later op still needs, each part's outputs, and two of its largest interior values per slice),
    greedily, one cut at a time, while a cut lowers the largest estimate by at least 5% and each part keeps an
    interior value of at least the region floor. Values crossing a cut become a whole output and input, which the
    estimate counts; the compiler's planned peak remains the judge (NOTE [A region must not raise the peak]).

    Splitting costs a compile, so it is tried only where it can lower the planned peak: ``compile_graph`` compiles
    unsplit first, and compiles again with every region split only if this search would cut the cut region where
    that compile's planned peak falls, or a region it left whole because it raised the peak (``would_split``, on
    the regions already planned; split, such a region may no longer raise it: Wan's rotary tables). The split
    compile is kept only if its planned peak is lower. A peak outside every region or in a region the search leaves
    whole costs nothing more: SVD's UNet peaks in a region it leaves whole and compiles once, as it did before
    splitting; AnimateDiff's motion modules, LTX-Video and Wan peak in regions it cuts. All regions are split, not
    just the one at the peak: once it is split the peak moves to the next one (AnimateDiff: splitting only the
    region at the peak, three rounds, planned 0.57 GiB against 0.52 GiB with every region split in one)."""
    if len(r.nodes) < 2:
        return [r]
    parts = [list(r.nodes)]
    best = max(_part_peaks(parts, order, output_nodes, r.count))
    while True:
        choice = None
        for k, part in enumerate(parts):
            for i in _split_points(part):
                a, b = part[:i], part[i:]
                if any(_interior_max(x, output_nodes) < max(floor, 1) for x in (a, b)):
                    continue
                trial = parts[:k] + [a, b] + parts[k + 1:]
                peak = max(_part_peaks(trial, order, output_nodes, r.count))
                if choice is None or peak < choice[0]:
                    choice = (peak, trial)
        if choice is None or choice[0] > 0.95 * best:
            break
        best, parts = choice
    if len(parts) == 1:
        return [r]
    log.debug("region of %d ops split in %d parts", len(r.nodes), len(parts))
    return [_sub_region(r, part, output_nodes) for part in parts]


def _interior_max(part: list, output_nodes: set) -> int:
    mine = set(part)
    return max((tensor_bytes(n) for n in part if n not in output_nodes and all(u in mine for u in n.users)),
               default=0)


# Ops that treat some dims as batch and others as features: each is sliced along its outermost sliceable axis.
ANCHOR_KINDS = frozenset({"linear", "conv", "norm", "attention", "softmax"})


def _anchor_bans(axes, floods: dict) -> dict:
    """For each axis (by ``Axis.key``), the nodes that belong to another axis.

    NOTE [Outermost axis first]
    An op that can be cut along several axes (a linear over ``(B*F, H*W, C)`` along frames or along height) is
    cut along the one in its outermost dim: there each slice is a contiguous block and the op sees the dim as
    batch. This puts spatial layers on frames and temporal layers on height, as the paper does, without
    knowing which layer is which. Two axes in the same dim (the factors of a ``(B*F, C, H, W)`` batch) go to the
    outer factor. Pointwise and view ops ("glue") have no preference of their own: each goes with the axis of its
    nearest anchor op, counting steps along edges whose cuts agree.
    """
    best: dict = {}
    for a in axes:
        flood = floods[a.key]
        for n, c in flood.cut.items():
            rule = rule_for(n)
            if n in flood.req and isinstance(c, Cut) and rule is not None and rule.kind in ANCHOR_KINDS:
                rank = (c.dim, c.outer)
                if n not in best or rank < best[n][0]:
                    best[n] = (rank, a.key)
    owner = {n: key for n, (_, key) in best.items()}
    dist: dict = {}
    for a in axes:
        flood = floods[a.key]
        g = nx.Graph()
        for n, req in flood.req.items():
            for p, c in req.items():
                if p in flood.req and c == flood.cut[p]:
                    g.add_edge(p, n)
        glue = {n for n in g if n not in best}
        sources = [n for n in g if owner.get(n) == a.key]
        for n, d in nx.multi_source_dijkstra_path_length(g.subgraph(glue | set(sources)), sources).items() \
                if sources else []:
            if n in glue and (n not in dist or d < dist[n][0]):
                dist[n] = (d, a.key)
    owner.update({n: key for n, (_, key) in dist.items()})
    return {a.key: {n for n, key in owner.items() if key != a.key} for a in axes}


def _graph_facts(gm: GraphModule, min_fraction: float) -> tuple:
    """The node order, the graph's output values and the region floor (``min_fraction`` of the largest
    activation)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    biggest = max((tensor_bytes(n) for n in gm.graph.nodes if n.op == "call_function"), default=0)
    return order, set(out_node.all_input_nodes), min_fraction * biggest


def would_split(gm: GraphModule, region: Region, min_fraction: float) -> bool:
    """Whether ``plan_slicing(..., split=True)`` would cut ``region`` (one of a plan of ``gm``) in parts
    (NOTE [Regions split where they hold too much])."""
    order, output_nodes, floor = _graph_facts(gm, min_fraction)
    return len(_split_for_peak(region, order, output_nodes, floor)) > 1


def plan_slicing(gm: GraphModule, counts: dict, min_fraction: float, axes: list | None = None,
                 split: bool = False) -> SlicePlan:
    """Choose the regions for ``gm``: ``counts`` gives each axis name (``"frames"``, ``"height"``, ``"width"``,
    ``"batch"``, ``"tokens"``) its slice count (1 or missing: not sliced); a region is kept if its largest interior
    value is at least ``min_fraction`` of the graph's largest activation. ``axes``: the graph's axes if already
    found on another copy of the same capture (``compiler.axes_of``), else they are found here. ``split``: cut
    regions where they hold too much (NOTE [Regions split where they hold too much]). ``gm`` must carry
    ``meta["val"]`` on every node."""
    order, output_nodes, floor = _graph_facts(gm, min_fraction)
    if axes is None:  # found here (else on another copy of the same capture: the names hold for every copy)
        found = axis_floods(gm)
        axes, effects, floods = found.axes, found.effects, found.floods
    else:
        effects, floods = find_effects(gm), {}
    every = list(axes)
    axes = [a for a in axes if counts.get(a.name, 1) > 1]
    for a in axes:
        if a.key not in floods:
            floods[a.key] = Flood(gm, a, set(), effects.pinned)
    taken: set = set()
    regions, reasons = [], {}
    banned = _anchor_bans(axes, floods)

    def candidates(axis):
        flood = Flood(gm, axis, taken | banned[axis.key], effects.pinned)
        out = []
        for length in sorted(set(flood.length[n] for n in flood.req)):
            allowed = {n for n in flood.req if flood.length[n] == length and n not in taken}
            sub = replace(axis, length=length)
            count = min(counts.get(axis.name, 1), length)
            out.extend(_keep_large(sub, count, _regions_of(flood, allowed, order, effects), flood))
        for n, r in flood.reason.items():  # after the regions: they add why an op had to leave one
            reasons.setdefault(n, f"{axis.name}: {r}")
        return out

    def _keep_large(axis, count, comps, flood):
        out = []
        for comp in comps:
            reg = _make_region(axis, count, comp, flood, order, output_nodes)
            if count > 1 and reg.largest_interior_bytes > 0 and reg.largest_interior_bytes >= floor:
                out.append(reg)
            else:
                for n in comp:
                    reasons.setdefault(n, f"{axis.name}: region too small to pay for its loop")
        return out

    axis_by_key = {a.key: a for a in axes}
    pool = [r for a in axes for r in candidates(a)]
    while pool:
        best = max(pool, key=lambda r: r.saved_bytes)
        pool.remove(best)
        if taken.isdisjoint(best.nodes):
            regions.append(best)
            taken.update(best.nodes)
        else:  # it overlaps a chosen region: that axis is planned again without the taken nodes
            pool = [r for r in pool if r.axis.key != best.axis.key] + candidates(axis_by_key[best.axis.key])
    if split:
        regions = [piece for r in regions for piece in _split_for_peak(r, order, output_nodes, floor)]
    regions.sort(key=lambda r: order[r.nodes[0]])
    for r in regions:
        for n in r.nodes:
            reasons.pop(n, None)
    log.debug("planned %d regions", len(regions))
    return SlicePlan(regions, reasons, every)
