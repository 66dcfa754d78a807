"""In-place writes (issue 18): what they pin, the order they impose, and exact results with diffusers' FreeU.

FreeU writes into views (``h[:, :c] *= b``, ``mask[..., a:b] = s``); before ``fxstream.analysis.effects`` a
region computed the view into a fresh buffer and the write missed the base: frames 0.17-0.34 away on the tiny
UNets. The planted-bug tests show the property tests catch the pattern when the analysis is switched off.
"""
import pytest
import torch

import fxstream
from fxstream.analysis import slicer
from fxstream.analysis.effects import Effects, find_effects, written_args
from fxstream.compiler import capture, compile_graph

from programs import Spec, build


PATTERNS = ["inplace_half", "fft_filter", "batch_halves", "first_frame"]


class _FreeUish(torch.nn.Module):
    def forward(self, x):
        h = x * 2.0
        before = h.sum()
        h[:, :2] = h[:, :2] * 1.5  # aten.copy_ into aten.slice
        return h + before


def test_find_effects_pins_the_storage_and_orders_readers():
    ep = capture(_FreeUish(), {"x": torch.randn(3, 4, 5)})
    gm = ep.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    write = next(n for n in gm.graph.nodes if written_args(n))
    assert write.target is torch.ops.aten.copy_.default
    fx = find_effects(gm)
    base = nodes["mul"]
    assert base in fx.pinned and write in fx.pinned and write.args[0] in fx.pinned
    assert "writes into mul through a view" in fx.pinned[base]
    total = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.sum.default)
    late = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    assert total in fx.deps[write]  # the reader before the write runs before it
    assert write in fx.deps[late]  # and the reader after it, after
    assert find_effects(capture(torch.nn.Linear(4, 4), {"input": torch.randn(2, 4)}).graph_module) == Effects()


def _spec(block: str, layout: str = "BFCHW") -> Spec:
    return Spec(layout, 2, 4, 8, 4, 4, ("conv1x1", block, "temporal_attn", block, "spatial_attn"), 3)


@pytest.mark.parametrize("block", PATTERNS)
@pytest.mark.parametrize("layout", ["BFCHW", "BCFHW"])
def test_patterns_compile_exactly(block, layout):
    spec = _spec(block, layout)
    m, kw = build(spec), spec.inputs()
    with torch.no_grad():
        ref = m(**kw)
        assert torch.equal(fxstream.compile(m, fxstream.Policy())(**kw), ref)
        for policy in (fxstream.Policy(slices=2, min_region_fraction=0.0),
                       fxstream.Policy(batch=2, spatial=3, temporal=2, min_region_fraction=0.0)):
            cm = fxstream.compile(m, policy)
            out = cm(**kw)
            assert cm.explain().regions, "nothing sliced: the check would be vacuous"
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_explain_says_why_written_values_are_not_sliced():
    spec = _spec("inplace_half")
    report = fxstream.explain(build(spec), spec.inputs(), fxstream.Policy(slices=2, min_region_fraction=0.0))
    assert any("in-place aten.copy_.default" in u.reason for u in report.unsliced), report.table()


def test_planted_bug_without_effects_is_caught(monkeypatch):
    """Switch the analysis off: the in-place pattern must then give a wrong answer the equality check sees."""
    spec = _spec("inplace_half")
    m, kw = build(spec), spec.inputs()
    with torch.no_grad():
        ref = m(**kw)
    from fxstream.passes import group_regions
    for mod in (slicer, group_regions):
        monkeypatch.setattr(mod, "find_effects", lambda gm: Effects())
    cg = compile_graph(capture(m, kw).graph_module, fxstream.Policy(slices=2, min_region_fraction=0.0))
    params = [p for _, p in m.named_parameters()]
    with torch.no_grad():
        out = cg.graph_module(*params, kw["sample"], kw["encoder_hidden_states"])[0]
    assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["animatediff-tiny", pytest.param("unet3d-tiny", marks=pytest.mark.slow)])
def test_freeu_unet_sliced_equals_original(name):
    from fxstream.models import build_unet, example_inputs
    unet = build_unet(name)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    kw = example_inputs(name, unet)
    with torch.no_grad():
        ref = unet(**kw)[0]
        out = fxstream.compile(unet, fxstream.Policy(slices=2))(**kw)[0]
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


def _straddling(pos: int):
    """A planted wrong rule for chunk/cat: slices along the op's own dim as if the pieces were inside the axis
    (each slice of a half-batch then takes rows of both halves)."""
    from fxstream.analysis import rules
    from fxstream.analysis.cuts import Cut

    def wrong(node, cut, ctx):
        d = node.args[pos] if len(node.args) > pos else 0
        if not isinstance(cut, Cut) or d % len(rules.val_shape(node)) != cut.dim:
            return rules._dim_arg_rule(pos, 0)(node, cut, ctx)
        if node.target is torch.ops.aten.chunk.default:
            return {node.args[0]: Cut(cut.dim, cut.outer, cut.inner * node.args[1])}
        xs = node.args[0]
        if cut.inner % len(xs):
            raise rules.CantSlice("planted rule: uneven")
        return {x: Cut(cut.dim, cut.outer, cut.inner // len(xs)) for x in xs}

    return rules.Rule(wrong, kind="split")


def test_planted_straddling_chunk_rule_is_caught(monkeypatch):
    """PAG-style halves of B*F: a chunk/cat rule that ignores where the halves lie gives a wrong answer that the
    equality check sees (the real rules refuse a cut along the op's own dim)."""
    from fxstream.analysis import rules
    aten = torch.ops.aten
    spec = Spec("BFCHW", 2, 4, 8, 4, 4, ("conv1x1", "batch_halves", "spatial_attn"), 3)
    m, kw = build(spec), spec.inputs()
    with torch.no_grad():
        ref = m(**kw)
        torch.testing.assert_close(fxstream.compile(m, fxstream.Policy(slices=2, min_region_fraction=0.0))(**kw), ref,
                                   rtol=1e-5, atol=1e-5)
        monkeypatch.setitem(rules.RULES, aten.chunk.default, _straddling(2))
        monkeypatch.setitem(rules.RULES, aten.cat.default, _straddling(1))
        out = fxstream.compile(m, fxstream.Policy(batch=2, min_region_fraction=0.0))(**kw)
    assert (out - ref).abs().max() > 1e-3


class _Fills(torch.nn.Module):
    """Fresh buffers filled through views (NOTE [Fresh buffers filled through views]): ``kind`` picks interleaved
    halves (Wan's rotary embedding), consecutive ranges, a broadcast write (export makes it an ``expand``), a
    partial fill, a write that casts, or a read between the writes; the first three fill the buffer as the pass
    requires."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        a, b = x * 2.0, x - 1.0
        out = torch.empty_like(torch.cat([x, x], dim=-1))
        if self.kind == "interleave":
            out[..., 0::2] = a
            out[..., 1::2] = b
        elif self.kind == "ranges":
            out[..., 4:] = b
            out[..., :4] = a
        elif self.kind == "partial":
            out.zero_()
            out[..., :4] = a
        elif self.kind == "broadcast":  # export writes the broadcast as an expand: a value of the view's shape
            out[..., :4] = a[:, :1]
            out[..., 4:] = b
        elif self.kind == "cast":  # copy_ rounds float64 to float32: not a plain copy
            out[..., :4] = a.double() / 3.0
            out[..., 4:] = b
        else:  # a read of the buffer between the writes
            out[..., :4] = a
            early = out[..., :4].sum()  # reads the written part only
            out[..., 4:] = b
            return out * early
        return out * 3.0


@pytest.mark.parametrize("kind, rewritten", [("interleave", True), ("ranges", True), ("broadcast", True),
                                             ("partial", False), ("cast", False), ("read_between", False)])
def test_fresh_buffers_filled_through_views_become_values(kind, rewritten):
    """A buffer the writes fill is rewritten as a stack or a cat (no write left, nothing pinned, the tokens
    sliced); any other pattern keeps its writes and pins; results equal eager in both cases (bitwise unsliced)."""
    from fxstream.compiler import stripped_graph
    m, x = _Fills(kind), torch.randn(2, 12, 4)
    gm = stripped_graph(capture(m, {"x": x}).graph_module)
    writes = [n for n in gm.graph.nodes if written_args(n)]
    assert (not writes) == rewritten, [n.name for n in writes]
    with torch.no_grad():
        want = m(x)
        assert torch.equal(gm(x)[0] if isinstance(gm(x), (tuple, list)) else gm(x), want)
        got = fxstream.compile(m, fxstream.Policy(slices=3, min_region_fraction=0))(x=x)
    assert torch.equal(got, want)
