"""Queries recompute what they share with keys and values: a cheap chain (norms, casts, pointwise ops, views) that
feeds both an attention's queries and its keys or values is copied for the queries' side.

NOTE [Queries recompute what they share with keys and values]
An attention cut along its queries needs its keys and values whole, so the ops that make them leave the query
region (``Rule.producers_leave``). A transformer block makes queries, keys and values from one normed copy of
the residual stream (``norm1(x) * (1 + scale) + shift``): that value then crosses from the keys' region to the
queries' and exists whole, one more token-sized value at the block's peak (Wan's blocks: with k, v, the residual
in and out, and the normed tokens whole, a region holds five or six of them). Where the shared value is made by
cheap ops only (rule kinds ``pointwise``, ``view``, ``norm``) from values that live on anyway, this pass gives the
queries their own copy of that chain, placed just before the first op of the queries' side that reads it; the
keys and values keep the original. Each copy is then sliced with the region that reads it and never exists
whole. A shared value made from weights, buffers and constants only (a *table*: a rotary embedding's cosines and
sines, made once and read by every block's queries and keys) is copied for every reader instead, each copy just
before its reader, and the original is no longer made: each region computes the slice of the table it reads.
A chain is never copied where a copy could compute other bits: a seeded random op (dropout, ``rand_like``) or a
value sharing a storage that an in-place write changes (analysis/effects.py: FreeU's ``h[:, :c] *= b``), in the
chain or read by it, leaves it as it is. The copies are the same ops on the same inputs (bitwise the same
values); the cost is the chain's compute again
(a layer norm and a few pointwise ops per block, a table's expands and cat per reader, against the block's
projections and attention).

The pass only rewrites; whether the result is kept is the compile's choice (``compiler.compile_graph`` keeps the
graph only where the planned peak falls, as it does for split regions).
"""
from __future__ import annotations

import weakref

import torch
from torch.fx import Graph, GraphModule, Node

from fxstream.analysis.effects import find_effects
from fxstream.analysis.rules import rule_for
from fxstream.graph_utils import fake_mode_of, lazy_module, lifted, propagate_nodes, refresh_values

__all__ = ["recompute_queries", "shared_chains"]

ATTENTION = torch.ops.aten.scaled_dot_product_attention.default
CHEAP = ("pointwise", "view", "norm")  # rule kinds a chain may be made of
TABLE = CHEAP + ("cat", "split", "index", "repeat")  # rule kinds a table's chain may be made of
MAX_CHAIN = 16  # ops in one copied chain
DEPTH = 12  # edges searched upstream of an attention's queries, keys and values


def _repeatable(n: Node, pinned) -> bool:
    """An op that makes the same value when run again: not a seeded random op (dropout, rand_like: its copy would
    draw other numbers) and not touching a storage an in-place write changes (``pinned``: analysis/effects.py)."""
    tags = getattr(n.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags and n not in pinned


def _reads_unwritten(chain: list, pinned) -> bool:
    """Whether no value the chain reads from outside it shares a storage an in-place write changes: a copy runs
    later than the original and must read the same bits."""
    inside = set(chain)
    return not any(p in pinned for c in chain for p in c.all_input_nodes if p not in inside)


def _cheap(n: Node, pinned) -> bool:
    rule = rule_for(n)
    return rule is not None and rule.kind in CHEAP and isinstance(n.meta.get("val"), torch.Tensor) and \
        _repeatable(n, pinned)


def _pure(n: Node) -> bool:
    """A node that only makes its value (erasable when nothing reads it): an op of the ``TABLE`` kinds."""
    rule = rule_for(n)
    return rule is not None and rule.kind in TABLE


def _ancestors(n: Node, depth: int = DEPTH) -> set:
    """The nodes at most ``depth`` edges upstream of ``n``: a shared value is a few ops before an attention (its
    projection, a reshape, a norm), and a bounded walk keeps the search linear in the graph's size."""
    seen, frontier = set(), [n]
    for _ in range(depth):
        nxt = []
        for x in frontier:
            for p in x.all_input_nodes:
                if p not in seen:
                    seen.add(p)
                    nxt.append(p)
        frontier = nxt
    return seen


def _table(f: Node, order: dict, pinned) -> list | None:
    """Where ``f`` is a table (made from weights, buffers and constants only, by ops of the ``TABLE`` kinds: a
    rotary embedding's cosines and sines), every op it is made of, in graph order; else None."""
    chain, work = {f}, [f]
    while work:
        x = work.pop()
        for p in x.all_input_nodes:
            if p in chain:
                continue
            if p.op == "placeholder":
                if not lifted(p):
                    return None  # made from a user input: not a table
                continue
            if p.op == "get_attr":
                continue
            rule = rule_for(p)
            if p.op != "call_function" or rule is None or rule.kind not in TABLE or not _repeatable(p, pinned):
                return None
            chain.add(p)
            work.append(p)
            if len(chain) > MAX_CHAIN:
                return None
    return sorted(chain, key=order.get)


def _chain(f: Node, first: Node, order: dict, pinned) -> list | None:
    """``f`` and the cheap ops it is made of that would die before ``first`` (the first op on the queries' side that
    reads ``f``), in graph order: what a copy for the queries computes again. A value read after ``first`` by
    anything else lives on anyway and is read by the copy instead. None when the chain is longer than
    ``MAX_CHAIN``."""
    chain, work = {f}, [f]
    while work:
        x = work.pop()
        for p in x.all_input_nodes:
            if p in chain or p.op != "call_function" or not _cheap(p, pinned):
                continue
            if max(order[u] for u in p.users) >= order[first]:
                continue  # alive at the copy anyway: read it
            chain.add(p)
            work.append(p)
            if len(chain) > MAX_CHAIN:
                return None
    return sorted(chain, key=order.get)


_FOUND: "weakref.WeakKeyDictionary[GraphModule, tuple]" = weakref.WeakKeyDictionary()


def shared_chains(gm: GraphModule) -> list:
    """``[(value, chain, query-side users)]``: for each attention, each value made by a cheap chain that feeds both
    its queries and its keys or values (within ``DEPTH`` ops of them), with the users on the queries' side that
    read it. Kept per graph while its nodes are the same (a budget asks for one captured graph many times)."""
    kept = _FOUND.get(gm)
    nodes = tuple(gm.graph.nodes)
    if kept is not None and kept[0] == nodes:
        return kept[1]
    out = _find(gm)
    _FOUND[gm] = (nodes, out)
    return out


def _find(gm: GraphModule) -> list:
    pinned = set(find_effects(gm).pinned)
    out, taken = [], set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for s in gm.graph.nodes:
        if s.op != "call_function" or s.target is not ATTENTION:
            continue
        q, k, v = s.args[:3]
        aq = _ancestors(q) | {q}
        akv = _ancestors(k) | _ancestors(v) | {k, v}
        for f in sorted(aq & akv, key=lambda n: n.name):
            if f in taken or f.op != "call_function" or not _cheap(f, pinned):
                continue
            users = [u for u in f.users if u in aq and u not in akv]
            if not users or not any(u in akv for u in f.users):
                continue
            table = _table(f, order, pinned)
            if table is not None and _reads_unwritten(table, pinned):
                # a table: every reader makes its own copy (its region slices it), the original is no longer made
                taken.add(f)
                out += [(f, table, [u]) for u in sorted(f.users, key=order.get)]
                continue
            chain = _chain(f, min(users, key=order.get), order, pinned)
            if chain is None or not _reads_unwritten(chain, pinned):
                continue
            taken.add(f)
            out.append((f, chain, users))
    return out


def recompute_queries(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` where every :func:`shared_chains` chain is made again for its queries' side (NOTE [Queries
    recompute what they share with keys and values]), and every table for each of its readers; ``gm`` itself
    when there is none."""
    found = shared_chains(gm)
    if not found:
        return gm
    before = {}  # first query-side user -> [(value, chain)] copied just before it
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for f, chain, users in found:
        first = min(users, key=order.get)
        before.setdefault(first, []).append((f, chain, set(users)))
    graph = Graph()
    graph._codegen = gm.graph._codegen
    env: dict = {}
    redirect: dict = {}  # (user, value) -> the copy it reads
    copies: list = []
    for n in gm.graph.nodes:
        for f, chain, users in before.get(n, []):
            local = {}
            for c in chain:
                local[c] = graph.node_copy(c, lambda p: local.get(p, env[p]))
                copies.append(local[c])
            for u in users:
                redirect[(u, f)] = local[f]
        env[n] = graph.node_copy(n, lambda p, n=n: redirect.get((n, p), env[p]))
    # a table every reader copies is not made at all any more
    made = set(copies)
    for n in reversed(list(graph.nodes)):
        if n.op == "call_function" and not n.users and n not in made and _pure(n):
            graph.erase_node(n)
    # the copies are values of their own (storages apart from the originals'), and so are their readers' views
    mode = fake_mode_of(gm)
    old = {c: c.meta.get("val") for c in copies}
    propagate_nodes(copies, mode)
    refresh_values(graph, old, mode)
    return lazy_module(gm, graph)
