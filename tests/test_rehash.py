"""Step Rehash: the graph surgery (exact), the schedules, the runtime state across steps and generations."""
import json
import warnings

import pytest
import torch

import fxstream
from fxstream import Policy, StepRehash
from fxstream.compiler import capture
from fxstream.errors import FxstreamError
from fxstream.graph_utils import strip_asserts
from fxstream.passes.step_rehash import add_output, cut_at, module_output, only, split_for_rehash
from fxstream.rehash import default_cache_point, key_steps, temporal_layers


def _graph(model):
    unet, kw = model
    return strip_asserts(capture(unet, kw).graph_module), kw


def _inputs(unet, kw):
    """(state, user inputs) of the exported graph, in its placeholder order."""
    ep = capture(unet, kw)
    state = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "PARAMETER":
            state.append(unet.get_parameter(spec.target))
        elif spec.kind.name == "BUFFER":
            state.append(unet.get_buffer(spec.target))
        elif spec.kind.name != "USER_INPUT":
            state.append(ep.constants[spec.target])
    flat, _ = torch.utils._pytree.tree_flatten(((), kw))
    return state + flat


@pytest.mark.parametrize("model", ["svd_tiny", "animatediff_tiny"])
def test_rehash_graph_fed_the_current_feature_is_the_full_graph(model, request):
    """The surgery is exact: the full graph returns the original outputs (bitwise) plus the feature, and the
    rehash graph given this step's own feature returns bitwise what the original does."""
    unet, kw = request.getfixturevalue(model)
    gm, _ = _graph((unet, kw))
    point = default_cache_point(unet)
    g = split_for_rehash(gm, point)
    args = _inputs(unet, kw)
    with torch.no_grad():
        ref = gm(*args)
        *outs, feature = g.full(*args)
        again = g.rehash(*args, feature)
    assert len(outs) == len(ref)
    for a, b, c in zip(ref, outs, again):
        assert torch.equal(a, b) and torch.equal(a, c)
    # what a rehash step skips: the whole down path and mid block; nothing skipped runs in the rehash graph
    kept = {n.name for n in g.rehash.graph.nodes}
    assert g.skipped and not kept & set(g.skipped)
    down = [n.name for n in gm.graph.nodes if n.op == "call_function"
            and any(p.startswith(("down_blocks", "mid_block")) for p, _ in n.meta.get("nn_module_stack", {}).values())]
    assert down and set(down) <= set(g.skipped)


def test_small_passes(svd_tiny):
    unet, kw = svd_tiny
    gm, _ = _graph(svd_tiny)
    node = module_output(gm, "conv_in")
    assert node.target is torch.ops.aten.conv2d.default
    n_out = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    assert len(next(n for n in add_output(gm, node.name).graph.nodes if n.op == "output").args[0]) == n_out + 1
    probe = only(gm, node.name)
    assert sum(n.op == "call_function" for n in probe.graph.nodes) < 10
    cut = cut_at(gm, node.name)
    assert node.name not in {n.name for n in cut.graph.nodes}
    assert [n for n in cut.graph.nodes if n.op == "placeholder"][-1].name == f"{node.name}_cached"
    args = _inputs(unet, kw)
    with torch.no_grad():
        (x,) = probe(*args)
        assert torch.equal(cut(*args, x)[0], gm(*args)[0])
    # the input graph is never modified
    assert node.name in {n.name for n in gm.graph.nodes}


def test_cache_point_errors(svd_tiny):
    gm, _ = _graph(svd_tiny)
    with pytest.raises(FxstreamError, match="no module of the captured graph"):
        module_output(gm, "up_blocks.9")
    with pytest.raises(FxstreamError, match="tensor outputs"):
        module_output(gm, "down_blocks.0")  # returns the hidden state and its skip connections
    skipped = split_for_rehash(gm, "conv_in").skipped  # legal and pointless: the conv and the view feeding it
    assert module_output(gm, "conv_in").name in skipped and len(skipped) == 2
    with pytest.raises(FxstreamError, match="does not use it"):
        split_for_rehash(gm, "up_blocks.1.attentions.1", probe="down_blocks.0.resnets.0")


def test_default_cache_point_and_temporal_layers(svd_tiny, animatediff_tiny):
    assert default_cache_point(svd_tiny[0]) == "up_blocks.1.attentions.1"
    assert default_cache_point(animatediff_tiny[0]) == "up_blocks.1.motion_modules.1"
    layers = temporal_layers(animatediff_tiny[0])
    assert "up_blocks.1.motion_modules.2" in layers and any(p.startswith("down_blocks") for p in layers)
    with pytest.raises(FxstreamError, match="up_blocks"):
        default_cache_point(torch.nn.Linear(2, 2))


def test_step_rehash_checks_and_schedules(tmp_path):
    for bad in [dict(), dict(full_every=2, adaptive=0.1), dict(full_every=0), dict(schedule=[1, 2]),
                dict(schedule="0,1"), dict(adaptive=-1.0), dict(schedule=[0], steps=5), dict(full_every=2, probe="x"),
                dict(full_every=2, cache_point="")]:
        with pytest.raises(ValueError, match="StepRehash"):
            StepRehash(**bad)
    with pytest.raises(TypeError, match="Policy.rehash"):
        Policy(rehash="every 3")
    u = StepRehash(full_every=3, steps=8)
    assert [u.is_full(i) for i in range(8)] == [True, False, False, True, False, False, True, True]
    assert [StepRehash(full_every=3).is_full(i) for i in range(5)] == [True, False, False, True, False]
    s = StepRehash(schedule=[3, 0, 1, 3])
    assert s.schedule == (0, 1, 3) and [s.is_full(i) for i in range(6)] == [True, True, False, True, True, True]
    s.save(tmp_path / "k.json")
    assert json.loads((tmp_path / "k.json").read_text()) == [0, 1, 3]
    assert StepRehash.load(tmp_path / "k.json") == s
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="path"):
        StepRehash.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="only a key-step schedule"):
        u.save(tmp_path / "u.json")
    assert "rehash=StepRehash(full_every=3, steps=8)" in Policy(rehash=u).describe()


def test_key_step_search():
    base = torch.ones(10)
    turn = torch.cat([torch.ones(5), -torch.ones(5)])  # orthogonal to base: similarity 0
    feats = [base, base * 2, base + 0.01 * turn, turn, turn * 3, turn]
    assert key_steps(feats, 0.99).schedule == (0, 3, 5)
    assert key_steps(feats, 0.99, last=False).schedule == (0, 3)
    assert key_steps(feats, 1.0).schedule == (0, 2, 3, 5)
    with pytest.raises(ValueError, match="threshold"):
        key_steps(feats, 1.5)


def _generation(compiled, kw, steps=6, seed=0):
    """A toy denoising loop: decreasing timesteps, the sample updated from the UNet's output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(kw["sample"].shape, generator=g)
    outs = []
    with torch.no_grad():
        for t in torch.linspace(900.0, 10.0, steps):
            out = compiled(**dict(kw, sample=x, timestep=t))[0]
            c = out.shape[2]  # SVD's sample also carries the image latents after the noisy ones (dim 2)
            x = torch.cat([x[:, :, :c] - 0.05 * out, x[:, :, c:]], dim=2)
            outs.append(out)
    return outs


@pytest.mark.parametrize("policy", [Policy(rehash=StepRehash(full_every=1)),
                                    pytest.param(Policy(slices=2, rehash=StepRehash(schedule=[0, 1, 2, 3, 4, 5])),
                                                 marks=pytest.mark.slow)])  # sliced rehash: test_rehash_under_a_memory_budget
def test_every_step_full_equals_the_module(svd_tiny, policy):
    unet, kw = svd_tiny
    c = fxstream.compile(unet, policy)
    got, ref = _generation(c, kw), _generation(unet, kw)
    tol = 0.0 if not policy.slices_anything else 1e-5
    assert all((a - b).abs().max() <= tol for a, b in zip(got, ref))
    assert c.step_log == ["full"] * 6


@pytest.mark.parametrize("model", ["svd_tiny", pytest.param("animatediff_tiny", marks=pytest.mark.slow)])
def test_generations_do_not_leak_into_each_other(model, request):
    """Two generations back to back on one compiled module equal two runs on fresh ones (bitwise): the first
    ran on a fresh module; the second is run again on another fresh one."""
    unet, kw = request.getfixturevalue(model)
    policy = Policy(slices=2, rehash=StepRehash(full_every=3, steps=6))
    c = fxstream.compile(unet, policy)
    a, b = _generation(c, kw, seed=1), _generation(c, kw, seed=2)
    assert c.step_log == ["full", "rehash", "rehash", "full", "rehash", "full"]
    fresh_b = _generation(fxstream.compile(unet, policy), kw, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(b, fresh_b))
    # and the rehash steps did reuse the feature: they differ from full computation
    ref = _generation(unet, kw, seed=1)
    assert (a[1] - ref[1]).abs().max() > 1e-4 and (a[0] - ref[0]).abs().max() <= 1e-5


def test_reset_and_new_generation_rules(svd_tiny):
    unet, kw = svd_tiny
    c = fxstream.compile(unet, Policy(rehash=StepRehash(full_every=4)))
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):
            c(**dict(kw, timestep=torch.tensor(t)))
        assert c.step_log == ["full", "rehash", "rehash"]
        c.reset()
        assert c.step_log == [] and all(e.rehash.cache is None for e in c._entries.values())
        c(**dict(kw, timestep=torch.tensor(600.0)))
        c(**dict(kw, timestep=torch.tensor(600.0)))  # the same timestep: a second call of step 0 (its own feature)
        assert c.step_log == ["full", "full"]
        c(**dict(kw, timestep=torch.tensor(500.0)))
        assert c.step_log == ["full", "full", "rehash"]
        c(**dict(kw, timestep=torch.tensor(650.0)))  # not decreasing: a new generation
        assert c.step_log == ["full"]
        c(**dict(kw, timestep=torch.tensor(500.0)))
        assert c.step_log == ["full", "rehash"]
        c(**dict(kw, timestep=400.0))  # a plain number counts steps too; it is another signature: no feature yet
        assert c.step_log == ["full", "rehash", "full"]
        c.reset(compiled=True)
        assert not c._entries
        with pytest.raises(FxstreamError, match="timestep"):
            c(**dict(kw, timestep=None))


def test_cache_is_kept_per_signature(svd_tiny):
    """Interleaved signatures in one generation: each rehashes from its own feature."""
    unet, kw = svd_tiny
    small = dict(kw, sample=kw["sample"][:1], encoder_hidden_states=kw["encoder_hidden_states"][:1],
                 added_time_ids=kw["added_time_ids"][:1])
    policy = Policy(rehash=StepRehash(full_every=10))
    c = fxstream.compile(unet, policy)
    with torch.no_grad():
        c(**dict(kw, timestep=torch.tensor(900.0)))
        c(**dict(small, timestep=torch.tensor(850.0)))  # no feature for this signature yet: full
        mixed = c(**dict(kw, timestep=torch.tensor(800.0)))[0]
        assert c.step_log == ["full", "full", "rehash"]
        alone = fxstream.compile(unet, policy)
        alone(**dict(kw, timestep=torch.tensor(900.0)))
        assert torch.equal(alone(**dict(kw, timestep=torch.tensor(800.0)))[0], mixed)


def test_adaptive_probe_decides(svd_tiny):
    unet, kw = svd_tiny
    c = fxstream.compile(unet, Policy(rehash=StepRehash(adaptive=0.05, max_rehash=2)))
    x = kw["sample"]
    with torch.no_grad():
        for t, s in [(900.0, x), (800.0, x * 1.01), (700.0, x * 1.02), (600.0, x * 1.02), (500.0, x * 2),
                     (400.0, x * 2)]:
            c(**dict(kw, sample=s, timestep=torch.tensor(t)))
    # small changes rehash; max_rehash=2 forces step 3; a doubled input (100% change) forces step 4
    assert c.step_log == ["full", "rehash", "rehash", "full", "full", "rehash"]
    info = c.explain().rehash
    assert info.probe == "conv_in" and info.cache_bytes > 0


def test_report_says_what_a_rehash_step_skips(svd_tiny):
    unet, kw = svd_tiny
    report = fxstream.explain(unet, kw, Policy(slices=2, rehash=StepRehash(full_every=3)))
    r = report.rehash
    assert r.cache_point == "up_blocks.1.attentions.1" and r.ops_skipped > r.ops // 2
    assert 0.5 < r.skipped_share < 1.0 and r.flops_rehash < r.flops
    assert r.skipped_modules[:2] == ["down_blocks", "mid_block"]
    assert r.rehash_peak_bytes < report.peak_bytes
    assert "planned FLOPs skipped" in report.table() and "rehash" in report.policy.describe()
    assert fxstream.explain(unet, kw, Policy(slices=2)).rehash is None


def test_rehash_under_a_memory_budget(svd_tiny):
    unet, kw = svd_tiny
    full = fxstream.explain(unet, kw, Policy(rehash=StepRehash(full_every=2)))
    budget = full.weight_bytes + full.original_peak_bytes * 2 // 3
    r = fxstream.explain(unet, kw, Policy(max_memory=budget, slices=8, rehash=StepRehash(full_every=2)))
    assert r.weight_bytes + r.peak_bytes <= budget
    assert r.weight_bytes + r.rehash.cache_bytes + r.rehash.rehash_peak_bytes <= budget


def test_record_and_key_steps(svd_tiny):
    unet, kw = svd_tiny
    c = fxstream.compile(unet, Policy(rehash=StepRehash(full_every=1)))
    with fxstream.rehash.record(c) as rec:
        _generation(c, kw, steps=5)
    assert len(rec.features) == 1 and len(rec.features[0]) == 5
    assert len(rec.similarities()) == 4 and all(-1.0 <= s <= 1.0 for s in rec.similarities())
    sched = rec.key_steps(threshold=1.0)  # every change is "too much": every step full
    assert sched.schedule == (0, 1, 2, 3, 4)
    assert rec.key_steps(threshold=1e-9).schedule == (0, 4)
    with pytest.raises(FxstreamError, match="not compiled with"):
        with fxstream.rehash.record(fxstream.compile(unet, Policy())):
            pass


def test_compile_needs_a_timestep_argument():
    with pytest.raises(TypeError, match="timestep"):
        fxstream.compile(torch.nn.Linear(2, 2), Policy(rehash=StepRehash(full_every=2)))


def test_drawing_marks_the_cache_and_the_skipped_blocks(svd_tiny):
    from fxstream.entry import Entry
    from fxstream.viz import draw_graph
    unet, kw = svd_tiny
    entry = Entry(unet, kw, Policy(slices=2, rehash=StepRehash(full_every=3)))
    for gm in (entry.compiled.original, entry.compiled.graph_module):
        boxes = [n for n in draw_graph(gm, title="t", depth=2).nodes if n.kind in ("module", "region")]
        marks = {m for b in boxes for m in b.marks}
        assert {"cache", "skip"} <= marks
        assert all("skip" in b.marks for b in boxes if b.module.startswith(("down_blocks", "mid_block")))
        assert not any(b.marks for b in boxes if b.module.startswith(("up_blocks.1.resnets.2", "conv_out")))


def test_two_calls_per_timestep_keep_the_generation_and_a_feature_each(svd_tiny):
    """Classifier-free guidance run as two calls (or FreeNoise's windows): the same timestep twice is one step;
    each call reuses its own feature, so the conditional calls give what they give without the others."""
    unet, kw = svd_tiny
    other = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"] * 0)  # the "unconditional" call
    both = fxstream.compile(unet, Policy(rehash=StepRehash(full_every=2)))
    alone = fxstream.compile(unet, Policy(rehash=StepRehash(full_every=2)))
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):
            got = both(**dict(kw, timestep=torch.tensor(t)))[0]
            both(**dict(other, timestep=torch.tensor(t)))
            want = alone(**dict(kw, timestep=torch.tensor(t)))[0]
            assert torch.equal(got, want)
    assert both.step_log == ["full", "full", "rehash", "rehash", "full", "full"]
    assert alone.step_log == ["full", "rehash", "full"]


def test_timesteps_that_never_decrease_warn_once(svd_tiny):
    unet, kw = svd_tiny
    c = fxstream.compile(unet, Policy(rehash=StepRehash(full_every=3)))
    with torch.no_grad():
        for t in (100.0, 200.0, 300.0):
            c(**dict(kw, timestep=torch.tensor(t)))
        with pytest.warns(RuntimeWarning, match="did not decrease"):
            c(**dict(kw, timestep=torch.tensor(400.0)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            c(**dict(kw, timestep=torch.tensor(500.0)))  # once
    every = fxstream.compile(unet, Policy(rehash=StepRehash(full_every=1)))  # never rehashes anyway: no warning
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in (100.0, 200.0, 300.0, 400.0):
            every(**dict(kw, timestep=torch.tensor(t)))
