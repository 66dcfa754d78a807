"""Slice rules: a table keyed by OpOverload.

For a node whose output is cut (``Cut`` or ``PARTIAL``), a rule returns what each tensor input must be: cut in a
given way, or ``WHOLE`` (used unsliced in every slice). A rule raises :class:`CantSlice` with a reason when the op
cannot be sliced that way. Ops without a rule are never sliced; the slicer reports them.

A rule may also rewrite the node for a slice of ``n`` elements of the axis (``Rule.rewrite``): view ops become a
``reshape`` to the slice's shape, ``expand`` gets the slice's sizes, ``repeat_interleave`` its slice's count.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Node

from ..errors import CantSlice
from .cuts import PARTIAL, Cut, cut_size, map_view_cut

aten = torch.ops.aten
WHOLE = None

__all__ = ["RULES", "Rule", "WHOLE", "rule_for", "val_shape", "RuleContext", "POINTWISE", "VIEWS", "tensor_args"]


@dataclass(frozen=True)
class RuleContext:
    """What a rule may ask besides the node: the axis length and the cuts already chosen for inputs."""

    length: int
    cut_of: Callable[[Node], object]


@dataclass(frozen=True)
class Rule:
    inputs: Callable  # (node, out_cut, ctx) -> dict[Node, Cut | PARTIAL | WHOLE]
    rewrite: Callable | None = None  # (node, out_cut, n, length) -> (target, args, kwargs)
    kind: str = ""
    # where an input this op needs whole is cut in the op's own region: True sends the input's producers out of
    # the region (they run whole before it: an attention's keys and values), False the op itself (the default)
    producers_leave: bool = False


def val_shape(n) -> list[int]:
    """Concrete shape of a node's tensor value (the first element for list-valued nodes)."""
    v = n.meta.get("val") if isinstance(n, Node) else n
    if isinstance(v, (list, tuple)):
        v = v[0]
    if not isinstance(v, torch.Tensor):
        raise CantSlice(f"{getattr(n, 'name', n)} has no tensor value")
    return [int(s) for s in v.shape]


def _merge(req: dict, node: Node, cut) -> None:
    if node in req and req[node] != cut:
        raise CantSlice(f"input {node.name} is needed both as {req[node]} and {cut}")
    req[node] = cut


def tensor_args(node: Node):
    """The node's tensor inputs in argument order, flattening lists (cat)."""
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        for x in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(x, Node):
                out.append(x)
    return out


def _broadcast_req(node: Node, out_cut: Cut, inputs) -> dict:
    """Inputs of a broadcasting op: right-aligned dims of equal size take the same cut, size-1 dims are WHOLE."""
    out_shape = val_shape(node)
    req = {}
    for x in inputs:
        if not isinstance(x, Node):
            continue
        xs = val_shape(x)
        d = out_cut.dim - (len(out_shape) - len(xs))
        if d < 0 or (xs[d] == 1 and out_shape[out_cut.dim] != 1):
            _merge(req, x, WHOLE)
        elif xs[d] == out_shape[out_cut.dim]:
            _merge(req, x, Cut(d, out_cut.outer, out_cut.inner))
        else:
            raise CantSlice(f"input {x.name} dim {d} has size {xs[d]}, output {out_shape[out_cut.dim]}")
    return req


def _need_cut(cut) -> Cut:
    if not isinstance(cut, Cut):
        raise CantSlice("only a sum can give a partial result")
    return cut


def pointwise(node, cut, ctx):
    return _broadcast_req(node, _need_cut(cut), tensor_args(node))


def _norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def linear(node, cut, ctx):
    cut = _need_cut(cut)
    x, w = node.args[0], node.args[1]
    if cut.dim == len(val_shape(node)) - 1:
        raise CantSlice("linear: output features are not sliced")
    req = {x: cut, w: WHOLE}
    if len(node.args) > 2 and isinstance(node.args[2], Node):
        req[node.args[2]] = WHOLE
    return req


def conv(node, cut, ctx):
    cut = _need_cut(cut)
    x, w = node.args[0], node.args[1]
    nsp = len(val_shape(node)) - 2
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding = (args[3] or [1] * nsp), (args[4] or [0] * nsp)  # args 5, 6: dilation, groups
    if isinstance(padding, str):
        padding = [0] * nsp if padding == "valid" else None
    if cut.dim == 1:
        raise CantSlice("convolution: output channels are not sliced")
    if cut.dim >= 2:
        i = cut.dim - 2
        k = val_shape(w)[2 + i]
        st = stride[i] if len(stride) > 1 else stride[0]
        pad = None if padding is None else (padding[i] if len(padding) > 1 else padding[0])
        if (k, st, pad) != (1, 1, 0):
            raise CantSlice(f"convolution: kernel {k}, stride {st}, padding {pad} along dim {cut.dim} needs a halo")
    req = {x: cut, w: WHOLE}
    if isinstance(args[2], Node):
        req[args[2]] = WHOLE
    return req


def group_norm(node, cut, ctx):
    cut = _need_cut(cut)
    if cut.dim != 0:
        raise CantSlice(f"group_norm: statistics span dim {cut.dim}")
    req = {node.args[0]: cut}
    for a in node.args[2:4]:
        if isinstance(a, Node):
            req[a] = WHOLE
    return req


def layer_norm(node, cut, ctx):
    cut = _need_cut(cut)
    nd = len(val_shape(node))
    if cut.dim >= nd - len(node.args[1]):
        raise CantSlice(f"{node.target}: statistics span dim {cut.dim}")
    req = {node.args[0]: cut}
    for a in node.args[2:4]:
        if isinstance(a, Node):
            req[a] = WHOLE
    return req


def sdpa(node, cut, ctx):
    cut = _need_cut(cut)
    q, k, v = node.args[:3]
    nd = len(val_shape(node))
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = (node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
    if cut.dim == nd - 1:
        raise CantSlice("attention: head features are not sliced")
    if cut.dim == nd - 2:
        if causal:
            raise CantSlice("attention: causal attention is not sliced along queries")
        req = {q: cut}
        _merge(req, k, WHOLE)
        _merge(req, v, WHOLE)
    else:
        req = _broadcast_req(node, cut, [q, k, v])
    if isinstance(mask, Node):
        _merge(req, mask, _broadcast_req(node, cut, [mask])[mask])
    return req


def _dim_arg_rule(pos: int, default=None):
    """Ops that act along one dim given at ``args[pos]`` (softmax, cat, chunk, slice): other dims keep the cut."""

    def rule(node, cut, ctx):
        cut = _need_cut(cut)
        d = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", default)
        if _norm_dim(d, len(val_shape(node))) == cut.dim:
            raise CantSlice(f"{node.target}: acts along the sliced dim {cut.dim}")
        return _broadcast_req(node, cut, tensor_args(node))

    return rule


def stack(node, cut, ctx):
    """``stack(tensors, dim)``: a new dim at ``dim``; the others keep the cut in every input."""
    cut = _need_cut(cut)
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    d = _norm_dim(d, len(val_shape(node)))
    if cut.dim == d:
        raise CantSlice(f"{node.target}: stacks along the sliced dim {cut.dim}")
    inner = Cut(cut.dim - (cut.dim > d), cut.outer, cut.inner)
    req = {}
    for x in node.args[0]:
        _merge(req, x, inner)
    return req


def unbind(node, cut, ctx):
    """``unbind(x, dim)``: a list of ``x``'s slices along ``dim`` (each one dim less); the cut of every element
    sits in ``x`` one dim further where it is at or after ``dim``."""
    cut = _need_cut(cut)
    x = node.args[0]
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    d = _norm_dim(d, len(val_shape(x)))
    return {x: Cut(cut.dim + (cut.dim >= d), cut.outer, cut.inner)}


def getitem(node, cut, ctx):
    src = node.args[0]
    if not isinstance(src, Node) or not isinstance(src.meta.get("val"), (list, tuple)):
        raise CantSlice("getitem of a non-list value")
    return {src: _need_cut(cut)}


def select(node, cut, ctx):
    cut = _need_cut(cut)
    x, d = node.args[0], node.args[1]
    d = _norm_dim(d, len(val_shape(x)))
    return {x: Cut(cut.dim + (cut.dim >= d), cut.outer, cut.inner)}


def _reduced_dims(node) -> tuple[list[int], bool]:
    x = node.args[0]
    nd = len(val_shape(x))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or dims == []:
        dims = list(range(nd))
    dims = [_norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return sorted(dims), bool(keep)


def reduction(node, cut, ctx, partial_ok: bool = False):
    x = node.args[0]
    dims, keep = _reduced_dims(node)
    if cut is PARTIAL:
        xc = ctx.cut_of(x)
        if not partial_ok or not isinstance(xc, Cut) or xc.dim not in dims:
            raise CantSlice(f"{node.target}: no partial result")
        return {x: xc}
    if keep:
        d = cut.dim
        if d in dims:
            raise CantSlice(f"{node.target}: reduces the sliced dim")
    else:
        kept = [i for i in range(len(val_shape(x))) if i not in dims]
        d = kept[cut.dim]
    return {x: Cut(d, cut.outer, cut.inner)}


def sum_rule(node, cut, ctx):
    return reduction(node, cut, ctx, partial_ok=True)


def permute(node, cut, ctx):
    cut = _need_cut(cut)
    x = node.args[0]
    nd = len(val_shape(x))
    if node.target is aten.permute.default:
        perm = [_norm_dim(p, nd) for p in node.args[1]]
    elif node.target is aten.t.default:
        perm = list(range(nd))[::-1]
    else:
        a, b = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
    return {x: Cut(perm[cut.dim], cut.outer, cut.inner)}


def view(node, cut, ctx):
    cut = _need_cut(cut)
    x = node.args[0]
    return {x: map_view_cut(val_shape(node), val_shape(x), cut, ctx.length)}


def reshape_to_slice(node, cut, n, length):
    return aten.reshape.default, (node.args[0], cut_size(val_shape(node), cut, n)), {}


def expand(node, cut, ctx):
    return _broadcast_req(node, _need_cut(cut), [node.args[0]])


def expand_to_slice(node, cut, n, length):
    return node.target, (node.args[0], cut_size(val_shape(node), cut, n)) + tuple(node.args[2:]), dict(node.kwargs)


def repeat(node, cut, ctx):
    cut = _need_cut(cut)
    x, reps = node.args[0], list(node.args[1])
    off = len(reps) - len(val_shape(x))
    if reps[cut.dim] != 1 or cut.dim < off:
        raise CantSlice("repeat: the sliced dim is repeated")
    return {x: Cut(cut.dim - off, cut.outer, cut.inner)}


def repeat_interleave(node, cut, ctx):
    cut = _need_cut(cut)
    x, reps = node.args[0], node.args[1]
    d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(reps, int) or d is None:
        raise CantSlice("repeat_interleave: needs an int count and a dim")
    d = _norm_dim(d, len(val_shape(x)))
    if cut.dim != d:
        return {x: Cut(cut.dim, cut.outer, cut.inner)}
    if cut.inner % reps == 0:
        return {x: Cut(d, cut.outer, cut.inner // reps)}
    if cut.inner == 1 and reps == ctx.length and val_shape(x)[d] == cut.outer:
        return {x: WHOLE}  # the axis is the repetition itself: every slice repeats each row n times
    raise CantSlice("repeat_interleave: the sliced axis straddles the repetition")


def repeat_interleave_to_slice(node, cut, n, length):
    x, reps = node.args[0], node.args[1]
    d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    d = _norm_dim(d, len(val_shape(x)))
    out_size = cut_size(val_shape(node), cut, n)[d]
    if cut.dim == d and cut.inner == 1 and reps == length and val_shape(x)[d] == cut.outer:
        reps = n
    return node.target, (x, reps, d), {"output_size": out_size}


def _pooled_trailing(n_pooled: int):
    """Ops that pool the last ``n_pooled`` dims per leading index (adaptive pooling): leading dims keep the cut."""

    def rule(node, cut, ctx):
        cut = _need_cut(cut)
        if cut.dim >= len(val_shape(node)) - n_pooled:
            raise CantSlice(f"{node.target}: pools along the sliced dim {cut.dim}")
        return {node.args[0]: cut}

    return rule


def type_as(node, cut, ctx):
    """``type_as(x, other)`` is ``x`` cast to ``other``'s dtype: ``x`` keeps the cut; ``other`` gives only its dtype
    and device, so any slice of it (or the whole) serves, and the rule leaves it out: inside the region the body
    passes its slice, outside it the whole value (NOTE [Arguments read for their dtype])."""
    return _broadcast_req(node, _need_cut(cut), [node.args[0]])


def like_creation(node, cut, ctx):
    """``new_zeros(x, size)`` and kin: ``x`` gives only dtype and device; each slice makes its own part."""
    _need_cut(cut)
    return {node.args[0]: WHOLE}


def upsample(node, cut, ctx):
    cut = _need_cut(cut)
    if cut.dim >= 2:
        raise CantSlice("upsample: spatial dims need index maps")
    return {node.args[0]: cut}


# Elementwise ops and reshape-like ops: the halo analysis (analysis/halo.py) gives them rules from the same lists.
POINTWISE = [
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.neg.default, aten.abs.default,
    aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.tanh.default, aten.relu.default,
    aten.exp.default, aten.log.default, aten.sin.default, aten.cos.default, aten.sqrt.default, aten.rsqrt.default,
    aten.erf.default, aten.clamp.default, aten.where.self, aten.masked_fill.Scalar, aten.maximum.default,
    aten.minimum.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
    aten.clone.default, aten.contiguous.default, aten.dropout.default, aten.alias.default,
    aten.detach.default, aten.lerp.Scalar, aten.lerp.Tensor, aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar,
    aten.gt.Scalar, aten.logical_not.default, aten.real.default, aten.imag.default,
    aten.ones_like.default, aten.zeros_like.default,  # each slice makes its own part, the same constant
]
VIEWS = [
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
]

RULES: dict = {}
for _op in POINTWISE:
    RULES[_op] = Rule(pointwise, kind="pointwise")
for _op in VIEWS:
    RULES[_op] = Rule(view, reshape_to_slice, kind="view")
RULES.update({
    aten.permute.default: Rule(permute, kind="view"),
    aten.transpose.int: Rule(permute, kind="view"),
    aten.t.default: Rule(permute, kind="view"),
    aten.expand.default: Rule(expand, expand_to_slice, kind="view"),
    aten.broadcast_to.default: Rule(expand, expand_to_slice, kind="view"),
    aten.type_as.default: Rule(type_as, kind="pointwise"),
    aten.linear.default: Rule(linear, kind="linear"),
    aten.conv1d.default: Rule(conv, kind="conv"),
    aten.conv2d.default: Rule(conv, kind="conv"),
    aten.conv3d.default: Rule(conv, kind="conv"),
    aten.group_norm.default: Rule(group_norm, kind="norm"),
    aten.layer_norm.default: Rule(layer_norm, kind="norm"),
    aten.rms_norm.default: Rule(layer_norm, kind="norm"),  # the same statistics over the trailing dims
    aten.scaled_dot_product_attention.default: Rule(sdpa, kind="attention", producers_leave=True),
    aten.softmax.int: Rule(_dim_arg_rule(1), kind="softmax"),
    aten._softmax.default: Rule(_dim_arg_rule(1), kind="softmax"),
    aten.log_softmax.int: Rule(_dim_arg_rule(1), kind="softmax"),
    aten.cat.default: Rule(_dim_arg_rule(1, 0), kind="cat"),
    aten.stack.default: Rule(stack, kind="cat"),
    aten.unbind.int: Rule(unbind, kind="split"),
    aten.chunk.default: Rule(_dim_arg_rule(2, 0), kind="split"),
    aten.split.Tensor: Rule(_dim_arg_rule(2, 0), kind="split"),
    aten.split_with_sizes.default: Rule(_dim_arg_rule(2, 0), kind="split"),
    aten.slice.Tensor: Rule(_dim_arg_rule(1, 0), kind="index"),
    aten.narrow.default: Rule(_dim_arg_rule(1, 0), kind="index"),
    aten.select.int: Rule(select, kind="index"),
    operator.getitem: Rule(getitem, kind="index"),
    aten.mean.dim: Rule(reduction, kind="reduction"),
    aten.sum.dim_IntList: Rule(sum_rule, kind="reduction"),
    aten.amax.default: Rule(reduction, kind="reduction"),
    aten.repeat.default: Rule(repeat, kind="repeat"),
    aten.repeat_interleave.self_int: Rule(repeat_interleave, repeat_interleave_to_slice, kind="repeat"),
    aten.upsample_nearest2d.vec: Rule(upsample, kind="upsample"),
    aten.upsample_nearest2d.default: Rule(upsample, kind="upsample"),
    aten.adaptive_avg_pool2d.default: Rule(_pooled_trailing(2), kind="pool"),
    aten.new_zeros.default: Rule(like_creation, expand_to_slice, kind="creation"),
    aten.new_ones.default: Rule(like_creation, expand_to_slice, kind="creation"),
})


def rule_for(node: Node) -> Rule | None:
    """The rule for a call_function node, or None when the op has none (it is then never sliced)."""
    if node.op != "call_function":
        return None
    return RULES.get(node.target)

