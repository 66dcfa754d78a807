"""The flood: every op an axis reaches through the rule table, with the cut each op's rule allows.

Starting from one axis of one input (a placeholder's dim, or a factor of it: ``Cut(dim, outer, inner)``), the flood
follows users forwards and rule requirements backwards. A node whose rule lets the cut through gets its cut, its
axis length and its inputs' requirements (``req``); a node no rule lets through still gets the axis named in its
output where the dim keeps its index (``_carry``: a 3x3 convolution keeps the height, a strided one halves it), for
naming only. The slicer (``slicer.py``) builds regions from ``req``; the axis finder (``axes.py``) names axes from
the positions the flood reaches.

NOTE [Arguments read for their dtype]
Some ops read an argument only for its dtype and device (``type_as(x, other)``); their rule leaves it out of the
requirements, so a slice of it serves as well as the whole. The flood does not pass such an op from that argument
(nothing says which of the op's dims the axis would be in) and leaves it unnamed, with no reason, until the axis
reaches it through the argument it does cut; the slicer passes the argument's slice inside a region and the whole
value from outside one.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from ..errors import CantSlice
from .cuts import PARTIAL, Cut
from .rules import WHOLE, RuleContext, rule_for, val_shape

__all__ = ["Flood"]


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
    length): a 3x3 convolution keeps the height, a strided one halves it. Used for naming only, never slicing.
    An output of one element along the axis (a convolution taking the last rows to one) names the op's position
    but is not followed further."""
    if c is PARTIAL or not isinstance(u.meta.get("val"), torch.Tensor):
        return None
    rule = rule_for(u)
    if rule is not None and rule.kind == "attention" and n is not u.args[0]:
        return None  # keys and values: their sequence is not the output's (the query's) sequence
    try:
        su, sn = val_shape(u), val_shape(n)
    except CantSlice:
        return None
    k = c.outer * c.inner
    if len(su) != len(sn) or su[c.dim] % k or su[c.dim] // k < 1:
        return None
    return c, su[c.dim] // k


class Flood:
    """Every node reached from an axis, with its cut and axis length; for nodes a rule lets slice, the input
    requirements the rule gives (``req``)."""

    def __init__(self, gm, axis, excluded: set, pinned: dict | None = None):
        self.cut: dict = {}
        self.length: dict = {}
        self.req: dict = {}
        self.through: dict = {}  # excluded nodes: their rule's requirements, followed only to name the axis
        self.reason: dict = {}
        self.excluded = excluded
        self.pinned = pinned or {}  # never sliced, and the flood does not pass them (analysis/effects.py)
        src = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == axis.source)
        self.cut[src], self.length[src] = Cut(axis.dim, axis.outer, axis.inner), axis.length
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
        why, ignored = {}, False
        for cand in _candidate_cuts(u, length):
            req = self._try(u, cand, length)
            if req is not None and n not in req and n is not u.args[0]:
                ignored = True  # NOTE [Arguments read for their dtype]
                continue
            if req is not None and req.get(n, WHOLE) == c:
                # an excluded node names the axis for its users and inputs but is not sliced itself
                self._set(u, cand, length, req)
                self.reason.pop(u, None)
                return True
            if u in self.reason:
                why[cand] = self.reason.pop(u)
        if ignored:
            return False
        same_dim = [r for k, r in why.items() if isinstance(k, Cut) and k.dim == getattr(c, "dim", -1)]
        if why:
            self.reason[u] = (same_dim or list(why.values()))[0]
        carried = _carry(n, u, c)
        if carried is not None:
            self._set(u, *carried, None)
            return carried[1] >= 2
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
