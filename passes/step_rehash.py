"""Step Rehash as graph surgery: one captured graph becomes a full graph and a rehash graph.

A *cache point* is a module's output node (found by ``nn_module_stack``, so a module path names it). Three small
passes, each GraphModule -> GraphModule on a copy, do all the work:

- :func:`add_output`: the graph also returns the node (the full graph returns the feature to cache);
- :func:`cut_at`: the node becomes a new input and everything that only fed it is dead-code eliminated
  (the rehash graph takes the cached feature; an adaptive schedule's probe is fed the same way);
- :func:`only`: the graph computes just the node (the adaptive schedule's cheap probe).

:func:`split_for_rehash` composes them. Extra outputs go after the graph's own outputs and extra inputs after
its own placeholders, so the runtime feeds ``(*state, *user_inputs, *extra)`` and strips the tail of the outputs.

    >>> g = split_for_rehash(gm, "up_blocks.3.attentions.1")
    >>> g.full      # returns (*outputs, feature)
    >>> g.rehash    # takes (*inputs, feature); the blocks that only fed the feature are gone
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from fxstream.errors import FxstreamError
from fxstream.meta import CutInput, get_meta, set_meta

__all__ = ["module_nodes", "module_output", "add_output", "cut_at", "only", "split_for_rehash", "RehashGraphs",
           ]

# meta key on a placeholder made by cut_at: the name of the node it stands for


def _paths(n: Node) -> set:
    return {path for path, _ in (n.meta.get("nn_module_stack") or {}).values()}


def module_nodes(gm: GraphModule, path: str) -> list:
    """The ``call_function`` nodes that run inside module ``path`` (or a module under it), in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and path in _paths(n)]


def module_output(gm: GraphModule, path: str) -> Node:
    """The node a module's forward returns: the one node of the module that is used outside it.

    FxstreamError when the path names no module of the graph, or a module with several outputs (name a module
    inside it, one that returns a single tensor).
    """
    inside = module_nodes(gm, path)
    if not inside:
        known = sorted({p for n in gm.graph.nodes for p in _paths(n) if p.count(".") <= 2 and p})
        raise FxstreamError(f"cache point {path!r}: no module of the captured graph has this path; module paths "
                            f"look like {known[:6]} (see fxstream.rehash.temporal_layers(unet))")
    members = set(inside)
    escaping = [n for n in inside if any(u not in members for u in n.users)]
    tensors = [n for n in escaping if isinstance(n.meta.get("val"), torch.Tensor)]
    if len(tensors) != 1:
        names = ", ".join(n.name for n in tensors) or "none"
        raise FxstreamError(f"cache point {path!r}: the module has {len(tensors)} tensor outputs ({names}); "
                            "name a module that returns one tensor (a temporal layer, a whole block)")
    return tensors[0]


def _node(gm: GraphModule, name: str) -> Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise FxstreamError(f"node {name!r} is not in the graph")


def _output(gm: GraphModule) -> Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def add_output(gm: GraphModule, name: str) -> GraphModule:
    """A copy of ``gm`` that also returns node ``name`` after its own outputs."""
    gm = copy.deepcopy(gm)
    node, out = _node(gm, name), _output(gm)
    outs = out.args[0]
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    out.args = (outs + (node,),)
    gm.recompile()
    return gm


def cut_at(gm: GraphModule, name: str) -> GraphModule:
    """A copy of ``gm`` in which node ``name`` is an input (after the others) and what only fed it is gone."""
    gm = copy.deepcopy(gm)
    g, node = gm.graph, _node(gm, name)
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last):
        ph = g.placeholder(f"{name}_cached")
    ph.meta["val"] = node.meta["val"]
    set_meta(ph, CutInput(name))
    node.replace_all_uses_with(ph)
    _dce(gm)
    g.lint()
    gm.recompile()
    return gm


def only(gm: GraphModule, name: str) -> GraphModule:
    """A copy of ``gm`` that computes and returns just node ``name`` (same inputs)."""
    gm = copy.deepcopy(gm)
    node, out = _node(gm, name), _output(gm)
    out.args = ((node,),)
    _dce(gm)
    gm.recompile()
    return gm


def _dce(gm: GraphModule) -> None:
    # random ops (dropout, even at p=0 in eval mode) count as pure here: one that only fed the cached feature
    # has no effect a later op can see, so it goes with the rest
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))


def _ops(gm: GraphModule) -> set:
    return {n.name for n in gm.graph.nodes if n.op == "call_function"}


@dataclass
class RehashGraphs:
    """The graphs one captured graph becomes. ``extra_inputs`` name the nodes the full and rehash graphs take as
    inputs after the user's (the probe, then, in the rehash graph, the cached feature)."""

    full: GraphModule  # returns (*outputs, cached feature)
    rehash: GraphModule  # takes (*inputs, [probe], cached feature)
    cache_node: str
    skipped: list  # names of the original graph's ops a rehash step does not run
    probe: GraphModule | None = None  # computes the probe alone (adaptive schedules)
    probe_node: str | None = None
    extra_full: list = field(default_factory=list)  # extra inputs of the full graph, in order


def split_for_rehash(gm: GraphModule, cache_point: str, probe: str | None = None) -> RehashGraphs:
    """Full and rehash graphs for caching module ``cache_point``'s output; with ``probe`` (a module path), also a
    graph computing that module's output alone, which the other two then take as an input instead of recomputing.
    """
    cache = module_output(gm, cache_point).name
    base, probe_gm, probe_name, extra = gm, None, None, []
    if probe is not None:
        probe_name = module_output(gm, probe).name
        if probe_name == cache:
            raise FxstreamError(f"probe {probe!r}: it is the cache point itself; choose an earlier module")
        probe_gm = only(gm, probe_name)
        base, extra = cut_at(gm, probe_name), [probe_name]
    full = add_output(base, cache)
    rehash = cut_at(base, cache)
    if probe_name is not None and not any(getattr(get_meta(n, CutInput), "name", None) == probe_name and n.users for n in rehash.graph.nodes):
        raise FxstreamError(f"probe {probe!r}: a rehash step does not use it (it only fed the cached feature); "
                            "choose a module that still runs on rehash steps, such as 'conv_in'")
    # at least the cached node itself; how much more is the report's business (ops and FLOPs skipped)
    skipped = sorted(_ops(gm) - _ops(rehash) - (_ops(probe_gm) if probe_gm is not None else set()))
    return RehashGraphs(full, rehash, cache, skipped, probe_gm, probe_name, extra)
