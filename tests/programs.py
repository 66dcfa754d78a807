"""Random fx programs for property tests: a video latent in a UNet's layout through a drawn chain of blocks.

A program is a :class:`Spec` (latent layout and sizes, channel count, block list, weight seed) and becomes an
``nn.Module`` whose ``forward(sample, encoder_hidden_states)`` takes the latent in that layout (``BFCHW`` as SVD,
``BCFHW`` as AnimateDiff) and a text context, works on the latent as ``(B, F, C, H, W)`` and returns it in the
input's layout. Blocks use only ops the rule table covers: views, permutes, GroupNorm over 5-D tensors and over
``(B*F, C, H, W)``, LayerNorm, linear, spatial (tokens ``H*W``), temporal (tokens ``F``) and cross attention (the
context repeated per frame), 1x1 / 3x3 conv2d, temporal conv3d, pointwise ops, skip connections (add or cat +
conv), reductions (mean, sum, amax, softmax) and the patterns of diffusers' options that broke slicing before
(issue 18): in-place writes into views (FreeU's channel scaling), an FFT pair with a mask written through a view
(FreeU's skip filter), halves of the batch treated differently (perturbed-attention guidance) and fixed parts of
the frames axis.

The module classes are named per layout (``RandomProgramBFCHW``, ``RandomProgramBCFHW``), names the compiler has
never seen: it finds the axes from the ops alone (fxstream/analysis/axes.py), so that
``fxstream.compile`` / ``fxstream.explain`` find the axes the same way they do for the UNets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import fxstream

BLOCKS = ("pointwise", "conv1x1", "conv3x3", "temporal_conv", "group_norm_5d", "group_norm_2d", "spatial_attn",
          "temporal_attn", "cross_attn", "views", "skip_push", "skip_add", "skip_cat", "mean_hw", "sum_frames",
          "amax_frames", "softmax_channels", "inplace_half", "fft_filter", "batch_halves", "first_frame")


@dataclass(frozen=True)
class Spec:
    layout: str  # "BFCHW" or "BCFHW"
    batch: int
    frames: int
    channels: int
    height: int
    width: int
    blocks: tuple
    seed: int

    @property
    def shape(self) -> tuple:
        sizes = {"B": self.batch, "F": self.frames, "C": self.channels, "H": self.height, "W": self.width}
        return tuple(sizes[c] for c in self.layout)

    def sample(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(*self.shape, generator=g)

    def inputs(self) -> dict:
        """The forward's keyword arguments: the latent and a text context (batch, 3 tokens, channels)."""
        g = torch.Generator().manual_seed(self.seed + 2)
        context = torch.randn(self.batch, 3, self.channels, generator=g)
        return {"sample": self.sample(), "encoder_hidden_states": context}

    def module(self) -> torch.nn.Module:
        return build(self)


class _Attention(torch.nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(c)
        self.q, self.k, self.v = (torch.nn.Linear(c, c, bias=False) for _ in range(3))
        self.out = torch.nn.Linear(c, c)

    def forward(self, x, context=None):  # x: (N, T, C); context: (N, S, C) or None (self-attention)
        n, t, c = x.shape
        y = self.norm(x)
        kv = y if context is None else context
        s = kv.shape[1]
        q = self.q(y).view(n, t, self.heads, c // self.heads).transpose(1, 2)
        k, v = (p(kv).view(n, s, self.heads, c // self.heads).transpose(1, 2) for p in (self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(n, t, c))


class _Block(torch.nn.Module):
    def __init__(self, kind: str, c: int):
        super().__init__()
        self.kind = kind
        if kind == "conv1x1":
            self.conv = torch.nn.Conv2d(c, c, 1)
        elif kind == "conv3x3":
            self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        elif kind == "temporal_conv":
            self.conv = torch.nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))
        elif kind in ("group_norm_5d", "group_norm_2d"):
            self.norm = torch.nn.GroupNorm(2, c)
        elif kind in ("spatial_attn", "temporal_attn", "cross_attn"):
            self.attn = _Attention(c, 2)
        elif kind == "skip_cat":
            self.conv = torch.nn.Conv2d(2 * c, c, 1)

    def forward(self, h, skips: list, context):  # h: (B, F, C, H, W); context: (B, S, C)
        b, f, c, hh, ww = h.shape
        k = self.kind
        if k == "pointwise":
            return F.silu(h) * 0.5 + h
        if k in ("conv1x1", "conv3x3", "group_norm_2d"):
            layer = self.conv if k != "group_norm_2d" else self.norm
            return layer(h.reshape(b * f, c, hh, ww)).reshape(b, f, c, hh, ww)
        if k == "temporal_conv":
            return h + self.conv(h.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        if k == "group_norm_5d":  # diffusers' temporal blocks: GroupNorm over (B, C, F, H, W)
            return self.norm(h.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        if k == "spatial_attn":
            x = h.permute(0, 1, 3, 4, 2).reshape(b * f, hh * ww, c)
            return self.attn(x).reshape(b, f, hh, ww, c).permute(0, 1, 4, 2, 3)
        if k == "cross_attn":  # SVD's spatial cross-attention: the context repeated for every frame
            x = h.permute(0, 1, 3, 4, 2).reshape(b * f, hh * ww, c)
            ctx = context.repeat_interleave(f, dim=0)
            return self.attn(x, ctx).reshape(b, f, hh, ww, c).permute(0, 1, 4, 2, 3)
        if k == "temporal_attn":
            x = h.permute(0, 3, 4, 1, 2).reshape(b * hh * ww, f, c)
            return self.attn(x).reshape(b, hh, ww, f, c).permute(0, 3, 4, 1, 2)
        if k == "views":
            x = h.flatten(3).transpose(2, 3).unsqueeze(0)  # (1, B, F, H*W, C)
            return x.squeeze(0).transpose(2, 3).unflatten(3, (hh, ww)).contiguous()
        if k == "skip_push":
            skips.append(h)
            return h
        if k == "skip_add":
            return h + skips.pop() if skips else h
        if k == "skip_cat":
            s = skips.pop() if skips else h
            x = torch.cat([h, s], dim=2).reshape(b * f, 2 * c, hh, ww)
            return self.conv(x).reshape(b, f, c, hh, ww)
        if k == "mean_hw":
            return h - h.mean(dim=(3, 4), keepdim=True)
        if k == "sum_frames":
            return h + h.sum(dim=1, keepdim=True) / f
        if k == "amax_frames":
            return h - torch.amax(h, dim=1, keepdim=True)
        if k == "softmax_channels":
            return h * torch.softmax(h, dim=2)
        if k == "inplace_half":  # FreeU's backbone scaling: an in-place write into a view of half the channels
            h = F.silu(h)
            h[:, :, : c // 2] = h[:, :, : c // 2] * 1.5
            return h + 1.0
        if k == "fft_filter":  # FreeU's skip filter: FFT over (H, W), a centre window scaled through a mask view
            x = h.reshape(b * f, c, hh, ww)
            freq = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
            mask = torch.ones(x.shape, device=x.device)
            mask[..., hh // 2: hh // 2 + 1, ww // 2: ww // 2 + 1] = 0.5
            x = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
            return x.reshape(b, f, c, hh, ww)
        if k == "batch_halves":  # perturbed-attention guidance: the two halves of B*F treated differently
            x = h.reshape(b * f, c, hh, ww)
            if (b * f) % 2:
                return h
            first, second = x.chunk(2)
            return torch.cat([F.silu(first), second * 2.0]).reshape(b, f, c, hh, ww)
        if k == "first_frame":  # a fixed part of the frames: the first frame conditions every frame
            return h - h[:, :1] * 0.5 + h.narrow(1, f - 1, 1)
        raise ValueError(f"unknown block {k!r}")


class _RandomProgram(torch.nn.Module):
    LAYOUT = "BFCHW"

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.blocks = torch.nn.ModuleList(_Block(k, spec.channels) for k in spec.blocks)

    def forward(self, sample, encoder_hidden_states, timestep=None):
        # timestep is unused: it is there so that Step Rehash (which counts denoising steps by it) can compile these
        h = sample.permute(0, 2, 1, 3, 4) if self.LAYOUT == "BCFHW" else sample
        skips: list = []
        for blk in self.blocks:
            h = blk(h, skips, encoder_hidden_states)
        for s in skips:  # unused skips still reach the output (a long skip connection)
            h = h + s
        return h.permute(0, 2, 1, 3, 4) if self.LAYOUT == "BCFHW" else h


class RandomProgramBFCHW(_RandomProgram):
    LAYOUT = "BFCHW"


class RandomProgramBCFHW(_RandomProgram):
    LAYOUT = "BCFHW"


def build(spec: Spec) -> torch.nn.Module:
    cls = RandomProgramBFCHW if spec.layout == "BFCHW" else RandomProgramBCFHW
    return cls(spec).eval()


@st.composite
def specs(draw, min_blocks: int = 1, max_blocks: int = 6) -> Spec:
    """A program: layout, sizes (a few KB of fp32), and a chain of blocks."""
    return Spec(
        layout=draw(st.sampled_from(["BFCHW", "BCFHW"])),
        batch=draw(st.integers(1, 3)),
        frames=draw(st.integers(2, 5)),
        channels=draw(st.sampled_from([4, 8])),
        height=draw(st.integers(2, 5)),
        width=draw(st.integers(1, 4)),
        blocks=tuple(draw(st.lists(st.sampled_from(BLOCKS), min_size=min_blocks, max_size=max_blocks))),
        seed=draw(st.integers(0, 2**16)),
    )


_MEMORY_BLOCKS = list(BLOCKS)


@st.composite
def memory_specs(draw, max_blocks: int = 5) -> Spec:
    """Programs for the planner-versus-tracker property: 32 channels and at least 3x2 pixels, so that what
    ops allocate besides their outputs (GroupNorm's mean and rstd, attention's logsumexp: the planner counts an
    op's outputs only) stays under 1% of the peak. Sums over frames (partial sums across a region's slices) are
    included: see ``test_planner_counts_a_partial_sum_from_its_first_slice``. GroupNorm's copy of a
    non-contiguous input is planned (``fxstream.memory._COPIES_STRIDED_ARG``)."""
    return Spec(
        layout=draw(st.sampled_from(["BFCHW", "BCFHW"])),
        batch=draw(st.integers(1, 2)),
        frames=draw(st.integers(2, 5)),
        channels=32,
        height=draw(st.integers(3, 6)),
        width=draw(st.integers(2, 5)),
        blocks=tuple(draw(st.lists(st.sampled_from(_MEMORY_BLOCKS),
                                   min_size=1, max_size=max_blocks))),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def policies(draw, pipeline: bool = True) -> fxstream.Policy:
    """A policy that slices something: counts 2..6 (many do not divide the axes), a batch split or not,
    pipelining (CPU workers or serial) when ``pipeline``."""
    count = st.integers(2, 6)
    spatial = draw(st.one_of(st.none(), count))
    temporal = draw(st.one_of(st.none(), count))
    batch = draw(st.one_of(st.none(), st.integers(2, 3)))
    if spatial is None and temporal is None and batch is None:
        spatial = temporal = draw(count)
    k = draw(st.integers(1, 3)) if pipeline else 1
    return fxstream.Policy(spatial=spatial, temporal=temporal, batch=batch, pipeline=k,
                           cpu_workers=draw(st.booleans()) if k > 1 else None,
                           min_region_fraction=draw(st.sampled_from([0.0, 0.05])))
