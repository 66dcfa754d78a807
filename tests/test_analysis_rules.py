"""Every slice rule checked on real tensors: the op on the whole input, sliced, equals the op on the slices."""
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxstream.analysis.cuts import Cut, slice_bounds
from fxstream.analysis.rules import RULES, WHOLE, RuleContext, rule_for
from fxstream.errors import CantSlice
from fxstream.runtime import body_input, slice_view

aten = torch.ops.aten


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


_EXPORTED = {}


def _op_nodes(fn, inputs):
    key = (id(fn), tuple(tuple(x.shape) for x in inputs))
    if key not in _EXPORTED:
        _EXPORTED[key] = torch.export.export(_Fn(fn), tuple(inputs), strict=False)
    ep = _EXPORTED[key]
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and rule_for(n) is not None
             and n.target is not operator.getitem]
    return ep, nodes


def _check_node(node, inputs_by_name, count):
    """For every plain cut of the node's output its rule accepts, compare sliced and whole results."""
    rule = rule_for(node)
    val = node.meta["val"]
    outs = val if isinstance(val, (list, tuple)) else [val]
    env = {k: v for k, v in inputs_by_name.items()}

    def real(a):
        return env[a.name] if isinstance(a, torch.fx.Node) else a

    full = node.target(*torch.fx.map_arg(node.args, real), **torch.fx.map_arg(node.kwargs, real))
    checked = 0
    for d, length in enumerate(outs[0].shape):
        if length < 2:
            continue
        cut = Cut(d)
        try:
            req = rule.inputs(node, cut, RuleContext(int(length), lambda p: None))
        except CantSlice:
            continue
        for start, n in slice_bounds(int(length), count):
            local = {}
            for p, c in req.items():
                local[p.name] = env[p.name] if c is WHOLE else body_input(env[p.name], c, start, n, int(length))
            target, args, kwargs = node.target, node.args, node.kwargs
            if rule.rewrite is not None:
                target, args, kwargs = rule.rewrite(node, cut, n, int(length))
            part = target(*torch.fx.map_arg(args, lambda a: local[a.name]),
                          **torch.fx.map_arg(kwargs, lambda a: local[a.name]))
            fulls = full if isinstance(full, (list, tuple)) else [full]
            parts = part if isinstance(part, (list, tuple)) else [part]
            for f, p in zip(fulls, parts):
                torch.testing.assert_close(p, slice_view(f, cut, start, n, int(length)), rtol=1e-5, atol=1e-5)
        checked += 1
    return checked


def _run_all(ep, inputs) -> dict:
    """Real values of every node of ``ep`` for ``inputs``, by node name."""
    names = [n.name for n in ep.graph.nodes if n.op == "placeholder"]
    env = dict(zip(names, inputs))

    def real(a):
        return env[a.name] if isinstance(a, torch.fx.Node) else a

    for node in ep.graph.nodes:
        if node.op == "call_function":
            env[node.name] = node.target(*torch.fx.map_arg(node.args, real), **torch.fx.map_arg(node.kwargs, real))
    return env


CASES = {
    "pointwise_broadcast": (lambda x, y: F.silu(x) * y + 1.0, [(2, 3, 4, 5), (3, 1, 5)]),
    "linear": (lambda x, w, b: F.linear(x, w, b), [(3, 4, 6), (5, 6), (5,)]),
    "conv2d_3x3": (lambda x, w: F.conv2d(x, w, padding=1), [(4, 3, 5, 5), (2, 3, 3, 3)]),
    "conv3d_temporal": (lambda x, w: F.conv3d(x, w, padding=(1, 0, 0)), [(2, 3, 4, 5, 6), (2, 3, 3, 1, 1)]),
    "group_norm": (lambda x: F.group_norm(x, 2), [(4, 4, 3, 5)]),
    "layer_norm": (lambda x: F.layer_norm(x, [6]), [(3, 5, 6)]),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4)]),
    "softmax": (lambda x: torch.softmax(x, -1), [(3, 4, 5)]),
    "cat_chunk": (lambda x, y: torch.cat(torch.cat([x, y], 1).chunk(2, -1), 0), [(2, 3, 4), (2, 5, 4)]),
    "views": (lambda x: x.permute(0, 2, 1, 3).reshape(6, 4, 5).unsqueeze(0).flatten(0, 1).transpose(1, 2),
              [(2, 4, 3, 5)]),
    "expand": (lambda x, y: x.expand(3, 4, 5) + y, [(1, 4, 1), (3, 4, 5)]),
    "index": (lambda x: x[:, 1:3].select(2, 0), [(3, 5, 4, 2)]),
    "reductions": (lambda x: x.mean(-1) + x.sum(2, keepdim=True).squeeze(2), [(3, 4, 5)]),
    "repeat_interleave": (lambda x: x.repeat_interleave(3, dim=0), [(2, 5)]),
    "upsample": (lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), [(2, 3, 4, 4)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@given(count=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_rule_matches_whole_op(case, count, seed):
    fn, shapes = CASES[case]
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*s, generator=g) for s in shapes]
    ep, nodes = _op_nodes(fn, inputs)
    env = _run_all(ep, inputs)
    checked = sum(_check_node(n, env, count) for n in nodes)
    assert checked > 0, f"{case}: no rule accepted any cut"


def test_refused_cuts_say_why():
    x = torch.randn(2, 4, 3, 5)
    ep, nodes = _op_nodes(lambda x: F.group_norm(x, 2), [x])
    gn = next(n for n in nodes if n.target is aten.group_norm.default)
    with pytest.raises(CantSlice, match="statistics span dim 2"):
        rule_for(gn).inputs(gn, Cut(2), RuleContext(3, lambda p: None))


def test_a_wrong_rule_is_caught(monkeypatch):
    """Plant a wrong rule (softmax allowed along its own dim) and show the rule check fails."""
    from fxstream.analysis import rules

    def wrong(node, cut, ctx):
        return {node.args[0]: cut}

    monkeypatch.setitem(rules.RULES, aten._softmax.default, rules.Rule(wrong))
    monkeypatch.setitem(rules.RULES, aten.softmax.int, rules.Rule(wrong))
    x = torch.randn(3, 6)
    ep, nodes = _op_nodes(lambda x: torch.softmax(x, -1), [x])
    env = _run_all(ep, [x])
    with pytest.raises(AssertionError):
        for n in nodes:
            _check_node(n, env, 2)


def test_ops_of_the_video_unets_have_rules(svd_tiny, animatediff_tiny):
    """Every op in the exported UNets either has a rule or is a creation op (no input to slice)."""
    creation = {aten.arange.default, aten.arange.start, aten.zeros.default, aten.ones.default,
                aten._assert_tensor_metadata.default}
    for unet, kw in (svd_tiny, animatediff_tiny):
        ep = torch.export.export(unet, (), kw, strict=False)
        missing = {str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function" and n.target not in RULES and n.target not in creation}
        assert not missing, missing


SHAPED = {
    "pointwise": lambda d: (lambda x, y: F.gelu(x) * y, [(d[0], d[1], d[2]), (d[1], 1)]),
    "linear": lambda d: (lambda x, w: F.linear(x, w), [(d[0], d[1], d[2]), (d[3], d[2])]),
    "conv3d_temporal": lambda d: (lambda x, w: F.conv3d(x, w, padding=(1, 0, 0)),
                                  [(d[0], 2, d[1], d[2], d[3]), (3, 2, 3, 1, 1)]),
    "views": lambda d: (lambda x: x.reshape(d[0] * d[1], d[2], d[3]).transpose(0, 1).flatten(1),
                        [(d[0], d[1], d[2], d[3])]),
    "attention": lambda d: (lambda q, k: F.scaled_dot_product_attention(q, k, k),
                            [(d[0], 2, d[1], 4), (d[0], 2, d[2], 4)]),
}


@pytest.mark.parametrize("case", sorted(SHAPED))
@settings(max_examples=10)
@given(dims=st.lists(st.integers(1, 6), min_size=4, max_size=4), count=st.integers(1, 7))
def test_rule_matches_whole_op_for_random_shapes(case, dims, count):
    fn, shapes = SHAPED[case](dims)
    inputs = [torch.randn(*s) for s in shapes]
    ep, nodes = _op_nodes(fn, inputs)
    env = _run_all(ep, inputs)
    for n in nodes:
        _check_node(n, env, count)
