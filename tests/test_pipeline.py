"""Pipelined regions: every k gives the k=1 output, the planner counts k working sets, the budget may lower k,
the per-slice loop does only per-slice work, and (where CUDA exists) streams give bitwise the k=1 output."""
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fxstream
from fxstream.analysis.cuts import PARTIAL, Cut
from fxstream.compiler import capture, compile_graph
from fxstream.memory import measure_peak, plan_memory, weight_bytes
from fxstream.models import build_unet, example_inputs
from fxstream.runtime import LoopRegion, set_in_flight

_CAPTURED = {}


def _captured(name):
    if name not in _CAPTURED:
        unet = build_unet(name)
        kw = example_inputs(name, unet)
        ep = capture(unet, kw)
        flat, _ = pytree.tree_flatten(((), kw))
        state = [unet.get_parameter(s.target) if s.kind.name == "PARAMETER" else unet.get_buffer(s.target)
                 for s in ep.graph_signature.input_specs if s.kind.name in ("PARAMETER", "BUFFER")]
        _CAPTURED[name] = (unet, ep, state + flat)
    return _CAPTURED[name]


def _loops(gm):
    return [m for m in gm.modules() if isinstance(m, LoopRegion)]


def _set(gm, k, mode):
    set_in_flight(gm, k, {"serial": False, "workers": True, None: None}[mode])


def _run(gm, args):
    with torch.no_grad():
        return gm(*args)[0]


@settings(max_examples=2)
@given(model=st.sampled_from(["svd-tiny", "animatediff-tiny"]), slices=st.integers(2, 5),
       batch=st.sampled_from([None, 2]), k=st.integers(2, 4))
def test_every_k_gives_the_k1_output(model, slices, batch, k):
    unet, ep, args = _captured(model)
    gm = compile_graph(ep.graph_module, fxstream.Policy(slices=slices, batch=batch)).graph_module
    assert _loops(gm)
    ref = _run(gm, args)
    _set(gm, k, "serial")
    assert torch.equal(_run(gm, args), ref)
    # workers: the same slices, each on a thread with fewer intra-op threads; some CPU kernels (oneDNN's
    # Conv3d) pick their algorithm by thread count, so the sums may round differently
    _set(gm, k, "workers")
    torch.testing.assert_close(_run(gm, args), ref, rtol=0, atol=1e-5)
    _set(gm, k, None)  # measured on the first call, kept after: every call gives the same numbers
    first = _run(gm, args)
    assert all(loop.cpu_mode in ("serial", "workers") for loop in _loops(gm) if loop.in_flight > 1)
    assert torch.equal(_run(gm, args), first)
    torch.testing.assert_close(first, ref, rtol=0, atol=1e-5)


def test_partial_outputs_are_summed_in_slice_order():
    """A region with a partial output (a sum over the sliced axis): workers add the slices' sums in order."""
    body = torch.fx.symbolic_trace(lambda x: (x * 2, x.sum(dim=0, keepdim=True)))
    n = 7
    bounds = [(i, 1) for i in range(n)]
    x = torch.randn(n, 33, 17, dtype=torch.float64).float()
    loop = LoopRegion({1: body}, n, bounds, [Cut(0)], [Cut(0), PARTIAL],
                      [((n, 33, 17), (33 * 17, 17, 1), torch.float32), ((1, 33, 17), (33 * 17, 17, 1), torch.float32)])
    ref = loop(x)
    assert torch.equal(ref[0], x * 2)
    for k in (2, 3, 4):
        loop.pipeline, loop.cpu_mode = k, "workers"
        out = loop(x)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_public_policy_and_report(svd_tiny):
    unet, kw = svd_tiny
    with torch.no_grad():
        ref = fxstream.compile(unet, policy=fxstream.Policy(slices=3))(**kw)[0]
        compiled = fxstream.compile(unet, policy=fxstream.Policy(slices=3, pipeline=2))
        out = compiled(**kw)[0]
        again = compiled(**kw)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(out, again)
    report = compiled.explain()
    assert {r.in_flight for r in report.regions} == {2}
    assert all(r.node.startswith("region_") for r in report.regions)
    assert "in flight" in report.table()


def test_planner_counts_k_working_sets_and_bounds_the_measured_peak():
    unet, ep, args = _captured("svd-tiny")
    gm = compile_graph(ep.graph_module, fxstream.Policy(slices=4)).graph_module
    one = plan_memory(gm)
    for k in (2, 4):
        _set(gm, k, "workers")
        plan = plan_memory(gm)
        for name, work in one.region_working_bytes.items():
            loop = getattr(gm, name)
            if loop.partial:  # its sums are held once, beside k working sets (NOTE [Partial sums])
                assert plan.region_working_bytes[name] >= work
            else:
                assert plan.region_working_bytes[name] == min(k, len(loop.bounds)) * work
        _, measured = measure_peak(gm, *args)
        assert one.peak_bytes <= measured <= plan.peak_bytes
    _set(gm, 4, "serial")  # one slice at a time: the k=1 plan is exact
    _, measured = measure_peak(gm, *args)
    assert measured == one.peak_bytes


def test_nested_batch_region_pipelines_inside_only():
    unet, ep, _ = _captured("svd-tiny")
    gm = compile_graph(ep.graph_module, fxstream.Policy(slices=3, batch=2, pipeline=3)).graph_module
    outer = [m for m in gm.children() if isinstance(m, LoopRegion)]
    assert outer and all(m.nested and m.in_flight == 1 for m in outer)
    inner = [m for m in _loops(gm) if not m.nested]
    assert inner and all(m.in_flight == min(3, len(m.bounds)) for m in inner)


@pytest.mark.slow
def test_budget_lowers_k_until_it_fits():
    unet, ep, _ = _captured("svd-tiny")
    weights = weight_bytes(ep)
    floor = fxstream.explain(unet, example_inputs("svd-tiny", unet), fxstream.Policy(slices=4)).lower_bound_bytes
    kw = example_inputs("svd-tiny", unet)
    tight = fxstream.explain(unet, kw, fxstream.Policy(max_memory=weights + floor, pipeline=4))
    assert tight.peak_bytes + weights <= weights + floor
    assert max(r.in_flight for r in tight.regions) < 4  # four working sets do not fit the floor's budget
    roomy = fxstream.explain(unet, kw, fxstream.Policy(max_memory=weights + tight.original_peak_bytes - 1, pipeline=2))
    assert roomy.peak_bytes < roomy.original_peak_bytes
    assert max(r.in_flight for r in roomy.regions) == 2


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.inside = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_loop_does_only_per_slice_work_per_slice():
    """Outside its bodies a region call makes its output buffers and base views once, then per slice narrows
    each sliced argument and copies each cut output: nothing else (no re-derived views, no lookups that
    dispatch)."""
    unet, ep, args = _captured("svd-tiny")
    gm = compile_graph(ep.graph_module, fxstream.Policy(slices=3)).graph_module
    loop_nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    env = {}
    counter = _Ops()
    for loop in _loops(gm):  # count only the loop's own ops
        for body in loop.bodies.values():
            body.register_forward_pre_hook(lambda *_: setattr(counter, "inside", counter.inside + 1))
            body.register_forward_hook(lambda *_: setattr(counter, "inside", counter.inside - 1))
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*args, initial_env=env)
        checked = 0
        for node in loop_nodes[:8]:
            loop = gm.get_submodule(node.target)
            node_args = [interp.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args]
            counter.ops = []
            with counter:
                loop(*node_args)
            sliced_in = sum(c is not None for c in loop.in_cuts)
            cut_out = [c for c in loop.out_cuts if isinstance(c, Cut)]
            per_call = (sum(r is None for c, r in zip(loop.out_cuts, loop.reuse) if isinstance(c, Cut))  # buffers
                        + sum(r is not None for c, r in zip(loop.out_cuts, loop.reuse) if isinstance(c, Cut))
                        + len(loop._unflat_in) + len(loop._unflat_out))
            per_slice = sliced_in + 2 * len(cut_out) + sum(c.outer > 1 for c in cut_out)
            partial = sum(c is PARTIAL for c in loop.out_cuts) * (len(loop.bounds) - 1)
            assert len(counter.ops) == per_call + len(loop.bounds) * per_slice + partial, (node.name, counter.ops)
            checked += 1
    assert checked


@pytest.mark.gpu
@pytest.mark.parametrize("k", [2, 4])
def test_cuda_streams_bitwise_equal_and_within_plan(k):
    unet = build_unet("svd-tiny", device="cuda")
    kw = example_inputs("svd-tiny", unet)
    with torch.no_grad():
        ref = fxstream.compile(unet, policy=fxstream.Policy(slices=4))(**kw)[0]
        compiled = fxstream.compile(unet, policy=fxstream.Policy(slices=4, pipeline=k))
        compiled(**kw)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = compiled(**kw)[0]
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    assert torch.equal(out, ref)
    report = compiled.explain()
    assert {r.in_flight for r in report.regions} == {k}
    assert peak <= report.peak_bytes * 1.05 + 2**20  # the allocator rounds blocks up to 512 bytes
