"""diffusers' video transformers (issue 20): tiny configs as in diffusers' own tests, random weights.

No code in fxstream names them: the tokens axis is found from the ops (an attention's sequence), attention is cut
along its queries with keys and values whole (NOTE [Queries only]), and a region that would raise the planned
peak is left whole (NOTE [A region must not raise the peak]). Checked: ``Policy(slices=4)`` within 1e-5,
``Policy()`` bitwise, the compiled plan never above the exported graph's, and the measured activation peak at
about 2,300 tokens at most 0.75x the exported graph's (see PEAK_RATIO).
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


# measured activation peak of Policy(slices=4) over the exported graph's, at each default size: all meet issue 20's
# 0.75x (measured 0.53x, 0.65x, 0.67x; wan-mid 0.53x: docs/benchmarks.md "Video transformers")
PEAK_RATIO = {"cogvideox-tiny": 0.75, "ltx-tiny": 0.70, "wan-tiny": 0.75, "wan-mid": 0.60}


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

    def __init__(self, d=32, heads=4, n=64):
        super().__init__()
        self.norm, self.heads = torch.nn.LayerNorm(d, elementwise_affine=False), heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.register_buffer("freqs", torch.randn(n, d // heads // 2))

    def forward(self, x, scale):
        h = (self.norm(x.float()) * (1 + scale) + 0.5).type_as(x)
        b, n, d = x.shape
        table = torch.cat([self.freqs[:n], self.freqs[:n]], dim=-1).view(1, 1, n, -1)  # a rotary-like table

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k = split(self.q(h)) * table, split(self.k(h)) * table
        a = torch.nn.functional.scaled_dot_product_attention(q, k, split(self.v(h)))
        return x + self.o(a.transpose(1, 2).reshape(b, n, d))


def test_recompute_queries_copies_the_shared_chain_bitwise():
    """passes/recompute_queries.py: the normed tokens are made again for the queries (the keys and values keep the
    original), the table is made again for each of its readers (the original is gone), and the rewritten graph
    computes the same bits."""
    from fxstream.compiler import capture, stripped_graph
    from fxstream.passes.recompute_queries import recompute_queries, shared_chains
    torch.manual_seed(0)
    m = _Block().eval()
    kw = dict(x=torch.randn(2, 64, 32), scale=torch.randn(1, 1, 32))
    program = capture(m, kw)
    gm = stripped_graph(program.graph_module)
    found = shared_chains(gm)
    normed = [(v, c, u) for v, c, u in found if v.target is torch.ops.aten.type_as.default]
    tables = [(v, c, u) for v, c, u in found if v.target is not torch.ops.aten.type_as.default]
    assert len(normed) == 1 and len(normed[0][2]) == 1
    assert {c.target for c in normed[0][1]} >= {torch.ops.aten.layer_norm.default, torch.ops.aten.type_as.default}
    assert len(tables) == 2 and len({v for v, _, _ in tables}) == 1  # one table, a copy for each of its 2 readers
    assert torch.ops.aten.cat.default in {c.target for c in tables[0][1]}
    out = recompute_queries(gm)
    targets = [n.target for n in out.graph.nodes]
    assert targets.count(torch.ops.aten.layer_norm.default) == 2 and targets.count(torch.ops.aten.cat.default) == 2
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


class _WrittenBlock(_Block):
    """The normed tokens written in place before the projections read them (as FreeU writes a block's features)."""

    def forward(self, x, scale):
        h = self.norm(x)
        h[..., :4] *= 2.0
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        a = torch.nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return x + self.o(a.transpose(1, 2).reshape(b, n, d))


def test_recompute_leaves_chains_that_touch_written_storage():
    """A copy runs later than its original: a chain reading (or made of) a storage an in-place write changes is
    never copied, and the compile stays exact."""
    from fxstream.compiler import capture, stripped_graph
    from fxstream.passes.recompute_queries import shared_chains
    torch.manual_seed(0)
    m = _WrittenBlock().eval()
    kw = dict(x=torch.randn(2, 64, 32), scale=torch.randn(1, 1, 32))
    gm = stripped_graph(capture(m, kw).graph_module)
    assert not [v for v, _, _ in shared_chains(gm) if v.target is not torch.ops.aten.view.default]
    with torch.no_grad():
        assert (fxstream.compile(m, fxstream.Policy(slices=4))(**kw) - m(**kw)).abs().max().item() <= 1e-5
