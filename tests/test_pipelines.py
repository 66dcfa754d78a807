"""Drop-in: the real diffusers pipelines, built from tiny components with random weights (no hub)."""
import pytest
import torch

import fxstream

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _svd_pipeline():
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=8, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                                       latent_channels=4)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=4))
    fe = CLIPImageProcessor(crop_size=32, size=32)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=enc, unet=unet, scheduler=scheduler,
                                        feature_extractor=fe)
    return pipe.to("cpu")


def _animatediff_pipeline():
    from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter,
                           UNet2DConditionModel)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_norm_num_groups=2,
                            motion_num_attention_heads=4)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                        norm_num_groups=2)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
    pipe = AnimateDiffPipeline(unet=unet, motion_adapter=adapter, vae=vae, scheduler=sched,
                               text_encoder=None, tokenizer=None)
    return pipe.to("cpu")


def _frames(pipe, kind, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "svd":
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        return pipe(image=image, height=32, width=32, num_frames=3, num_inference_steps=steps, generator=g,
                    decode_chunk_size=3, output_type="pt").frames
    emb = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    return pipe(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), height=32, width=32,
                num_frames=3, num_inference_steps=steps, generator=g, output_type="pt").frames


@pytest.mark.parametrize("kind", ["svd", "animatediff"])
def test_pipeline_frames_equal_with_compiled_unet(kind):
    """Policy() gives the very same frames; slicing gives frames equal within float rounding. Per UNet call the
    difference is <= 1e-5 (test_compile.py); over the denoising loop and the VAE decoder it compounds (SVD's
    v-prediction scales the model output by sigma, up to 700 here), hence 1e-4 on the frames."""
    pipe = _svd_pipeline() if kind == "svd" else _animatediff_pipeline()
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


@pytest.mark.parametrize("kind", ["svd", "animatediff"])
def test_pipeline_with_step_rehash(kind):
    """Every step full: the very same frames as the uncompiled pipeline. A rehash schedule runs whole
    generations (the pipeline's own timesteps start each one), and a second generation gives the first's frames
    again: nothing is carried from one video into the next."""
    pipe = _svd_pipeline() if kind == "svd" else _animatediff_pipeline()
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
