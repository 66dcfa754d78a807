"""Real diffusers pipelines around a video UNet, with tiny random-weight companions (VAE, encoders, scheduler).

No weights can be downloaded, so the tests, the similarity tool and the benchmarks drive a UNet (tiny, mid-size
or loaded from a local folder) through the real ``StableVideoDiffusionPipeline`` / ``AnimateDiffPipeline``, with
a small VAE and image encoder whose shapes fit it. The schedulers are configured as the released pipelines are.

    >>> pipe = tiny_pipeline("svd")                              # everything tiny
    >>> pipe = tiny_pipeline("svd", unet=build_unet("svd-mid"))  # a mid-size UNet, tiny companions
    >>> video = pipe(**pipeline_inputs(pipe, steps=25)).frames

:func:`build_pipeline` builds the released pipelines' architectures from the configs shipped in the package
(UNet, VAE, image or text encoder; random weights), on the ``meta`` device for whole-pipeline planning
(:func:`fxstream.explain_pipeline`) or on the CPU:

    >>> pipe = build_pipeline("svd-xt", device="meta", dtype=torch.float16)
"""
from __future__ import annotations

import torch

from .catalog import unet_kind

__all__ = ["tiny_pipeline", "pipeline_inputs", "scheduler", "build_pipeline", "PIPELINES"]


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


def _tiny_svd_companions(unet):
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                                       latent_channels=4)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=unet.config.cross_attention_dim, num_hidden_layers=2,
        num_attention_heads=4, image_size=32, intermediate_size=37, patch_size=4))
    return vae, enc, CLIPImageProcessor(crop_size=32, size=32)


def _tiny_ad_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                         norm_num_groups=2)


def _assemble(kind: str, unet, vae, image_encoder=None, feature_extractor=None, text_encoder=None):
    from diffusers import AnimateDiffPipeline, StableVideoDiffusionPipeline
    if kind == "svd":
        return StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler("svd"),
                                            feature_extractor=feature_extractor)
    return AnimateDiffPipeline(unet=unet, motion_adapter=None, vae=vae, scheduler=scheduler("animatediff"),
                               text_encoder=text_encoder, tokenizer=None)


def tiny_pipeline(kind: str, unet: torch.nn.Module | None = None, seed: int = 0):
    """A ``StableVideoDiffusionPipeline`` (``kind="svd"``) or ``AnimateDiffPipeline`` (``"animatediff"``) on the
    CPU: ``unet`` (default: a tiny one) with a 2-level VAE (scale factor 2) and, for SVD, a tiny CLIP image
    encoder projecting to the UNet's ``cross_attention_dim``. Random weights, seeded."""
    if kind not in ("svd", "animatediff"):
        raise ValueError(f"kind: expected 'svd' or 'animatediff', got {kind!r}")
    torch.manual_seed(seed)
    if unet is None:
        unet = _svd_tiny_unet() if kind == "svd" else _ad_tiny_unet()
    elif unet_kind(unet) != kind:
        raise ValueError(f"unet: a {type(unet).__name__} does not fit a {kind} pipeline")
    if kind == "svd":
        vae, enc, fe = _tiny_svd_companions(unet)
        pipe = _assemble("svd", unet, vae, image_encoder=enc, feature_extractor=fe)
    else:
        pipe = _assemble("animatediff", unet, _tiny_ad_vae())
    return pipe.to("cpu")


# name -> (kind, UNet name for fxstream.models.build_unet, VAE config, encoder config)
PIPELINES = {
    "svd": ("svd", "svd", "svd-vae.json", "svd-image-encoder.json"),
    "svd-xt": ("svd", "svd-xt", "svd-vae.json", "svd-image-encoder.json"),
    "animatediff": ("animatediff", "animatediff", "sd15-vae.json", "sd15-text-encoder.json"),
    "svd-tiny": ("svd", None, None, None),  # tiny_pipeline's components
    "animatediff-tiny": ("animatediff", None, None, None),
}


def build_pipeline(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float16,
                   seed: int = 0):
    """A whole diffusers pipeline with random weights, built from the configs shipped in ``fxstream/configs``:

    - ``"svd"`` / ``"svd-xt"``: ``StableVideoDiffusionPipeline``: the UNet (``svd.json`` / ``svd-xt.json``),
      ``AutoencoderKLTemporalDecoder`` (``svd-vae.json``), the CLIP ViT-H image encoder
      (``svd-image-encoder.json``), a default ``CLIPImageProcessor`` and SVD's Euler scheduler;
    - ``"animatediff"``: ``AnimateDiffPipeline``: SD 1.5's UNet with the motion adapter merged in
      (``UNetMotionModel``), SD 1.5's ``AutoencoderKL`` (``sd15-vae.json``) and CLIP text encoder
      (``sd15-text-encoder.json``); no tokenizer (its vocabulary would have to be downloaded: pass
      ``prompt_embeds``), DDIM;
    - ``"svd-tiny"`` / ``"animatediff-tiny"``: :func:`tiny_pipeline`'s components.

    ``device="meta"`` (default) allocates nothing: for :func:`fxstream.explain_pipeline`. Nothing is fetched
    from a hub.
    """
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from .models import build_unet, load_config

    if name not in PIPELINES:
        raise ValueError(f"name: unknown pipeline {name!r}; expected one of {sorted(PIPELINES)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point torch.dtype such as torch.float16, got {dtype!r}")
    kind, unet_name, vae_cfg, enc_cfg = PIPELINES[name]
    device = torch.device(device)
    torch.manual_seed(seed)
    # On meta, build inside the device context (no memory); elsewhere on the CPU, moved afterwards.
    # AlphaBlender's mix_factor is made on the CPU either way: the final .to() moves every module.
    build_on = device if device.type == "meta" else torch.device("cpu")
    with build_on:
        if unet_name is None:
            unet = _svd_tiny_unet() if kind == "svd" else _ad_tiny_unet()
            if kind == "svd":
                vae, enc, fe = _tiny_svd_companions(unet)
                parts = dict(image_encoder=enc, feature_extractor=fe)
            else:
                vae, parts = _tiny_ad_vae(), {}
        else:
            unet = build_unet(unet_name, device=build_on, dtype=dtype, seed=seed)
            cfg = load_config(enc_cfg)
            if kind == "svd":
                vae = AutoencoderKLTemporalDecoder.from_config(load_config(vae_cfg))
                parts = dict(image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)),
                             feature_extractor=CLIPImageProcessor())
            else:
                vae = AutoencoderKL.from_config(load_config(vae_cfg))
                parts = dict(text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)))
    modules = dict(unet=unet, vae=vae, **{k: v for k, v in parts.items() if isinstance(v, torch.nn.Module)})
    for k, m in modules.items():
        modules[k] = m.to(device=device, dtype=dtype).eval()
    parts.update({k: v for k, v in modules.items() if k in parts})
    return _assemble(kind, modules["unet"], modules["vae"], **parts)


def pipeline_inputs(pipe, *, steps: int, frames: int = 3, latent: int | tuple = 16, seed: int = 0) -> dict:
    """Keyword arguments for one generation of :func:`tiny_pipeline`'s pipeline: ``frames`` frames of
    ``latent`` (an int, or (height, width)) latents, ``steps`` denoising steps, seeded; frames returned as a
    tensor."""
    lh, lw = (latent, latent) if isinstance(latent, int) else latent
    h, w = lh * pipe.vae_scale_factor, lw * pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    if unet_kind(pipe.unet.module if hasattr(pipe.unet, "policy") else pipe.unet) == "svd":
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
        return dict(image=image, height=h, width=w, num_frames=frames, num_inference_steps=steps, generator=g,
                    decode_chunk_size=frames, output_type="pt")
    dim = pipe.unet.config.cross_attention_dim
    emb = torch.randn(1, 7, dim, generator=torch.Generator().manual_seed(seed + 1))
    return dict(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), height=h, width=w,
                num_frames=frames, num_inference_steps=steps, generator=g, output_type="pt")
