"""Video UNets built from the architecture configs shipped inside the package.

No weights can be downloaded, so every model here has random weights: built on the ``meta`` device for
full-size planning (no memory, no compute) or on the CPU for real runs at small sizes. ``example_inputs``
gives the keyword arguments of one UNet forward for each model, shaped as the diffusers pipelines call it.

    >>> unet = build_unet("svd-tiny")
    >>> out = unet(**example_inputs("svd-tiny", unet))
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .catalog import UNET_CLASSES

__all__ = ["MODELS", "ModelSpec", "build_unet", "example_inputs", "load_config", "load_unet"]


@dataclass(frozen=True)
class ModelSpec:
    """One named UNet: its kind, config files and the default input size (latent height, width, frames)."""

    kind: str  # "svd", "animatediff", "unet3d" (ModelScope text-to-video) or "i2vgenxl"
    unet_config: str | dict
    adapter_config: str | dict | None
    height: int
    width: int
    frames: int
    batch: int = 2


# Tiny configs in the shape of the ones diffusers' own tests use.
_SVD_TINY = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "cross_attention_dim": 32,
    "num_attention_heads": [8, 16],
    "projection_class_embeddings_input_dim": 96,
    "addition_time_embed_dim": 32,
    "in_channels": 8,
    "out_channels": 4,
    "layers_per_block": 2,
    "sample_size": 16,
    "num_frames": 4,
}
_AD_TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "norm_num_groups": 2,
}
_AD_TINY_ADAPTER = {
    "block_out_channels": [32, 64],
    "motion_layers_per_block": 2,
    "motion_norm_num_groups": 2,
    "motion_num_attention_heads": 4,
    "motion_max_seq_length": 32,
}

# diffusers' own test configs: tests/models/unets/test_models_unet_3d_condition.py (UNet3DConditionModel) and
# tests/pipelines/i2vgen_xl/test_i2vgenxl.py (I2VGenXLUNet).
_UNET3D_TINY = {
    "block_out_channels": [4, 8],
    "norm_num_groups": 4,
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "out_channels": 4,
    "in_channels": 4,
    "layers_per_block": 1,
    "sample_size": 16,
}
_I2VGENXL_TINY = {
    "block_out_channels": [4, 8],
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
    "cross_attention_dim": 4,
    "attention_head_dim": 4,
    "num_attention_heads": None,
    "norm_num_groups": 2,
}

MODELS: dict[str, ModelSpec] = {
    "svd": ModelSpec("svd", "svd.json", None, 72, 128, 14),
    "svd-xt": ModelSpec("svd", "svd-xt.json", None, 72, 128, 25),
    "svd-mid": ModelSpec("svd", "svd-mid.json", None, 64, 64, 8),
    "svd-tiny": ModelSpec("svd", _SVD_TINY, None, 16, 16, 4),
    "animatediff": ModelSpec("animatediff", "sd15-unet.json", "animatediff-motion-adapter.json", 64, 64, 16),
    "animatediff-mid": ModelSpec(
        "animatediff", "animatediff-mid-unet.json", "animatediff-mid-motion-adapter.json", 64, 64, 8
    ),
    "animatediff-tiny": ModelSpec("animatediff", _AD_TINY_UNET, _AD_TINY_ADAPTER, 16, 16, 4),
    "unet3d-tiny": ModelSpec("unet3d", _UNET3D_TINY, None, 16, 16, 4),
    "i2vgenxl-tiny": ModelSpec("i2vgenxl", _I2VGENXL_TINY, None, 16, 16, 4),
}


def load_config(name: str | dict) -> dict:
    """A config dict, from a file shipped in ``fxstream/configs`` or given directly; private keys removed."""
    if isinstance(name, dict):
        cfg = dict(name)
    else:
        text = resources.files("fxstream").joinpath("configs").joinpath(name).read_text()
        cfg = json.loads(text)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"model: unknown name {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def build_unet(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The named UNet with random weights (seeded), on ``device`` (``"meta"`` builds without memory)."""
    import diffusers
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    spec = _spec(name)
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        if spec.kind != "animatediff":
            unet = getattr(diffusers, UNET_CLASSES[spec.kind]).from_config(load_config(spec.unet_config))
        else:
            base = UNet2DConditionModel.from_config(load_config(spec.unet_config))
            adapter = MotionAdapter.from_config(load_config(spec.adapter_config))
            unet = UNetMotionModel.from_unet2d(base, adapter)
    # AlphaBlender's mix_factor is made with torch.Tensor([alpha]) and lands on the CPU; move everything.
    return unet.to(device=device, dtype=dtype).eval()


def load_unet(path, dtype: torch.dtype = torch.float32, subfolder: str | None = None):
    """A video UNet with trained weights from a local diffusers folder (``from_pretrained``, never the hub).

    ``path`` is a UNet folder (``config.json`` + weights) or a pipeline folder with ``subfolder="unet"``.
    """
    import diffusers

    folder = Path(path) / subfolder if subfolder else Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"path: no config.json in {folder}; expected a diffusers UNet folder "
                                "(or a pipeline folder with subfolder='unet')")
    name = json.loads(cfg_file.read_text()).get("_class_name")
    if name not in UNET_CLASSES.values():
        raise ValueError(f"path: {folder} holds a {name!r}; expected one of {list(UNET_CLASSES.values())}")
    cls = getattr(diffusers, name)
    return cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).eval()


def example_inputs(name: str, unet, *, batch: int | None = None, frames: int | None = None,
                   height: int | None = None, width: int | None = None, seed: int = 0) -> dict:
    """Keyword arguments for one forward of ``unet`` (built by :func:`build_unet` for ``name``)."""
    spec = _spec(name)
    b = spec.batch if batch is None else batch
    f = spec.frames if frames is None else frames
    h = spec.height if height is None else height
    w = spec.width if width is None else width
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    cfg = unet.config
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32) if device.type != "meta" else torch.empty(shape)
        return t.to(device=device, dtype=dtype)

    if spec.kind == "svd":
        return {
            "sample": randn(b, f, cfg.in_channels, h, w),
            "timestep": torch.tensor(700.0, device=device),
            "encoder_hidden_states": randn(b, 1, cfg.cross_attention_dim),
            "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * b, device=device, dtype=dtype),
            "return_dict": False,
        }
    if spec.kind == "unet3d":  # the text-to-video pipeline: one prompt embedding per video, repeated per frame inside
        return {
            "sample": randn(b, cfg.in_channels, f, h, w),
            "timestep": torch.tensor(700.0, device=device),
            "encoder_hidden_states": randn(b, 77, cfg.cross_attention_dim),
            "return_dict": False,
        }
    if spec.kind == "i2vgenxl":  # as I2VGenXLPipeline calls it: fps per video, the image's latents per frame
        return {
            "sample": randn(b, cfg.in_channels, f, h, w),
            "timestep": torch.tensor(700.0, device=device),
            "encoder_hidden_states": randn(b, 77, cfg.cross_attention_dim),
            "fps": torch.tensor([16] * b, device=device),
            "image_latents": randn(b, 4, f, h, w),
            "image_embeddings": randn(b, 1, cfg.cross_attention_dim),
            "return_dict": False,
        }
    return {
        "sample": randn(b, cfg.in_channels, f, h, w),
        "timestep": torch.tensor(700.0, device=device),
        "encoder_hidden_states": randn(b * f, 77, cfg.cross_attention_dim),
        "return_dict": False,
    }


# -- video transformers (issue 20) ----------------------------------------------------------------------------------
# name -> (diffusers class, config file or dict, default latent frames, height, width, text tokens, batch).
# The tiny configs are the shapes diffusers' own tests use (a few layers, two heads); the full-size ones are the
# published architectures at their published resolution and frame count.
TRANSFORMERS = {
    "cogvideox-tiny": ("CogVideoXTransformer3DModel", {
        "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "time_embed_dim": 2,
        "text_embed_dim": 8, "num_layers": 2, "sample_width": 48, "sample_height": 48, "sample_frames": 13,
        "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8}, 4, 48, 48, 8, 1),
    "wan-tiny": ("WanTransformer3DModel", {
        "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
        "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}, 4, 48, 48, 12, 1),
    "ltx-tiny": ("LTXVideoTransformer3DModel", {
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
        "cross_attention_dim": 16, "num_layers": 2, "qk_norm": "rms_norm_across_heads", "caption_channels": 16},
        4, 24, 24, 16, 1),
    # CogVideoX-shaped, larger than the tiny one: 4 layers, 4 heads of 16, 4 latent frames of 64x64 (4,096
    # tokens) and 16 of text, batch 2 (classifier-free guidance): tools/bench_compare.py's transformer row
    "cogvideox-mid": ("CogVideoXTransformer3DModel", {
        "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "time_embed_dim": 32,
        "text_embed_dim": 32, "num_layers": 4, "sample_width": 64, "sample_height": 64, "sample_frames": 13,
        "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 16}, 4, 64, 64, 16, 2),
    # Wan-shaped with a wider hidden size than the tiny one (4 heads of 32, feed-forward 512): its token-sized values,
    # not the rotary tables, hold the memory, as at full size (1,024 tokens at its default size)
    "wan-mid": ("WanTransformer3DModel", {
        "patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 4,
        "out_channels": 4, "text_dim": 32, "freq_dim": 256, "ffn_dim": 512, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 64}, 4, 32, 32, 16, 1),
    "cogvideox-5b": ("CogVideoXTransformer3DModel", "cogvideox-5b-transformer.json", 13, 60, 90, 226, 2),
    "wan2.1-14b": ("WanTransformer3DModel", "wan2.1-t2v-14b-transformer.json", 21, 90, 160, 512, 1),
}


def build_transformer(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0):
    """The named video transformer (``TRANSFORMERS``) with random weights, on ``device`` (``"meta"``: no memory)."""
    import diffusers
    if name not in TRANSFORMERS:
        raise ValueError(f"model: unknown transformer {name!r}; expected one of {sorted(TRANSFORMERS)}")
    cls, config = TRANSFORMERS[name][:2]
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(diffusers, cls).from_config(load_config(config))
    return model.to(device=device, dtype=dtype).eval()


def transformer_inputs(name: str, model, *, frames: int | None = None, height: int | None = None,
                       width: int | None = None, batch: int | None = None, seed: int = 0) -> dict:
    """Keyword arguments for one forward of a video transformer as its diffusers pipeline calls it (latent
    ``frames`` x ``height`` x ``width``; CogVideoX gets its rotary tables as the pipeline makes them)."""
    cls, _, f0, h0, w0, text, b0 = TRANSFORMERS[name]
    f, h, w, b = frames or f0, height or h0, width or w0, batch or b0
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config

    def randn(*shape):
        t = torch.randn(*shape, generator=gen) if device.type != "meta" else torch.empty(shape)
        return t.to(device=device, dtype=dtype)

    step = torch.tensor([500] * b, device=device)
    if cls == "CogVideoXTransformer3DModel":
        kw = dict(hidden_states=randn(b, f, cfg.in_channels, h, w), encoder_hidden_states=randn(b, text, cfg.text_embed_dim),
                  timestep=step, return_dict=False)
        if cfg.use_rotary_positional_embeddings:
            tokens = f * (h // cfg.patch_size) * (w // cfg.patch_size)
            kw["image_rotary_emb"] = (randn(tokens, cfg.attention_head_dim), randn(tokens, cfg.attention_head_dim))
        return kw
    if cls == "WanTransformer3DModel":
        return dict(hidden_states=randn(b, cfg.in_channels, f, h, w), encoder_hidden_states=randn(b, text, cfg.text_dim),
                    timestep=step, return_dict=False)
    return dict(hidden_states=randn(b, f * h * w, cfg.in_channels), encoder_hidden_states=randn(b, text, cfg.caption_channels),
                timestep=step, encoder_attention_mask=torch.ones(b, text, device=device), num_frames=f, height=h,
                width=w, return_dict=False)
