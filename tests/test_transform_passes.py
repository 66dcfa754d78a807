"""Each pass alone: GroupNorm split numerics, region grouping structure, determinism."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fxstream
from fxstream.compiler import capture, compile_graph
from fxstream.graph_utils import strip_asserts
from fxstream.meta import SplitNorm, get_meta
from fxstream.passes.split_group_norm import split_group_norm, splittable_group_norms


class _Norm5d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, 8)

    def forward(self, x):
        return F.silu(self.norm(x))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_split_group_norm_matches_fused(dtype, tol):
    m = _Norm5d().to(dtype)
    torch.nn.init.normal_(m.norm.weight)
    torch.nn.init.normal_(m.norm.bias)
    x = torch.randn(2, 8, 3, 5, 6, dtype=dtype) * 3 + 1
    ep = capture(m, {"x": x})
    gm = copy.deepcopy(ep.graph_module)
    assert splittable_group_norms(gm)
    split_group_norm(gm)
    assert not splittable_group_norms(gm)
    tagged = [n for n in gm.graph.nodes if get_meta(n, SplitNorm) is not None]
    assert tagged and all("nn_module_stack" in n.meta for n in tagged)
    params = [m.norm.weight, m.norm.bias]
    (out,) = gm(*params, x)
    assert (out - m(x)).abs().max().item() <= tol


def test_grouping_replaces_regions_by_loops(svd_tiny):
    unet, kw = svd_tiny
    ep = capture(unet, kw)
    cg = compile_graph(ep.graph_module, fxstream.Policy(slices=3))
    calls = [n for n in cg.graph_module.graph.nodes if n.op == "call_module"]
    assert len(calls) == len(cg.plan.regions) > 0
    original_ops = sum(1 for n in cg.prepared.graph.nodes if n.op == "call_function")
    sliced = sum(len(r.nodes) for r in cg.plan.regions)
    outer_ops = sum(1 for n in cg.graph_module.graph.nodes if n.op == "call_function")
    getitems = sum(len(r.outputs) for r in cg.plan.regions)
    assert outer_ops == original_ops - sliced + getitems
    for r in cg.plan.regions:  # a region never holds an op its rule refuses for that cut
        from fxstream.analysis.rules import RuleContext, rule_for
        for n in r.nodes:
            rule_for(n).inputs(n, r.cuts[n], RuleContext(r.axis.length, r.cuts.get))


def test_compiling_twice_gives_the_same_graph(animatediff_tiny):
    unet, kw = animatediff_tiny
    ep = capture(unet, kw)
    a = compile_graph(ep.graph_module, fxstream.Policy(slices=4))
    b = compile_graph(ep.graph_module, fxstream.Policy(slices=4))
    assert a.graph_module.code == b.graph_module.code
    for (na, ma), (nb, mb) in zip(a.graph_module.named_modules(), b.graph_module.named_modules()):
        assert na == nb and getattr(ma, "code", None) == getattr(mb, "code", None)


def test_policy_nothing_leaves_the_graph_untouched(svd_tiny):
    unet, kw = svd_tiny
    ep = capture(unet, kw)
    cg = compile_graph(ep.graph_module, fxstream.Policy())
    assert cg.graph_module is ep.graph_module and not cg.plan.regions


def test_batch_axis_regions_are_exact(svd_tiny):
    unet, kw = svd_tiny
    compiled = fxstream.compile(unet, policy=fxstream.Policy(batch=2))
    with torch.no_grad():
        out = compiled(**kw)[0]
        ref = unet(**kw)[0]
    assert (out - ref).abs().max().item() <= 1e-5
    assert {r.dim for r in compiled.explain().regions} == {"batch"}


def test_planned_peak_matches_measured_for_the_exported_graph(svd_tiny):
    from fxstream.memory import measure_peak, planned_peak
    unet, kw = svd_tiny
    ep = capture(unet, kw)
    gm = strip_asserts(ep.graph_module)
    planned, _ = planned_peak(gm)
    import torch.utils._pytree as pytree
    flat, _ = pytree.tree_flatten(((), kw))
    state = [unet.get_parameter(s.target) for s in ep.graph_signature.input_specs if s.target
             and s.kind.name == "PARAMETER"]
    _, measured = measure_peak(gm, *state, *flat)
    assert abs(planned - measured) <= 0.05 * measured
