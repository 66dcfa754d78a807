"""diffusers' video transformers (issue 20): tiny configs as in diffusers' own tests, random weights.

No code in fxstream names them: the tokens axis is found from the ops (an attention's sequence), attention is cut
along its queries with keys and values whole (NOTE [Queries only]), and a region that would raise the planned
peak is left whole (NOTE [A region must not raise the peak]). Checked: ``Policy(slices=4)`` within 1e-5,
``Policy()`` bitwise, the compiled plan never above the exported graph's, and CogVideoX's measured activation peak
at about 2,300 tokens at most 0.75x the exported graph's.
"""
import pytest
import torch

import fxstream
from fxstream.memory import measure_peak


def cogvideox(size: int = 16):
    from diffusers import CogVideoXTransformer3DModel
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=size, sample_height=size, sample_frames=13, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8)


def wan():
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)


def ltx():
    from diffusers import LTXVideoTransformer3DModel
    return LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16)


CASES = {
    "cogvideox": (cogvideox, lambda: dict(hidden_states=torch.randn(2, 4, 4, 16, 16),
                                          encoder_hidden_states=torch.randn(2, 8, 8), timestep=torch.tensor([10, 10]),
                                          return_dict=False)),
    "wan": (wan, lambda: dict(hidden_states=torch.randn(1, 4, 4, 16, 16), encoder_hidden_states=torch.randn(1, 12, 16),
                              timestep=torch.tensor([10]), return_dict=False)),
    "ltx": (ltx, lambda: dict(hidden_states=torch.randn(2, 4 * 16 * 16, 4), encoder_hidden_states=torch.randn(2, 16, 16),
                              timestep=torch.tensor([10, 10]), encoder_attention_mask=torch.ones(2, 16), num_frames=4,
                              height=16, width=16, return_dict=False)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_video_transformer_compiles_exactly(name):
    make, inputs = CASES[name]
    torch.manual_seed(0)
    m = make().eval()
    kw = inputs()
    with torch.no_grad():
        want = m(**kw)[0]
        compiled = fxstream.compile(m, fxstream.Policy(slices=4))
        got = compiled(**kw)[0]
        whole = fxstream.compile(m, fxstream.Policy())(**kw)[0]
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert torch.equal(whole, want)
    rep = compiled.explain()
    assert rep.regions and rep.peak_bytes <= rep.original_peak_bytes
    assert any(a.name == "tokens" for a in rep.axes) or name == "wan"  # Wan's frames reach its tokens


def test_cogvideox_peak_falls_at_a_few_thousand_tokens():
    """4 latent frames of 48x48 (2,304 tokens and 8 of text): the measured activation peak of
    ``Policy(slices=4)`` is at most 0.75x the exported graph's."""
    torch.manual_seed(0)
    m = cogvideox(48).eval()
    kw = dict(hidden_states=torch.randn(1, 4, 4, 48, 48), encoder_hidden_states=torch.randn(1, 8, 8),
              timestep=torch.tensor([10]), return_dict=False)
    with torch.no_grad():
        exported = fxstream.compile(m, fxstream.Policy())
        compiled = fxstream.compile(m, fxstream.Policy(slices=4))
        want, _ = exported(**kw), compiled(**kw)  # first calls compile
        (got, *_), sliced = measure_peak(compiled, **kw)
        _, whole = measure_peak(exported, **kw)
    assert (got - want[0]).abs().max().item() <= 1e-5 * want[0].abs().max().item()
    assert sliced <= 0.75 * whole, (sliced, whole)
