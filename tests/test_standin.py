"""A compiled module stands in for the original in the machinery around it: diffusers' pipelines (components,
``register_modules``, ``save_pretrained`` / ``from_pretrained``), state dicts (the original's keys, also inside a
module holding one), attribute access, pickling, and training features (one clear error)."""
import copy
import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fxstream
from fxstream import FxstreamError, Policy
from fxstream.api import CompiledModule
from fxstream.pipelines import tiny_pipeline


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecations (torch_dtype, config attributes)
        yield


def _saved(pipe, path):
    pipe.save_pretrained(path)
    return json.loads((path / "model_index.json").read_text())


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_save_pretrained_writes_the_original_unet_and_loads_back(tmp_path):
    from diffusers import DiffusionPipeline
    pipe = tiny_pipeline("svd")
    unet = pipe.unet
    plain = _saved(pipe, tmp_path / "plain")
    pipe.unet = fxstream.compile(unet)
    assert pipe.config["unet"] == ("diffusers", "UNetSpatioTemporalConditionModel")  # register_modules
    index = _saved(pipe, tmp_path / "compiled")
    assert index == plain and index["unet"] == ["diffusers", "UNetSpatioTemporalConditionModel"]
    assert (tmp_path / "compiled/unet/config.json").read_text() == (tmp_path / "plain/unet/config.json").read_text()
    saved, want = _weights(tmp_path / "compiled/unet"), unet.state_dict()
    assert sorted(saved) == sorted(want)
    assert all(torch.equal(saved[k], v) for k, v in want.items())
    for dtype in (None, torch.float16):
        loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "compiled"), torch_dtype=dtype)
        assert type(loaded.unet) is type(unet) and loaded.unet.dtype == (dtype or torch.float32)
        assert all(torch.equal(loaded.unet.state_dict()[k], v.to(dtype or v.dtype)) for k, v in want.items())


def test_attributes_and_pipeline_checks_see_the_original():
    from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
    pipe = tiny_pipeline("svd")
    unet = pipe.unet
    pipe.unet = c = fxstream.compile(unet)
    assert type(c) is CompiledModule and isinstance(c, CompiledModule) and isinstance(c, type(unet))
    assert isinstance(c, UNetSpatioTemporalConditionModel) and c.__class__ is type(unet)
    assert c.config == unet.config and c.dtype == unet.dtype and c.device == unet.device
    assert c.in_channels == unet.config.in_channels and c.training == unet.training
    assert repr(c).startswith("CompiledModule(")
    assert pipe.components["unet"] is c and pipe.device == unet.device and pipe.dtype == unet.dtype
    other = StableVideoDiffusionPipeline(**pipe.components)
    assert other.unet is c and other.config["unet"] == ("diffusers", "UNetSpatioTemporalConditionModel")


def test_state_dict_has_the_original_keys_and_loads_them():
    torch.manual_seed(0)
    outer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    want = {k: v.clone() for k, v in outer.state_dict().items()}
    outer[1] = fxstream.compile(outer[1])
    c = fxstream.compile(torch.nn.Linear(2, 2))
    assert list(c.state_dict()) == ["weight", "bias"]
    sd = outer.state_dict()
    assert list(sd) == list(want) and all(torch.equal(sd[k], v) for k, v in want.items())
    assert "1.module" not in sd._metadata and "1.0" in sd._metadata
    zeros = {k: torch.zeros_like(v) for k, v in want.items()}
    assert not outer.load_state_dict(zeros).missing_keys  # strict: every key found under its original name
    assert all(v.abs().sum() == 0 for v in outer.state_dict().values())
    c.load_state_dict({"weight": torch.eye(2), "bias": torch.ones(2)})
    assert torch.equal(c.module.weight, torch.eye(2))


def test_compile_pipeline_keeps_the_vae_checkpoint_and_a_shared_vae_compiles_again(tmp_path):
    """compile_pipeline puts a compiled decoder inside the VAE: its state dict and saved folder keep the original
    keys (the decoder's weights were left on meta before), and a second pipeline sharing the VAE compiles."""
    from diffusers import DiffusionPipeline, StableVideoDiffusionPipeline
    pipe = tiny_pipeline("svd")
    want = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    latents = torch.randn(1, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frames = pipe.decode_latents(latents, 2, 2)
    fxstream.compile_pipeline(pipe, Policy())
    assert list(pipe.vae.state_dict()) == list(want)
    _saved(pipe, tmp_path)
    assert sorted(_weights(tmp_path / "vae")) == sorted(want)
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path))
    assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in want.items())
    with torch.no_grad():
        assert torch.equal(loaded.decode_latents(latents, 2, 2), frames)
    second = StableVideoDiffusionPipeline(**pipe.components)  # shares the VAE (and pipe's compiled UNet)
    fxstream.compile_pipeline(second, Policy())
    assert second.unet.module is pipe.unet.module and second.vae.decoder.module is pipe.fxstream._decoder.module
    with torch.no_grad():
        assert torch.equal(second.decode_latents(latents, 2, 2), frames)
        assert torch.equal(pipe.decode_latents(latents, 2, 2), frames)
    assert pipe.vae.decoder is pipe.fxstream._decoder  # each pipeline decodes with its own compiled decoder
    with pytest.raises(TypeError, match="already compiled"):
        fxstream.compile_pipeline(second)


def test_training_features_raise_one_clear_error(svd_tiny):
    unet, kw = svd_tiny
    c = fxstream.compile(unet)
    with pytest.raises(AttributeError):  # as on the original (no RecursionError)
        c.gradient_checkpointing
    assert c.is_gradient_checkpointing is False
    with pytest.raises(FxstreamError, match="enable_gradient_checkpointing.*inference graphs.*compiled.module"):
        c.enable_gradient_checkpointing()
    assert not unet.is_gradient_checkpointing
    assert not c._entries  # refused before compiling anything


def test_an_uninitialised_or_copied_compiled_module_behaves():
    bare = CompiledModule.__new__(CompiledModule)
    with pytest.raises(AttributeError, match="not set yet"):
        bare.gradient_checkpointing
    c = fxstream.compile(torch.nn.Linear(2, 2).eval())
    x = torch.randn(3, 2)
    with torch.no_grad():
        want = c(x)
    for other in (copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert type(other) is CompiledModule and other.module is not c.module
        with torch.no_grad():
            assert torch.equal(other(x), want)
