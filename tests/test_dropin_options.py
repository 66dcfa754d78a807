"""Drop-in with every option diffusers offers on its video pipelines (issue 18).

Each test builds a real diffusers pipeline from tiny random-weight components (nothing from a hub: a CLIP
tokenizer over a vocabulary of single letters and digits, tiny CLIP text and image encoders, fxstream's tiny UNets
and VAEs), turns one option on and generates once with the original UNet (the reference) and once with
``fxstream.compile(unet, policy)``: ``Policy()`` must give the very same frames (``torch.equal``), ``Policy(slices=2)``
frames within 1e-4 (the frames are in [0, 1]; per UNet call slicing is within ~1e-6, test_pipelines.py).
Each generation is 2 denoising steps of 4 frames of 8x8 latents. Every variant is a fresh pipeline built from the
same seeds, with the option turned on after the UNet was compiled (as a user would) unless said otherwise.
"""
import string

import numpy as np
import pytest
import torch

import fxstream
from fxstream.pipelines import pipeline_inputs, scheduler, tiny_pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

STEPS, FRAMES, LATENT = 2, 4, 8
POLICIES = {"exact": fxstream.Policy(), "slices2": fxstream.Policy(slices=2)}
TOL = 1e-4


# A compiled UNet that falls back to the original module would pass every comparison: make that an error.
pytestmark = pytest.mark.filterwarnings("error::fxstream.api.FallbackWarning")


def _case(*values, slow=True, xfail=None):
    """One parametrisation: slow unless said otherwise, a strict xfail where ``xfail`` (what is wrong) is given."""
    marks = ([pytest.mark.slow] if slow else []) + (
        [pytest.mark.xfail(strict=True, reason=f"issue 18: {xfail}")] if xfail else [])
    return pytest.param(*values, marks=marks, id="-".join(map(str, values)))


def _policies(*default, xfail=None):
    """Both policies; those named in ``default`` run without --runslow; ``xfail``: {policy: what is wrong}."""
    xfail = xfail or {}
    return pytest.mark.parametrize("policy", [_case(p, slow=p not in default, xfail=xfail.get(p)) for p in POLICIES])


# -- tiny components ----------------------------------------------------------------------------------------------
def _tokenizer():
    """A real CLIPTokenizer over a vocabulary of single letters and digits (no merges): no download."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _text_encoder(dim: int, seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=80, hidden_size=dim, intermediate_size=37, num_attention_heads=2 if dim < 16 else 4,
        num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def _image_encoder(dim: int, seed: int = 2):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=dim, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=4)).eval()
    return enc, CLIPImageProcessor(crop_size=32, size=32)


def _image(size: int, seed: int):
    from PIL import Image
    rgb = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def _ad_pipe(cls=None, **extra):
    """An AnimateDiff-family pipeline (default AnimateDiffPipeline) around fxstream's tiny UNetMotionModel and VAE,
    with a tokenizer and text encoder so that prompts (which FreeNoise needs) work. ``extra``: the class's other
    components (controlnet, image_encoder, pag_applied_layers, ...)."""
    base = tiny_pipeline("animatediff", seed=0)
    cls = cls or diffusers.AnimateDiffPipeline
    extra.setdefault("motion_adapter", None)
    pipe = cls(unet=base.unet, vae=base.vae, text_encoder=_text_encoder(base.unet.config.cross_attention_dim),
               tokenizer=_tokenizer(), scheduler=scheduler("animatediff"), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ad_inputs(pipe, **over):
    size = LATENT * pipe.vae_scale_factor
    kw = dict(prompt="a cat walking", num_frames=FRAMES, height=size, width=size, num_inference_steps=STEPS,
              generator=torch.Generator().manual_seed(0), output_type="pt")
    kw.update(over)
    return kw


# -- the check ----------------------------------------------------------------------------------------------------
def _assert_close(policy: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    diff = (out.float() - ref.float()).abs().max().item()
    if policy == "exact":
        assert torch.equal(out, ref), f"Policy(): frames differ from the original UNet's by {diff:.3g}"
    else:
        assert diff <= TOL, f"Policy(slices=2): frames differ from the original UNet's by {diff:.3g} (> {TOL})"


def _generate(make_pipe, inputs, enable=None, policy=None, before_compile=False):
    """A fresh pipeline, its UNet compiled with ``policy`` (None: the original), ``enable(pipe)`` turning the
    option on (after compiling unless ``before_compile``); the pipeline and its frames."""
    pipe = make_pipe()
    if enable is not None and (policy is None or before_compile):
        enable(pipe)
    if policy is not None:
        pipe.unet = fxstream.compile(pipe.unet, policy=POLICIES[policy])
        if enable is not None and not before_compile:
            enable(pipe)
    return pipe, pipe(**inputs(pipe)).frames


def _dropin(policy: str, make_pipe, inputs, enable=None, *, before_compile=False, plain_inputs=None):
    """Generate with the original UNet and with the compiled one, the option on in both, and compare; then a
    second generation with the compiled one must give the same frames and compile nothing new. Where
    ``plain_inputs`` is given, the option must change the frames against a generation with those inputs and
    without ``enable`` (so that the comparison is not vacuous)."""
    _, ref = _generate(make_pipe, inputs, enable)
    assert torch.isfinite(ref).all()
    if plain_inputs is not None:
        _, plain = _generate(make_pipe, plain_inputs)
        assert (ref - plain).abs().max().item() > 1e-3, "the option does not change the frames"
    pipe, out = _generate(make_pipe, inputs, enable, policy, before_compile)
    _assert_close(policy, out, ref)
    if policy != "exact":
        assert pipe.unet.explain().regions, "nothing was sliced"
    compiled = len(pipe.unet._entries)
    assert torch.equal(pipe(**inputs(pipe)).frames, out)
    assert len(pipe.unet._entries) == compiled, "the second generation compiled the UNet again"
    return pipe


def _toggle(policy: str, enable, disable):
    """The option turned on on a compiled UNet that has already generated without it, then off again: each
    generation must be the original's in the same state (the change is seen, not a stale compiled graph run)."""
    _, plain = _generate(_ad_pipe, _ad_inputs)
    _, on = _generate(_ad_pipe, _ad_inputs, enable)
    pipe = _ad_pipe()
    pipe.unet = fxstream.compile(pipe.unet, policy=POLICIES[policy])
    _assert_close(policy, pipe(**_ad_inputs(pipe)).frames, plain)
    enable(pipe)
    _assert_close(policy, pipe(**_ad_inputs(pipe)).frames, on)
    disable(pipe)
    _assert_close(policy, pipe(**_ad_inputs(pipe)).frames, plain)


# -- AnimateDiffPipeline ------------------------------------------------------------------------------------------
@_policies()
def test_animatediff_plain(policy):
    """No option: the baseline every other test adds one option to."""
    _dropin(policy, _ad_pipe, _ad_inputs)


def _freeu(p):
    p.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


@_policies("exact", "slices2")
def test_animatediff_freeu(policy):
    _dropin(policy, _ad_pipe, _ad_inputs, _freeu, plain_inputs=_ad_inputs)


@_policies("exact")
def test_animatediff_free_init(policy):
    """FreeInit: the denoising loop runs twice, re-noising the first result's low frequencies."""
    _dropin(policy, _ad_pipe, _ad_inputs, lambda p: p.enable_free_init(
        num_iters=2, use_fast_sampling=False, method="butterworth", order=4, spatial_stop_frequency=0.25,
        temporal_stop_frequency=0.25), plain_inputs=_ad_inputs)


def _free_noise_pipe():
    """FreeNoise reads the motion adapter's config (motion_max_seq_length): the adapter fxstream's tiny UNet was
    built from (random weights; the pipeline uses only its config, the UNet already holds its modules)."""
    from fxstream.models import MODELS
    torch.manual_seed(7)
    return _ad_pipe(motion_adapter=diffusers.MotionAdapter(**MODELS["animatediff-tiny"].adapter_config))


@_policies()
def test_animatediff_free_noise(policy):
    """FreeNoise: the motion modules' transformer blocks are swapped for FreeNoise blocks attending over sliding
    windows of 2 frames (stride 1)."""
    def enable(p):
        p.enable_free_noise(context_length=2, context_stride=1, weighting_scheme="pyramid",
                            noise_type="shuffle_context")
    _dropin(policy, _free_noise_pipe, _ad_inputs, enable, plain_inputs=_ad_inputs)


@_policies()
def test_animatediff_free_noise_split_inference(policy):
    """FreeNoise with split inference: motion modules, attentions, resnets and samplers wrapped in
    SplitInferenceModules that run the effective batch in chunks."""
    def enable(p):
        p.enable_free_noise(context_length=2, context_stride=1)
        p.enable_free_noise_split_inference(spatial_split_size=32, temporal_split_size=4)
    _dropin(policy, _free_noise_pipe, _ad_inputs, enable)


def _ip_adapter_state_dict(unet, embed_dim: int, seed: int = 3) -> dict:
    """An IP-Adapter checkpoint for ``unet`` in the original format (as diffusers' test helper
    ``create_ip_adapter_state_dict`` builds it): ``to_k_ip`` / ``to_v_ip`` for every cross-attention outside the
    motion modules, keyed 1, 3, 5, ... in attn_processors order, and an ``ImageProjection`` to 4 tokens."""
    torch.manual_seed(seed)
    cfg, dim = unet.config, unet.config.cross_attention_dim
    ip, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        else:
            level = int(name.split(".")[1])
            chans = list(cfg.block_out_channels)
            hidden = (chans[::-1] if name.startswith("up_blocks") else chans)[level]
        for kv in ("k", "v"):
            ip[f"{key}.to_{kv}_ip.weight"] = torch.nn.Linear(dim, hidden, bias=False).weight.detach()
        key += 2
    proj = torch.nn.Linear(embed_dim, 4 * dim)
    image_proj = {"proj.weight": proj.weight.detach(), "proj.bias": proj.bias.detach(),
                  "norm.weight": 1 + 0.1 * torch.randn(dim), "norm.bias": 0.1 * torch.randn(dim)}
    return {"image_proj": image_proj, "ip_adapter": ip}


def _ip_pipe():
    enc, fe = _image_encoder(32)
    return _ad_pipe(image_encoder=enc, feature_extractor=fe)


@_policies("exact")
def test_animatediff_ip_adapter(policy):
    """IP-Adapter: IPAdapterAttnProcessor2_0 on every cross-attention and an image projection (encoder_hid_proj),
    fed by a tiny CLIP image encoder from an image."""
    def enable(p):
        p.unet._load_ip_adapter_weights([_ip_adapter_state_dict(p.unet, 32)])
        p.set_ip_adapter_scale(0.7)
    _dropin(policy, _ip_pipe, lambda p: _ad_inputs(p, ip_adapter_image=_image(32, 5)), enable,
            plain_inputs=_ad_inputs)


def _motion_lora(p):
    from peft import LoraConfig
    torch.manual_seed(4)
    p.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                  target_modules=r".*motion_modules.*\.(to_q|to_k|to_v|to_out\.0)"),
                       adapter_name="motion")


@pytest.mark.parametrize("policy, scale", [_case(p, scale, slow=(p, scale) != ("exact", None))
                                           for p in POLICIES for scale in (None, 0.5)])
def test_animatediff_motion_lora(policy, scale):
    """A PEFT LoRA adapter (random up and down weights) on the motion modules' attention projections; with
    ``scale`` passed as cross_attention_kwargs={"scale": ...} (diffusers scales the LoRA layers inside forward)."""
    kw = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
    _dropin(policy, _ad_pipe, lambda p: _ad_inputs(p, **kw), _motion_lora, plain_inputs=_ad_inputs)


def _halve_latents_at_step_0(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"] * 0.5} if i == 0 else {}


@_policies("exact")
def test_animatediff_callback_on_step_end(policy):
    """callback_on_step_end changes the latents between steps."""
    _dropin(policy, _ad_pipe, lambda p: _ad_inputs(
        p, callback_on_step_end=_halve_latents_at_step_0, callback_on_step_end_tensor_inputs=["latents"]),
        plain_inputs=_ad_inputs)


@_policies("exact")
def test_animatediff_fuse_qkv_projections(policy):
    """fuse_qkv_projections() (UNet and VAE, FusedAttnProcessor2_0) before compiling."""
    _dropin(policy, _ad_pipe, _ad_inputs, lambda p: p.fuse_qkv_projections(), before_compile=True)


@_policies()
def test_animatediff_forward_chunking_after_first_call(policy):
    """enable_forward_chunking() on the compiled UNet after a first generation without it, then disabled."""
    _toggle(policy, lambda p: p.unet.enable_forward_chunking(chunk_size=1, dim=1),
            lambda p: p.unet.disable_forward_chunking())


@_policies()
def test_animatediff_freeu_after_first_call(policy):
    """enable_freeu() after a first generation without it, then disable_freeu()."""
    _toggle(policy, _freeu, lambda p: p.disable_freeu())


# -- the other AnimateDiff pipelines ------------------------------------------------------------------------------
def _sparsectrl_pipe():
    torch.manual_seed(5)
    controlnet = diffusers.SparseControlNetModel(
        block_out_channels=(32, 64), layers_per_block=2, in_channels=4, conditioning_channels=3,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), cross_attention_dim=32,
        conditioning_embedding_out_channels=(8, 8), norm_num_groups=2, motion_num_attention_heads=4,
        use_simplified_condition_embedding=False)
    return _ad_pipe(diffusers.AnimateDiffSparseControlNetPipeline, controlnet=controlnet.eval())


@_policies("exact")
def test_animatediff_sparsectrl(policy):
    """SparseCtrl: a SparseControlNetModel conditioned on frames 0 and 2 adds residuals to the UNet's blocks."""
    size = LATENT * 2
    _dropin(policy, _sparsectrl_pipe, lambda p: _ad_inputs(
        p, conditioning_frames=[_image(size, 6), _image(size, 7)], controlnet_frame_indices=[0, 2],
        controlnet_conditioning_scale=1.0))


def _controlnet_pipe():
    torch.manual_seed(6)
    controlnet = diffusers.ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        conditioning_embedding_out_channels=(8, 8), norm_num_groups=2)
    return _ad_pipe(diffusers.AnimateDiffControlNetPipeline, controlnet=controlnet.eval())


@_policies("exact")
def test_animatediff_controlnet(policy):
    """ControlNet: one conditioning image per frame, residuals added to the UNet's down and mid blocks."""
    size = LATENT * 2
    _dropin(policy, _controlnet_pipe, lambda p: _ad_inputs(
        p, conditioning_frames=[_image(size, 10 + i) for i in range(FRAMES)]))


@_policies("exact")
def test_animatediff_video_to_video(policy):
    """Video-to-video: the input video encoded by the VAE, noised to strength 0.5 of 4 steps (2 denoising steps)."""
    size = LATENT * 2

    def inputs(p):
        kw = _ad_inputs(p, video=[_image(size, 20 + i) for i in range(FRAMES)], num_inference_steps=4,
                        strength=0.5)
        del kw["num_frames"]
        return kw
    _dropin(policy, lambda: _ad_pipe(diffusers.AnimateDiffVideoToVideoPipeline), inputs)


DEFAULT_PAG = {("exact", "cfg", "mid"), ("exact", "nocfg", "down_blocks.0|up_blocks.1"), ("slices2", "cfg", "mid")}


@pytest.mark.parametrize("policy, guidance, layers", [
    _case(policy, guidance, layers, slow=(policy, guidance, layers) not in DEFAULT_PAG)
    for policy in POLICIES for guidance in ("cfg", "nocfg") for layers in ("mid", "down_blocks.0|up_blocks.1")])
def test_animatediff_pag(policy, guidance, layers):
    """Perturbed-attention guidance: PAG processors (identity self-attention for the perturbed batch) swapped into
    the chosen layers at every generation and swapped back after it; with CFG the UNet sees a batch of 3, without
    it a batch of 2."""
    _dropin(policy, lambda: _ad_pipe(diffusers.AnimateDiffPAGPipeline, pag_applied_layers=layers.split("|")),
            lambda p: _ad_inputs(p, guidance_scale=7.5 if guidance == "cfg" else 1.0, pag_scale=3.0))


@pytest.mark.parametrize("policy", [_case("exact", slow=False)])
def test_animatediff_pag_anchored_layer_id(policy):
    """PAG finds its layers by re.search over ``unet.named_modules()`` names: an anchored layer id must find the
    same layers in the compiled UNet as in the original."""
    _dropin(policy, lambda: _ad_pipe(diffusers.AnimateDiffPAGPipeline, pag_applied_layers=[r"^mid_block\..*attn1"]),
            lambda p: _ad_inputs(p, pag_scale=3.0))


# -- StableVideoDiffusionPipeline ---------------------------------------------------------------------------------
def _svd_pipe():
    pipe = tiny_pipeline("svd", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _svd_inputs(pipe, **over):
    kw = pipeline_inputs(pipe, steps=STEPS, frames=FRAMES, latent=LATENT)
    kw.update(over)
    return kw


@_policies("exact")
def test_svd_decode_chunk_size(policy):
    """decode_chunk_size=1 < num_frames: the VAE decodes frame by frame (the UNet is unaffected)."""
    _dropin(policy, _svd_pipe, lambda p: _svd_inputs(p, decode_chunk_size=1))


@_policies()
def test_svd_callback_on_step_end(policy):
    _dropin(policy, _svd_pipe, lambda p: _svd_inputs(
        p, callback_on_step_end=_halve_latents_at_step_0, callback_on_step_end_tensor_inputs=["latents"]),
        plain_inputs=_svd_inputs)


# -- TextToVideoSDPipeline (UNet3DConditionModel) -----------------------------------------------------------------
def _t2v_pipe():
    from fxstream.models import build_unet
    unet = build_unet("unet3d-tiny")
    vae = tiny_pipeline("animatediff", seed=0).vae
    pipe = diffusers.TextToVideoSDPipeline(vae=vae, text_encoder=_text_encoder(unet.config.cross_attention_dim),
                                           tokenizer=_tokenizer(), unet=unet, scheduler=scheduler("animatediff"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_policies("exact", "slices2")
def test_text_to_video_freeu(policy):
    _dropin(policy, _t2v_pipe, _ad_inputs, _freeu, plain_inputs=_ad_inputs)
