"""Golden graphs: the rewritten graph and its loop bodies for four small modules, checked in under tests/golden/.

A change to a pass that rewrites these shows up in the diff of the .txt files, where a reviewer reads it; the tests
fail until the files are written again on purpose:

    FXSTREAM_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

Each file holds the compiled graph's code, then each loop's body code (the first body of a cut region: the others
differ only in sizes), and each case also checks the compiled module against the original (1e-5).
"""
import os
import pathlib

import pytest
import torch
import torch.nn.functional as F

import fxstream

GOLDEN = pathlib.Path(__file__).parent / "golden"


class FramesLinear(torch.nn.Module):
    """A linear (and a GELU) per frame of ``(B, F, C)`` tokens, then a mean over channels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))) + x.mean(-1, keepdim=True)


class SplitGroupNorm(torch.nn.Module):
    """A GroupNorm over a 5-D ``(B, C, F, H, W)`` video between two temporal (3, 1, 1) convolutions: along height
    the norm's statistics are summed over slices (the split GroupNorm)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
        self.norm = torch.nn.GroupNorm(2, 4)
        self.b = torch.nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):
        return self.b(F.silu(self.norm(self.a(x))))


class BatchNet(torch.nn.Module):
    """Per-sample convolutions and an attention over each sample's pixels: a batch region."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.conv(x).flatten(2).transpose(1, 2)
        y = F.scaled_dot_product_attention(y, y, y)
        return y.transpose(1, 2).reshape(b, c, h, w) + x


class ConvChain(torch.nn.Module):
    """Two 3x3 convolutions with a SiLU: a halo region along height."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


CASES = {
    "linear_over_frames": (FramesLinear, (2, 6, 8), fxstream.Policy(slices=3, min_region_fraction=0.0)),
    "split_group_norm": (SplitGroupNorm, (1, 4, 3, 6, 5), fxstream.Policy(temporal=3, min_region_fraction=0.0)),
    "batch_region": (BatchNet, (2, 4, 4, 4), fxstream.Policy(batch=2, min_region_fraction=0.0)),
    "halo_conv_chain": (ConvChain, (2, 4, 8, 6), fxstream.Policy(halo=2, min_region_fraction=0.0)),
}


def _render(compiled) -> str:
    entry = next(iter(compiled._entries.values()))
    gm = entry.compiled.graph_module
    parts = [f"# compiled graph\n{gm.code.strip()}\n"]
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        loop = gm.get_submodule(n.target)
        body = next(iter(loop.bodies.values())) if loop.kind == "cut" else loop.body
        parts.append(f"# {n.name}: {type(loop).__name__}({loop.extra_repr()})\n{body.code.strip()}\n")
    return "\n".join(parts)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_graph(name):
    cls, shape, policy = CASES[name]
    torch.manual_seed(0)
    m = cls().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        want = m(x)
        compiled = fxstream.compile(m, policy)
        got = compiled(x)
    assert (got - want).abs().max().item() <= 1e-5 * max(want.abs().max().item(), 1.0)
    text = _render(compiled)
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("FXSTREAM_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: write it with FXSTREAM_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name}: the rewritten graph changed; review and write it with " \
                                     "FXSTREAM_UPDATE_GOLDEN=1 if the change is meant"
