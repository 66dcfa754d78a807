"""Split a GroupNorm whose statistics span frames and space into a statistics phase and a normalise phase.

``group_norm(x, G, w, b, eps)`` on ``x`` of shape ``(N, C, F, H, W)`` (SVD's ``temporal_res_block.norm1/2``,
AnimateDiff's ``motion_modules.*.norm``) becomes::

    xg   = reshape(x, (N, G, C/G, F, H, W))
    s1   = sum(xg as float64, dims 2..)         # a sum over height: sliced, each slice adds its part
    s2   = sum((xg as float64)**2, dims 2..)
    mean = s1 / n ; rstd = rsqrt(s2 / n - mean**2 + eps)
    y    = (xg - mean) * rstd, reshaped back, * w + b

The sums have a ``PARTIAL`` rule, so the slicer accumulates them slice by slice and the normalise phase, now
pointwise, slices along height or width exactly (max error ~1e-7 in fp32 against the fused op; the
statistics are accumulated in float64). Nodes made here carry ``fxstream.meta.SplitNorm`` naming the
GroupNorm they replace, so the compiler can keep unsliced GroupNorms fused.
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from fxstream.graph_utils import copy_meta, fake_mode_of, propagate_nodes, refresh_values
from fxstream.meta import SplitNorm, set_meta

aten = torch.ops.aten

__all__ = ["split_group_norm", "splittable_group_norms"]



def splittable_group_norms(gm: GraphModule) -> list[str]:
    """Names of the GroupNorm nodes over 5-D inputs: their statistics span frames and space."""
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and n.target is aten.group_norm.default and n.args[0].meta["val"].dim() == 5]


def _emit_split(gm: GraphModule, gn: Node) -> tuple[Node, list]:
    g = gm.graph
    x, groups = gn.args[0], gn.args[1]
    weight = gn.args[2] if len(gn.args) > 2 else None
    bias = gn.args[3] if len(gn.args) > 3 else None
    eps = gn.args[4] if len(gn.args) > 4 else 1e-5
    shape = list(x.meta["val"].shape)
    dtype = x.meta["val"].dtype
    n_, c = shape[:2]
    spatial = shape[2:]
    red = list(range(2, 3 + len(spatial)))
    count = (c // groups) * math.prod(spatial)
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ones = [1] * (1 + len(spatial))
    made = []

    def op(target, *args, **kwargs):
        node = g.call_function(target, args, kwargs)
        copy_meta(gn, node)
        set_meta(node, SplitNorm(gn.name))
        made.append(node)
        return node

    with g.inserting_before(gn):
        xg = op(aten.reshape.default, x, [n_, groups, c // groups, *spatial])
        x64 = op(aten.to.dtype, xg, torch.float64)
        s1 = op(aten.sum.dim_IntList, x64, red)
        s2 = op(aten.sum.dim_IntList, op(aten.mul.Tensor, x64, x64), red)
        mean = op(aten.div.Scalar, s1, count)
        var = op(aten.sub.Tensor, op(aten.div.Scalar, s2, count), op(aten.mul.Tensor, mean, mean))
        rstd = op(aten.rsqrt.default, op(aten.add.Scalar, var, eps))
        mean_c = op(aten.reshape.default, op(aten.to.dtype, mean, compute), [n_, groups, *ones])
        rstd_c = op(aten.reshape.default, op(aten.to.dtype, rstd, compute), [n_, groups, *ones])
        # x - mean with x in fp16/bf16 and mean in float32 computes in float32 (type promotion), exactly as a cast
        # first would, without a float32 copy of x that a region boundary would have to hold whole
        y = op(aten.mul.Tensor, op(aten.sub.Tensor, xg, mean_c), rstd_c)
        y = op(aten.reshape.default, y, shape)
        affine = [1] * len(spatial)
        if weight is not None:
            y = op(aten.mul.Tensor, y, op(aten.reshape.default, weight, [c, *affine]))
        if bias is not None:
            y = op(aten.add.Tensor, y, op(aten.reshape.default, bias, [c, *affine]))
        if compute != dtype:
            y = op(aten.to.dtype, y, dtype)
    return y, made


def split_group_norm(gm: GraphModule, names=None) -> GraphModule:
    """Split the named GroupNorm nodes (default: every one :func:`splittable_group_norms` finds), in place."""
    names = set(splittable_group_norms(gm) if names is None else names)
    if not names:
        return gm
    mode = fake_mode_of(gm)
    before = {}
    for gn in [n for n in gm.graph.nodes if n.name in names]:
        y, made = _emit_split(gm, gn)
        propagate_nodes(made, mode)  # y has the GroupNorm's shape and dtype; its strides may differ
        before[y] = gn.meta["val"]
        gn.replace_all_uses_with(y)
        gm.graph.erase_node(gn)
    refresh_values(gm.graph, before, mode)  # what follows a GroupNorm takes the split one's layout
    gm.graph.lint()
    gm.recompile()
    return gm
