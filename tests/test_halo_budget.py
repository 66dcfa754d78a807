"""Policy(max_memory) on a VAE decoder: the budget picks halo slices and checkpoints, or says why it cannot."""
import pytest
import torch

import fxstream
from fxstream.budget import HALO_CAP, _frame_counts, _halo_counts, _halo_grids


def _svd_decoder():
    from diffusers import AutoencoderKLTemporalDecoder
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4).eval()
    frames = 3
    kw = dict(sample=torch.randn(frames, 4, 16, 12), image_only_indicator=torch.zeros(1, frames), num_frames=frames)
    return vae.decoder, kw


@pytest.fixture(scope="module")
def decoder():
    return _svd_decoder()


@pytest.fixture(scope="module")
def unsliced(decoder):
    dec, kw = decoder
    return fxstream.explain(dec, kw, fxstream.Policy())


def test_a_budget_the_unsliced_decoder_meets_slices_nothing(decoder, unsliced):
    dec, kw = decoder
    rep = fxstream.explain(dec, kw, fxstream.Policy(max_memory=unsliced.weight_bytes + unsliced.original_peak_bytes))
    assert rep.regions == [] and rep.peak_bytes == unsliced.original_peak_bytes


@pytest.mark.parametrize("share", [0.75, pytest.param(0.55, marks=pytest.mark.slow)])
def test_a_tighter_budget_is_met_exactly(decoder, unsliced, share):
    dec, kw = decoder
    budget = unsliced.weight_bytes + int(share * unsliced.original_peak_bytes)
    compiled = fxstream.compile(dec, fxstream.Policy(max_memory=budget))
    with torch.no_grad():
        got, want = compiled(**kw), dec(**kw)
    rep = compiled.explain()
    halo = [r for r in rep.regions if r.kind == "halo"]
    assert halo, rep.table()
    assert rep.weight_bytes + rep.peak_bytes <= budget
    assert all(r.passes >= 1 and r.compute >= 1.0 for r in halo)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_tighter_budgets_never_plan_more_and_cost_more_compute(decoder, unsliced):
    dec, kw = decoder
    reps = [fxstream.explain(dec, kw, fxstream.Policy(max_memory=unsliced.weight_bytes +
                                                       int(s * unsliced.original_peak_bytes))) for s in (0.8, 0.5)]
    assert reps[1].peak_bytes <= reps[0].peak_bytes

    def compute(rep):
        halo = [r for r in rep.regions if r.kind == "halo"]
        return sum(r.compute * r.ops for r in halo) / sum(r.ops for r in halo)
    assert compute(reps[1]) >= compute(reps[0])


def test_an_impossible_budget_names_the_figures(decoder, unsliced):
    dec, kw = decoder
    with pytest.raises(fxstream.MemoryBudgetError, match="halo slicing") as err:
        fxstream.explain(dec, kw, fxstream.Policy(max_memory=unsliced.weight_bytes + 1000))
    e = err.value
    assert e.weight_bytes == unsliced.weight_bytes and 0 < e.lower_bound_bytes < unsliced.original_peak_bytes


def test_halo_counts_double_up_to_the_cap():
    assert _halo_counts(fxstream.Policy()) == [2, 4, 8, 16, 32, HALO_CAP]
    assert _halo_counts(fxstream.Policy(halo=6)) == [2, 4, 6]
    assert _halo_counts(fxstream.Policy(halo=2)) == [2]


def test_lower_bound_of_a_halo_policy_is_below_the_original(decoder, unsliced):
    dec, kw = decoder
    rep = fxstream.explain(dec, kw, fxstream.Policy(halo=4))
    assert rep.lower_bound_bytes <= rep.peak_bytes <= unsliced.original_peak_bytes


def test_halo_grids_by_tile_count():
    """For each tile count: bands of rows and the grid whose tiles are closest to square in pixels (a 72x128
    latent: 8x8 tiles of 9x16); a pair caps rows and columns."""
    grids = _halo_grids(fxstream.Policy(), 72, 128)
    assert [g[0][0] * g[0][1] for g in grids] == [2, 4, 8, 16, 32, 64]
    assert grids[0] == [(2, 1), (1, 2)] and grids[-1] == [(64, 1), (8, 8)]
    assert all(g[0][1] == 1 for g in grids)
    assert _halo_grids(fxstream.Policy(halo=(2, 4)), 64, 64)[-1] == [(2, 4)]
    assert _halo_grids(fxstream.Policy(halo=(1, 2)), 64, 64) == [[(1, 2)]]


def test_frame_counts(decoder):
    from fxstream.compiler import capture
    dec, kw = decoder
    gm = capture(dec, kw).graph_module
    assert _frame_counts(gm, fxstream.Policy()) == [1, 2, 3]  # 3 frames
    assert _frame_counts(gm, fxstream.Policy(spatial=2)) == [1, 2]
    assert _frame_counts(gm, fxstream.Policy(spatial=1)) == [1]


@pytest.mark.slow
def test_svd_25_frame_decoder_under_one_gib():
    """The issue's target (slow: about a minute on 2 cores): SVD's temporal decoder, 25 frames of 576x1024
    (fp16, meta), exact at <= 1 GiB of activations: 8x8 tiles for the convolution chains, the mid block's
    attention in slices of frames."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_decoder import build_vae, decoder_inputs
    dec = build_vae("svd", device="meta", dtype=torch.float16).decoder
    weights = sum(p.numel() * p.element_size() for p in dec.parameters())
    rep = fxstream.explain(dec, decoder_inputs("svd", 25, 72, 128, "meta", torch.float16),
                           fxstream.Policy(max_memory=weights + 2**30))
    assert rep.original_peak_bytes > 20 * 2**30 and rep.peak_bytes <= 2**30
    assert {"frames (halo)", "height x width (halo)"} <= {r.dim for r in rep.regions}
