"""Small helpers on fx graphs shared by the passes: fake-tensor metadata and node metadata copies."""
from __future__ import annotations

import copy

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, GraphModule, Node
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from .meta import KEPT

__all__ = ["fake_mode_of", "propagate_meta", "propagate_nodes", "copy_meta", "strip_asserts", "storage_refs",
           "copy_module", "refresh_values", "lazy_module", "graph_key", "value_key"]

_KEEP_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn") + KEPT


def lifted(n: Node) -> bool:
    """Whether a placeholder is one torch.export lifted from the module (a parameter, buffer or constant, named
    ``p_``, ``b_``, ``c_``) rather than a user input."""
    return n.op == "placeholder" and n.name.startswith(("p_", "b_", "c_"))


def fake_mode_of(gm: GraphModule):
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        raise ValueError("graph: placeholders carry no fake tensors in meta['val']; capture it with torch.export")
    return mode


def propagate_meta(gm: GraphModule, inputs, mode) -> None:
    """Recompute ``meta["val"]`` of every node from fake ``inputs`` (one per placeholder)."""
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def propagate_nodes(nodes, mode) -> None:
    """Compute ``meta["val"]`` of just these ``call_function`` nodes (in order) from their inputs' values:
    for passes that insert a few nodes into a graph whose other values are already known."""
    with mode:
        for n in nodes:
            args, kwargs = torch.fx.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
            n.meta["val"] = n.target(*args, **kwargs)


def _layout(v) -> list:
    return [(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, t.device) if isinstance(t, torch.Tensor)
            else t for t in tree_leaves(v)]


def refresh_values(graph: Graph, before: dict, mode, owner: GraphModule | None = None, recompute=()) -> None:
    """Recompute ``meta["val"]`` of the nodes whose value depends on a replaced one, in place, as whole-graph fake
    propagation would (same layouts, same storages shared), given a graph whose other values are propagated:
    ``before`` maps each node whose value was replaced (a region's output, now a fresh buffer) to its old value.

    Each ``call_function`` node with a replaced input is computed again (one fake kernel, under ``mode``). If it
    is a fresh tensor now and was one before, with the same layout, the old value stays (its users need nothing
    new); otherwise (a view, or a changed layout) it takes the new value and counts as replaced for its users. A
    region's ``call_module`` allocates its outputs itself, whatever its inputs' layout: it is not computed,
    except the ``call_module`` nodes in ``recompute`` (submodules of ``owner``; a region whose outputs now take
    over its inputs' storage: ``passes/reuse_buffers.py``), which are computed the same way."""
    before = dict(before)
    with mode:
        for n in graph.nodes:
            if n.op == "output":  # the values returned, as whole-graph propagation leaves them
                n.meta["val"] = torch.fx.map_arg(n.args[0], lambda a: a.meta.get("val"))
            if n in recompute:
                target = owner.get_submodule(n.target)
            elif n.op != "call_function" or n in before or not any(a in before for a in n.all_input_nodes):
                continue
            else:
                target = n.target
            old = n.meta.get("val")
            args, kwargs = torch.fx.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
            new = target(*args, **kwargs)
            ins_now = {r for a in n.all_input_nodes for r in storage_refs(a.meta.get("val"))}
            ins_before = {r for a in n.all_input_nodes for r in storage_refs(before.get(a, a.meta.get("val")))}
            if (ins_now & set(storage_refs(new))) or (ins_before & set(storage_refs(old))) or \
                    _layout(new) != _layout(old):
                before[n] = old
                n.meta["val"] = new


def _arg_key(a, index: dict):
    if isinstance(a, Node):
        return index[a]
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_arg_key(x, index) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple((k, _arg_key(v, index)) for k, v in a.items()))
    if isinstance(a, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise _Unkeyed
    return (type(a).__name__, repr(a))


class _Unkeyed(Exception):
    """A value ``graph_key`` or ``value_key`` does not describe (a tensor constant in an argument, a symbolic
    size)."""


def graph_key(graph: Graph) -> tuple | None:
    """The graph as a hashable value, equal for graphs with the same nodes in the same order (kind, target,
    arguments with nodes named by position and constants by type and repr), whatever the node names; None for
    a graph with a tensor constant or a symbolic value in an argument."""
    index: dict = {}
    out = []
    try:
        for i, n in enumerate(graph.nodes):
            index[n] = i
            target = n.target if n.op == "call_function" else None if n.op == "placeholder" else str(n.target)
            out.append((n.op, target, _arg_key(n.args, index), _arg_key(n.kwargs, index)))
    except _Unkeyed:
        return None
    return tuple(out)


def value_key(vals) -> tuple | None:
    """Fake values as a hashable value: each tensor's shape, strides, storage offset, dtype, device,
    ``requires_grad``, whether it is a view, its storage size, and which earlier value of ``vals`` shares its
    storage; other values by type and repr. Ops on values with equal keys give values with equal keys (fake
    propagation reads nothing else). None if a size, stride or value is symbolic (dynamic shapes)."""
    first: dict = {}
    out = []
    for i, v in enumerate(vals):
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            ref = first.setdefault(StorageWeakRef(st), i)
            sizes = (*v.shape, *v.stride(), v.storage_offset(), st.nbytes())
            if not all(type(x) is int for x in sizes):
                return None
            out.append((tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype, v.device, v.requires_grad,
                        v._is_view(), st.nbytes(), ref))
        elif isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return None
        else:
            out.append((type(v).__name__, repr(v)))
    return tuple(out)


def storage_refs(val) -> list:
    """The storages of the tensors in a value (``meta["val"]``: fake tensors share storages as real ones do), as
    weak references that compare equal for the same storage."""
    return [StorageWeakRef(t.untyped_storage()) for t in tree_leaves(val) if isinstance(t, torch.Tensor)]


def output_values(gm: GraphModule) -> list:
    """What graph ``gm`` returns, as a list (one item for a single value)."""
    ret = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return list(ret) if isinstance(ret, (tuple, list)) else [ret]


def copy_meta(src: Node, dst: Node) -> None:
    """Give ``dst`` the module path and source location of ``src`` (not its value)."""
    for k in _KEEP_META:
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def lazy_module(root: torch.nn.Module, graph: Graph, class_name: str = "GraphModule") -> GraphModule:
    """A GraphModule over ``graph`` whose Python code is generated when first needed (``.code``, a call), not now.

    NOTE [Lazy code of compiled graphs]: making a GraphModule generates and compiles its ``forward`` (about 10
    ms for a body of a few dozen ops). Most of the GraphModules a compile makes never run: the graphs a budget tries
    and drops, every loop body while planning on the meta device, every halo body (``HaloLoop`` walks its nodes).
    torch's ``_LazyGraphModule`` defers that work to the first call or ``.code`` access; the code, and so what
    runs, is the same. (A ``LoopRegion`` generates its bodies' code before it runs any on worker threads.)"""
    return _LazyGraphModule(root, graph, class_name=class_name)


def copy_module(gm: GraphModule, edit=None) -> GraphModule:
    """A GraphModule over a copy of ``gm``'s graph, after ``edit(graph)`` if given; ``gm`` is unchanged.

    The graph is copied node by node (``copy.deepcopy`` of the Graph: each node's metadata dict is copied, the fake
    values in it are shared, as nothing changes a fake value in place) and its code is generated once, when first
    needed (NOTE [Lazy code of compiled graphs]). A deep copy of the GraphModule would copy every fake value and
    generate the code again at each edit."""
    graph = copy.deepcopy(gm.graph)
    if edit is not None:
        edit(graph)
    out = lazy_module(gm, graph, class_name=type(gm).__name__)
    out.meta = dict(gm.meta)
    return out


def strip_asserts(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` without ``_assert_tensor_metadata`` checks (they would keep sliced values alive whole)."""
    def strip(graph):
        for n in list(graph.nodes):
            if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
                graph.erase_node(n)
    return copy_module(gm, strip)
