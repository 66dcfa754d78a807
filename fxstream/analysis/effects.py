"""Side effects in a captured graph: in-place writes, what they pin, and the order they impose.

The slicer and the grouping treat a graph as pure dataflow: a value is what its node computed, and nodes may run
in any order their inputs allow. An in-place write breaks both. diffusers' FreeU scales half the channels with
``h[:, :c] *= b`` and a spectrum window with ``mask[..., a:b, c:d] = s``; export keeps these as ``aten.copy_`` /
``aten.fill_`` into ``aten.slice`` views, and the write changes every value sharing the storage, read later
through the base, not through the write's output.

NOTE [In-place writes pin their storage]
Inside a region a view is computed per slice into a fresh buffer, so a write into a sliced view would miss the
base it should change. So every value sharing a storage with a written value (the base, its views, the write)
is pinned: never sliced, with a reason. Values that only *read* such a storage may be sliced, but they must run
on the right side of the write: ``deps`` gives each write the readers before it, and each reader after it the
write, as extra ordering edges that the convexity checks and the emitted order respect. Which ops write is read
from the op schema (an argument whose alias annotation is a write: ``Tensor(a!)``), never from names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from ..graph_utils import storage_refs

__all__ = ["Effects", "find_effects", "written_args"]


@dataclass(frozen=True)
class Effects:
    """``pinned``: node -> why it is never sliced. ``deps``: node -> nodes that must run before it although it
    does not read their values (ordering edges of in-place writes)."""

    pinned: dict = field(default_factory=dict)
    deps: dict = field(default_factory=dict)

    def inputs(self, n: Node) -> list:
        """The nodes ``n`` must run after: its inputs, then its ordering edges."""
        return list(n.all_input_nodes) + list(self.deps.get(n, ()))


def written_args(node: Node) -> list:
    """The argument nodes an op writes in place, from its schema's alias annotations (``Tensor(a!) self``)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        out.extend(x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, Node))
    return out


def find_effects(gm: GraphModule) -> Effects:
    """The pinned nodes and ordering edges of every in-place write in ``gm`` (see NOTE [In-place writes pin
    their storage]); empty for a graph without writes."""
    writes = [(n, w) for n in gm.graph.nodes for w in written_args(n)]
    if not writes:
        return Effects()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    holders: dict = {}  # storage -> nodes whose value lives in it
    for n in gm.graph.nodes:
        for s in storage_refs(n.meta.get("val")):
            holders.setdefault(s, []).append(n)
    pinned, deps = {}, {}
    for m, w in writes:
        family = {x for s in storage_refs(w.meta.get("val")) for x in holders.get(s, [])} | {m, w}
        base = min(family, key=order.get)
        why = (f"in-place {m.target} ({m.name}) writes into {base.name} through a view: values sharing its storage "
               "are not sliced (a slice would be a copy the write misses)")
        for x in family:
            if x.op == "call_function":
                pinned.setdefault(x, why)
        readers = {u for x in family for u in x.users if u not in family or written_args(u)} - {m}
        for r in readers:
            before, after = (r, m) if order[r] < order[m] else (m, r)
            deps.setdefault(after, set()).add(before)
    return Effects(pinned, {n: tuple(sorted(d, key=order.get)) for n, d in deps.items()})
