"""diffusers' video transformers (issue 20): tiny configs as in diffusers' own tests, random weights.

No code in fxstream names them: the tokens axis is found from the ops (an attention's sequence), attention is cut
along its queries with keys and values whole (NOTE [Queries only]), and a region that would raise the planned
peak is left whole (NOTE [A region must not raise the peak]). Checked: ``Policy(slices=4)`` within 1e-5,
``Policy()`` bitwise, the compiled plan never above the exported graph's, and the measured activation peak at
about 2,300 tokens at most 0.75x the exported graph's for CogVideoX and LTX-Video (Wan: 0.92x, see PEAK_RATIO).
"""
import pytest
import torch

import fxstream
from fxstream.memory import measure_peak
from fxstream.models import build_transformer, transformer_inputs


# small sizes (a few hundred tokens) for the exactness checks; the default size of each (about 2,300 tokens) for
# the memory check
SMALL = {"cogvideox-tiny": dict(batch=2),  # its positional table is made for its config size only
         "wan-tiny": dict(height=16, width=16),
         "ltx-tiny": dict(height=16, width=16, batch=2)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_video_transformer_compiles_exactly(name):
    m = build_transformer(name)
    kw = transformer_inputs(name, m, **SMALL[name])
    with torch.no_grad():
        want = m(**kw)[0]
        compiled = fxstream.compile(m, fxstream.Policy(slices=4))
        got = compiled(**kw)[0]
        whole = fxstream.compile(m, fxstream.Policy())(**kw)[0]
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert torch.equal(whole, want)
    rep = compiled.explain()
    assert rep.regions and rep.peak_bytes <= rep.original_peak_bytes
    assert any(a.name == "tokens" for a in rep.axes) or name == "wan-tiny"  # Wan's frames reach its tokens


# measured activation peak of Policy(slices=4) over the exported graph's, at each default size: CogVideoX and LTX
# meet issue 20's 0.75x (LTX 0.65x since its queries recompute the normed tokens); Wan-tiny is held at what it
# reaches (0.90x: its rotary tables; see docs/benchmarks.md "Video transformers"), wan-mid 0.64x
PEAK_RATIO = {"cogvideox-tiny": 0.75, "ltx-tiny": 0.70, "wan-tiny": 0.92, "wan-mid": 0.67}


@pytest.mark.parametrize("name", sorted(PEAK_RATIO))
def test_peak_falls_at_a_few_thousand_tokens(name):
    """At the default size (2,304 video tokens): the measured activation peak of ``Policy(slices=4)`` is at most
    ``PEAK_RATIO`` times the exported graph's, within 1e-5 of it."""
    m = build_transformer(name)
    kw = transformer_inputs(name, m)
    with torch.no_grad():
        exported = fxstream.compile(m, fxstream.Policy())
        compiled = fxstream.compile(m, fxstream.Policy(slices=4))
        want, _ = exported(**kw), compiled(**kw)  # first calls compile
        (got, *_), sliced = measure_peak(compiled, **kw)
        _, whole = measure_peak(exported, **kw)
    assert (got - want[0]).abs().max().item() <= 1e-5 * want[0].abs().max().item()
    assert sliced <= PEAK_RATIO[name] * whole, (sliced, whole)


class _Block(torch.nn.Module):
    """A transformer block's self-attention: one normed copy of the tokens feeds queries, keys and values."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.norm, self.heads = torch.nn.LayerNorm(d, elementwise_affine=False), heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x, scale):
        h = (self.norm(x.float()) * (1 + scale) + 0.5).type_as(x)
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        a = torch.nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return x + self.o(a.transpose(1, 2).reshape(b, n, d))


def test_recompute_queries_copies_the_shared_chain_bitwise():
    """passes/recompute_queries.py: the normed tokens are made again for the queries (the keys and values keep the
    original), and the rewritten graph computes the same bits."""
    from fxstream.compiler import capture, stripped_graph
    from fxstream.passes.recompute_queries import recompute_queries, shared_chains
    torch.manual_seed(0)
    m = _Block().eval()
    kw = dict(x=torch.randn(2, 64, 32), scale=torch.randn(1, 1, 32))
    program = capture(m, kw)
    gm = stripped_graph(program.graph_module)
    found = shared_chains(gm)
    assert len(found) == 1
    value, chain, users = found[0]
    assert value.target is torch.ops.aten.type_as.default and len(users) == 1
    assert {c.target for c in chain} >= {torch.ops.aten.layer_norm.default, value.target}
    out = recompute_queries(gm)
    layer_norms = [n for n in out.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert len(layer_norms) == 2
    weights = [program.state_dict[s.target] for s in program.graph_signature.input_specs if s.target]
    with torch.no_grad():
        assert torch.equal(out(*weights, kw["x"], kw["scale"])[0], m(**kw))


def test_wan_recomputes_the_normed_tokens_for_its_queries(monkeypatch):
    """Wan's blocks make queries, keys and values from one normed copy of the tokens: the compile copies that chain
    for the queries where the planned peak falls (NOTE [Queries recompute what they share with keys and values]);
    the result is within 1e-5 (bitwise here) and the measured peak follows the plan."""
    import fxstream.compiler as compiler
    m = build_transformer("wan-mid")
    kw = transformer_inputs("wan-mid", m)
    with torch.no_grad():
        want = m(**kw)[0]
        exported = fxstream.compile(m, fxstream.Policy())
        compiled = fxstream.compile(m, fxstream.Policy(slices=4))
        exported(**kw), compiled(**kw)  # first calls compile
        (got, *_), sliced = measure_peak(compiled, **kw)
        _, whole = measure_peak(exported, **kw)
    rep = compiled.explain()
    assert rep.recomputed >= 2 and "chains recomputed" in rep.table()
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert sliced <= 1.05 * rep.peak_bytes and sliced < 0.65 * whole, (sliced, rep.peak_bytes, whole)
    monkeypatch.setattr(compiler, "_recompute_may_help", lambda *a: False)
    plain = fxstream.explain(m, kw, fxstream.Policy(slices=4))
    assert plain.recomputed == 0 and rep.peak_bytes < plain.peak_bytes
