"""The compiled module's guard rails: signature cache size, fallback when capture fails, verify=True, weight and
structure changes after compile (LoRA-style layers, load_state_dict)."""
import warnings

import pytest
import torch

import fxstream
from fxstream import Policy
from fxstream.api import FallbackWarning


def test_cache_size_evicts_the_least_recently_used(svd_tiny):
    unet, kw = svd_tiny
    c = fxstream.compile(unet, Policy(cache_size=2))
    sizes = [dict(kw, sample=kw["sample"][:, :f]) for f in (2, 3, 4)]
    with torch.no_grad():
        for k in sizes[:2] + sizes[:1] + sizes[2:]:  # 2, 3, 2 (used again), 4: evicts 3
            c(**k)
    assert len(c._entries) == 2
    assert [key[1][0][1][1] for key in c._entries] == [2, 4]  # sample's frame count in each kept signature
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="Policy.cache_size"):
            Policy(cache_size=bad)


class _Uncapturable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return self.lin(x)
        return -self.lin(x)


def test_capture_failure_falls_back_to_the_original_with_one_warning():
    m = _Uncapturable().eval()
    c = fxstream.compile(m, Policy(slices=2))
    x = torch.ones(2, 4)
    with pytest.warns(FallbackWarning, match="running the original _Uncapturable"):
        out = c(x)
    assert torch.equal(out, m(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same signature again: no second warning
        assert torch.equal(c(-x), m(-x))


def test_verify_passes_on_a_correct_compile(svd_tiny):
    unet, kw = svd_tiny
    c = fxstream.compile(unet, Policy(slices=2, verify=True))
    with torch.no_grad():
        out = c(**kw)[0]
    assert (out - unet(**kw)[0]).abs().max() <= 1e-5


def test_verify_raises_and_names_the_first_differing_region(svd_tiny, monkeypatch):
    """A planted bug (the first region's first slice is zeroed) must be caught, with the region named."""
    from fxstream.runtime import LoopRegion
    unet, kw = svd_tiny
    real = LoopRegion._slice
    first = {}

    def broken(self, step, ins, dsts):
        results = real(self, step, ins, dsts)
        first.setdefault("region", self)
        if self is first["region"] and step is self._steps[0]:
            for j, d, s, n, ud, us in step.outs:
                dsts[j].narrow(d, s, n).zero_()
        return results

    monkeypatch.setattr(LoopRegion, "_slice", broken)
    c = fxstream.compile(unet, Policy(slices=2, verify=True, cpu_workers=False))
    with pytest.raises(fxstream.VerificationError, match="first region that differs: region_") as e:
        with torch.no_grad():
            c(**kw)
    assert e.value.max_abs_diff > 1e-3 and e.value.region.startswith("region_")


class _Lora(torch.nn.Module):
    """A LoRA-style layer as PEFT makes them: a base linear plus a low-rank update with a scale and a merge flag."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base, self.scale, self.merged = base, 0.5, False
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight)

    def forward(self, x):
        y = self.base(x)
        return y if self.merged else y + self.scale * self.up(self.down(x))

    def merge(self):
        with torch.no_grad():
            self.base.weight += self.scale * self.up.weight @ self.down.weight
        self.merged = True


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_weights_and_structure_changed_after_compile_are_never_stale():
    torch.manual_seed(0)
    net = _Net().eval()
    c = fxstream.compile(net, Policy())
    x = torch.randn(3, 6)
    with torch.no_grad():
        c(x)
        net.load_state_dict({k: v * 2 for k, v in net.state_dict().items()})  # in place: read live, no recompile
        assert torch.equal(c(x), net(x)) and len(c._entries) == 1
        net.a = _Lora(net.a)  # LoRA loaded: a new structure, compiled again
        assert torch.equal(c(x), net(x)) and len(c._entries) == 2
        net.a.scale = 2.0  # the scale is baked into the graph: another compile
        assert torch.equal(c(x), net(x)) and len(c._entries) == 3
        net.a.merge()  # fused: the weights change in place and the layer stops adding its update
        assert torch.allclose(c(x), net(x), atol=1e-6) and len(c._entries) == 4


@pytest.mark.slow
def test_a_real_peft_lora_loaded_rescaled_and_fused_after_compile():
    """diffusers' PEFT integration on the tiny AnimateDiff UNet: every change is seen, none is stale."""
    peft = pytest.importorskip("peft")
    from fxstream.models import build_unet, example_inputs
    unet = build_unet("animatediff-tiny")
    kw = example_inputs("animatediff-tiny", unet)
    c = fxstream.compile(unet, Policy(slices=2))
    with torch.no_grad():
        base = c(**kw)[0]
        unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        lora = c(**kw)[0]
        assert (lora - base).abs().max() > 1e-3  # the adapter changes the output
        assert (lora - unet(**kw)[0]).abs().max() <= 1e-5
        unet.set_adapters(["default"], weights=[0.25])
        assert (c(**kw)[0] - unet(**kw)[0]).abs().max() <= 1e-5
        unet.fuse_lora(lora_scale=1.0)
        assert (c(**kw)[0] - unet(**kw)[0]).abs().max() <= 1e-5
    assert len(c._entries) == 4
