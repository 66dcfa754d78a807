"""Drop-in: the real diffusers pipelines, built from tiny components with random weights (no hub)."""
import pytest
import torch

import fxstream
from fxstream.pipelines import pipeline_inputs, tiny_pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _frames(pipe, kind, steps=2):
    return pipe(**pipeline_inputs(pipe, steps=steps)).frames


@pytest.mark.parametrize("kind", ["svd", "animatediff"])
def test_pipeline_frames_equal_with_compiled_unet(kind):
    """Policy() gives the very same frames; slicing gives frames equal within float rounding. Per UNet call the
    difference is <= 1e-5 (test_compile.py); over the denoising loop and the VAE decoder it compounds (SVD's
    v-prediction scales the model output by sigma, up to 700 here), hence 1e-4 on the frames."""
    pipe = tiny_pipeline(kind)
    with torch.no_grad():
        ref = _frames(pipe, kind)
    original = pipe.unet
    pipe.unet = fxstream.compile(original, policy=fxstream.Policy())
    with torch.no_grad():
        same = _frames(pipe, kind)
    assert torch.equal(same, ref)
    pipe.unet = fxstream.compile(original, policy=fxstream.Policy(slices=2))
    with torch.no_grad():
        out = _frames(pipe, kind)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4
    report = pipe.unet.explain()
    assert report.regions
    assert len(pipe.unet._entries) == 1  # one compiled signature serves every denoising step


@pytest.mark.parametrize("kind", ["svd", pytest.param("animatediff", marks=pytest.mark.slow)])
def test_pipeline_with_step_rehash(kind):
    """Every step full: the very same frames as the uncompiled pipeline. A rehash schedule runs whole
    generations (the pipeline's own timesteps start each one), and a second generation gives the first's frames
    again: nothing is carried from one video into the next."""
    pipe = tiny_pipeline(kind)
    with torch.no_grad():
        ref = _frames(pipe, kind, steps=4)
    original = pipe.unet
    pipe.unet = fxstream.compile(original, policy=fxstream.Policy(rehash=fxstream.StepRehash(full_every=1)))
    with torch.no_grad():
        assert torch.equal(_frames(pipe, kind, steps=4), ref)
    assert pipe.unet.step_log == ["full"] * 4
    pipe.unet = fxstream.compile(original, policy=fxstream.Policy(
        slices=2, rehash=fxstream.StepRehash(full_every=2, steps=5)))
    with torch.no_grad():
        first = _frames(pipe, kind, steps=5)
        assert pipe.unet.step_log == ["full", "rehash", "full", "rehash", "full"]
        second = _frames(pipe, kind, steps=5)
    assert torch.equal(first, second) and first.shape == ref.shape[:1] + first.shape[1:]
    assert torch.isfinite(first).all()
    assert pipe.unet.explain().rehash.ops_skipped > 0
