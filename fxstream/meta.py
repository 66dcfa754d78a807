"""Every ``node.meta`` entry fxstream writes, typed: one key per class, read and written through this module.

    >>> set_meta(node, SplitNorm("group_norm_3"))
    >>> get_meta(node, SplitNorm).group_norm
    'group_norm_3'

A value is a small frozen dataclass; its key is ``"fxstream."`` and the class's snake-case name (so a graph printed
with its meta shows ``fxstream.split_norm``). Nothing else in fxstream spells a key. The entries:

- :class:`SplitNorm` on the nodes ``passes/split_group_norm.py`` makes for one GroupNorm (which one);
- :class:`BodyInput` on a region body's placeholders (``passes/group_regions.py``): whether the input is passed
  whole, so a body compiled again (a batch split) finds its latent among the sliced ones;
- :class:`CutInput` on the placeholders ``passes/step_rehash.py`` adds (the value it stands for);
- :class:`Marks` for the drawing (``fxstream.viz``): the Step Rehash cache point and the ops a rehash step skips;
- :class:`Grouped` on a grouped region's ``call_module`` node: the region it runs (a cut region of the Feature
  Slicer, or a halo region).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SplitNorm", "BodyInput", "CutInput", "Marks", "Grouped", "set_meta", "get_meta", "meta_key", "KEPT",
           "region_of", "region_id", "grouped_calls", "call_names", "KINDS"]

KINDS = ("cut", "halo")  # the kinds of grouped region (NOTE [One region model])


@dataclass(frozen=True)
class SplitNorm:
    """A node made by splitting the GroupNorm named ``group_norm`` (statistics and normalise phases)."""

    group_norm: str


@dataclass(frozen=True)
class BodyInput:
    """A placeholder of a region body: ``whole`` when every slice gets the whole value (else a slice of it)."""

    whole: bool


@dataclass(frozen=True)
class CutInput:
    """A placeholder that Step Rehash's graph cut added: it stands for the value named ``name`` of the full graph."""

    name: str


@dataclass(frozen=True)
class Marks:
    """Drawing marks: ``cache`` (the Step Rehash cache point), ``skip`` (a rehash step does not run this op)."""

    cache: bool = False
    skip: bool = False

    def names(self) -> tuple:
        return tuple(k for k in ("cache", "skip") if getattr(self, k))


@dataclass(frozen=True)
class Grouped:
    """A grouped region's call: ``kind`` is ``"cut"`` (a Feature Slicer region) or ``"halo"`` (a halo region)."""

    region: object
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Grouped.kind: expected one of {KINDS}, got {self.kind!r}")

    @property
    def id(self) -> str:
        """The region's stable id (:func:`region_id`)."""
        return region_id(self.region)


_TYPES = (SplitNorm, BodyInput, CutInput, Marks, Grouped)


def meta_key(cls: type) -> str:
    """The ``node.meta`` key of a metadata class: ``fxstream.split_norm`` for :class:`SplitNorm`."""
    return "fxstream." + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


_KEYS = {cls: meta_key(cls) for cls in _TYPES}
KEPT = (meta_key(Marks),)  # the entries a copied node keeps (graph_utils.copy_meta): marks follow an op anywhere


def set_meta(node, value) -> None:
    """Attach ``value`` (an instance of one of this module's classes) to ``node``."""
    key = _KEYS.get(type(value))
    if key is None:
        raise TypeError(f"value: expected one of {[c.__name__ for c in _TYPES]}, got {type(value).__name__}")
    node.meta[key] = value


def get_meta(node, cls: type):
    """``node``'s entry of class ``cls``, or None."""
    return node.meta.get(_KEYS[cls])


def region_id(region) -> str:
    """A name for a region (cut or halo) that is the same in every compile of one graph: its first op's node
    name."""
    return region.nodes[0].name


def grouped_calls(gm, kind: str | None = None) -> list:
    """``[(call node, Grouped)]`` of every grouped region called in ``gm``'s graph (of ``kind`` if given), in
    graph order. NOTE [One region model]: this, not a node's name, tells a region's call from any other node."""
    out = []
    for n in gm.graph.nodes:
        g = n.meta.get(_KEYS[Grouped]) if n.op == "call_module" else None
        if g is not None and (kind is None or g.kind == kind):
            out.append((n, g))
    return out


def call_names(gm, kind: str | None = None) -> dict:
    """``{region id: call node name}`` of the grouped regions called in ``gm`` (the names a memory plan's
    ``region_peaks`` use)."""
    return {g.id: n.name for n, g in grouped_calls(gm, kind)}


def region_of(node, kind: str = "cut"):
    """The region a grouped call node runs (of this ``kind``), or None for any other node."""
    g = node.meta.get(_KEYS[Grouped])
    return g.region if g is not None and g.kind == kind else None
