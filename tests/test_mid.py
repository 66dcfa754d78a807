"""Mid-size models (slow): equality at the sizes the benchmark uses, and the memory target."""
import pytest
import torch

import fxstream
from fxstream.memory import measure_peak
from fxstream.models import build_unet, example_inputs


@pytest.mark.slow
@pytest.mark.parametrize("model", ["svd-mid", "animatediff-mid"])
def test_mid_size_equal_and_half_the_memory(model):
    unet = build_unet(model)
    kw = example_inputs(model, unet)
    base = fxstream.compile(unet, policy=fxstream.Policy())
    sliced = fxstream.compile(unet, policy=fxstream.Policy(slices=8))
    with torch.no_grad():
        ref = unet(**kw)[0]
        base(**kw)
        sliced(**kw)
    out_b, peak_b = measure_peak(base, **kw)
    out_s, peak_s = measure_peak(sliced, **kw)
    assert torch.equal(out_b[0], ref)
    assert (out_s[0] - ref).abs().max().item() <= 1e-5
    assert peak_s <= 0.5 * peak_b


@pytest.mark.slow
@pytest.mark.parametrize("model", ["svd-mid", "animatediff-mid"])
@pytest.mark.parametrize("policy", [fxstream.Policy(), fxstream.Policy(batch=2, slices=8)], ids=str)
def test_mid_size_planner_within_5_percent(model, policy):
    unet = build_unet(model)
    kw = example_inputs(model, unet)
    compiled = fxstream.compile(unet, policy=policy)
    with torch.no_grad():
        compiled(**kw)
    _, measured = measure_peak(compiled, **kw)
    planned = compiled.explain().peak_bytes
    assert abs(planned - measured) <= 0.05 * measured
