"""The compiled module's guard rails: signature cache size, fallback when capture fails, verify=True, weight and
structure changes after compile (LoRA-style layers, load_state_dict, diffusers' attention processors, PAG, fused
QKV, FreeU, forward chunking, objects the guard cannot read).

Guard cost (``fxstream/guard.py``), measured with ``python -c "import fxstream.guard as g; g.bench()"`` on
full-size SVD built on the meta device (1542 modules, 1428 weights; 2-core CPU, torch 2.13, best of 5x100 calls):
the per-call check 0.54 ms, against 9.5 ms for the structure hash every call computed before; a walk after a change
20 ms. Table in docs/benchmarks.md, "Guard cost".
"""
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
        # an equal layer with other weights (the same structure: no compile) is read, never the one it replaced
        net.b = torch.nn.Linear(6, 6).eval()
        assert torch.equal(c(x), net(x)) and len(c._entries) == 4 and not c._new
        net._modules["b"] = torch.nn.Linear(6, 6).eval()  # written into the dict directly
        net.b._parameters["bias"] = torch.nn.Parameter(torch.ones(6))
        assert torch.equal(c(x), net(x)) and len(c._entries) == 4


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


# -- the structure guard: what diffusers switches after a compile -------------------------------------------------
def _pag(unet):
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0
    procs = unet.attn_processors
    unet.set_attn_processor({k: PAGIdentitySelfAttnProcessor2_0() if ".attentions." in k and "attn1" in k else p
                             for k, p in procs.items()})


def _processors(cls_name):
    def switch(unet):
        import diffusers.models.attention_processor as ap
        unet.set_attn_processor(getattr(ap, cls_name)())
    return switch


SWITCHES = {  # feature: (switch it on, switch it off), each after a compile
    "attention processor": (_processors("AttnProcessor"), _processors("AttnProcessor2_0")),
    "PAG": (_pag, _processors("AttnProcessor2_0")),
    "fused QKV": (lambda u: u.fuse_qkv_projections(), lambda u: u.unfuse_qkv_projections()),
    "FreeU": (lambda u: u.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4), lambda u: u.disable_freeu()),
    "forward chunking": (lambda u: u.enable_forward_chunking(chunk_size=2, dim=1),
                         lambda u: u.disable_forward_chunking()),
}


@pytest.mark.parametrize("feature", list(SWITCHES))
def test_a_diffusers_feature_switched_after_compile_compiles_again_once(feature):
    """Policy() must stay bitwise the module through each switch. Switching on compiles one new signature (off
    compiles one or finds the first again), and the calls after it reuse it: the per-call check does not walk the
    module again."""
    from fxstream.models import build_unet, example_inputs
    unet = build_unet("unet3d-tiny")
    kw = example_inputs("unet3d-tiny", unet, frames=2, height=4, width=4)
    c = fxstream.compile(unet, Policy())
    on, off = SWITCHES[feature]
    with torch.no_grad():
        c(**kw)
        first = c._last
        for switch in (on, off):
            switch(unet)
            want = unet(**kw)[0]
            assert torch.equal(c(**kw)[0], want), f"{feature}: the compiled module ran a stale graph"
            assert c._new or (switch is off and c._last is first), f"{feature}: not compiled again"
            walks, entries = c._guard.walks, len(c._entries)
            assert torch.equal(c(**kw)[0], want) and not c._new
            assert c._guard.walks == walks and len(c._entries) == entries


class _Scaled(torch.nn.Module):
    """Reads a scale from an attribute object (as attention processors hold settings) and factors from a list."""

    def __init__(self, cfg):
        super().__init__()
        self.lin, self.cfg, self.factors = torch.nn.Linear(4, 4), cfg, [1.0]

    def forward(self, x):
        return self.lin(x) * self.cfg.scale * self.factors[-1]


class _Readable:
    def __init__(self, scale):
        self.scale = scale


class _Unreadable:
    __slots__ = ("scale",)

    def __init__(self, scale):
        self.scale = scale


def _called_once(cfg):
    """A compiled _Scaled holding ``cfg``, called once; the module, the compiled module and the input."""
    torch.manual_seed(0)
    m = _Scaled(cfg).eval()
    c = fxstream.compile(m, Policy())
    x = torch.randn(2, 4)
    with torch.no_grad():
        c(x)
    return m, c, x


def test_objects_and_containers_changed_in_place_or_swapped_compile_again():
    m, c, x = _called_once(_Readable(1.0))
    with torch.no_grad():
        m.cfg.scale = 2.0  # inside an object: its __dict__ is watched
        assert torch.equal(c(x), m(x)) and c._new
        m.factors.append(3.0)  # a list changed in place
        assert torch.equal(c(x), m(x)) and c._new
        m.cfg = _Readable(2.0)  # an equal object: the same structure, no compile
        assert torch.equal(c(x), m(x)) and not c._new


def test_an_attribute_the_guard_cannot_read_compiles_again_when_swapped():
    """An object without a readable __dict__ is known by identity: swapping it for an equal one still compiles
    (conservative), never reuses a graph captured with the other."""
    m, c, x = _called_once(_Unreadable(1.0))
    with torch.no_grad():
        m.cfg = _Unreadable(1.0)
        assert torch.equal(c(x), m(x)) and c._new
        m.cfg = _Unreadable(5.0)
        assert torch.equal(c(x), m(x)) and c._new


def test_the_guard_sees_hooks_dtypes_devices_and_direct_dict_writes():
    from fxstream.guard import StructureGuard
    net = _Net()
    g = StructureGuard(net)
    k0 = g.key()
    assert g.key() is k0 and g.walks == 1  # nothing changed: no walk
    h = net.a.register_forward_hook(lambda mod, args, out: out * 2)
    assert g.key() != k0
    h.remove()
    assert g.key() == k0
    net.b.weight.data = net.b.weight.data.double()  # in place: the same Parameter object
    assert g.key() != k0
    net.b.float()  # a submodule moved: .to() changes dtypes in place too
    assert g.key() == k0
    net.b.to("meta")  # new Parameter objects, written into the dict directly
    assert g.key() != k0
    for name, p in list(net.b.named_parameters()):  # direct writes, as accelerate does
        net.b._parameters[name] = torch.nn.Parameter(torch.zeros(p.shape))
    assert g.key() == k0 and g.walks == 7
    net.b._modules["extra"] = torch.nn.Identity()
    assert g.key() != k0
    del net.b._modules["extra"]
    net.a.training = False  # a submodule's flag
    assert g.key() != k0


def test_verify_tolerance_follows_dtype_and_backend(monkeypatch):
    """verify=True must not flag correct half-precision or TF32 runs: the tolerance is the arithmetic's rounding."""
    from fxstream import tolerance
    one = torch.ones(3)
    assert tolerance.verify_tolerance([one]) == pytest.approx(1e-5)
    assert tolerance.verify_tolerance([one.half() * 4]) == pytest.approx(8 * torch.finfo(torch.float16).eps * 4)
    assert tolerance.verify_tolerance([one.bfloat16()]) == pytest.approx(8 * torch.finfo(torch.bfloat16).eps)
    cuda = torch.device("cuda")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:  # torch's backend flags are not plain attributes (monkeypatch cannot restore them): set them by hand
        torch.backends.cudnn.allow_tf32 = True
        assert tolerance._reduced_float32_eps(cuda) == 2.0 ** -10  # cuDNN convolutions in TF32 (torch's default)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
        assert tolerance._reduced_float32_eps(cuda) == torch.finfo(torch.float32).eps
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
        assert tolerance._reduced_float32_eps(cuda) == torch.finfo(torch.bfloat16).eps
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert tolerance._reduced_float32_eps(torch.device("cpu")) == torch.finfo(torch.float32).eps


class _SometimesUncapturable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, branch: bool = False):
        if branch and x.sum() > 0:  # data-dependent control flow only when asked: those inputs cannot be captured
            return -self.lin(x)
        return self.lin(x)


def test_a_failed_signature_does_not_evict_a_compiled_one():
    m = _SometimesUncapturable().eval()
    c = fxstream.compile(m, Policy(cache_size=1))
    x = torch.ones(2, 4)
    c(x)
    compiled = c.explain()
    with pytest.warns(FallbackWarning):
        assert torch.equal(c(x, branch=True), m(x, branch=True))
    assert torch.equal(c(x), m(x)) and not c._new and c.explain() is compiled  # still compiled, not again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(c(x, branch=True), m(x, branch=True))  # the failure is remembered too: no new warning


def _first(out):
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.mark.parametrize("policy", [Policy(), Policy(slices=2)], ids=["unsliced", "slices2"])
def test_a_number_timestep_is_a_graph_input(svd_tiny, animatediff_tiny, policy):
    """One compile for a loop of Python-number timesteps; the output is the module's own for that number."""
    for (unet, kw), steps in ((svd_tiny, (700.0, 650.5, 20.25)), (animatediff_tiny, (901, 450, 3))):
        c = fxstream.compile(unet, policy)
        with torch.no_grad():
            for t in steps:
                got, want = _first(c(**dict(kw, timestep=t))), _first(unet(**dict(kw, timestep=t)))
                if policy == Policy():
                    assert torch.equal(got, want)
                else:
                    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max())
        assert len(c._entries) == 1
