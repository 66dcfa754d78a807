"""Axes found from the ops alone (issue 20): networks nobody listed, in any layout, slice and stay exact.

The networks come from ``tests/video_nets.py`` (random blocks, layouts ``(B, F, C, H, W)``, ``(B, C, F, H, W)``,
``(B*F, C, H, W)`` and token sequences, class names drawn at random). Checked:

- ``Policy(slices=3)`` matches the eager result within 1e-5 (relative to the output's largest value), ``Policy()``
  bitwise;
- most of a fixed sample of them slice (a network whose only repeated dim is a batch may not);
- the axis names the ops give the four UNets are the ones their layouts say (the table this replaced);
- a reshape that splits ``B*F`` exposes frames as a factor axis; the issue's own network slices along frames.
"""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import fxstream
from fxstream.analysis.axes import axis_floods, describe_axis, find_axes, frames_in_batch
from fxstream.compiler import capture
from fxstream.models import build_unet, example_inputs

from video_nets import TOKEN_BLOCKS, VIDEO_BLOCKS, NetSpec, build_net, net_specs

FEW = settings(max_examples=max(4, settings.default.max_examples * 2 // 5), deadline=None,
               suppress_health_check=[HealthCheck.too_slow])


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    err = (got - want).abs().max().item()
    assert err <= tol * max(want.abs().max().item(), 1.0), f"max |diff| {err:.3g}"


def _run(spec: NetSpec, policy: fxstream.Policy):
    m = build_net(spec)
    kw = spec.inputs()
    with torch.no_grad():
        want = m(**kw)
        compiled = fxstream.compile(m, policy)
        got = compiled(**kw)
    return want, got, compiled.explain()


@FEW
@given(net_specs())
def test_random_video_nets_match(spec):
    want, got, rep = _run(spec, fxstream.Policy(slices=3, min_region_fraction=0.0))
    _close(got, want)
    _, whole, _ = _run(spec, fxstream.Policy())
    assert torch.equal(whole, want)


def _sample(n: int, seed: int = 0) -> list[NetSpec]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        layout = rng.choice(["BFCHW", "BCFHW", "(BF)CHW", "BNC"])
        kinds = TOKEN_BLOCKS if layout == "BNC" else VIDEO_BLOCKS
        out.append(NetSpec(layout, rng.choice([1, 2]), rng.randint(3, 6) if layout != "BNC" else rng.randint(8, 24),
                           rng.choice([4, 8]), rng.randint(3, 6), rng.randint(3, 6),
                           tuple(rng.choice(kinds) for _ in range(rng.randint(2, 5))), f"Qwzx{i}Net", i))
    return out


def test_most_random_video_nets_slice():
    """12 drawn networks (every layout): at least 10 get regions under ``Policy(slices=3)``, all exact."""
    sliced = 0
    for spec in _sample(12):
        want, got, rep = _run(spec, fxstream.Policy(slices=3))
        _close(got, want)
        sliced += bool(rep.regions)
    assert sliced >= 10, sliced


@pytest.mark.parametrize("kind, names", [
    ("svd-tiny", {0: "batch", 1: "frames", 2: "channels", 3: "height", 4: "width"}),         # BFCHW
    ("animatediff-tiny", {0: "batch", 1: "channels", 2: "frames", 3: "height", 4: "width"}),  # BCFHW
    ("unet3d-tiny", {0: "batch", 1: "channels", 2: "frames", 3: "height", 4: "width"}),
    ("i2vgenxl-tiny", {0: "batch", 1: "channels", 2: "frames", 3: "height", 4: "width"}),
])
def test_unet_axes_named_from_the_ops(kind, names):
    unet = build_unet(kind)
    gm = capture(unet, example_inputs(kind, unet)).graph_module
    axes = {a.dim: a.name for a in axis_floods(gm).axes if a.source == "sample"}
    assert axes == names
    assert not frames_in_batch(gm)


class MyVideoNet(torch.nn.Module):
    """The network of issue 20: spatial ResNet blocks on ``(B*F, C, H, W)``, a temporal Conv3d and attention over
    frames, a GEGLU feed-forward, a long skip."""

    def __init__(self, frames: int, c: int = 8):
        super().__init__()
        self.frames = frames
        from video_nets import _Block
        self.res1, self.res2 = _Block("resnet", c), _Block("resnet", c)
        self.tconv, self.tattn = _Block("temporal_conv", c), _Block("temporal_attention", c)
        self.ff = _Block("geglu", c)
        self.merge = torch.nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        f = self.frames
        b = x.shape[0] // f
        skip = x
        h = self.res1(x, b, f)
        h = self.tconv(h, b, f)
        h = self.tattn(h, b, f)
        h = self.ff(h, b, f)
        h = self.res2(h, b, f)
        return self.merge(torch.cat([h, skip], dim=1))


@pytest.mark.parametrize("batch", [1, 2])
def test_issue_network_slices_along_frames(batch):
    frames = 6
    torch.manual_seed(0)
    m = MyVideoNet(frames).eval()
    kw = {"x": torch.randn(batch * frames, 8, 6, 5)}
    gm = capture(m, kw).graph_module
    axes = find_axes(gm)
    frames_axis = next(a for a in axes if a.name == "frames")
    # B*F: frames are dim 0 itself (one video), or its inner factor (two videos)
    assert (frames_axis.dim, frames_axis.length, frames_axis.outer) == (0, frames, batch), describe_axis(frames_axis)
    with torch.no_grad():
        want = m(**kw)
        compiled = fxstream.compile(m, fxstream.Policy(slices=3))
        got = compiled(**kw)
    _close(got, want)
    rep = compiled.explain()
    assert "frames" in {r.dim for r in rep.regions}
    assert rep.peak_bytes < rep.original_peak_bytes


def test_token_sequence_slices_along_tokens():
    spec = NetSpec("BNC", 2, 32, 8, 1, 1, ("norm_mlp", "geglu", "attention", "geglu"), "Plinth", 3)
    want, got, rep = _run(spec, fxstream.Policy(slices=4))
    _close(got, want)
    assert {r.dim for r in rep.regions} == {"tokens"}


def test_channels_are_never_an_axis_to_slice():
    """A network with nothing but per-pixel channel mixing and a batch of one: the only dims are channels and
    kernel dims of 3x3 convolutions; nothing slices, and explain says why for the largest op."""
    m = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    kw = {"input": torch.randn(1, 4, 5, 5)}
    names = [a.name for a in axis_floods(capture(m, kw).graph_module).axes]
    assert names == ["channels", "height", "width"]
    rep = fxstream.explain(m, kw, fxstream.Policy(slices=2))
    assert not rep.regions
    assert all(u.reason for u in rep.unsliced)


def test_temporal_decoder_slices_with_cuts():
    """SVD's temporal VAE decoder, which takes ``(B*F, C, H, W)``: ``Policy(slices=4)`` cuts its per-frame layers
    along frames and its temporal layers along height (no class table names its axes); ``Policy(halo=...)`` still
    plans it with halos (tests/test_halo.py)."""
    from test_halo import tiny_svd_attention
    decoder, kw = tiny_svd_attention()
    gm = capture(decoder, kw).graph_module
    assert [a.name for a in find_axes(gm)] == ["frames", "height", "width"] and frames_in_batch(gm)
    with torch.no_grad():
        want = decoder(**kw)
        compiled = fxstream.compile(decoder, fxstream.Policy(slices=4))
        got = compiled(**kw)
    _close(got, want)
    dims = {r.dim for r in compiled.explain().regions}
    assert {"frames", "height"} <= dims, dims
