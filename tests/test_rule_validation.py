"""Every rule of RULES against the real op (tools/validate_rules.py), and planted wrong rules that must be caught.

``tests/test_analysis_rules.py`` checks rules on ops as torch.export writes them for hand-written functions, along
plain cuts; this file runs the table-wide checker: every op of the table has sample calls, every cut the rule
accepts (all ``outer``/``inner`` factorisations, partial sums) is compared with the whole op, and an op without
a sample fails the test, so a new rule cannot go unchecked.
"""
import importlib.util
import math
import pathlib
import sys

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fxstream
from fxstream.analysis import rules
from fxstream.compiler import capture, compile_graph

from programs import BLOCKS, Spec, build

aten = torch.ops.aten

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "validate_rules.py"
_spec = importlib.util.spec_from_file_location("validate_rules", _PATH)
validate_rules = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("validate_rules", validate_rules)  # dataclasses look their module up
_spec.loader.exec_module(validate_rules)


def _table(findings) -> str:
    return "\n".join(f"{f.kind}: {f.op} ({f.sample}) {f.cut}: {f.detail}" for f in findings)


def test_every_rule_matches_the_real_op():
    findings, checked = validate_rules.check_all()
    assert not findings, f"rules that disagree with their op or go unchecked:\n{_table(findings)}"
    assert set(checked) == {str(op) for op in rules.RULES}


def test_ops_of_random_programs_have_rules():
    """Every op torch.export writes for the generated programs (every block kind, both layouts) has a rule."""
    graphs = [capture(build(s), s.inputs()).graph_module
              for s in (Spec("BFCHW", 2, 3, 4, 3, 2, BLOCKS, 0), Spec("BCFHW", 1, 2, 8, 2, 3, BLOCKS, 1))]
    found = validate_rules.missing_rules(graphs)
    assert not found, f"ops without a slice rule:\n{_table(found)}"


def test_a_new_rule_without_a_sample_is_reported(monkeypatch):
    monkeypatch.setattr(rules, "RULES", {**rules.RULES, aten.hardtanh.default: rules.Rule(rules.pointwise)})
    findings, _ = validate_rules.check_all()
    assert [(f.kind, f.op) for f in findings] == [("unchecked", str(aten.hardtanh.default))]


def _accept_any(node, cut, ctx):
    """Wrong on purpose: pass the output's cut to the first input, everything else whole."""
    x = node.args[0]
    return {x: cut, **{p: rules.WHOLE for p in node.all_input_nodes if p is not x}}


def _mean_as_sum(node, cut, ctx):
    return rules.reduction(node, cut, ctx, partial_ok=True)  # wrong: a mean of slices is no partial sum


def _creation_keeps_size(node, cut, ctx):
    return rules.like_creation(node, cut, ctx)  # used without its rewrite: every slice makes the whole size


def _interleave_ignores_repeats(node, cut, ctx):
    return {node.args[0]: cut}  # wrong: the input's axis is 1/reps as long


PLANTED = {  # op -> a wrong rule (a copy of the table is patched; rules.py is not edited)
    aten.conv2d.default: rules.Rule(_accept_any, kind="conv"),  # 3x3 along height: no halo
    aten.group_norm.default: rules.Rule(_accept_any, kind="norm"),  # along the channels: statistics differ
    aten.layer_norm.default: rules.Rule(_accept_any, kind="norm"),  # along the normalised features
    aten.mean.dim: rules.Rule(_mean_as_sum, kind="reduction"),
    aten.repeat_interleave.self_int: rules.Rule(_interleave_ignores_repeats, rules.repeat_interleave_to_slice),
    # batch and heads cut in the queries only
    aten.scaled_dot_product_attention.default: rules.Rule(_accept_any, kind="attention"),
    aten.adaptive_avg_pool2d.default: rules.Rule(_accept_any, kind="pool"),  # along the pooled dims
    aten.new_zeros.default: rules.Rule(_creation_keeps_size, kind="creation"),
}


@pytest.mark.parametrize("op", list(PLANTED), ids=str)
def test_a_planted_wrong_rule_is_caught(monkeypatch, op):
    monkeypatch.setattr(rules, "RULES", {**rules.RULES, op: PLANTED[op]})
    findings, _ = validate_rules.check_rule(op)
    assert any(f.kind == "wrong" for f in findings), f"the planted wrong rule for {op} was not caught"
    monkeypatch.undo()
    findings, checked = validate_rules.check_rule(op)
    assert not findings and checked > 0, "the real rule must pass the same check"


def test_a_planted_wrong_rule_breaks_a_compiled_program(monkeypatch):
    """End to end: with a conv rule that forgets the 3x3 halo, a height region takes the conv in and the
    compiled program differs from the original; with the real table it matches."""
    spec = Spec("BCFHW", 1, 3, 4, 6, 3, ("temporal_attn", "conv3x3", "temporal_attn"), 5)
    module, kwargs = build(spec), spec.inputs()
    ep = capture(module, kwargs)
    flat = list(kwargs.values())
    state = [module.get_parameter(s.target) for s in ep.graph_signature.input_specs if s.kind.name == "PARAMETER"]
    policy = fxstream.Policy(temporal=4, min_region_fraction=0.0)
    with torch.no_grad():
        expected = module(**kwargs)

    def run():
        cg = compile_graph(ep.graph_module, policy)
        convs = [n for r in cg.plan.regions for n in r.nodes if n.target is aten.conv2d.default]
        with torch.no_grad():
            return cg.graph_module(*state, *flat)[0], convs

    out, convs = run()
    assert not convs
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(rules, "RULES", {**rules.RULES, aten.conv2d.default: PLANTED[aten.conv2d.default]})
    out, convs = run()
    assert convs, "the planted rule should let a height region take the 3x3 conv in"
    assert not torch.allclose(out, expected, rtol=1e-5, atol=1e-5), "a wrong rule went unnoticed end to end"


# ---------------------------------------------------------------------------------------------------------------
# the same checker on random shapes: the view algebra, broadcasting, reductions and dim arguments

T = validate_rules.T
_dims = st.lists(st.integers(1, 6), min_size=1, max_size=4)


def _prime_factors(n: int) -> list:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@st.composite
def reshapes(draw):
    """A shape and another grouping of its elements (size-1 dims anywhere): every reshape a UNet writes."""
    src = draw(_dims)
    primes = draw(st.permutations(_prime_factors(math.prod(src))))
    bounds = sorted(draw(st.lists(st.integers(0, len(primes)), max_size=3)))
    edges = [0, *bounds, len(primes)]
    dst = [math.prod(primes[a:b]) for a, b in zip(edges, edges[1:])]
    op = draw(st.sampled_from([aten.reshape.default, aten.view.default, aten._unsafe_view.default]))
    return op, [((T(tuple(src)), dst), {})]


@st.composite
def broadcasts(draw):
    a = draw(_dims)
    b = [draw(st.sampled_from([1, s])) for s in a[len(a) - draw(st.integers(1, len(a))):]]
    first, second = draw(st.permutations([T(tuple(a)), T(tuple(b))]))
    return draw(st.sampled_from([aten.mul.Tensor, aten.sub.Tensor, aten.maximum.default])), [((first, second), {})]


@st.composite
def reductions(draw):
    x = draw(_dims)
    dims = draw(st.lists(st.integers(-len(x), len(x) - 1), min_size=1, max_size=len(x), unique_by=lambda d: d % len(x)))
    op = draw(st.sampled_from([aten.sum.dim_IntList, aten.mean.dim, aten.amax.default]))
    return op, [((T(tuple(x)), dims, draw(st.booleans())), {})]


@st.composite
def dim_ops(draw):
    x = draw(_dims)
    d = draw(st.integers(-len(x), len(x) - 1))
    return draw(st.sampled_from([
        (aten._softmax.default, [((T(tuple(x)), d, False), {})]),
        (aten.permute.default, [((T(tuple(x)), draw(st.permutations(range(len(x))))), {})]),
        (aten.transpose.int, [((T(tuple(x)), d, draw(st.integers(0, len(x) - 1))), {})]),
        (aten.unsqueeze.default, [((T(tuple(x)), draw(st.integers(-len(x) - 1, len(x)))), {})]),
        (aten.cat.default, [(([T(tuple(x)), T(tuple(x))], d), {})]),
        (aten.select.int, [((T(tuple(x)), d, 0), {})]),
    ]))


@pytest.mark.parametrize("family", [reshapes, broadcasts, reductions, dim_ops], ids=lambda f: f.__name__)
@settings(max_examples=max(20, settings.default.max_examples), deadline=None)
@given(data=st.data())
def test_rules_match_the_real_op_on_random_shapes(family, data):
    op, samples = data.draw(family(), label="case")
    findings, checked = validate_rules.check_rule(op, samples)
    event(f"{op.__name__}: {'some cut accepted' if checked else 'no cut accepted'}")
    assert not findings, f"{op} on {samples}:\n{_table(findings)}"
