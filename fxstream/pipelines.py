"""Real diffusers pipelines around a video UNet, with tiny random-weight companions (VAE, encoders, scheduler).

No weights can be downloaded, so the tests, the similarity tool and the benchmarks drive a UNet (tiny, mid-size
or loaded from a local folder) through the real ``StableVideoDiffusionPipeline`` / ``AnimateDiffPipeline``, with
a small VAE and image encoder whose shapes fit it. The schedulers are configured as the released pipelines are.

    >>> pipe = tiny_pipeline("svd")                              # everything tiny
    >>> pipe = tiny_pipeline("svd", unet=build_unet("svd-mid"))  # a mid-size UNet, tiny companions
    >>> video = pipe(**pipeline_inputs(pipe, steps=25)).frames
"""
from __future__ import annotations

import torch

__all__ = ["tiny_pipeline", "pipeline_inputs", "kind_of", "scheduler"]


def kind_of(unet: torch.nn.Module) -> str:
    name = type(unet).__name__
    if name == "UNetSpatioTemporalConditionModel":
        return "svd"
    if name in ("UNetMotionModel", "UNet2DConditionModel"):
        return "animatediff"
    raise ValueError(f"unet: a {name}; expected a UNetSpatioTemporalConditionModel (SVD) or a UNetMotionModel "
                     "(AnimateDiff)")


def _svd_tiny_unet():
    from diffusers import UNetSpatioTemporalConditionModel
    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=8, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32)


def _ad_tiny_unet():
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_norm_num_groups=2,
                            motion_num_attention_heads=4)
    return UNetMotionModel.from_unet2d(unet, adapter)


def scheduler(kind: str):
    """The scheduler the released pipelines use: SVD's EulerDiscrete (v-prediction, Karras sigmas), else DDIM."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    if kind == "svd":
        return EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
            num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
            steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)


def tiny_pipeline(kind: str, unet: torch.nn.Module | None = None, seed: int = 0):
    """A ``StableVideoDiffusionPipeline`` (``kind="svd"``) or ``AnimateDiffPipeline`` (``"animatediff"``) on the
    CPU: ``unet`` (default: a tiny one) with a 2-level VAE (scale factor 2) and, for SVD, a tiny CLIP image
    encoder projecting to the UNet's ``cross_attention_dim``. Random weights, seeded."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    if kind not in ("svd", "animatediff"):
        raise ValueError(f"kind: expected 'svd' or 'animatediff', got {kind!r}")
    torch.manual_seed(seed)
    if unet is None:
        unet = _svd_tiny_unet() if kind == "svd" else _ad_tiny_unet()
    elif kind_of(unet) != kind:
        raise ValueError(f"unet: a {type(unet).__name__} does not fit a {kind} pipeline")
    if kind == "svd":
        vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                           down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                                           latent_channels=4)
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, projection_dim=unet.config.cross_attention_dim, num_hidden_layers=2,
            num_attention_heads=4, image_size=32, intermediate_size=37, patch_size=4))
        fe = CLIPImageProcessor(crop_size=32, size=32)
        pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=enc, unet=unet, scheduler=scheduler("svd"),
                                            feature_extractor=fe)
    else:
        vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                            norm_num_groups=2)
        pipe = AnimateDiffPipeline(unet=unet, motion_adapter=None, vae=vae, scheduler=scheduler("animatediff"), text_encoder=None,
                                   tokenizer=None)
    return pipe.to("cpu")


def pipeline_inputs(pipe, *, steps: int, frames: int = 3, latent: int | tuple = 16, seed: int = 0) -> dict:
    """Keyword arguments for one generation of :func:`tiny_pipeline`'s pipeline: ``frames`` frames of
    ``latent`` (an int, or (height, width)) latents, ``steps`` denoising steps, seeded; frames returned as a
    tensor."""
    lh, lw = (latent, latent) if isinstance(latent, int) else latent
    h, w = lh * pipe.vae_scale_factor, lw * pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    if kind_of(pipe.unet.module if hasattr(pipe.unet, "policy") else pipe.unet) == "svd":
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
        return dict(image=image, height=h, width=w, num_frames=frames, num_inference_steps=steps, generator=g,
                    decode_chunk_size=frames, output_type="pt")
    dim = pipe.unet.config.cross_attention_dim
    emb = torch.randn(1, 7, dim, generator=torch.Generator().manual_seed(seed + 1))
    return dict(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), height=h, width=w,
                num_frames=frames, num_inference_steps=steps, generator=g, output_type="pt")
