"""Operator Grouping: turn each planned region into one ``call_module`` node running a loop-tiled body.

Recipe: build one body GraphModule per distinct slice size, wrap them in a :class:`~fxstream.runtime.LoopRegion`,
emit the graph again in a topological order of the condensed DAG (a region counts as one node), and let
``getitem`` nodes stand for the region's outputs. Every new node keeps the module path of what it replaces.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
from torch.fx import Graph, GraphModule

from fxstream.analysis.cuts import Cut, cut_size
from fxstream.analysis.effects import find_effects
from fxstream.analysis.rules import rule_for
from fxstream.analysis.slicer import Region, SlicePlan
from fxstream.meta import BodyInput, Grouped, set_meta
from fxstream.graph_utils import (copy_meta, fake_mode_of, graph_key, lazy_module, propagate_nodes, refresh_values,
                                  value_key)
from fxstream.runtime import LoopRegion, buffer_layout, slice_view

aten = torch.ops.aten

__all__ = ["group_regions", "build_body", "emit_grouped"]


def build_body(region: Region, n: int, mode) -> GraphModule:
    """The region's ops for a slice of ``n`` elements of its axis, as a GraphModule with fake metadata."""
    g = Graph()
    env: dict = {}
    outside: dict = {}  # (input node, cut) -> placeholder
    fake_inputs = []
    for i, (p, c) in enumerate(region.inputs):
        ph = g.placeholder(f"{p.name}_{'whole' if c is None else 'slice'}{i}")
        copy_meta(p, ph)
        set_meta(ph, BodyInput(whole=c is None))  # a body compiled again (a batch split) finds its latent among the slices
        outside[(p, c)] = ph
        v = p.meta["val"]
        with mode:
            fake_inputs.append(v if c is None else slice_view(v, c, 0, n, region.axis.length))
        if c is not None and c.outer > 1:
            # the slice is a strided view (outer, n*inner) in two dims: the body merges them (a copy it pays for)
            merged = list(fake_inputs[-1].shape)
            merged[c.dim:c.dim + 2] = [c.outer * n * c.inner]
            outside[(p, c)] = g.call_function(aten.reshape.default, (ph, merged))
            copy_meta(p, outside[(p, c)])
    for node in region.nodes:
        cut = region.cuts[node]
        rule = rule_for(node)
        target, args, kwargs = node.target, node.args, node.kwargs
        if rule.rewrite is not None and isinstance(cut, Cut):
            target, args, kwargs = rule.rewrite(node, cut, n, region.axis.length)
        req = region.reqs[node]

        def arg(a, req=req):
            return env[a] if a in env else outside[(a, req.get(a))]

        new = g.call_function(target, torch.fx.map_arg(args, arg), torch.fx.map_arg(kwargs, arg))
        copy_meta(node, new)
        env[node] = new
    g.output(tuple(env[o] for o, _ in region.outputs))
    body = lazy_module(torch.nn.Module(), g)
    phs = [x for x in g.nodes if x.op == "placeholder"]
    ops = [x for x in g.nodes if x.op == "call_function"]
    known = _body_values(mode)
    key, values = graph_key(g), value_key(fake_inputs)
    key = None if key is None or values is None else (key, values, _propagation_state())
    if key in known:  # see NOTE [Values of equal bodies]
        for x, v in zip(phs + ops, known[key]):
            x.meta["val"] = v
        return body
    for ph, v in zip(phs, fake_inputs):
        ph.meta["val"] = v
    propagate_nodes(ops, mode)
    if key is not None:
        known[key] = [x.meta["val"] for x in phs + ops]
    return body


def _propagation_state() -> tuple:
    """The global state fake propagation reads besides the values: grad and inference mode, the default dtype,
    autocast."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_default_dtype(),
            torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))


def _body_values(mode) -> dict:
    """The fake values of the bodies built under ``mode``, by body key (kept on the mode: they die with it).

    NOTE [Values of equal bodies]: a model repeats blocks, and a memory budget compiles one captured graph many
    times, so many bodies are the same graph (ops and arguments, names aside: ``graph_key``) on inputs with the
    same metadata and the same storages shared (``value_key``), under the same global state. Fake propagation
    gives such bodies values with equal metadata and the same storage sharing, so a body like one built before
    takes that body's values, placeholders included (its views then share its placeholders' storages as
    propagation would make them), instead of propagating again. Nothing reads a body's values against values
    outside it (the body's shape check, its memory plan, the reuse checks and a batch split's compile of it read
    only its own), and nothing changes a fake value in place."""
    known = getattr(mode, "_fxstream_body_values", None)
    if known is None:
        known = mode._fxstream_body_values = {}
    return known


def _check_body(region: Region, body: GraphModule, n: int) -> None:
    """Each body output must have exactly the slice's shape: a wrong rule is caught here, at compile time."""
    out = next(x for x in body.graph.nodes if x.op == "output").args[0]
    for (o, c), b in zip(region.outputs, out):
        want = list(o.meta["val"].shape)
        if isinstance(c, Cut):
            want = cut_size(want, c, n)
        got = list(b.meta["val"].shape)
        if got != want:
            raise AssertionError(f"region at {region.module}: body output {o.name} has shape {got}, expected {want}")


def make_loop(region: Region, mode) -> LoopRegion:
    sizes = sorted({n for _, n in region.bounds})
    bodies = {}
    for n in sizes:
        bodies[n] = build_body(region, n, mode)
        _check_body(region, bodies[n], n)
    out_meta = [buffer_layout(o.meta["val"]) for o, _ in region.outputs]
    return LoopRegion(bodies, region.axis.length, region.bounds, [c for _, c in region.inputs],
                      [c for _, c in region.outputs], out_meta, axis=region.axis.name)


def _common_stack(region: Region) -> dict:
    """The module stack of the region's first op cut down to the modules every op of the region is inside."""
    stack = region.nodes[0].meta.get("nn_module_stack") or {}
    common = region.module
    return {k: v for k, v in stack.items() if common == v[0] or common.startswith(v[0] + ".")} if common else {}


def _condensed_order(gm: GraphModule, regions) -> list:
    """Units (a node, or a whole region) in a topological order of data edges and the ordering edges of in-place
    writes (NOTE [In-place writes pin their storage]), each as early as its first node was."""
    effects = find_effects(gm)
    region_of = {n: i for i, r in enumerate(regions) for n in r.nodes}
    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def unit(n):
        return ("region", region_of[n]) if n in region_of else ("node", index[n])

    first = {}
    dag = nx.DiGraph()
    for n in gm.graph.nodes:
        u = unit(n)
        first.setdefault(u, index[n])
        dag.add_node(u)
        for p in effects.inputs(n):
            if unit(p) != u:
                dag.add_edge(unit(p), u)
    return list(nx.lexicographical_topological_sort(dag, key=first.__getitem__))


def group_regions(gm: GraphModule, plan: SlicePlan) -> GraphModule:
    """A new GraphModule in which every region of ``plan`` is a loop-tiled ``call_module`` node."""
    if not plan.regions:
        return gm
    mode = fake_mode_of(gm)
    return emit_grouped(gm, plan.regions, "region", lambda r: make_loop(r, mode), "cut")


def emit_grouped(gm: GraphModule, regions: list, prefix: str, make, region_kind: str) -> GraphModule:
    """``gm`` emitted again in a topological order of the condensed DAG, each region (``.nodes``, ``.inputs``,
    ``.outputs``; cut regions list ``(node, cut)`` pairs) one ``call_module`` node ``{prefix}_{i}`` running
    ``make(region)``, with ``getitem`` nodes for its outputs. Shared by Operator Grouping and halo grouping."""
    mode = fake_mode_of(gm)
    nodes = list(gm.graph.nodes)
    new_graph = Graph()
    new_graph._codegen = gm.graph._codegen
    env: dict = {}
    loops = {}
    before: dict = {}  # each region output's node -> the value it had (an interior value; now a fresh buffer)

    def plain(items):
        return [x[0] if isinstance(x, tuple) else x for x in items]

    for kind, key in _condensed_order(gm, regions):
        if kind == "node":
            old = nodes[key]
            env[old] = new_graph.node_copy(old, env.__getitem__)
            continue
        region = regions[key]
        name = f"{prefix}_{key}"
        loops[name] = make(region)
        outputs = plain(region.outputs)
        call = new_graph.call_module(name, tuple(env[p] for p in plain(region.inputs)))
        copy_meta(region.nodes[0], call)
        call.meta["nn_module_stack"] = _common_stack(region)
        # the runtime allocates every output afresh (see buffer_layout), whatever the original value aliased
        with mode:
            fresh = tuple(torch.empty_strided(*buffer_layout(o.meta["val"])[:2], dtype=o.meta["val"].dtype,
                                              device=o.meta["val"].device) for o in outputs)
        call.meta["val"] = fresh
        set_meta(call, Grouped(region, region_kind))
        for j, o in enumerate(outputs):
            item = new_graph.call_function(operator.getitem, (call, j))
            copy_meta(o, item)
            item.meta["val"] = fresh[j]
            before[item] = o.meta["val"]
            env[o] = item
    root = torch.nn.Module()
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    for name, loop in loops.items():
        root.add_module(name, loop)
    out = lazy_module(root, new_graph)  # code made when first run; the compile driver lints after each step
    # values downstream of a region view its fresh output buffers now, not the interior values they came from
    refresh_values(out.graph, before, mode)
    return out
