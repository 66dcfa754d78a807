"""The drawing data model (no Graphviz needed), the DOT and HTML renderers, the memory timeline, and one
test that opens the HTML page in headless Chromium."""
import json
import re
import shutil
import subprocess

import pytest
import torch

import fxstream
from fxstream.entry import Entry
from fxstream.models import build_unet, example_inputs
from fxstream.render import GraphvizMissing, to_dot, to_html, to_svg
from fxstream.timeline import block_of, memory_timeline, plot_memory
from fxstream.meta import Marks, set_meta
from fxstream.viz import DIM_COLOURS, draw_graph


def _plan(policy):
    unet = build_unet("svd-tiny", device="meta")
    return Entry(unet, example_inputs("svd-tiny", unet), policy)


@pytest.fixture(scope="module")
def sliced():
    return _plan(fxstream.Policy(slices=2))


@pytest.fixture(scope="module")
def batch_split():
    return _plan(fxstream.Policy(batch=2, slices=2))


def _draw(entry, which, **kw):
    r = entry.report
    gm = entry.compiled.original if which == "original" else entry.compiled.graph_module
    peak = r.original_peak_node if which == "original" else r.peak_node
    return draw_graph(gm, title=which, timeline=r.timeline[which], peak_node=peak, prefix=which[0],
                      user_inputs=entry.program.graph_signature.user_inputs, **kw)


def _drawn_ops(gm):
    """Names of the ops a drawing must show: call_function nodes that read an input (not constants), not checks."""
    const, out = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith(("p_", "b_", "c_"))}, []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            if all(p in const for p in n.all_input_nodes):
                const.add(n)
            elif n.users or n.meta.get("val") is not None:
                out.append(n.name)
    return out


# -- module-level collapse ---------------------------------------------------------------------------------
def test_original_is_collapsed_into_module_boxes(sliced):
    g = _draw(sliced, "original")
    boxes = [n for n in g.nodes if n.kind == "module"]
    modules = {n.module for n in boxes}
    assert {"down_blocks.0.resnets.1", "down_blocks.0.attentions.0", "mid_block.resnets.0", "conv_in"} <= modules
    assert not any(m.endswith("temporal_res_block") for m in modules)  # depth 2 stops above it
    assert len(boxes) < 60 < len(_drawn_ops(sliced.compiled.original))
    # every op that reads an input is in exactly one box
    members = [m for n in boxes for m in n.members]
    assert sorted(members) == sorted(_drawn_ops(sliced.compiled.original))
    box = g.find("down_blocks.0.resnets.1")[0]
    assert box.label.split("\n")[1] == f"SpatioTemporalResBlock · {box.ops} ops"
    assert ("class", "SpatioTemporalResBlock") in box.details


def test_depth_chooses_the_module_level(sliced):
    deep = _draw(sliced, "original", depth=3)
    shallow = _draw(sliced, "original", depth=1)
    assert deep.find("down_blocks.0.resnets.1.temporal_res_block")
    assert {n.module for n in shallow.nodes if n.kind == "module"} >= {"down_blocks.0", "mid_block", "up_blocks.1"}
    assert not any(n.module.count(".") > 1 for n in shallow.nodes if n.kind == "module" and n.module != "")
    assert len(shallow.nodes) < len(_draw(sliced, "original").nodes) < len(deep.nodes)


def test_expand_draws_one_module_op_by_op(sliced):
    target = "down_blocks.0.resnets.1.temporal_res_block"
    g = _draw(sliced, "original", expand=target)
    ops = [n for n in g.nodes if n.kind == "op"]
    assert ops and all(n.module.startswith(target) for n in ops)
    gm = sliced.compiled.original
    expected = {n.name for n in gm.graph.nodes if n.name in set(_drawn_ops(gm))
                and list(n.meta["nn_module_stack"].values())[-1][0].startswith(target)}
    assert {m for n in ops for m in n.members} == expected
    assert any(n.label.startswith("conv3d") or n.label.startswith("convolution") for n in ops)
    # compiled: the regions holding those ops are drawn around their bodies, ops inside
    c = _draw(sliced, "compiled", expand=target)
    assert c.clusters
    inside = [n for n in c.nodes if n.parent is not None]
    assert any(n.kind == "op" for n in inside)


# -- regions -----------------------------------------------------------------------------------------------
def test_each_region_is_one_box_coloured_by_dim_with_its_slice_count(sliced):
    g = _draw(sliced, "compiled")
    regions = [n for n in g.nodes if n.kind == "region"]
    loops = [n for n in sliced.compiled.graph_module.graph.nodes if n.op == "call_module"]
    assert len(regions) == len(loops) == len(sliced.report.regions)
    assert {n.dim for n in regions} == {"frames", "height"}
    for n, info in zip(regions, sliced.report.regions):
        assert (n.dim, n.slices, n.module, n.ops) == (info.dim, info.slices, info.module, info.ops)
        assert n.colour == DIM_COLOURS[n.dim] != DIM_COLOURS["batch"]
        assert f"{n.slices} slices along {n.dim}" in n.label
    assert g.colours == {"frames": DIM_COLOURS["frames"], "height": DIM_COLOURS["height"]}
    assert DIM_COLOURS["frames"] != DIM_COLOURS["height"]


def test_batch_region_is_a_cluster_around_its_regions(batch_split):
    g = _draw(batch_split, "compiled")
    assert len(g.clusters) == 1
    cluster = g.clusters[0]
    assert (cluster.dim, cluster.slices, cluster.colour) == ("batch", 2, DIM_COLOURS["batch"])
    inner = [n for n in g.nodes if n.kind == "region"]
    assert inner and all(n.parent == cluster.id for n in inner)
    assert all(m.startswith("region_0/") for n in inner for m in n.members)
    assert {"batch", "frames", "height"} == set(g.colours)


# -- edges and the peak ------------------------------------------------------------------------------------
def test_edges_carry_shapes_and_bytes(sliced):
    g = _draw(sliced, "original")
    sample = g.find("sample")[0]
    edge = next(e for e in g.edges if e.src == sample.id)
    assert edge.shapes == ("2x4x8x16x16 f32",) and edge.bytes == 2 * 4 * 8 * 16 * 16 * 4
    assert edge.label == "2x4x8x16x16 f32\n64.0 KiB" and not edge.minor
    timestep = g.find("timestep")[0]
    assert all(e.minor for e in g.edges if e.src == timestep.id)  # a scalar fanned out: drawn faint
    ids = {n.id for n in g.nodes}
    assert all(e.src in ids and e.dst in ids and e.src != e.dst for e in g.edges)


@pytest.mark.parametrize("which", ["original", "compiled"])
def test_the_peak_box_is_flagged(sliced, which):
    g = _draw(sliced, which)
    r = sliced.report
    peak_node = r.original_peak_node if which == "original" else r.peak_node
    flagged = [n for n in g.nodes if n.peak]
    assert len(flagged) == 1 and flagged[0].id == g.peak_id
    assert peak_node in flagged[0].members and "PEAK" in flagged[0].label
    assert flagged[0].peak_bytes == (r.original_peak_bytes if which == "original" else r.peak_bytes)
    assert all("PEAK" not in n.label for n in g.nodes if not n.peak)


def test_peak_inside_a_batch_region(batch_split):
    g = _draw(batch_split, "compiled")
    box = g.node(g.peak_id)
    assert batch_split.report.peak_node.startswith("region_0/") and batch_split.report.peak_node in box.members
    assert box.parent == g.clusters[0].id


# -- marks (set by hand here; tests/test_rehash.py checks the ones the Step Rehash pass sets) -------------
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.mid(self.inp(x)))


def test_marks_are_drawn_when_present():
    gm = torch.export.export(_Toy(), (torch.randn(3, 8),)).graph_module
    node = next(n for n in gm.graph.nodes if n.meta.get("nn_module_stack") and
                list(n.meta["nn_module_stack"].values())[-1][0] == "mid")
    set_meta(node, Marks(cache=True))
    g = draw_graph(gm, title="toy")
    assert [n.module for n in g.nodes if n.kind == "module"] == ["inp", "mid", "out"]
    mid = g.find("mid")[0]
    assert mid.marks == ("cache",) and "[cache]" in mid.label
    assert all(n.marks == () for n in g.nodes if n is not mid)
    dot = to_dot([g])
    assert re.search(rf'^\s*{mid.id} \[.*peripheries=2', dot, re.M)


# -- renderers -------------------------------------------------------------------------------------------
def test_dot_source_needs_no_graphviz(sliced, batch_split, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    graphs = [_draw(sliced, "original"), _draw(batch_split, "compiled")]
    dot = to_dot(graphs, "svd-tiny")
    assert "subgraph cluster_graph0" in dot and "subgraph cluster_graph1" in dot
    assert f"subgraph cluster_{graphs[1].clusters[0].id}" in dot
    region = next(n for n in graphs[1].nodes if n.kind == "region")
    assert re.search(rf'^\s*{region.id} \[.*fillcolor="{region.colour}"', dot, re.M)
    assert re.search(rf'^\s*{graphs[0].peak_id} \[.* color="#d62728"', dot, re.M)
    with pytest.raises(GraphvizMissing, match="apt-get install graphviz"):
        to_svg(graphs)


def test_html_page_is_self_contained(sliced):
    g = _draw(sliced, "compiled")
    svg = '<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/x.dtd">\n' \
          '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><g id="c1" class="node"></g></svg>'
    page = to_html([g], svg, title="t </script>")
    assert "<!DOCTYPE svg" not in page and "x.dtd" not in page
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]  # a namespace, not a fetch
    data = json.loads(re.search(r'id="fx-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    assert set(data["details"]) == {n.id for n in g.nodes}
    assert data["graphs"][0]["peak"] == g.peak_id


def _browser():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_browser() is None, reason="headless Chromium not installed (apt-get install chromium)")
@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot not installed (apt-get install graphviz)")
def test_html_page_in_headless_chromium(sliced, tmp_path):
    graphs = [_draw(sliced, "original"), _draw(sliced, "compiled")]
    page = tmp_path / "page.html"
    page.write_text(to_html(graphs, to_svg(graphs, "svd-tiny"), "svd-tiny"))
    peak = graphs[1].node(graphs[1].peak_id)
    dom = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"{page.as_uri()}#node={peak.id}"], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    texts = set(re.findall(r"<text[^>]*>([^<]*)</text>", dom))
    assert {"sample", "down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "output"} <= texts
    assert f"{peak.slices} slices along {peak.dim} (length 16)" in texts
    # the deep link selected the peak box: highlighted, and its details in the side panel
    assert re.search(rf'<g id="{peak.id}" class="node selected"', dom)
    panel = re.search(r'<aside id="details" data-selected="([^"]+)"><h2>([^<]*)</h2>(.*?)</aside>', dom, re.S)
    assert panel and panel.group(1) == peak.id and panel.group(2) == peak.module
    assert "slices" in panel.group(3) and "planned peak" in panel.group(3)


# -- memory timeline -------------------------------------------------------------------------------------
def test_block_of():
    assert block_of("down_blocks.1.resnets.0.conv1") == "down_blocks.1"
    assert block_of("mid_block.attentions.0") == "mid_block"
    assert block_of("conv_in") == "conv_in" and block_of("") is None


def test_timeline_lines_up_blocks_and_keeps_the_peaks(batch_split, tmp_path):
    r = batch_split.report
    tl = memory_timeline(r, title="svd-tiny")
    orig, comp = tl.series
    assert (orig.peak_bytes, comp.peak_bytes) == (r.original_peak_bytes, r.peak_bytes)
    assert (orig.peak_node, comp.peak_node) == (r.original_peak_node, r.peak_node)
    assert len(comp.x) == len(r.timeline["compiled"]) and list(comp.x) == sorted(comp.x)
    assert comp.x[0] == 0 and comp.x[-1] == orig.x[-1]
    blocks = [b.block for b in tl.boundaries]
    assert blocks.index("down_blocks.0") < blocks.index("mid_block") < blocks.index("up_blocks.1")
    # a batch split hoists constant ops of every block to the front; the blocks still line up
    for block in ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"):
        xs = {s.name: sorted(x for x, t in zip(s.x, r.timeline[s.name]) if block_of(t.module) == block)
              for s in tl.series}
        med = {k: v[(len(v) - 1) // 2] for k, v in xs.items()}
        assert abs(med["compiled"] - med["original"]) <= 1, block
    plot_memory(tl, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_halo_regions_are_drawn_as_region_boxes():
    """NOTE [One region model]: a halo region's call is drawn like a cut region's (one box along its axis, its
    slices and ops), from the same protocol; the drawing of a decoder under Policy(halo=...) used to refuse it."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_halo import tiny_svd
    decoder, kw = tiny_svd()
    entry = Entry(decoder, kw, fxstream.Policy(halo=3))
    g = draw_graph(entry.compiled.graph_module, timeline=entry.report.timeline["compiled"])
    boxes = [n for n in g.nodes if n.kind == "region"]
    halo = [r for r in entry.report.regions if r.kind == "halo"]
    assert halo and len(boxes) == len(halo)
    assert all(b.dim == "height" and b.slices == 3 and b.colour == DIM_COLOURS["height"] for b in boxes)
    assert sorted(b.ops for b in boxes) == sorted(r.ops for r in halo)
