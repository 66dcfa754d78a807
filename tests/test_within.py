"""NOTE [Slices within one element]: a region asked for more slices than its axis has elements cuts each
one-element body again along the body's own axes (a frame's tokens or height): exact, planned as measured, below
the one-element plan, and across ranks each rank runs the regions inside its slices whole."""
import sys
from pathlib import Path

import pytest
import torch

import fxstream
from fxstream.compiler import compile_graph
from fxstream.distributed import compile_policy, rank_plan, shard_regions, spread_loops
from fxstream.entry import Entry
from fxstream.memory import MemoryTracker, measure_peak, plan_memory
from fxstream.models import build_unet, example_inputs
from fxstream.runtime import LoopRegion

HERE = Path(__file__).resolve().parent


def _loops(gm):
    return [m for m in gm.children() if isinstance(m, LoopRegion)]


@pytest.mark.parametrize("model", ["svd_tiny", "animatediff_tiny"])
def test_more_slices_than_frames_cut_each_frame_again(model, request):
    unet, kw = request.getfixturevalue(model)
    within = fxstream.compile(unet, policy=fxstream.Policy(slices=16))  # more than the frames (8 in the batch)
    with torch.no_grad():
        ref = unet(**kw)[0]
        out = within(**kw)[0]
    assert (out - ref).abs().max().item() <= 1e-5
    gm = within._last.compiled.graph_module
    cut = [m for m in _loops(gm) if m.within > 1]
    assert any(m.axis == "frames" for m in cut) and all(len(m.bounds) == m.length for m in cut)
    assert all(m.within == -(-16 // m.length) and not m.nested and m.in_flight == 1 for m in cut)
    # the same compile with one element per slice (as before, and as the budget compiles)
    frames = compile_graph(within._last.compiled.original, fxstream.Policy(slices=16), cut_within=False)
    rep = within.explain()
    outer = [r for r in rep.regions if r.within > 1]
    inner = [r for r in rep.regions if "/" in r.node]
    assert outer and inner and {r.node.split("/")[0] for r in inner} <= {r.node for r in outer}
    assert f"{outer[0].slices} x {outer[0].within}" in rep.table()
    # a frame's working set cut again: the plan falls below the one-frame plan, and is what runs
    assert rep.peak_bytes < plan_memory(frames.graph_module).peak_bytes
    _, measured = measure_peak(within, **kw)
    assert abs(rep.peak_bytes - measured) <= 0.05 * measured, (rep.peak_bytes, measured)


def test_the_budget_search_never_cuts_within(svd_tiny):
    """The budget's counts are one element per slice at most; its compiles keep every body as the slicer made it
    (``compile_graph(..., cut_within=False)``, recorded for the plan cache)."""
    unet, kw = svd_tiny
    gm = Entry(unet, kw, fxstream.Policy()).compiled.original
    off = compile_graph(gm, fxstream.Policy(slices=16), cut_within=False)
    assert off.made_with.cut_within is False and not off.within
    assert not any(m.within > 1 for m in _loops(off.graph_module))
    on = compile_graph(gm, fxstream.Policy(slices=16))
    assert on.made_with.cut_within and on.within
    assert plan_memory(on.graph_module).peak_bytes < plan_memory(off.graph_module).peak_bytes


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ranks_run_the_regions_inside_their_slices_whole(one_thread):
    """Across 2 ranks (threads standing in, as in test_distributed.py) a region cut within one frame spreads its
    frames; the regions inside its bodies are not spread and run on the rank that runs the frame. Every rank
    returns the one-process output bitwise, at or below its planned peak."""
    sys.path.insert(0, str(HERE))
    from test_distributed import _on_thread_ranks, _own_regions
    m = build_unet("svd-tiny")
    kw = example_inputs("svd-tiny", m, batch=1)
    entry = Entry(m, kw, compile_policy(fxstream.Policy(slices=4), 2))  # 8 slices of 4 frames: 2 within each
    gm = entry.compiled.graph_module
    cut = [x for x in _loops(gm) if x.within > 1]
    assert cut
    spread = spread_loops(gm, 2)
    inside = [x for c in cut for b in c.bodies.values() for x in b.modules() if isinstance(x, LoopRegion)]
    assert all(id(c) in spread for c in cut) and inside and not any(id(x) in spread for x in inside)
    planned = rank_plan(entry.compiled, 2).peak_bytes
    flat = [*entry.weights(m), *torch.utils._pytree.tree_flatten(((), kw))[0]]
    with torch.no_grad():
        want = gm(*flat)[0]

    def work(sh):
        mine = _own_regions(gm)
        shard_regions(mine, sh)
        assert all(x.shards is None for x in inside)
        with torch.no_grad(), MemoryTracker() as tracker:
            out = mine(*flat)[0]
        return out, tracker.peak

    got = _on_thread_ranks(2, work)
    for r in range(2):
        out, peak = got[r]
        assert torch.equal(out, want), (r, (out - want).abs().max())
        assert peak <= planned * 1.02 + 2**16, (r, peak, planned)
