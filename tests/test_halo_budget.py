"""Policy(max_memory) on a VAE decoder: the budget picks halo slices and checkpoints, or says why it cannot."""
import pytest
import torch

import fxstream
from fxstream.budget import HALO_CAP, _halo_counts


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
    halo = [r for r in rep.regions if r.dim == "height (halo)"]
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
        halo = [r for r in rep.regions if r.dim == "height (halo)"]
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
