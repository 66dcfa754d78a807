"""Renderers of :class:`~fxstream.viz.DrawGraph`: DOT source, SVG through Graphviz's ``dot``, an HTML page.

They decide nothing: boxes, colours, labels and the peak come from :func:`fxstream.viz.draw_graph`. Several
graphs (the original and the compiled one) are drawn side by side, each in a cluster of its own.

    >>> svg = to_svg([original, compiled])                 # needs Graphviz's `dot` on PATH
    >>> Path("svd-viz.html").write_text(to_html([original, compiled], svg))
"""
from __future__ import annotations

import html
import json
import math
import shutil
from dataclasses import asdict
from importlib import resources

import graphviz

from .errors import FxstreamError
from .viz import COLOURS, DrawGraph

__all__ = ["to_dot", "to_svg", "to_html", "GraphvizMissing", "require_dot", "DOT_HINT", "graphs_json"]

DOT_HINT = ("install Graphviz: `sudo apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS), "
            "or see https://graphviz.org/download/; or write only the DOT source with --format dot")
_PEAK = "#d62728"
_MARK_STYLE = {"cache": {"peripheries": "2", "color": "#6a51a3"}, "skip": {"fontcolor": "#777777"}}


class GraphvizMissing(FxstreamError):
    """Graphviz's ``dot`` program is not on PATH."""


def require_dot() -> str:
    """The path of Graphviz's ``dot``; :class:`GraphvizMissing` with the install hint if there is none."""
    path = shutil.which("dot")
    if path is None:
        raise GraphvizMissing(f"Graphviz's `dot` program was not found on PATH: {DOT_HINT}")
    return path


def _text(label: str) -> str:
    """A plain DOT label: lines joined with DOT's centred line break, backslashes kept literal."""
    return label.replace("\\", "\\\\").replace("\n", "\\n")


def _node_attrs(n, peak: bool) -> dict:
    shape = {"input": "ellipse", "output": "ellipse", "region": "box3d", "op": "box"}.get(n.kind, "box")
    style = ["filled"] + (["rounded"] if n.kind == "module" else []) + (["dashed"] if "skip" in n.marks else [])
    attrs = {"shape": shape, "style": ",".join(style), "fillcolor": n.colour, "id": n.id,
             "tooltip": n.label.split("\n", 1)[0]}
    for m in n.marks:
        attrs.update(_MARK_STYLE.get(m, {}))
    if peak:
        attrs.update(color=_PEAK, penwidth="3", fontcolor="#a50f15")
    return attrs


def _legend(graphs) -> str:
    """An HTML-like label: one swatch per slice axis drawn, unsliced modules, single ops, the peak."""
    colours = {}
    for g in graphs:
        colours.update(g.colours)
    rows = [(c, f"region sliced along {d}") for d, c in sorted(colours.items())]
    rows.append((COLOURS["module"], "module (ops not sliced)"))
    if any(n.kind == "op" for g in graphs for n in g.nodes):
        rows.append((COLOURS["op"], "single op (--expand)"))
    cells = "".join(f'<TR><TD BGCOLOR="{c}" WIDTH="18"> </TD><TD ALIGN="LEFT">{html.escape(t)}</TD></TR>'
                    for c, t in rows)
    cells += f'<TR><TD BORDER="3" COLOR="{_PEAK}"> </TD><TD ALIGN="LEFT">planned peak</TD></TR>'
    if any(n.marks for g in graphs for n in g.nodes):
        cells += '<TR><TD PORT="m"> </TD><TD ALIGN="LEFT">double border: cache, dashed: skip</TD></TR>'
    return f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="2" CELLPADDING="3">{cells}</TABLE>>'


def _add_graph(dot: graphviz.Digraph, g: DrawGraph, index: int) -> None:
    heaviest = max((e.bytes for e in g.edges), default=0) or 1
    with dot.subgraph(name=f"cluster_graph{index}") as top:
        top.attr(label=_text(g.title), fontsize="16", style="solid", color="#bbbbbb", labeljust="c")
        scopes = {None: top}
        pending = list(g.clusters)
        contexts = []
        while pending:  # open clusters parent first (they nest: a batch region holds regions)
            c = next(c for c in pending if c.parent in scopes)
            pending.remove(c)
            ctx = scopes[c.parent].subgraph(name=f"cluster_{c.id}")
            sub = ctx.__enter__()
            contexts.append(ctx)
            sub.attr(label=_text(c.label), id=c.id, style="filled,rounded", fillcolor=c.colour + "55",
                     color=_PEAK if c.peak else c.colour, penwidth="3" if c.peak else "1.5", labeljust="l")
            scopes[c.id] = sub
        for n in g.nodes:
            scopes[n.parent].node(n.id, _text(n.label), **_node_attrs(n, n.id == g.peak_id))
        for ctx in reversed(contexts):  # close children before parents: each adds itself to its parent
            ctx.__exit__(None, None, None)
    for e in g.edges:
        if e.minor:  # small values fanned out to many blocks: faint, unlabelled, not pulling the layout
            dot.edge(e.src, e.dst, tooltip=_text(e.label), color="#cccccc", style="dashed", weight="0",
                     arrowsize="0.4")
            continue
        width = 0.6 + 3.4 * math.sqrt(e.bytes / heaviest)
        dot.edge(e.src, e.dst, label=_text(e.label), penwidth=f"{width:.2f}")


def to_dot(graphs: list[DrawGraph], title: str = "") -> str:
    """DOT source drawing ``graphs`` side by side, with a legend."""
    dot = graphviz.Digraph("fxstream", graph_attr={
        "rankdir": "TB", "fontname": "Helvetica", "label": _text(title), "labelloc": "t", "fontsize": "18",
        "nodesep": "0.25", "ranksep": "0.3", "newrank": "true", "bgcolor": "white"},
        node_attr={"fontname": "Helvetica", "fontsize": "10", "margin": "0.08,0.03", "height": "0.3"},
        edge_attr={"fontname": "Helvetica", "fontsize": "8", "color": "#666666", "fontcolor": "#444444",
                   "arrowsize": "0.6"})
    dot.node("legend", _legend(graphs), shape="plaintext", fontsize="10", id="legend")
    for i, g in enumerate(graphs):
        _add_graph(dot, g, i)
    return dot.source


def to_svg(graphs: list[DrawGraph], title: str = "") -> str:
    """The SVG of :func:`to_dot`, drawn by Graphviz's ``dot`` (:class:`GraphvizMissing` if it is absent)."""
    require_dot()
    try:
        return graphviz.Source(to_dot(graphs, title)).pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound as e:
        raise GraphvizMissing(f"Graphviz's `dot` could not be run ({e}): {DOT_HINT}") from None
    except graphviz.CalledProcessError as e:
        raise FxstreamError(f"Graphviz's `dot` failed on the drawing: {e.stderr or e}") from None


def _inline_svg(svg: str) -> str:
    """The ``<svg>`` element alone: no XML prolog or DOCTYPE (which would name a DTD on the web)."""
    start = svg.find("<svg")
    if start < 0:
        raise ValueError("svg: no <svg> element in Graphviz's output")
    return svg[start:]


def to_html(graphs: list[DrawGraph], svg: str, title: str = "") -> str:
    """A self-contained page: the SVG inline, pan (drag), zoom (wheel), a click shows a box's details.

    Nothing is fetched when the page is viewed. ``page.html#node=<id>`` opens with that box selected.
    """
    details = {}
    for g in graphs:
        for n in g.nodes:
            details[n.id] = {"title": n.label.split("\n", 1)[0], "graph": g.title, "rows": list(n.details)}
        for c in g.clusters:
            details[c.id] = {"title": c.label.split("\n", 1)[0], "graph": g.title, "rows": list(c.details)}
    data = json.dumps({"details": details, "graphs": [
        {"title": g.title, "peak": g.peak_id, "nodes": len(g.nodes), "edges": len(g.edges)} for g in graphs]})
    page = resources.files("fxstream").joinpath("viz_page.html").read_text()
    return (page.replace("{{TITLE}}", html.escape(title or " / ".join(g.title for g in graphs)))
                .replace("{{DATA}}", data.replace("</", "<\\/"))
                .replace("{{SVG}}", _inline_svg(svg)))


def graphs_json(graphs: list[DrawGraph]) -> list:
    """The drawing data as plain JSON-ready dicts (``--json`` of ``fxstream viz``)."""
    return [asdict(g) for g in graphs]
