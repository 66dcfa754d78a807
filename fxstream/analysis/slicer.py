"""Feature Slicer: decide which chains of ops are sliced along which axis. Analysis only; nothing is rewritten.

For each named axis of the video latent (batch, frames, height, width) the slicer floods the graph from the
latent input: every op reached gets the cut its rule allows (``_Flood``). Each op that could be cut along
several axes is given one (``_anchor_bans``, see NOTE [Outermost axis first]). Ops connected by edges whose cuts
agree form candidate regions (``_components``); a region must not need its own values whole, and must be convex
(no path leaves it and comes back), so both are enforced. Candidates that still overlap (ops no anchor claims)
are settled greedily by the bytes they keep from ever being materialised; a node belongs to at most one region.

NOTE [Why flood from the input]
An axis is a fact about the data (the height of the video), not about one tensor. Starting from the latent and
following rules forwards and backwards names every tensor's copy of that axis, however it is reshaped
(``(B*F, C, H, W)``, ``(B*H*W, F, C)``, ...), so the report can say "height" instead of "dim 0".
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from ..errors import CantSlice
from .cuts import PARTIAL, Cut, slice_bounds
from .effects import Effects, find_effects
from .rules import WHOLE, RuleContext, rule_for, val_shape

from ..catalog import AXIS_NAMES, LAYOUTS
from ..meta import BodyInput, get_meta

log = logging.getLogger(__name__)

__all__ = ["Axis", "Region", "SlicePlan", "plan_slicing", "LAYOUTS", "find_axes", "tensor_bytes",
           "nonconvex"]



@dataclass(frozen=True)
class Axis:
    """A named axis of the latent input: which placeholder and dim it starts from, and its length."""

    name: str
    source: str  # placeholder name
    dim: int
    length: int


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


# Placeholder meta of a region body: True where the input enters every slice whole (``passes/group_regions``).


def _whole_body_input(n: Node) -> bool:
    b = get_meta(n, BodyInput)
    return b is not None and b.whole


def find_axes(gm: GraphModule, layout: str | None) -> list[Axis]:
    """Named axes of the first 5-D tensor input, from ``layout`` (e.g. ``"BFCHW"``).

    In a region body (a batch split compiled again) an input the body takes whole is not the latent: I2VGen-XL's
    ``sample.new_zeros(...)`` takes the full-batch ``sample`` for its dtype alone, ahead of the sliced one.
    """
    for n in gm.graph.nodes:
        if n.op != "placeholder" or n.name.startswith(("p_", "b_", "c_")) or _whole_body_input(n):
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() == 5 and layout:
            if v.numel() == 0:  # an empty video: nothing to slice
                return []
            return [Axis(AXIS_NAMES[c], n.name, i, int(v.shape[i])) for i, c in enumerate(layout)
                    if c in AXIS_NAMES and int(v.shape[i]) > 1]
    return []


def _candidate_cuts(node: Node, length: int):
    try:
        shape = val_shape(node)
    except CantSlice:
        return
    for e, s in enumerate(shape):
        if s % length:
            continue
        rest = s // length
        for outer in range(1, rest + 1):
            if rest % outer == 0:
                yield Cut(e, outer, rest // outer)
    yield PARTIAL


def _carry(n: Node, u: Node, c: Cut):
    """Where no rule lets the cut through ``u``, still name the axis in its output (same dim index, new
    length): a 3x3 convolution keeps the height, a strided one halves it. Used for naming only, never slicing."""
    if c is PARTIAL or not isinstance(u.meta.get("val"), torch.Tensor):
        return None
    try:
        su, sn = val_shape(u), val_shape(n)
    except CantSlice:
        return None
    k = c.outer * c.inner
    if len(su) != len(sn) or su[c.dim] % k or su[c.dim] // k < 2:
        return None
    return c, su[c.dim] // k


class _Flood:
    """Every node reached from an axis, with its cut and axis length; for nodes a rule lets slice, the input
    requirements the rule gives (``req``)."""

    def __init__(self, gm: GraphModule, axis: Axis, excluded: set, pinned: dict | None = None):
        self.cut: dict = {}
        self.length: dict = {}
        self.req: dict = {}
        self.through: dict = {}  # excluded nodes: their rule's requirements, followed only to name the axis
        self.reason: dict = {}
        self.excluded = excluded
        self.pinned = pinned or {}  # never sliced, and the flood does not pass them (analysis/effects.py)
        src = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == axis.source)
        self.cut[src], self.length[src] = Cut(axis.dim), axis.length
        self._run(src)

    def ctx(self, length: int) -> RuleContext:
        return RuleContext(length, lambda p: self.cut.get(p) if self.length.get(p) == length else None)

    def _try(self, node: Node, cut, length: int):
        if node in self.pinned:
            self.reason[node] = self.pinned[node]
            return None
        rule = rule_for(node)
        if rule is None:
            self.reason[node] = f"no slice rule for {node.target}"
            return None
        try:
            return rule.inputs(node, cut, self.ctx(length))
        except CantSlice as e:
            self.reason[node] = str(e)
            return None

    def _set(self, node, cut, length, req):
        self.cut[node], self.length[node] = cut, length
        if req is not None and node in self.excluded:
            self.through[node] = req
        elif req is not None:
            self.req[node] = req

    def _forward(self, n: Node, u: Node) -> bool:
        c, length = self.cut[n], self.length[n]
        why = {}
        for cand in _candidate_cuts(u, length):
            req = self._try(u, cand, length)
            if req is not None and req.get(n, WHOLE) == c:
                # an excluded node names the axis for its users and inputs but is not sliced itself
                self._set(u, cand, length, req)
                self.reason.pop(u, None)
                return True
            if u in self.reason:
                why[cand] = self.reason.pop(u)
        same_dim = [r for k, r in why.items() if isinstance(k, Cut) and k.dim == getattr(c, "dim", -1)]
        if why:
            self.reason[u] = (same_dim or list(why.values()))[0]
        carried = _carry(n, u, c)
        if carried is not None:
            self._set(u, *carried, None)
            return True
        return False

    def _run(self, src: Node):
        work = [src]
        while work:
            n = work.pop()
            for u in n.users:
                if u.op == "call_function" and u not in self.cut and self._forward(n, u):
                    work.append(u)
            # NOTE [Backwards through excluded nodes]: a value reached only backwards through glue another axis
            # owns (I2VGen-XL's image-latent encoder feeds the latent's cat) still gets this axis named
            for p, c in (self.req.get(n) or self.through.get(n) or {}).items():
                if isinstance(c, Cut) and p.op == "call_function" and p not in self.cut:
                    req = self._try(p, c, self.length[n])
                    if req is not None:
                        self._set(p, c, self.length[n], req)
                        work.append(p)


def _components(flood: _Flood, allowed: set) -> list[set]:
    g = nx.Graph()
    g.add_nodes_from(allowed)
    for n in allowed:
        for p, c in flood.req[n].items():
            if p in allowed and c == flood.cut[p]:
                g.add_edge(p, n)
    return [set(c) for c in nx.connected_components(g)]


def _conflicts(flood: _Flood, comp: set) -> set:
    """Nodes needing a value of their own region whole (or cut otherwise) must leave it."""
    bad = set()
    for n in comp:
        for p, c in flood.req[n].items():
            if p in comp and c != flood.cut[p]:
                bad.add(n)
        if flood.cut[n] is PARTIAL and any(u in comp for u in n.users):
            bad.update(u for u in n.users if u in comp)
        # a list (chunk, split) is sliced only together with every getitem of it
        if isinstance(n.meta.get("val"), (list, tuple)) and any(u not in comp for u in n.users):
            bad.add(n)
            bad.update(u for u in n.users if u in comp)
        if n.target is operator.getitem and n.args[0] not in comp:
            bad.add(n)
    return bad


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


def _regions_of(flood: _Flood, allowed: set, order: dict, effects: Effects) -> list[set]:
    pending, done = [set(allowed)], []
    while pending:
        s = pending.pop()
        for comp in _components(flood, s):
            bad = _conflicts(flood, comp)
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


def _make_region(axis: Axis, count: int, comp: set, flood: _Flood, order: dict, output_nodes: set) -> Region:
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


# Ops that treat some dims as batch and others as features: each is sliced along its outermost sliceable axis.
ANCHOR_KINDS = frozenset({"linear", "conv", "norm", "attention", "softmax"})


def _anchor_bans(gm: GraphModule, axes, pinned: dict) -> dict:
    """For each axis, the nodes that belong to another axis.

    NOTE [Outermost axis first]
    An op that can be cut along several axes (a linear over ``(B*F, H*W, C)`` along frames or along height) is
    cut along the one in its outermost dim: there each slice is a contiguous block and the op sees the dim as
    batch. This puts spatial layers on frames and temporal layers on height, as the paper does, without
    knowing which layer is which. Pointwise and view ops ("glue") have no preference of their own: each goes
    with the axis of its nearest anchor op, counting steps along edges whose cuts agree.
    """
    floods = {a.name: _Flood(gm, a, set(), pinned) for a in axes}
    best: dict = {}
    for name, flood in floods.items():
        for n, c in flood.cut.items():
            rule = rule_for(n)
            if n in flood.req and isinstance(c, Cut) and rule is not None and rule.kind in ANCHOR_KINDS:
                if n not in best or c.dim < best[n][0]:
                    best[n] = (c.dim, name)
    owner = {n: name for n, (_, name) in best.items()}
    dist: dict = {}
    for name, flood in floods.items():
        g = nx.Graph()
        for n, req in flood.req.items():
            for p, c in req.items():
                if p in flood.req and c == flood.cut[p]:
                    g.add_edge(p, n)
        glue = {n for n in g if n not in best}
        sources = [n for n in g if owner.get(n) == name]
        for n, d in nx.multi_source_dijkstra_path_length(g.subgraph(glue | set(sources)), sources).items() \
                if sources else []:
            if n in glue and (n not in dist or d < dist[n][0]):
                dist[n] = (d, name)
    owner.update({n: name for n, (_, name) in dist.items()})
    return {a.name: {n for n, name in owner.items() if name != a.name} for a in axes}


def plan_slicing(gm: GraphModule, counts: dict, min_fraction: float, layout: str | None) -> SlicePlan:
    """Choose the regions for ``gm``: ``counts`` gives each axis name (``"frames"``, ``"height"``, ``"width"``,
    ``"batch"``) its slice count (1 or missing: not sliced); a region is kept if its largest interior value is at
    least ``min_fraction`` of the graph's largest activation. ``gm`` must carry ``meta["val"]`` on every node."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    output_nodes = set(out_node.all_input_nodes)
    biggest = max((tensor_bytes(n) for n in gm.graph.nodes if n.op == "call_function"), default=0)
    floor = min_fraction * biggest
    axes = [a for a in find_axes(gm, layout) if counts.get(a.name, 1) > 1]
    taken: set = set()
    regions, reasons = [], {}
    effects = find_effects(gm)
    banned = _anchor_bans(gm, axes, effects.pinned)

    def candidates(axis):
        flood = _Flood(gm, axis, taken | banned[axis.name], effects.pinned)
        for n, r in flood.reason.items():
            reasons.setdefault(n, f"{axis.name}: {r}")
        out = []
        for length in sorted(set(flood.length[n] for n in flood.req)):
            allowed = {n for n in flood.req if flood.length[n] == length and n not in taken}
            sub = Axis(axis.name, axis.source, axis.dim, length)
            count = min(counts.get(axis.name, 1), length)
            out.extend(_keep_large(sub, count, _regions_of(flood, allowed, order, effects), flood))
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

    axis_by_name = {a.name: a for a in axes}
    pool = [r for a in axes for r in candidates(a)]
    while pool:
        best = max(pool, key=lambda r: r.saved_bytes)
        pool.remove(best)
        if taken.isdisjoint(best.nodes):
            regions.append(best)
            taken.update(best.nodes)
        else:  # it overlaps a chosen region: that axis is planned again without the taken nodes
            pool = [r for r in pool if r.axis.name != best.axis.name] + candidates(axis_by_name[best.axis.name])
    regions.sort(key=lambda r: order[r.nodes[0]])
    for r in regions:
        for n in r.nodes:
            reasons.pop(n, None)
    log.debug("planned %d regions", len(regions))
    return SlicePlan(regions, reasons)
