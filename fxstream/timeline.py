"""The memory timeline: planned bytes live per node, original against compiled, as data and as a matplotlib PNG.

:func:`memory_timeline` decides what to plot from a :class:`~fxstream.report.Report`; :func:`plot_memory` only
draws it. The two graphs have different node counts (regions replace hundreds of ops), so both are put on one
axis, the original's node index, with the compiled graph's nodes stretched so that each UNet block
(``down_blocks.0``, ``mid_block``, ...) has its median node at the same place in both: the curves line up block
by block, like the allocator timelines of the paper. Dashed lines mark where each block starts.

    >>> tl = memory_timeline(report, title="svd 576x1024")
    >>> plot_memory(tl, "svd-memory.png")
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .viz import human_bytes

_QUANTILE = 0.5  # where in a block the two graphs are matched: its median node (see _block_marks)
_LABEL_GAP = 0.02  # a block start closer than this share of the axis to the next labelled one gets no label

__all__ = ["Series", "Boundary", "MemoryTimeline", "memory_timeline", "plot_memory", "block_of"]


@dataclass(frozen=True)
class Series:
    """One graph's timeline on the common axis."""

    name: str
    x: tuple  # position of each node on the original graph's node axis
    live: tuple  # bytes live after each node
    during: tuple  # the most bytes live while each node ran
    peak_bytes: int
    peak_x: float
    peak_node: str
    peak_module: str


@dataclass(frozen=True)
class Boundary:
    """Where a UNet block starts on the common axis."""

    x: float
    block: str


@dataclass(frozen=True)
class MemoryTimeline:
    title: str
    series: tuple  # (original, compiled)
    boundaries: tuple
    weight_bytes: int = 0


def block_of(module: str) -> str | None:
    """The top-level block a module path belongs to: ``down_blocks.1`` for ``down_blocks.1.resnets.0.conv1``,
    ``conv_in`` for ``conv_in``; None for the top level."""
    if not module:
        return None
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def _block_starts(points, known=None) -> dict:
    """{block: index of its first node}, for the blocks in ``known`` (all if None)."""
    starts = {}
    for i, t in enumerate(points):
        b = block_of(t.module)
        if b is not None and (known is None or b in known):
            starts.setdefault(b, i)
    return starts


def _block_marks(points, q: float = _QUANTILE) -> dict:
    """{block: index of the node ``q`` of the way through its nodes}. Unlike its first node, its median is not
    moved by the small ops a compiled graph runs early: a batch split hoists every op that needs no input
    (the time mixers' constants, ``arange`` of the positional embeddings) in front of the batch region."""
    where: dict = {}
    for i, t in enumerate(points):
        b = block_of(t.module)
        if b is not None:
            where.setdefault(b, []).append(i)
    return {b: idx[int(q * (len(idx) - 1))] for b, idx in where.items()}


def _anchors(orig: dict, comp: dict, n_orig: int, n_comp: int) -> tuple[list, list]:
    """Matching indices (compiled, original): both starts, the longest chain of blocks whose marks increase in
    both graphs, both ends."""
    pairs = sorted((comp[b], orig[b]) for b in orig if b in comp and 0 < comp[b] < n_comp - 1
                   and 0 < orig[b] < n_orig - 1)
    best: list = []  # best[i]: longest increasing chain ending at pairs[i] (a dozen blocks: quadratic is fine)
    for i, (c, o) in enumerate(pairs):
        prev = max((best[j] for j in range(i) if pairs[j][0] < c and pairs[j][1] < o), key=len, default=[])
        best.append(prev + [(c, o)])
    chain = max(best, key=len, default=[])
    xs = [0] + [c for c, _ in chain] + ([n_comp - 1] if n_comp > 1 else [])
    ys = [0] + [o for _, o in chain] + ([max(n_orig - 1, 1)] if n_comp > 1 else [])
    return xs, ys


def _series(name, points, x, peak_node, peak_module) -> Series:
    during = tuple(t.peak_bytes for t in points)
    i = int(np.argmax(during)) if during else 0
    return Series(name, tuple(float(v) for v in x), tuple(t.live_bytes for t in points), during,
                  max(during, default=0), float(x[i]) if len(x) else 0.0, peak_node, peak_module)


def memory_timeline(report, title: str = "") -> MemoryTimeline:
    """Both timelines of ``report`` on the original graph's node axis, with the start of every block."""
    orig, comp = report.timeline["original"], report.timeline["compiled"]
    if not orig or not comp:
        raise ValueError("report: its timeline is empty; build it with fxstream.explain")
    o_starts = _block_starts(orig)
    cx, ox = _anchors(_block_marks(orig), _block_marks(comp), len(orig), len(comp))
    comp_x = np.interp(np.arange(len(comp)), cx, ox)
    series = (_series("original", orig, np.arange(len(orig)), report.original_peak_node, report.original_peak_module),
              _series("compiled", comp, comp_x, report.peak_node, report.peak_module))
    bounds = tuple(Boundary(float(i), b) for b, i in sorted(o_starts.items(), key=lambda kv: kv[1]))
    return MemoryTimeline(title, series, bounds, report.weight_bytes)


_STYLE = {"original": ("#7f7f7f", 0.25), "compiled": ("#1f77b4", 0.35)}


def plot_memory(tl: MemoryTimeline, path, dpi: int = 150) -> None:
    """Draw ``tl`` into a PNG at ``path``: bytes live per node, block starts, each peak annotated."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    top = max(s.peak_bytes for s in tl.series)
    unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    ax = fig.add_subplot()
    for s in tl.series:
        colour, alpha = _STYLE.get(s.name, ("#2ca02c", 0.3))
        x, during = np.asarray(s.x), np.asarray(s.during) / scale
        ax.fill_between(x, np.asarray(s.live) / scale, step="post", color=colour, alpha=alpha, lw=0)
        ax.step(x, during, where="post", color=colour, lw=0.9,
                label=f"{s.name}: peak {human_bytes(s.peak_bytes)}")
        ax.annotate(f"{s.name} peak {human_bytes(s.peak_bytes)}\n{s.peak_node}\n({s.peak_module or 'top level'})",
                    xy=(s.peak_x, s.peak_bytes / scale), xytext=(12, -4 if s.name == "original" else 18),
                    textcoords="offset points", fontsize=7.5, color=colour, va="top" if s.name == "original" else
                    "bottom", arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.8},
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
        ax.plot([s.peak_x], [s.peak_bytes / scale], "o", color=colour, ms=4)
    span = max(tl.series[0].x, default=1) or 1
    labelled = np.inf
    for b in reversed(tl.boundaries):  # of starts crowded together, label the last: the block that follows them
        ax.axvline(b.x, color="#bbbbbb", lw=0.6, ls="--", zorder=0)
        if labelled - b.x < _LABEL_GAP * span:
            continue
        labelled = b.x
        ax.text(b.x, 1.0, f" {b.block}", transform=ax.get_xaxis_transform(), rotation=90, fontsize=7,
                va="bottom", ha="center", color="#555555", clip_on=False)
    ax.set_ylim(0, top / scale * 1.25)
    ax.set_xlim(0, max(tl.series[0].x, default=1))
    ax.set_xlabel("node of the original exported graph (compiled graph stretched to line up block by block)")
    ax.set_ylabel(f"planned activations live ({unit})")
    ax.legend(loc="upper right", fontsize=8, title=f"weights {human_bytes(tl.weight_bytes)}, not shown",
              title_fontsize=7.5)
    ax.grid(axis="y", lw=0.3, alpha=0.5)
    if tl.title:
        fig.suptitle(tl.title, fontsize=10)
    fig.savefig(path, dpi=dpi)
