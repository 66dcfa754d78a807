"""Memory budget: choose the slicing whose planned peak fits ``Policy(max_memory=...)``. Decides; rewrites nothing.

1. *Floor of a structure.* Compile with every slice count at its upper limit (the policy's counts, else one
   element of the axis per slice) and plan it. Two structures are tried: the whole video batch at once, and the
   batch split into parts (each part compiled as a graph of its own, regions inside regions). The smaller floor
   is the lower bound: no slicing of one element per slice or more plans below it (slices within one element,
   NOTE [Slices within one element], are neither searched nor bounded here).
2. *Fewest slices per region.* While a region runs, the bytes live are the whole values around it (they do not
   depend on slice counts) plus its working set, which grows with the slice size. The working set at the
   floor's slice size, scaled to other sizes, gives the largest slice that fits; a region that fits whole is
   left unsliced.
3. *Slices in flight.* ``Policy(pipeline=k)`` is the most: the floors are planned with ``k`` working sets per
   region, and ``k`` is halved until one fits.
4. *Least expected slowdown.* Among structures that fit, the one with the fewest op launches (a region's ops
   run once per slice; a batch split runs everything inside it once per part). Its compile is planned again
   exactly, and a region still over the budget gets twice the slices until the plan fits.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, replace

from torch.fx import GraphModule

from .analysis.axes import find_axes, frames_in_batch, halo_sources
from .compiler import CompiledGraph, axes_of, compile_graph
from .meta import call_names, grouped_calls, region_id
from .errors import HostMemoryError, MemoryBudgetError
from .memory import MemoryPlan, plan_memory
from .policy import Policy, format_bytes
from .halo_runtime import set_line_buffers
from .runtime import set_in_flight

log = logging.getLogger(__name__)

__all__ = ["compile_for", "choose_slicing", "lower_bound", "Floor", "choose_halo", "halo_lower_bound", "HALO_CAP",
           "deferred_bound"]

_NO_LIMIT = 1 << 30  # "as many slices as the axis has elements"


@dataclass
class Floor:
    """A structure compiled at its upper-limit slice counts, and its plan."""

    batch: int | None
    compiled: CompiledGraph
    plan: MemoryPlan

    @property
    def peak_bytes(self) -> int:
        return self.plan.peak_bytes


def _caps(policy: Policy, batch: int | None, pipeline: int = 1) -> Policy:
    return Policy(slices=policy.slices or _NO_LIMIT, spatial=policy.spatial, temporal=policy.temporal,
                  batch=batch, pipeline=pipeline, cpu_workers=policy.cpu_workers,
                  min_region_fraction=policy.min_region_fraction)


def _batch_choices(gm: GraphModule, policy: Policy) -> list:
    size = next((a.length for a in find_axes(gm, axes_of(gm)) if a.name == "batch"), 1)
    parts = policy.batch if policy.batch is not None else size
    return [None] + ([parts] if size > 1 and parts > 1 else [])


def floor(gm: GraphModule, policy: Policy, batch: int | None) -> Floor:
    """The structure at its upper-limit counts, one slice in flight."""
    cg = compile_graph(gm, _caps(policy, batch), check_peak=False, cut_within=False)
    return Floor(batch, cg, plan_memory(cg.graph_module))


def _in_flight(f: Floor, k: int) -> Floor:
    """The same floor planned with ``k`` slices in flight per region (nothing is compiled again)."""
    return f if k == 1 else Floor(f.batch, f.compiled, plan_memory(f.compiled.graph_module, in_flight=k))


def lower_bound(gm: GraphModule, policy: Policy) -> Floor:
    """The floor of the most divided structure the policy allows (see the module docstring)."""
    return floor(gm, policy, _batch_choices(gm, policy)[-1])


def _graphs(f: Floor, budget: int, k: int = 1):
    """(compiled graph, its plan, activation budget for it) for each graph whose regions get counts."""
    if not f.compiled.inner:
        return [(f.compiled, f.plan, budget)]
    out = []
    loops = [n for n, _ in grouped_calls(f.compiled.graph_module, "cut")]
    i = 0
    for n in loops:
        loop = f.compiled.graph_module.get_submodule(n.target)
        around = f.plan.region_peaks[n.name] - f.plan.region_working_bytes[n.name]
        for _ in loop.bodies:
            inner = f.compiled.inner[i]
            out.append((inner, plan_memory(inner.graph_module, in_flight=k), budget - around))
            i += 1
    return out


def _fit_counts(cg: CompiledGraph, plan: MemoryPlan, budget: int) -> dict:
    counts, names = {}, call_names(cg.graph_module, "cut")
    for r in cg.plan.regions:
        name = names[region_id(r)]
        work = plan.region_working_bytes[name]
        room = budget - (plan.region_peaks[name] - work)
        n_cap = max(n for _, n in r.bounds)
        n = r.axis.length if work <= 0 else min(r.axis.length, max(n_cap, room * n_cap // work))
        counts[region_id(r)] = math.ceil(r.axis.length / n)
    return counts


def _launches(cg: CompiledGraph, counts: dict) -> int:
    inside = sum(len(r.nodes) for r in cg.plan.regions)
    ops = sum(1 for n in cg.prepared.graph.nodes if n.op == "call_function") - inside
    return ops + sum(counts.get(region_id(r), r.count) * len(r.nodes) for r in cg.plan.regions)


def choose_slicing(gm: GraphModule, policy: Policy, weight_bytes: int) -> tuple[CompiledGraph, Floor]:
    """Compile ``gm`` with the cheapest slicing whose planned peak plus ``weight_bytes`` fits
    ``policy.max_memory``; MemoryBudgetError when none can. Returns the compiled graph and the lower bound."""
    budget = policy.max_memory - weight_bytes
    floors = [floor(gm, policy, b) for b in _batch_choices(gm, policy)]
    lowest = min(floors, key=lambda f: f.peak_bytes)
    if budget < lowest.peak_bytes:
        raise MemoryBudgetError(
            f"Policy.max_memory={format_bytes(policy.max_memory)} cannot be met: the weights take "
            f"{format_bytes(weight_bytes)} and no slicing the budget searches plans the activations below "
            f"{format_bytes(lowest.peak_bytes)} (lower bound), so at least "
            f"{format_bytes(weight_bytes + lowest.peak_bytes)} is needed. Raise max_memory, or make the input "
            f"smaller (frames, resolution, batch) or the dtype narrower.",
            max_memory=policy.max_memory, weight_bytes=weight_bytes, lower_bound_bytes=lowest.peak_bytes)
    if plan_memory(gm).peak_bytes <= budget:
        return compile_graph(gm, Policy()), lowest
    # slices in flight: the most the policy allows whose floor fits (each one holds a working set of its own)
    k = policy.pipeline
    while k > 1 and min(_in_flight(f, k).peak_bytes for f in floors) > budget:
        k //= 2
    floors = [_in_flight(f, k) for f in floors]
    best = None
    for f in floors:
        if f.peak_bytes > budget:
            continue
        graphs = _graphs(f, budget, k)
        counts = [_fit_counts(cg, plan, b) for cg, plan, b in graphs]
        cost = sum(_launches(cg, c) for (cg, _, _), c in zip(graphs, counts))
        if f.batch is not None:  # ops outside the batch regions run once
            cost += _launches(f.compiled, {})
        if best is None or cost < best[0]:
            best = (cost, f, counts)
    _, f, counts = best
    for attempt in range(6):
        pol = _caps(policy, f.batch, k)
        if f.batch is None:
            cg = compile_graph(gm, pol, counts=counts[0], check_peak=False, cut_within=False)
        else:
            cg = compile_graph(gm, pol, inner_counts=counts, check_peak=False, cut_within=False)
        fitted = Floor(f.batch, cg, plan_memory(cg.graph_module))
        if fitted.peak_bytes <= budget:
            log.info("budget %s met with batch=%s after %d compiles", format_bytes(budget), f.batch, attempt + 1)
            return cg, lowest
        # the scaled working sets were optimistic somewhere: double the slices of every region over budget
        changed = False
        for (g, plan, b), c in zip(_graphs(fitted, budget, k), counts):
            names = call_names(g.graph_module, "cut")
            for r in g.plan.regions:
                if plan.region_peaks[names[region_id(r)]] > b and r.count < r.axis.length:
                    c[region_id(r)] = min(r.axis.length, 2 * r.count)
                    changed = True
        if not changed:
            break
    log.info("budget %s: using the floor's slicing (batch=%s)", format_bytes(budget), f.batch)
    set_in_flight(f.compiled.graph_module, k, policy.cpu_workers)  # the floor fits by construction, k in flight
    f.compiled.made_with = replace(f.compiled.made_with, in_flight=k)
    return f.compiled, lowest


# --- halo slicing (graphs without a named video axis: a VAE decoder) ---------------------------------------------

HALO_CAP = 64  # the most halo slices the budget tries when the policy sets none


def _halo_counts(policy: Policy) -> list[int]:
    """Tile counts the budget tries: doubling from 2 up to the policy's (``HALO_CAP`` if it sets none)."""
    cap = policy.halo_tiles if policy.halo is not None else HALO_CAP
    out, c = [], 2
    while c < cap:
        out.append(c)
        c *= 2
    return out + [cap]


def _pow2_upto(cap: int) -> list[int]:
    out, c = [], 1
    while c < cap:
        out.append(c)
        c *= 2
    return out + [cap]


def _halo_grids(policy: Policy, height: int, width: int) -> list[list[tuple[int, int]]]:
    """Grids the budget tries, grouped by tile count (ascending): for each count, bands of rows and the grid
    whose tiles are closest to square in pixels (smallest halos per tile; a ``height x width`` image). An int
    ``Policy.halo`` caps the tiles in all, a pair the rows and the columns."""
    if isinstance(policy.halo, tuple):
        rmax, cmax = policy.halo
        shapes = [(r, c) for r in _pow2_upto(rmax) for c in _pow2_upto(cmax) if r * c > 1]
    else:
        counts = _halo_counts(policy)
        shapes = [(t // c, c) for t in counts for c in _pow2_upto(t) if t % c == 0]
    by_count: dict = {}
    for r, c in shapes:
        by_count.setdefault(r * c, []).append((r, c))
    out = []
    for t in sorted(by_count):
        grids = by_count[t]
        square = min(grids, key=lambda g: (abs(math.log((height / g[0]) / (width / g[1]))), g))
        out.append(list(dict.fromkeys([g for g in grids if g[1] == 1] + [square])))
    return out


def _halo_lengths(gm: GraphModule) -> dict:
    """{"frames", "height", "width": length} of a captured decoder graph's halo axes, as the ops name them
    (:func:`~fxstream.analysis.axes.halo_sources`; 1 where there is no such axis)."""
    sources = halo_sources(gm, axes_of(gm))
    return {k: sources[k].length if k in sources else 1 for k in ("frames", "height", "width")}


def _image_size(gm: GraphModule) -> tuple[int, int]:
    lengths = _halo_lengths(gm)
    return lengths["height"], lengths["width"]


def _frame_counts(gm: GraphModule, policy: Policy) -> list[int]:
    """Slice counts along the frames (riding in the latents' dim 0) the budget tries for what height halos cannot
    take (a decoder's attention over each frame): 1, then doubling up to ``Policy.spatial`` (``slices``), or to the
    frame count when the policy sets neither."""
    frames = _halo_lengths(gm)["frames"]
    cap = min(policy.spatial or policy.slices or frames, frames)
    return [1] + [c for c in _pow2_upto(cap) if c > 1]


def _halo_policy(policy: Policy, grid: tuple[int, int], frames: int = 1, park: bool = False) -> Policy:
    return replace(policy, halo=grid if grid[1] > 1 else grid[0], max_memory=None, slices=None,
                   spatial=frames if frames > 1 else None, host_memory=policy.host_memory if park else None)


def _floor(gm: GraphModule, policy: Policy) -> float:
    """The planned peak of ``gm`` compiled under ``policy`` with nothing kept whole (infinite where the host budget
    holds no parked value)."""
    try:
        return plan_memory(compile_graph(gm, policy, halo_keep=0, check_peak=False, line_buffers=False)
                           .graph_module).peak_bytes
    except HostMemoryError:
        return math.inf


def _parks(policy: Policy) -> list[bool]:
    """Whether the budget plans halo regions parking values in host memory: only where the policy gives some."""
    return [False, True] if policy.host_memory else [False]


def _keep_choices(gm: GraphModule, policy: Policy) -> list[int]:
    """Sizes of the values a halo region could keep whole at a checkpoint, largest first, then 0 (none)."""
    from .analysis.halo import checkpoints, find_halo_regions
    regions, _ = find_halo_regions(compile_graph(gm, Policy()).graph_module, 2, policy.min_region_fraction,
                                   axes=axes_of(gm))
    sizes = set()
    for r in regions:
        for c in checkpoints(r.nodes, r.inside, 1 << 62):
            v = c.meta["val"]
            sizes.add(v.numel() * v.element_size())
    return sorted(sizes, reverse=True) + [0]


def halo_lower_bound(gm: GraphModule, policy: Policy) -> Floor:
    """The halo floor: the most tiles the policy allows (``HALO_CAP`` when it sets none), as bands and as the
    squarest grid, nothing kept whole (with ``Policy.host_memory``: also with values parked); the lowest plan."""
    best = None
    for grid, park in itertools.product(_halo_grids(policy, *_image_size(gm))[-1], _parks(policy)):
        try:
            cg = compile_graph(gm, _halo_policy(policy, grid, _frame_counts(gm, policy)[-1], park), halo_keep=0,
                               check_peak=False, line_buffers=False)
        except HostMemoryError:  # nothing fits the host budget: the plan without parking stands
            continue
        floor = Floor(None, cg, plan_memory(cg.graph_module))
        if best is None or floor.peak_bytes < best.peak_bytes:
            best = floor
    return best


# NOTE [Planned time of a decode]: the budget weighs recomputing against parking in host memory by time: the
# planned FLOPs at a compute rate plus the bytes parked and read back at a copy rate (both directions counted in
# turn, as if no copy overlapped compute). A graph planned on the meta device or on CUDA is planned for a GPU:
# the rate measured on one H200 (``distributed.H200_SVD_FLOPS_PER_S``: the UNet's, taken for the decoder as an
# assumption) and the host link of an H200 SXM host (PCIe 5.0 x16, ``distributed.LINKS["pcie5"]``, 80% of one
# direction). On the CPU the host is the same memory and a copy is a memcpy: the rates measured on this project's
# 2-core machine (``python tools/bench_decoder.py --rates``: a 3x3 convolution of a decoder's upper block in
# float32, 1.5e11-1.6e11 FLOP/s; a band written into a whole-size buffer and read back, 3.8e9-8.6e9 B/s: the
# lower copy rate taken). Without host memory the time orders compiles as their FLOPs do.
CPU_FLOPS_PER_S = 1.55e11
CPU_COPY_BYTES_PER_S = 4.0e9


def _rates(gm: GraphModule) -> tuple[float, float]:
    """(FLOP/s, host copy bytes/s) of the device ``gm``'s inputs are on (NOTE [Planned time of a decode])."""
    from .distributed import H200_SVD_FLOPS_PER_S, LINKS
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and hasattr(v, "device"):
            if v.device.type == "cpu":
                return CPU_FLOPS_PER_S, CPU_COPY_BYTES_PER_S
            break
    return H200_SVD_FLOPS_PER_S, LINKS["pcie5"].bytes_per_s


def _halo_cost(cg: CompiledGraph, flops: dict) -> tuple[float, float, int]:
    """(planned seconds, planned FLOPs, host bytes copied per call) of a compiled graph with halo regions (NOTE
    [Planned time of a decode])."""
    inside, total, traffic = set(), 0.0, 0
    for n, _ in grouped_calls(cg.graph_module, "halo"):
        loop = cg.graph_module.get_submodule(n.target)
        names = {m.name for m in loop.region.nodes}
        inside |= names
        hp = loop.plan(flops)
        total += hp.compute_factor * sum(flops.get(m, 0) for m in names)
        traffic += hp.host_traffic
    total += sum(v for k, v in flops.items() if k not in inside)
    compute, copy = _rates(cg.prepared)
    return total / compute + traffic / copy, total, traffic


# NOTE [Line buffers in the halo budget]
# A compile sets its halo loops' line buffers by its own rule (on where they do not raise its planned peak: a
# simulation of every loop with them, on top of the one without). The budget's search compiles a decoder tens to
# hundreds of times and keeps one: its tries (``choose_halo``, the floors) compile without line buffers and are
# checked against the budget by the peak planned without them; the ones that fit get them set under the budget
# (``set_line_buffers(gm, budget)``: on wherever the loop's planned peak with them stays within it), as the plan
# cache replays. A try that would fit only with line buffers on is not taken: none did in the full-size SVD-XT
# pipeline plan (136 compiles, the peak with them by the compile's rule equal to the peak without in every one),
# where they took 15.8 s of its 60 s on 2 cores.
def choose_halo(gm: GraphModule, policy: Policy, weight_bytes: int) -> tuple[CompiledGraph, int]:
    """Halo slicing under ``policy.max_memory``: the fewest slices along frames (for what height halos cannot
    take, such as an attention over each frame) whose floor fits; then for each checkpoint size (values up to it
    kept whole; with ``Policy.host_memory`` also: nothing kept whole, GroupNorm inputs parked in host memory), the
    fewest tiles (bands of rows, or the squarest grid) whose planned peak plus ``weight_bytes`` fits; of those, the
    one with the least planned time (NOTE [Planned time of a decode]: FLOPs with halo rows and statistics passes
    recomputed, and host copies). Returns
    the compiled graph and the lower bound (None: not computed); MemoryBudgetError with both figures when nothing
    fits."""
    from .analysis.cost import node_flops
    budget = policy.max_memory - weight_bytes
    if plan_memory(gm).peak_bytes <= budget:
        return compile_graph(gm, Policy()), None
    best_peak, best, flops = None, None, None
    grids = _halo_grids(policy, *_image_size(gm))
    for frames in _frame_counts(gm, policy):
        # the floor of this frame count (finest grid, nothing kept whole) first: no finer search where it misses
        floor = min(_floor(gm, _halo_policy(policy, grids[-1][-1], frames, park)) for park in _parks(policy))
        best_peak = floor if best_peak is None else min(best_peak, floor)
        if floor > budget:
            continue
        choices = [(0, True)] if policy.host_memory else []
        for keep, park in choices + [(keep, False) for keep in _keep_choices(gm, policy)]:
            for group in grids:
                fit = False
                for grid in group:
                    try:
                        cg = compile_graph(gm, _halo_policy(policy, grid, frames, park), halo_keep=keep,
                                           check_peak=False, line_buffers=False)
                    except HostMemoryError:  # nothing fits the host budget: this choice is the one without
                        continue
                    peak = plan_memory(cg.graph_module).peak_bytes
                    best_peak = min(best_peak, peak)
                    if peak <= budget:
                        fit = True
                        set_line_buffers(cg.graph_module, budget)  # where the budget has room for them
                        cg.made_with = replace(cg.made_with, line_buffers=budget)
                        flops = node_flops(cg.prepared) if flops is None else flops
                        cost = _halo_cost(cg, flops)
                        if best is None or cost[0] < best[0][0]:
                            best = (cost, cg, grid, keep, frames)
                if fit:
                    break
        if best is not None:
            break
    if best is not None:
        (seconds, work, traffic), cg, grid, keep, frames = best
        log.info("halo budget %s met: %dx%d tiles, %d slices along frames, values up to %s kept whole, %.2fx "
                 "planned FLOPs, %s copied to and from host memory, %.3f s planned", format_bytes(budget), *grid,
                 frames, format_bytes(keep), work / max(sum(flops.values()), 1), format_bytes(traffic), seconds)
        return cg, None
    raise MemoryBudgetError(
        f"Policy.max_memory={format_bytes(policy.max_memory)} cannot be met: the weights take "
        f"{format_bytes(weight_bytes)} and halo slicing (up to {_halo_counts(policy)[-1]} tiles, as bands of rows "
        f"or a grid, and up to {_frame_counts(gm, policy)[-1]} slices of frames) plans the activations no lower "
        f"than {format_bytes(best_peak)}, so at least {format_bytes(weight_bytes + best_peak)} is needed. Raise max_memory or Policy.halo, or decode fewer "
        f"frames or a smaller resolution at once.",
        max_memory=policy.max_memory, weight_bytes=weight_bytes, lower_bound_bytes=best_peak)


def _video(gm: GraphModule) -> bool:
    """Whether the budget slices ``gm`` by cuts (the video search above): it has a frames or tokens axis that does
    not ride in its convolutions' batch. Otherwise (a VAE decoder, an image network) halos do
    (:func:`choose_halo`); see :func:`fxstream.analysis.axes.frames_in_batch`."""
    axes = axes_of(gm)
    return not frames_in_batch(gm, axes) and any(a.name in ("frames", "tokens") for a in find_axes(gm, axes))


def compile_for(gm: GraphModule, policy: Policy, weights: int) -> tuple[CompiledGraph, object]:
    """Compile ``gm`` under ``policy``: with ``max_memory``, the search above chooses the counts (halo slicing along
    height when the graph is not a video by :func:`_video`: a VAE decoder); else the policy's counts as given. Returns the
    compiled graph and its lower bound (bytes, or a function computing them on demand: a lower bound is a compile).
    The compiled graph's ``made_with`` is the one compile that made it (:mod:`fxstream.plan_cache` replays it)."""
    video = _video(gm)
    if policy.max_memory is not None and not video:
        compiled, bound = choose_halo(gm, policy, weights)
        return compiled, bound if bound is not None else deferred_bound(gm, policy, video)
    if policy.max_memory is None and policy.halo and not video:
        return compile_graph(gm, policy), deferred_bound(gm, policy, video)
    if policy.max_memory is not None:
        compiled, lowest = choose_slicing(gm, policy, weights)
        return compiled, lowest.peak_bytes
    return compile_graph(gm, policy), deferred_bound(gm, policy, video)


def deferred_bound(gm: GraphModule, policy: Policy, video: bool | None = None):
    """The lower bound :func:`compile_for` gives where it computes none: a function computing it on demand (the
    halo floor for a graph without a named video axis, else :func:`lower_bound`)."""
    if video is None:
        video = _video(gm)
    if not video and (policy.max_memory is not None or policy.halo):
        return lambda: halo_lower_bound(gm, policy).peak_bytes
    return lambda: lower_bound(gm, policy).peak_bytes
