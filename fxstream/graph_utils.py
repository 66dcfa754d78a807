"""Small helpers on fx graphs shared by the passes: fake-tensor metadata and node metadata copies."""
from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from .meta import KEPT

__all__ = ["fake_mode_of", "propagate_meta", "propagate_nodes", "copy_meta", "strip_asserts", "storage_refs"]

_KEEP_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn") + KEPT


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


def storage_refs(val) -> list:
    """The storages of the tensors in a value (``meta["val"]``: fake tensors share storages as real ones do), as
    weak references that compare equal for the same storage."""
    return [StorageWeakRef(t.untyped_storage()) for t in tree_leaves(val) if isinstance(t, torch.Tensor)]


def copy_meta(src: Node, dst: Node) -> None:
    """Give ``dst`` the module path and source location of ``src`` (not its value)."""
    for k in _KEEP_META:
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def strip_asserts(gm: GraphModule) -> GraphModule:
    """Remove ``_assert_tensor_metadata`` checks: they would keep sliced values alive whole."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(n)
    gm.recompile()
    return gm
