"""The pipeline from a captured graph to a sliced one: a straight list of steps.

capture (torch.export) -> strip asserts -> split GroupNorms -> plan slicing (analysis) -> group regions (rewrite)
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace

import torch
from torch.fx import GraphModule

from .analysis.halo import find_halo_regions
from .analysis.slicer import LAYOUTS, SlicePlan, find_axes, plan_slicing, tensor_bytes
from .errors import CaptureError
from .graph_utils import strip_asserts
from .passes.group_regions import group_regions
from .passes.halo_regions import group_halo_regions
from .passes.reuse_buffers import reuse_region_buffers
from .meta import SplitNorm, get_meta
from .passes.split_group_norm import split_group_norm, splittable_group_norms
from .policy import Policy
from .runtime import LoopRegion, set_pipeline

log = logging.getLogger(__name__)

__all__ = ["capture", "compile_graph", "CompiledGraph", "layout_of", "region_id"]


def layout_of(module: torch.nn.Module) -> str | None:
    """Layout of the video latent for a known model class (see ``LAYOUTS``), else None."""
    return LAYOUTS.get(type(module).__name__)


def capture(module: torch.nn.Module, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export`` of one forward with these keyword arguments; CaptureError quoting export's reason."""
    try:
        with torch.no_grad():
            return torch.export.export(module, (), kwargs, strict=False)
    except Exception as e:  # export raises many types; all mean the same to the user
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: {type(e).__name__}: {e}\n"
            f"called with {describe_inputs(module, kwargs)}\n"
            "If the module itself fails on these inputs, fix the inputs; otherwise fxstream needs a module that "
            "torch.export.export(module, (), kwargs, strict=False) accepts."
        ) from e


def describe_inputs(module: torch.nn.Module, kwargs: dict) -> str:
    """``sample: float32 (2, 4, 8, 16, 16), timestep: 700.0, ...; weights: float32 on cpu`` for error messages."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).removeprefix('torch.')} {tuple(v.shape)}" + \
                ("" if v.device.type == "cpu" else f" on {v.device}")
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    p = next(module.parameters(), None)
    weights = "none" if p is None else f"{str(p.dtype).removeprefix('torch.')} on {p.device}"
    return ", ".join(f"{k}: {one(v)}" for k, v in kwargs.items()) + f"; weights: {weights}"


@dataclass
class CompiledGraph:
    """The result of compiling one captured graph: the graph to run, the plan, and the graph it came from."""

    graph_module: GraphModule
    plan: SlicePlan
    original: GraphModule
    prepared: GraphModule  # after the preparing passes, before grouping (what the plan's nodes belong to)
    inner: list = field(default_factory=list)  # CompiledGraphs of batch-region bodies (one per slice size)
    halo: list = field(default_factory=list)  # HaloRegions grouped at the top level (Policy(halo=...))
    halo_reasons: dict = field(default_factory=dict)  # node name -> why halo slicing left it out


def _loops(gm: GraphModule) -> list:
    return [m for m in gm.children() if isinstance(m, LoopRegion)]


def _prepare(gm: GraphModule, split: set) -> GraphModule:
    gm = copy.deepcopy(gm)
    strip_asserts(gm)
    if split:
        split_group_norm(gm, split)
    return gm


def compile_graph(gm: GraphModule, policy: Policy, layout: str | None, counts: dict | None = None,
                  inner_counts: list | None = None, halo_keep: int | None = None) -> CompiledGraph:
    """Slice ``gm`` (an exported graph with fake metadata) under ``policy``. ``Policy()`` returns it unchanged.

    With a batch split and other slicing both asked for, the batch is split first and each batch region's body
    (the graph for part of the batch) is compiled again with the rest of the policy: regions inside regions.
    ``counts`` ({region id: slice count}, see :func:`region_id`) overrides the policy's count for single regions (1: leave the
    region unsliced); ``inner_counts`` does the same for each inner graph, in the order of ``inner``.
    ``halo_keep``: with ``Policy(halo=...)``, halo regions are cut where one value of at most this many bytes
    crosses (it is kept whole; see :func:`fxstream.analysis.halo.find_halo_regions`). Default: the graph's
    largest activation over the halo count, about one band's size, so keeping a block's output whole costs about
    what its slices hold anyway and saves the statistics passes behind it from recomputing the block.
    """
    if not policy.slices_anything:
        return CompiledGraph(gm, SlicePlan([], {}), gm, gm)
    cg = _compile(gm, policy, layout, counts, inner_counts)
    set_pipeline(cg.graph_module, policy.pipeline, policy.cpu_workers)
    if policy.halo_tiles > 1:
        rows, cols = policy.halo_grid
        if halo_keep is None:
            biggest = max((tensor_bytes(n) for n in cg.graph_module.graph.nodes if n.op == "call_function"),
                          default=0)
            halo_keep = biggest // policy.halo_tiles
        cg.halo, why = find_halo_regions(cg.graph_module, rows, policy.min_region_fraction, keep_bytes=halo_keep,
                                         cols=cols)
        cg.halo_reasons = {n.name: f"{'height' if cols == 1 else 'height x width'} (halo): {r}"
                           for n, r in why.items()}
        frames = policy.count_for("spatial")
        if frames > 1 and not find_axes(gm, layout):
            # what height halos could not take (a decoder's attention over each frame's pixels), along frames
            taken = {n for r in cg.halo for n in r.nodes}
            more, why = find_halo_regions(cg.graph_module, frames, policy.min_region_fraction, exclude=taken, axis=0)
            for n, r in why.items():
                if n not in taken:
                    cg.halo_reasons.setdefault(n.name, f"frames (halo): {r}")
            for n in (n for r in more for n in r.nodes):
                cg.halo_reasons.pop(n.name, None)
            cg.halo += more
        cg.graph_module = group_halo_regions(cg.graph_module, cg.halo)
    return cg


def _compile(gm: GraphModule, policy: Policy, layout: str | None, counts, inner_counts) -> CompiledGraph:
    rest = replace(policy, batch=None, halo=None)
    if policy.count_for("batch") > 1 and rest.slices_anything:
        outer = compile_graph(gm, Policy(batch=policy.batch, min_region_fraction=policy.min_region_fraction), layout)
        k = 0
        for loop in _loops(outer.graph_module):
            for key, body in list(loop.bodies.items()):
                inner = compile_graph(body, rest, layout, (inner_counts or [None] * (k + 1))[k])
                loop.bodies[key] = inner.graph_module
                outer.inner.append(inner)
                k += 1
        return outer
    # GroupNorms are split only where a region uses the split (unsliced ops stay as they were): plan with all
    # candidates split, then again with just the ones used, until the set is stable.
    split = set(splittable_group_norms(gm)) if policy.count_for("temporal") > 1 else set()
    for _ in range(4):
        prepared = _prepare(gm, split)
        plan = plan_slicing(prepared, policy, layout)
        used = {get_meta(n, SplitNorm).group_norm for r in plan.regions for n in r.nodes if get_meta(n, SplitNorm)}
        if used == split:
            break
        split = used
    else:
        prepared = _prepare(gm, split)
        plan = plan_slicing(prepared, policy, layout)
    if counts:
        plan = _with_counts(plan, counts)
    out = reuse_region_buffers(group_regions(prepared, plan))
    log.info("compiled: %d regions", len(plan.regions))
    return CompiledGraph(out, plan, gm, prepared)


def region_id(region) -> str:
    """A name for a region that is the same in every compile of one graph: its first op's node name."""
    return region.nodes[0].name


def _with_counts(plan: SlicePlan, counts: dict) -> SlicePlan:
    """The plan with per-region slice counts; a region given 1 slice is left out (its ops run whole)."""
    regions, reasons = [], dict(plan.reasons)
    for r in plan.regions:
        c = counts.get(region_id(r), r.count)
        if c > 1:
            regions.append(replace(r, count=min(c, r.axis.length)))
        else:
            for n in r.nodes:
                reasons[n] = f"{r.axis.name}: the memory budget is met without slicing here"
    return SlicePlan(regions, reasons)
