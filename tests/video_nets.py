"""Random video networks the compiler has never seen, for issue 20's property tests (axes found from the ops).

Unlike ``tests/programs.py`` (one chain of blocks on a latent in a UNet's layout), a :class:`NetSpec` draws how the
video enters and leaves the network and the class's name:

- ``BFCHW`` (as SVD), ``BCFHW`` (as AnimateDiff) or ``(BF)CHW`` (frames folded into the batch, the frame count a
  constructor argument, as a VAE decoder or a per-frame network: a temporal layer unfolds it) for a video;
- ``BNC``: a token sequence (a video transformer's patches), through norms, self-attention and feed-forwards;

then a chain of blocks in random order and sizes: spatial ResNet blocks (GroupNorm, SiLU, 3x3 conv, skip), attention
over each frame's pixels, attention and a (3, 1, 1) Conv3d over frames, GEGLU feed-forwards, 1x1 convs, a long skip
(cat with an earlier feature and a 1x1 conv). The class is made with :func:`type` under a drawn name (``Zorblat``),
so nothing keyed on a class name can help. Weights come from a seed; inputs are a few KB of fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

VIDEO_LAYOUTS = ("BFCHW", "BCFHW", "(BF)CHW")
VIDEO_BLOCKS = ("resnet", "spatial_attention", "temporal_attention", "temporal_conv", "geglu", "conv1x1",
                "long_skip")
TOKEN_BLOCKS = ("attention", "geglu", "norm_mlp", "rotary_attention")


@dataclass(frozen=True)
class NetSpec:
    layout: str  # one of VIDEO_LAYOUTS, or "BNC"
    batch: int
    frames: int  # BNC: tokens
    channels: int
    height: int
    width: int
    blocks: tuple
    name: str
    seed: int = 0

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(self.seed + 1)
        b, f, c, h, w = self.batch, self.frames, self.channels, self.height, self.width
        shape = {"BFCHW": (b, f, c, h, w), "BCFHW": (b, c, f, h, w), "(BF)CHW": (b * f, c, h, w),
                 "BNC": (b, f, c)}[self.layout]
        return {"x": torch.randn(*shape, generator=g)}


class _Attention(torch.nn.Module):
    """LayerNorm, self-attention with two heads over dim 1 of a ``(N, S, C)`` tensor, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(c)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(c, c) for _ in range(3))
        self.out = torch.nn.Linear(c, c)

    def forward(self, x):
        n, s, c = x.shape
        y = self.norm(x)
        q, k, v = (p(y).reshape(n, s, 2, c // 2).transpose(1, 2) for p in self.qkv)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, c)
        return x + self.out(a)


class _RotaryAttention(_Attention):
    """Self-attention whose queries and keys are rotated by position, written as Wan's rotary embedding writes them:
    into ``empty_like`` buffers through views (interleaved halves for the queries, consecutive ones for the keys),
    then ``type_as`` (NOTE [Fresh buffers filled through views], passes/fill_views.py)."""

    def forward(self, x):
        n, s, c = x.shape
        y = self.norm(x)
        q, k, v = (p(y).reshape(n, s, 2, c // 2) for p in self.qkv)
        angle = torch.arange(s, dtype=x.dtype)[:, None, None] * (0.5 ** torch.arange(c // 4, dtype=x.dtype))
        cos, sin = angle.cos(), angle.sin()

        def interleaved(t):
            t1, t2 = t.unflatten(-1, (-1, 2)).unbind(-1)
            out = torch.empty_like(t)
            out[..., 0::2] = t1 * cos - t2 * sin
            out[..., 1::2] = t1 * sin + t2 * cos
            return out.type_as(t)

        def halves(t):
            t1, t2 = t.chunk(2, dim=-1)
            out = torch.empty_like(t)
            out[..., : c // 4] = t1 * cos - t2 * sin
            out[..., c // 4:] = t1 * sin + t2 * cos
            return out.type_as(t)

        q, k, v = interleaved(q).transpose(1, 2), halves(k).transpose(1, 2), v.transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, c)
        return x + self.out(a.type_as(q))


class _GEGLU(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(c)
        self.proj = torch.nn.Linear(c, 4 * c)
        self.out = torch.nn.Linear(2 * c, c)

    def forward(self, x):
        a, gate = self.proj(self.norm(x)).chunk(2, dim=-1)
        return x + self.out(a * F.gelu(gate))


class _Block(torch.nn.Module):
    def __init__(self, kind: str, c: int):
        super().__init__()
        self.kind = kind
        if kind in ("resnet", "long_skip"):
            self.norm = torch.nn.GroupNorm(2, c)
            self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        if kind == "long_skip":
            self.merge = torch.nn.Conv2d(2 * c, c, 1)
        if kind in ("spatial_attention", "temporal_attention", "attention"):
            self.attn = _Attention(c)
        if kind == "rotary_attention":
            self.attn = _RotaryAttention(c)
        if kind == "temporal_conv":
            self.conv3 = torch.nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))
        if kind == "geglu":
            self.ff = _GEGLU(c)
        if kind == "conv1x1":
            self.conv = torch.nn.Conv2d(c, c, 1)
        if kind == "norm_mlp":
            self.norm = torch.nn.LayerNorm(c)
            self.fc = torch.nn.Linear(c, c)

    def forward(self, h, b: int, f: int):
        """``h``: ``(B*F, C, H, W)`` for a video (``(B, N, C)`` for tokens)."""
        k = self.kind
        if k in ("attention", "rotary_attention"):
            return self.attn(h)
        if k == "norm_mlp":
            return h + self.fc(F.silu(self.norm(h)))
        if k == "geglu" and h.dim() == 3:
            return self.ff(h)
        bf, c, hh, ww = h.shape
        if k == "resnet":
            return h + self.conv(F.silu(self.norm(h)))
        if k == "long_skip":
            return self.merge(torch.cat([self.conv(F.silu(self.norm(h))), h], dim=1))
        if k == "conv1x1":
            return self.conv(h)
        if k == "spatial_attention":  # over each frame's pixels
            t = h.reshape(bf, c, hh * ww).transpose(1, 2)
            return self.attn(t).transpose(1, 2).reshape(bf, c, hh, ww)
        if k == "temporal_attention":  # over frames, per pixel
            t = h.reshape(b, f, c, hh, ww).permute(0, 3, 4, 1, 2).reshape(b * hh * ww, f, c)
            t = self.attn(t)
            return t.reshape(b, hh, ww, f, c).permute(0, 3, 4, 1, 2).reshape(bf, c, hh, ww)
        if k == "temporal_conv":  # (3, 1, 1) over frames
            t = h.reshape(b, f, c, hh, ww).permute(0, 2, 1, 3, 4)
            t = t + self.conv3(t)
            return t.permute(0, 2, 1, 3, 4).reshape(bf, c, hh, ww)
        if k == "geglu":  # per pixel
            t = h.permute(0, 2, 3, 1)
            return self.ff(t).permute(0, 3, 1, 2)
        raise ValueError(f"unknown block {k!r}")


class _VideoNet(torch.nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        self.layout, self.num_frames = spec.layout, spec.frames
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.blocks = torch.nn.ModuleList(_Block(k, spec.channels) for k in spec.blocks)

    def forward(self, x):
        if self.layout == "BNC":
            h = x
            for blk in self.blocks:
                h = blk(h, x.shape[0], x.shape[1])
            return h
        f = self.num_frames
        if self.layout == "BFCHW":
            b = x.shape[0]
            h = x.reshape(b * f, *x.shape[2:])
        elif self.layout == "BCFHW":
            b = x.shape[0]
            h = x.permute(0, 2, 1, 3, 4).reshape(b * f, x.shape[1], *x.shape[3:])
        else:
            b = x.shape[0] // f
            h = x
        for blk in self.blocks:
            h = blk(h, b, f)
        if self.layout == "BFCHW":
            return h.reshape(x.shape)
        if self.layout == "BCFHW":
            return h.reshape(b, f, *h.shape[1:]).permute(0, 2, 1, 3, 4)
        return h


def build_net(spec: NetSpec) -> torch.nn.Module:
    """The network as an instance of a class named ``spec.name`` (made here: no table can know it)."""
    cls = type(spec.name, (_VideoNet,), {"__module__": __name__})
    return cls(spec).eval()


@st.composite
def net_specs(draw, layouts=VIDEO_LAYOUTS + ("BNC",)) -> NetSpec:
    layout = draw(st.sampled_from(layouts))
    kinds = TOKEN_BLOCKS if layout == "BNC" else VIDEO_BLOCKS
    blocks = tuple(draw(st.lists(st.sampled_from(kinds), min_size=2, max_size=5)))
    return NetSpec(
        layout=layout,
        batch=draw(st.sampled_from([1, 2])),
        frames=draw(st.integers(3, 6)) if layout != "BNC" else draw(st.integers(8, 24)),
        channels=draw(st.sampled_from([4, 8])),
        height=draw(st.integers(3, 6)),
        width=draw(st.integers(3, 6)),
        blocks=blocks,
        name=draw(st.from_regex(r"[A-Z][a-z]{3,8}(Net|Model|Block)?", fullmatch=True)),
        seed=draw(st.integers(0, 2 ** 16)),
    )
