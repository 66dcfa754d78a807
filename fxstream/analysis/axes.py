"""Axes found in the graph: which dims of the inputs can be cut, and what each one means.

Every dim (of size > 1) of every tensor input is a candidate axis. Where a reshape splits a candidate across
several dims (a ``(B*F, C, H, W)`` input viewed as ``(B, F, C, H, W)`` for a temporal layer), its factors are the
candidates instead (``Cut(dim, outer, inner)``, see analysis/cuts.py). Each candidate is flooded through the rule
table (analysis/flood.py); a candidate the flood of an earlier one reaches whole (the batch of the text context is
the latent's batch) is that axis again and is dropped. What an axis means is read from the positions its flood
reaches at the ops that treat some dims as batch and others as features (NOTE [Axis names from the ops]); no table
of class names takes part. The slicer plans regions along the axes whose name has a slice count in the policy
(``policy.AXIS_KIND``); the others are reported with the reason.

NOTE [Axis names from the ops]
Each anchor op the flood reaches gives the axis a position: a convolution's batch dim, its channels, or one of its
kernel dims (counted from the last); an attention's batch dims, its sequence or its head features; a linear's rows
(every dim but the last) or its features; a norm's batch, its channels or its statistics dims. Then, first match:
  1. in a convolution's kernel dims, never in a convolution's batch: "width", "height", "frames" for the last,
     second-to-last and third-to-last kernel dim (a 3-D convolution's depth);
  2. in a convolution's batch, and somewhere mixed along (an attention's sequence, a convolution's kernel, a norm's
     statistics), or not the input's outermost dim (merged into the batch with another axis): "frames" (per-frame
     layers see it as batch, temporal layers mix along it);
  3. only ever batch-like (a convolution's, attention's or norm's batch, a linear's rows) and the input's outermost
     dim: "batch";
  4. an attention's sequence, or a linear's rows: "tokens";
  5. only channels or features: "channels";
otherwise the axis keeps its place as its name (``sample[2]``) and is not sliced.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ..errors import CantSlice
from ..graph_utils import lifted
from ..meta import BodyInput, get_meta
from .cuts import Cut
from .effects import find_effects
from .flood import Flood
from .rules import VIEWS, rule_for, val_shape

__all__ = ["Axis", "find_axes", "all_axes", "axis_floods", "frames_in_batch", "halo_sources", "describe_axis",
           "NAMED"]

# The names an axis can be given from the ops (the slicer slices these, by the policy's count for each).
NAMED = ("batch", "frames", "height", "width", "tokens")


@dataclass(frozen=True)
class Axis:
    """A cut candidate: dim ``dim`` of input ``source`` (or the factor of it with ``outer`` elements before and
    ``inner`` after), ``length`` long, named ``name`` from the ops its flood reached (``why`` says how)."""

    name: str
    source: str  # placeholder name
    dim: int
    length: int
    outer: int = 1
    inner: int = 1
    why: str = field(default="", compare=False)

    @property
    def key(self) -> tuple:
        """What identifies the axis whatever its length in one tensor or another (a strided op halves it)."""
        return self.source, self.dim, self.outer, self.inner

    @property
    def place(self) -> str:
        """Where the axis is in its input: ``sample[1]``, or ``x[0] (factor 4 of 8)`` for a factor of a dim."""
        if self.outer == 1 and self.inner == 1:
            return f"{self.source}[{self.dim}]"
        return f"{self.source}[{self.dim}] (factor {self.length} of {self.outer * self.length * self.inner})"


def describe_axis(axis: Axis) -> str:
    """``frames (sample[1]: a convolution's batch, an attention's sequence)``: the name, where, and why."""
    return f"{axis.name} ({axis.place}: {axis.why})" if axis.why else f"{axis.name} ({axis.place})"


# Where the cut sits in an anchor op's output: a function of (node, cut dim, rank) per rule kind.
def _conv_position(node: Node, d: int, nd: int):
    return "batch" if d == 0 else "channels" if d == 1 else ("kernel", nd - d)


def _attention_position(node: Node, d: int, nd: int):
    return "batch" if d < nd - 2 else "sequence" if d == nd - 2 else "features"


def _linear_position(node: Node, d: int, nd: int):
    return "features" if d == nd - 1 else "rows"


def _norm_position(node: Node, d: int, nd: int):
    if node.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.rms_norm.default):
        return "features" if d >= nd - len(node.args[1]) else "rows"
    return "batch" if d == 0 else "channels" if d == 1 else "statistics"


POSITIONS = {"conv": _conv_position, "attention": _attention_position, "linear": _linear_position,
             "norm": _norm_position}
_WHY = {"conv-batch": "a convolution's batch", "rows": "a linear's rows", "batch": "an op's batch"}


def _positions(flood: Flood) -> set:
    """Which kinds of position the flood reached: "conv-batch", ("kernel", k), "sequence", "mixed", ..."""
    seen: set = set()
    for n, c in flood.cut.items():
        rule = rule_for(n)
        if rule is None or rule.kind not in POSITIONS or not isinstance(c, Cut):
            continue
        try:
            nd = len(val_shape(n))
        except CantSlice:
            continue
        pos = POSITIONS[rule.kind](n, c.dim, nd)
        if isinstance(pos, tuple):
            seen |= {pos, "mixed"}
        elif pos == "batch" and rule.kind == "conv":
            seen.add("conv-batch")
        else:
            seen.add(pos)
            if pos in ("sequence", "statistics"):
                seen.add("mixed")
    return seen


def _name(axis: Axis, seen: set) -> tuple[str, str]:
    """(name, why) by NOTE [Axis names from the ops]."""
    kernels = sorted(k for p in seen if isinstance(p, tuple) for k in [p[1]])
    if kernels and "conv-batch" not in seen:
        k = kernels[0]
        name = {1: "width", 2: "height", 3: "frames"}.get(k)
        if name is not None:
            return name, f"a convolution's kernel dim {-k}"
    outermost = axis.dim == 0 and axis.outer == 1
    if "conv-batch" in seen and ("mixed" in seen or not outermost):
        how = "mixed as an attention's sequence" if "sequence" in seen else \
            "mixed as a convolution's kernel dim" if kernels else \
            "mixed in a norm's statistics" if "mixed" in seen else "merged with an outer batch"
        return "frames", f"a convolution's batch; {how}"
    batchlike = {"conv-batch", "batch", "rows"}
    if batchlike & seen and seen <= batchlike | {"channels", "features"} and outermost:
        return "batch", "only ever a batch (" + ", ".join(_WHY[p] for p in sorted(batchlike & seen)) + ")"
    if "sequence" in seen or "rows" in seen:
        return "tokens", "an attention's sequence" if "sequence" in seen else "a linear's rows"
    if seen and seen <= {"channels", "features"}:
        return "channels", "a convolution's channels or a linear's features"
    return axis.place, "reaches no convolution's batch or kernel dim and no attention's sequence"


def _factors(src_shape, dst_shape, cut: Cut, length: int):
    """Where a reshape splits the axis across several dims of ``dst``: [(size, inner)] for each dim of size > 1 inside
    the axis (``inner``: the axis's elements after it), else None."""
    stride = cut.inner * math.prod(src_shape[cut.dim + 1:])
    span = stride * length
    below, out = 1, []
    for e in reversed(range(len(dst_shape))):
        upto = below * dst_shape[e]
        if below >= stride and upto <= span:
            if below % stride or span % upto:
                return None
            if dst_shape[e] > 1:
                out.append((dst_shape[e], below // stride))
        elif below < stride < upto or below < span < upto:
            return None  # one dim holds part of the axis and something else: no factor is a dim of its own
        below = upto
    return out if len(out) > 1 else None


def _split_by_reshape(flood: Flood, axis: Axis) -> list[Axis]:
    """The factors of ``axis`` the first reshape that splits it shows (none if no reshape does)."""
    for n, c in flood.cut.items():
        if not isinstance(c, Cut) or flood.length[n] != axis.length:
            continue
        for u in n.users:
            if u.target not in VIEWS or u in flood.cut:
                continue
            try:
                parts = _factors(val_shape(n), val_shape(u), c, axis.length)
            except CantSlice:
                continue
            if parts:
                return [Axis("", axis.source, axis.dim, f, axis.outer * (axis.length // (f * inner)),
                             axis.inner * inner) for f, inner in parts]
    return []


def _user_inputs(gm: GraphModule):
    """Tensor inputs that are not weights, buffers or constants (nor, in a region body, taken whole)."""
    for n in gm.graph.nodes:
        if n.op != "placeholder" or lifted(n):
            continue
        b = get_meta(n, BodyInput)
        if b is not None and b.whole:
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            yield n, v


def _reached_inputs(flood: Flood, length: int) -> set:
    """(placeholder, dim, outer, inner) the flood needs cut along this axis: the same axis in another input."""
    out = set()
    for req in flood.req.values():
        for p, c in req.items():
            if p.op == "placeholder" and isinstance(c, Cut):
                out.add((p.name, c.dim, c.outer, c.inner))
    for n, c in flood.cut.items():
        if n.op == "placeholder" and isinstance(c, Cut) and flood.length[n] == length:
            out.add((n.name, c.dim, c.outer, c.inner))
    return out


@dataclass
class _Found:
    axes: list
    floods: dict  # axis key -> Flood with nothing excluded
    effects: object
    nodes: int


_FOUND: "weakref.WeakKeyDictionary[GraphModule, _Found]" = weakref.WeakKeyDictionary()


def axis_floods(gm: GraphModule) -> _Found:
    """Every axis of ``gm`` (see the module docstring), the flood of each with nothing excluded, and the graph's
    effects; made once per graph (the slicer's anchors use the same floods)."""
    found = _FOUND.get(gm)
    count = len(gm.graph.nodes)
    if found is not None and found.nodes == count:
        return found
    effects = find_effects(gm)
    axes, floods, covered = [], {}, set()

    def add(a: Axis, flood: Flood, named: tuple | None = None) -> None:
        name, why = named or _name(a, _positions(flood))
        a = Axis(name, a.source, a.dim, a.length, a.outer, a.inner, why)
        covered.update(_reached_inputs(flood, a.length))
        axes.append(a)
        floods[a.key] = flood

    for p, v in _user_inputs(gm):
        if v.numel() == 0:  # an empty tensor: nothing to slice
            continue
        for d, size in enumerate(int(s) for s in v.shape):
            if size < 2 or any(k[:2] == (p.name, d) for k in covered):
                continue  # an earlier axis reaches this dim (or a factor of it): the same axis in another input
            whole = Axis("", p.name, d, size)
            flood = Flood(gm, whole, set(), effects.pinned)
            named = _name(whole, _positions(flood))
            parts = [] if named[0] == "channels" else _split_by_reshape(flood, whole)
            if not parts:
                add(whole, flood, named)
            for a in parts:
                if a.key not in covered:
                    add(a, Flood(gm, a, set(), effects.pinned))
    found = _Found(axes, floods, effects, count)
    _FOUND[gm] = found
    return found


def all_axes(gm: GraphModule) -> list[Axis]:
    """Every axis of ``gm``'s inputs, named or not, in input order."""
    return axis_floods(gm).axes


def find_axes(gm: GraphModule, axes: list | None = None) -> list[Axis]:
    """The axes of ``gm``'s inputs that have a meaning the slicer can slice (``NAMED``), in input order
    (``axes``: the graph's axes if already found, e.g. on another copy of the same capture)."""
    return [a for a in (all_axes(gm) if axes is None else axes) if a.name in NAMED]


def halo_sources(gm: GraphModule, axes: list | None = None) -> dict:
    """Where a halo flood starts along each of its axes, as the ops name them (NOTE [Axis names from the ops]):
    {"height": Axis, "width": Axis, "frames": Axis} for those that exist as whole dims of an input. "height" and
    "width" are the first input dims so named; "frames" is dim 0 of the height's input where that dim is whole and
    named frames (or batch, with no frames axis anywhere): the frames riding in the convolutions' batch of a VAE
    decoder's ``(B*F, C, H, W)``. ``axes``: as :func:`find_axes`."""
    axes = [a for a in find_axes(gm, axes) if a.outer == a.inner == 1]
    out = {}
    for name in ("height", "width"):
        a = next((a for a in axes if a.name == name), None)
        if a is not None:
            out[name] = a
    height = out.get("height")
    if height is not None:
        lead = next((a for a in axes if a.source == height.source and a.dim == 0), None)
        if lead is not None and (lead.name == "frames" or
                                 (lead.name == "batch" and not any(a.name == "frames" for a in axes))):
            out["frames"] = lead
    return out


def frames_in_batch(gm: GraphModule, axes: list | None = None) -> bool:
    """True where the frames ride in the batch of the convolutions and the halos own the graph: the input whose
    dim the ops name height has its frames (or, with no frames axis, its batch) whole in dim 0 (a VAE decoder's
    ``(B*F, C, H, W)``; :func:`halo_sources`). Such a graph under ``Policy(halo=...)`` or ``max_memory`` is
    planned by halos (height bands, then slices of frames for what bands cannot take); anything else by cuts.
    ``axes``: as :func:`find_axes`."""
    return "frames" in halo_sources(gm, axes)
