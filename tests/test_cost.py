"""Planned compute (fxstream/analysis/cost.py): ``node_flops`` runs each distinct call once and skips ops that
cannot count; its figures must be those of running every node under FlopCounterMode."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fxstream
from fxstream.analysis.cost import node_flops
from fxstream.entry import Entry
from fxstream.models import build_transformer, build_unet, example_inputs, transformer_inputs


def every_node(gm) -> dict:
    """The reference: every call_function node run on meta copies of its inputs under FlopCounterMode."""
    def meta(v):
        if isinstance(v, torch.Tensor):
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        return v

    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        args, kwargs = torch.utils._pytree.tree_map(
            meta, torch.fx.map_arg((n.args, n.kwargs), lambda a: a.meta.get("val")))
        try:
            with FlopCounterMode(display=False) as counter:
                n.target(*args, **kwargs)
        except (RuntimeError, NotImplementedError, TypeError):
            out[n.name] = 0
            continue
        out[n.name] = counter.get_total_flops()
    return out


def _decoder():
    from diffusers import AutoencoderKLTemporalDecoder
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4).eval()
    return vae.decoder, dict(sample=torch.randn(3, 4, 16, 12), image_only_indicator=torch.zeros(1, 3), num_frames=3)


def _unet(name):
    m = build_unet(name, device="meta")
    return m, example_inputs(name, m)


def _transformer(name):
    m = build_transformer(name, device="meta")
    return m, transformer_inputs(name, m, height=16, width=16)


CASES = {"svd-tiny": lambda: _unet("svd-tiny"), "animatediff-tiny": lambda: _unet("animatediff-tiny"),
         "wan-tiny": lambda: _transformer("wan-tiny"), "svd-decoder": _decoder}


@pytest.mark.parametrize("name", sorted(CASES))
def test_node_flops_is_every_node_run(name):
    m, kw = CASES[name]()
    entry = Entry(m, kw, fxstream.Policy(slices=2))
    for gm in (entry.program.graph_module, entry.compiled.prepared):
        want = every_node(gm)
        assert node_flops(gm) == want
        assert sum(want.values()) > 0  # the graph has counted ops (matmuls, convolutions, attention)
