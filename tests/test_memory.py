"""The memory planner against the tracker, buffer reuse, the lower bound, the budget policy and the report."""
import copy

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

import fxstream
from fxstream.analysis.cuts import Cut
from fxstream.compiler import capture, compile_graph
from fxstream.memory import measure_peak, plan_memory, weight_bytes
from fxstream.models import build_unet, example_inputs
from fxstream.passes.group_regions import group_regions
from fxstream.passes.reuse_buffers import canonical_layout, reuse_region_buffers
from fxstream.policy import parse_bytes
from fxstream.runtime import LoopRegion, slice_view

POLICIES = [fxstream.Policy(), pytest.param(fxstream.Policy(slices=4), marks=pytest.mark.slow), fxstream.Policy(slices=3),
            fxstream.Policy(batch=2, slices=4), fxstream.Policy(spatial=2, temporal=5)]


def _cases():
    """Every policy on both tiny UNets; regions inside a batch split (the slowest case) on SVD's by default."""
    for policy in POLICIES:
        marks = list(getattr(policy, "marks", ()))
        policy = getattr(policy, "values", (policy,))[0]
        for model in ("svd_tiny", "animatediff_tiny"):
            slow = marks + ([pytest.mark.slow] if model == "animatediff_tiny" and policy.batch else [])
            yield pytest.param(model, policy, marks=slow, id=f"{policy.describe()}-{model}")


@pytest.mark.parametrize("model,policy", list(_cases()))
def test_planned_peak_within_5_percent_of_measured(model, policy, request):
    unet, kw = request.getfixturevalue(model)
    compiled = fxstream.compile(unet, policy=policy)
    with torch.no_grad():
        compiled(**kw)
    _, measured = measure_peak(compiled, **kw)
    planned = compiled.explain().peak_bytes
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured)


def _run(gm, unet, ep, kw):
    flat, _ = pytree.tree_flatten(((), kw))
    state = [unet.get_parameter(s.target) if s.kind.name == "PARAMETER" else unet.get_buffer(s.target)
             for s in ep.graph_signature.input_specs if s.kind.name in ("PARAMETER", "BUFFER")]
    with torch.no_grad():
        return measure_peak(gm, *state, *flat)


def test_buffer_reuse_pass_alone(animatediff_tiny):
    unet, kw = animatediff_tiny
    ep = capture(unet, kw)
    cg = compile_graph(ep.graph_module, fxstream.Policy(slices=4), check_peak=False)  # no split: regions as planned
    grouped = group_regions(cg.prepared, cg.plan)  # the same regions, no reuse yet
    loops = [m for m in grouped.children() if isinstance(m, LoopRegion)]
    assert all(r is None for m in loops for r in m.reuse)
    before = plan_memory(grouped).peak_bytes
    (ref, *_), peak_before = _run(grouped, unet, ep, kw)
    reused = reuse_region_buffers(copy.deepcopy(grouped))
    assert any(r is not None for m in reused.children() if isinstance(m, LoopRegion) for r in m.reuse)
    after = plan_memory(reused).peak_bytes
    (out, *_), peak_after = _run(reused, unet, ep, kw)
    assert torch.equal(out, ref)  # same ops in the same order: bitwise equal
    assert after < before and peak_after < peak_before
    assert after == peak_after


@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.data())
def test_canonical_layout_says_when_two_views_cover_the_same_bytes(shape, data):
    base = torch.arange(torch.Size(shape).numel())
    perm = data.draw(st.permutations(range(len(shape))))
    a = base.view(shape)
    b = base.view([shape[p] for p in perm]).permute(*sorted(range(len(shape)), key=lambda i: perm[i]))
    # a and b have one shape and cover the whole storage: equal layouts iff equal element positions
    same = set(a.flatten().tolist()) == set(b.flatten().tolist())
    assert same  # both cover everything
    dim = data.draw(st.integers(0, len(shape) - 1))
    if shape[dim] < 2:
        return
    va, vb = slice_view(a, Cut(dim), 0, 1, shape[dim]), slice_view(b, Cut(dim), 0, 1, shape[dim])
    assert (canonical_layout(va) == canonical_layout(vb)) == (set(va.flatten().tolist()) == set(vb.flatten().tolist()))


def test_report_fields(svd_tiny):
    unet, kw = svd_tiny
    rep = fxstream.explain(unet, kw, policy=fxstream.Policy(batch=2, slices=4))
    assert rep.weight_bytes == sum(p.numel() * p.element_size() for p in unet.parameters()) + \
        sum(b.numel() * b.element_size() for b in unet.buffers())
    assert 0 < rep.lower_bound_bytes <= rep.peak_bytes < rep.original_peak_bytes
    assert rep.peak_module and "/" in rep.peak_node  # inside the batch region, named with its module
    assert rep.original_peak_node
    for key, peak in (("original", rep.original_peak_bytes), ("compiled", rep.peak_bytes)):
        tl = rep.timeline[key]
        assert tl and max(t.peak_bytes for t in tl) == peak
        assert all(t.live_bytes <= t.peak_bytes for t in tl)
    assert all(0 < r.working_bytes <= r.peak_bytes <= rep.peak_bytes for r in rep.regions if r.dim != "batch")
    assert "lower bound" in rep.table()


def test_budget_fits_weights_and_measured_activations(svd_tiny):
    unet, kw = svd_tiny
    base = fxstream.explain(unet, kw)
    with torch.no_grad():
        ref = unet(**kw)[0]
    # one budget, measured (a looser one is planned in test_budget_respects_slice_limit)
    budget = base.weight_bytes + int(0.4 * base.original_peak_bytes)
    compiled = fxstream.compile(unet, policy=fxstream.Policy(max_memory=budget))
    with torch.no_grad():
        out = compiled(**kw)[0]
    rep = compiled.explain()
    _, measured = measure_peak(compiled, **kw)
    assert rep.weight_bytes + rep.peak_bytes <= budget
    assert rep.weight_bytes + measured <= budget
    assert (out - ref).abs().max().item() <= 1e-5
    assert rep.peak_bytes < 0.4 * base.original_peak_bytes


def test_budget_that_fits_unsliced_changes_nothing(svd_tiny):
    unet, kw = svd_tiny
    compiled = fxstream.compile(unet, policy=fxstream.Policy(max_memory="1GiB"))
    with torch.no_grad():
        assert torch.equal(compiled(**kw)[0], unet(**kw)[0])
    assert not compiled.explain().regions


def test_budget_below_the_floor_raises_before_compute():
    unet = build_unet("svd-tiny", device="meta")  # no data: any compute would fail
    kw = example_inputs("svd-tiny", unet)
    with pytest.raises(fxstream.MemoryBudgetError) as info:
        fxstream.explain(unet, kw, policy=fxstream.Policy(max_memory="7MiB"))
    e = info.value
    assert e.weight_bytes > 0 and 0 < e.lower_bound_bytes
    assert "lower bound" in str(e) and "weights" in str(e) and "max_memory" in str(e)


def test_budget_respects_slice_limit(svd_tiny):
    unet, kw = svd_tiny
    base = fxstream.explain(unet, kw)
    rep = fxstream.explain(unet, kw, policy=fxstream.Policy(
        slices=2, max_memory=base.weight_bytes + int(0.7 * base.original_peak_bytes)))
    assert rep.regions and all(r.slices <= 2 for r in rep.regions if r.dim != "batch")


@pytest.mark.parametrize("text,value", [("6GiB", 6 * 2**30), ("1.5 GB", 1_500_000_000), ("512MiB", 2**29),
                                        (1000, 1000)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value
    assert fxstream.Policy(max_memory=text).max_memory == value


@pytest.mark.parametrize("bad", ["6 gigs", "", -1, 0, 1.5, True])
def test_bad_budget_names_the_field(bad):
    with pytest.raises(ValueError, match="max_memory"):
        fxstream.Policy(max_memory=bad)


def test_weight_bytes_counts_tied_weights_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8, bias=False)
            self.b = torch.nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    ep = torch.export.export(Tied(), (torch.randn(2, 8),))
    assert weight_bytes(ep) == 8 * 8 * 4


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_group_norm_copy_of_a_strided_input_as_measured(layout):
    """A GroupNorm copies a non-contiguous input whole while it runs, except on the CPU an input contiguous in
    channels-last order (ATen takes it as it is there): planned as measured."""
    class Norm(torch.nn.Module):
        def forward(self, x):
            x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else \
                x.transpose(2, 3) if layout == "transposed" else x + 0
            return torch.nn.functional.group_norm(x, 8)

    x = torch.randn(2, 16, 32, 32)
    from fxstream.graph_utils import strip_asserts
    gm = strip_asserts(capture(Norm(), dict(x=x)).graph_module)
    inputs = [x]
    _, measured = measure_peak(gm, *inputs)
    planned = plan_memory(gm).peak_bytes
    assert abs(planned - measured) <= 256, (layout, planned, measured)  # the statistics: 2 x 2 x 8 floats
    assert planned // x.nbytes == 2  # the made input and the output; a view of the caller's: the copy and the output


def test_a_released_storage_is_freed_and_counted_so():
    """NOTE [An exchange frees its source]: ``release_storage`` frees a tensor's bytes while references to it
    remain (each then sees an empty tensor); a tracker counts them freed (its peak stays)."""
    from fxstream.memory import MemoryTracker, release_storage
    with torch.no_grad(), MemoryTracker() as tracker:
        a = torch.ones(1000)
        held = (a,)  # another reference, as a region's output tuple holds its parts
        b = torch.ones(500)
        assert tracker.current == 6000
        release_storage(a)
        assert tracker.current == 2000 and tracker.peak == 6000
        c = torch.ones(250)
        assert tracker.current == 3000 and tracker.peak == 6000
    assert held[0].numel() == 0 and held[0].untyped_storage().nbytes() == 0
    assert b.sum().item() == 500 and c.numel() == 250
