"""The compile driver: from a captured graph to a sliced one, as a literal list of named steps.

:data:`STEPS` is the recipe. Each step is a function ``(GraphModule, Job) -> GraphModule``: a pass returns the
rewritten graph, an analysis returns its input unchanged and leaves its result on the :class:`Job` (the plan, the
halo regions) for the passes after it. :func:`compile_graph` is the one place that reads a :class:`Policy`: it
turns it into a Job (slice counts per axis, region floor, slices in flight, halo grid) and runs the steps; the
analyses and passes receive those values, never the policy. After every step the graph is linted
(``graph.lint()``); with the environment variable ``FXSTREAM_DUMP=DIR`` each step's graph is written to
``DIR/compile-PID-NNN/MM-step.txt`` (one folder per compile of a process, one numbered file per step); each step's
time is logged (``logging`` at INFO, logger ``fxstream.compiler``); a step that raises has its
name and number added to the error (``add_note``). The memory budget (:mod:`fxstream.budget`) searches over
policies and calls :func:`compile_graph` for each one it tries.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch.fx import GraphModule

from .analysis.halo import choose_parked, find_halo_regions, parkable
from .halo_runtime import set_line_buffers
from .analysis.axes import all_axes, frames_in_batch
from .analysis.slicer import SlicePlan, plan_slicing, tensor_bytes, would_split
from .errors import CaptureError, HostMemoryError
from .graph_utils import copy_module, fake_mode_of, propagate_meta, strip_asserts
from .passes.fill_views import functionalize_fills
from .passes.group_regions import group_regions
from .passes.halo_regions import group_halo_regions
from .passes.reuse_buffers import reuse_region_buffers
from .meta import SplitNorm, call_names, get_meta, grouped_calls, region_id
from .passes.recompute_queries import recompute_queries, shared_chains
from .passes.split_group_norm import split_group_norm, splittable_group_norms
from .policy import AXIS_KIND, Policy, format_bytes
from .runtime import LoopRegion, set_in_flight

log = logging.getLogger(__name__)

__all__ = ["capture", "compile_graph", "CompiledGraph", "MadeWith", "axes_of", "region_id", "Job", "Step", "STEPS",
           "run_steps"]


def capture(module: torch.nn.Module, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export`` of one forward with these keyword arguments; CaptureError quoting export's reason.

    Nodes' stack traces are not recorded (``torch.fx.config.do_not_emit_stack_traces`` while it runs): nothing
    here reads them, and they cost 1.1 s of full-size SVD's 6.7 s capture on 2 cores (a Python traceback
    extracted and formatted per node). ``nn_module_stack`` (where a node comes from, for reports) is kept."""
    try:
        with torch.no_grad(), _no_stack_traces():
            return torch.export.export(module, (), kwargs, strict=False)
    except Exception as e:  # export raises many types; all mean the same to the user
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: {type(e).__name__}: {e}\n"
            f"called with {describe_inputs(module, kwargs)}\n"
            "If the module itself fails on these inputs, fix the inputs; otherwise fxstream needs a module that "
            "torch.export.export(module, (), kwargs, strict=False) accepts."
        ) from e


_TRACES = threading.Lock()
_TRACES_OFF = [0, None]  # captures running, the setting they found before the first


@contextlib.contextmanager
def _no_stack_traces():
    """``torch.fx.config.do_not_emit_stack_traces`` set while any capture runs (captures on several threads: the
    setting found before the first is put back after the last)."""
    import torch.fx.config as fx_config
    with _TRACES:
        if _TRACES_OFF[0] == 0:
            _TRACES_OFF[1] = fx_config.do_not_emit_stack_traces
            fx_config.do_not_emit_stack_traces = True
        _TRACES_OFF[0] += 1
    try:
        yield
    finally:
        with _TRACES:
            _TRACES_OFF[0] -= 1
            if _TRACES_OFF[0] == 0:
                fx_config.do_not_emit_stack_traces = _TRACES_OFF[1]


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
    made_with: MadeWith | None = None  # the compile_graph arguments that made it (what the plan cache replays)
    recomputed: int = 0  # chains copied for attention queries (NOTE [Queries recompute what they share ...])
    within: list = field(default_factory=list)  # (region node name, CompiledGraph) of each one-element body cut
    # again along its own axes (NOTE [Slices within one element]), in the order of the regions


@dataclass(frozen=True)
class MadeWith:
    """The arguments of the :func:`compile_graph` call that made a :class:`CompiledGraph` (copies of the counts):
    ``compile_graph(gm, m.policy, m.counts, m.inner_counts, m.halo_keep)`` makes it again from the same
    graph. ``in_flight``: slices in flight set on its loops afterwards (``runtime.set_in_flight``; the budget's
    floor fallback), None if not; ``line_buffers``: the ceiling its halo loops' line buffers were set under
    afterwards (``halo_runtime.set_line_buffers``; the budget's), None if not; ``norms``: the names of the
    GroupNorms each run of the compile driver's steps split, in the order ``compile_graph`` made them (the sets
    ``step_split_group_norm`` settled on, None where it searched none; given back to ``compile_graph``, each is
    checked with one plan instead of searched: NOTE [Split GroupNorms replayed]).
    :mod:`fxstream.plan_cache` stores and replays it."""

    policy: Policy
    counts: dict | None = None
    inner_counts: list | None = None
    halo_keep: int | None = None
    in_flight: int | None = None
    check_peak: bool = True
    line_buffers: int | None = None  # the ceiling the budget set the halo loops' line buffers under (None: the
    # compile's own rule, halo_runtime.set_line_buffers)
    norms: tuple | None = None
    cut_within: bool = True  # regions asked for more slices than elements cut their bodies again (NOTE [Slices
    # within one element]); the budget's compiles do not


@dataclass
class Job:
    """What one compile needs, read from the policy once by :func:`compile_graph`, and what its analyses found."""

    counts: dict  # axis name ("frames", "height", "width", "batch", "tokens") -> slice count (1: not sliced)
    min_fraction: float  # a region's largest interior value must be at least this fraction of the largest one
    in_flight: int = 1
    cpu_workers: bool | None = None
    region_counts: dict | None = None  # region id -> slice count (the budget's choice; 1 leaves it whole)
    inner: Policy | None = None  # a batch split: the policy each batch region's body is compiled with
    inner_counts: list | None = None  # region counts of each body, in order
    halo_grid: tuple = (1, 1)  # (rows, columns) of halo tiles
    halo_frames: int = 1  # halo regions along frames for what height halos cannot take (a decoder's attention)
    halo_keep: int | None = None
    host_memory: int | None = None  # Policy.host_memory: halo regions park GroupNorm inputs within it
    halo_ranks: int = 1  # Policy.halo_ranks: the ranks the halo bands spread over (NOTE [Checkpoints across ranks])
    # found by the steps
    axes: list | None = None  # every axis of the graph's inputs (named from the ops; step 0 finds them)
    left_whole: dict = field(default_factory=dict)  # region id -> why: regions left whole (they raised the peak)
    raised: list = field(default_factory=list)  # (graph, region): those regions, as planned on that graph
    check_peak: bool = True  # the compile_graph argument, passed on to the bodies of a batch split
    line_buffers: bool = True  # the compile_graph argument: halo loops' line buffers by the compile's own rule
    norms_given: tuple | None = None  # the GroupNorms this run of the steps split when first compiled, if known
    norms: tuple | None = None  # the GroupNorms split (names), where the step searched or checked them
    split: bool = False  # cut regions where they hold too much (NOTE [Regions split where they hold too much])
    recompute: bool = False  # queries recompute what they share with keys and values (passes/recompute_queries.py)
    cut_within: bool = True  # the compile_graph argument (NOTE [Slices within one element]), passed on to bodies
    prepared: GraphModule | None = None
    plan: SlicePlan | None = None
    planned: GraphModule | None = None  # the graph the plan was made on (a plan of the same graph is reused)
    bodies: list = field(default_factory=list)  # CompiledGraphs of the batch regions' bodies
    within: list = field(default_factory=list)  # (region node, CompiledGraph): bodies cut within (NOTE [Slices ...])
    halo: list = field(default_factory=list)
    halo_reasons: dict = field(default_factory=dict)

    @property
    def splits_norms(self) -> bool:
        return self.counts.get("height", 1) > 1 or self.counts.get("width", 1) > 1


# -- the steps -----------------------------------------------------------------------------------------------------
_STRIPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # captured graph -> (its code, stripped copy)


def step_strip_asserts(gm: GraphModule, job: Job) -> GraphModule:
    """A copy of the graph without ``_assert_tensor_metadata`` checks (they would keep sliced values alive whole),
    fresh buffers filled through views written as the values they end up holding (passes/fill_views.py), its fake
    values propagated through the graph (every view shares its input's storage as it does at run time;
    export's values do not always: an eval-mode dropout).

    NOTE [One stripped graph per capture]: a budget compiles the same captured graph many times, so the stripped,
    propagated copy is made once (kept while the captured graph lives and its code is unchanged) and every compile
    of it starts from that same GraphModule. No step changes its input graph in place: a pass that rewrites
    makes a new graph (or changes one an earlier step of the same compile made: the grouped graph's loops), and
    the grouping passes recompute only the values they replace (``graph_utils.refresh_values``)."""
    stripped = stripped_graph(gm)
    job.axes = all_axes(stripped)
    return recompute_queries(stripped) if job.recompute else stripped


def stripped_graph(gm: GraphModule) -> GraphModule:
    """The stripped, propagated copy of a captured graph (NOTE [One stripped graph per capture])."""
    kept = _STRIPPED.get(gm)
    if kept is None or kept[0] != gm.code:
        stripped = strip_asserts(gm)
        functionalize_fills(stripped.graph)  # NOTE [Fresh buffers filled through views]
        propagate_meta(stripped, [n.meta["val"] for n in stripped.graph.nodes if n.op == "placeholder"],
                       fake_mode_of(stripped))
        kept = _STRIPPED[gm] = (gm.code, stripped)
    return kept[1]


def axes_of(gm: GraphModule) -> list:
    """Every axis of a captured graph's inputs, named from the ops (:func:`fxstream.analysis.axes.axis_floods`),
    found once per capture (on its stripped copy) and shared by every compile of it and by the budget."""
    return all_axes(stripped_graph(gm))


def step_split_group_norm(gm: GraphModule, job: Job) -> GraphModule:
    """Split the GroupNorms a region uses (unsliced ones stay fused, numerically unchanged): plan with every
    candidate split, then with just the ones used, until the set is stable. The last plan is kept on the job for
    the planning step (it is a plan of the graph returned).

    NOTE [Split GroupNorms replayed]: the search plans the graph at least twice (every candidate split, then the
    ones used: 2.2 s of a full-size SVD compile on 2 cores). A plan cache entry's ``MadeWith.norms`` holds the set
    each run of the steps of its compile settled on, in order; replayed, each run is given its own
    (``job.norms_given``) and plans once with it, keeping it where that plan uses exactly those splits (the
    search's stopping rule; otherwise, a name not among this graph's candidates or another set used, it
    searches). The search is deterministic, so a run given what it found before reproduces it, and every later
    run's decisions follow as before."""
    split = set(splittable_group_norms(gm)) if job.splits_norms else set()
    if not split:
        return gm
    if job.norms_given is not None:
        given = set(job.norms_given)
        if given <= split:
            prepared = _split_copy(gm, given)
            plan = _plan(prepared, job)
            if _norms_used(plan) == given:
                job.planned, job.plan, job.norms = prepared, plan, tuple(sorted(given))
                return prepared
        log.info("the GroupNorms given to split are not the ones this compile settles on: searching")
    for _ in range(4):
        prepared = _split_copy(gm, split)
        plan = _plan(prepared, job)
        used = _norms_used(plan)
        if used == split:
            break
        split = used
    else:
        prepared = _split_copy(gm, split)
        plan = _plan(prepared, job)
    job.planned, job.plan, job.norms = prepared, plan, tuple(sorted(split))
    return prepared


def _norms_used(plan: SlicePlan) -> set:
    """The names of the GroupNorms (of the graph before splitting) whose split parts a plan's regions hold."""
    return {m.group_norm for r in plan.regions for n in r.nodes if (m := get_meta(n, SplitNorm)) is not None}


def step_plan_slicing(gm: GraphModule, job: Job) -> GraphModule:
    """Analysis: the Feature Slicer's regions (``job.plan``), with the budget's per-region counts applied."""
    job.prepared = gm
    plan = job.plan if job.planned is gm else _plan(gm, job)
    job.plan = _with_counts(plan, job.region_counts, job.left_whole) if job.region_counts else plan
    return gm


def step_group_regions(gm: GraphModule, job: Job) -> GraphModule:
    """Operator Grouping: each region becomes one loop over its slices (``passes/group_regions.py``)."""
    return group_regions(gm, job.plan)


def step_compile_bodies(gm: GraphModule, job: Job) -> GraphModule:
    """Regions inside regions. A batch split with more slicing asked for: each batch region's body is compiled
    again as a graph of its own, with the rest of the policy. Otherwise a cut region asked for more slices than
    its axis has elements: each one-element body is compiled again, cut along its own axes in the slices left
    over (NOTE [Slices within one element])."""
    if job.inner is None:
        _slice_within(gm, job)
        return gm
    k = 0
    for loop in _loops(gm):
        for key, body in list(loop.bodies.items()):
            inner = compile_graph(body, job.inner, (job.inner_counts or [None] * (k + 1))[k],
                                  check_peak=job.check_peak, cut_within=job.cut_within)
            loop.bodies[key] = inner.graph_module
            job.bodies.append(inner)
            k += 1
    return gm


def _slice_within(gm: GraphModule, job: Job) -> None:
    """NOTE [Slices within one element]
    ``Policy(slices=k)`` cuts a region in ``k`` slices, but a region cut along frames has only as many slices as
    frames: 14 at most for SVD's 14 frames, however large ``k`` (across devices ``k`` is multiplied by the ranks:
    NOTE [Slices per rank]). A one-frame slice still holds a frame's working set: SVD's first spatial
    transformer's feed-forward at 9,216 tokens, 0.099 GiB in fp16, which held issue 22's per-rank peaks above
    1.1/N at 4 and 8 ranks. So where a region is asked for more slices than its axis has elements (its count
    from the policy's axis count or the budget's per-region count, before the slicer caps it at the axis
    length), each of its bodies (one element each) is compiled again as a graph of its own, as a batch split's
    bodies are, under ``Policy(slices=ceil(asked / length))`` with the region floor, slices in flight and CPU
    mode of the policy: the Feature Slicer finds the body's own axes (a frame's tokens, its height) and cuts
    what the rules prove safe there, so the result stays exact; what they cannot cut runs whole, as it did.
    The loop keeps ``within`` (the count asked of its bodies) and runs one slice at a time, its bodies
    pipelining inside (``LoopRegion.in_flight``); it is no batch split (``LoopRegion.nested`` is False): across
    devices its slices spread as any region's, and the regions inside its bodies run whole on the rank that runs
    the slice (``distributed.spread_loops``). A body stays as it was where its compile finds nothing to cut or
    does not plan below it (inner regions allocate their outputs whole: on a tiny frame that can cost more than
    the frame's working set saves)."""
    from .memory import plan_memory
    if not job.cut_within:
        return
    asked = job.region_counts or {}
    for node, grouped in grouped_calls(gm, "cut"):
        r = grouped.region
        want = asked.get(region_id(r), job.counts.get(r.axis.name, 1))
        loop = gm.get_submodule(node.target)
        if want <= r.axis.length or any(n != 1 for _, n in loop.bounds):
            continue
        k = -(-want // r.axis.length)
        inner_policy = Policy(slices=k, min_region_fraction=job.min_fraction, pipeline=job.in_flight,
                              cpu_workers=job.cpu_workers)
        for key, body in list(loop.bodies.items()):
            inner = compile_graph(body, inner_policy, check_peak=job.check_peak)
            if inner.plan.regions and \
                    plan_memory(inner.graph_module).peak_bytes < plan_memory(body).peak_bytes:
                loop.bodies[key] = inner.graph_module
                loop.within = k
                job.within.append((node.name, inner))


def step_reuse_buffers(gm: GraphModule, job: Job) -> GraphModule:
    """A region output takes over the storage of a sliced input that dies at the region (``passes/reuse_buffers``)."""
    return reuse_region_buffers(gm)


def step_set_in_flight(gm: GraphModule, job: Job) -> GraphModule:
    """How many slices each loop region keeps in flight, and the CPU mode (nested regions too)."""
    set_in_flight(gm, job.in_flight, job.cpu_workers)
    return gm


def default_halo_keep(gm: GraphModule, tiles: int) -> int:
    """The default ``halo_keep`` for ``tiles`` halo tiles (bands times columns): the graph's largest activation
    over ``tiles``, about one tile's size (see :func:`compile_graph`)."""
    biggest = max((tensor_bytes(n) for n in gm.graph.nodes if n.op == "call_function"), default=0)
    return biggest // tiles


def step_plan_halos(gm: GraphModule, job: Job) -> GraphModule:
    """Analysis (``Policy(halo=...)``): halo regions along height (and width), then along frames for what height
    halos could not take; ``job.halo`` and ``job.halo_reasons``."""
    rows, cols = job.halo_grid
    if rows * cols <= 1:
        return gm
    keep = job.halo_keep
    if keep is None:
        keep = default_halo_keep(gm, max(1, rows * cols // job.halo_ranks))  # NOTE [Checkpoints across ranks]
    job.halo, why = find_halo_regions(gm, rows, job.min_fraction, keep_bytes=keep, cols=cols, axes=job.axes)
    job.halo_reasons = {n.name: f"{'height' if cols == 1 else 'height x width'} (halo): {r}" for n, r in why.items()}
    if job.halo_frames > 1 and frames_in_batch(gm, job.axes):
        # what height halos could not take (a decoder's attention over each frame's pixels), along frames
        taken = {n for r in job.halo for n in r.nodes}
        more, why = find_halo_regions(gm, job.halo_frames, job.min_fraction, exclude=taken, along="frames",
                                      axes=job.axes)
        for n, r in why.items():
            if n not in taken:
                job.halo_reasons.setdefault(n.name, f"frames (halo): {r}")
        for n in (n for r in more for n in r.nodes):
            job.halo_reasons.pop(n.name, None)
        job.halo += more
    if job.host_memory:
        for r in job.halo:  # NOTE [Host checkpoints]
            r.parked = choose_parked(r, job.host_memory)
        sizes = [tensor_bytes(v) for r in job.halo for v in parkable(r)]
        if sizes and not any(r.parked for r in job.halo):
            raise HostMemoryError(
                f"Policy.host_memory={format_bytes(job.host_memory)} cannot hold one value a halo region would "
                f"park: the smallest GroupNorm input takes {format_bytes(min(sizes))} whole in host memory. Raise "
                f"host_memory to at least that, or leave it None (the statistics passes recompute instead).",
                host_memory=job.host_memory, smallest_bytes=min(sizes))
    return gm


def step_group_halos(gm: GraphModule, job: Job) -> GraphModule:
    """Each halo region becomes one loop over bands (``passes/halo_regions.py``), with line buffers where they
    do not raise the planned peak (NOTE [Line buffers])."""
    if job.halo_grid == (1, 1):
        return gm
    out = group_halo_regions(gm, job.halo)
    if job.line_buffers:
        set_line_buffers(out)
    return out


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[GraphModule, Job], GraphModule]


STEPS = (
    Step("strip_asserts", step_strip_asserts),
    Step("split_group_norm", step_split_group_norm),
    Step("plan_slicing", step_plan_slicing),
    Step("group_regions", step_group_regions),
    Step("compile_bodies", step_compile_bodies),
    Step("reuse_buffers", step_reuse_buffers),
    Step("set_in_flight", step_set_in_flight),
    Step("plan_halos", step_plan_halos),
    Step("group_halos", step_group_halos),
)
_DUMPS = itertools.count()
_NESTING = threading.local()


def run_steps(gm: GraphModule, job: Job, steps=STEPS) -> GraphModule:
    """Run ``steps`` in order on ``gm``; lint after each; dump each graph where ``FXSTREAM_DUMP`` says."""
    dump = os.environ.get("FXSTREAM_DUMP")
    folder = Path(dump) / f"compile-{os.getpid()}-{next(_DUMPS):03d}" if dump else None
    depth = getattr(_NESTING, "depth", 0)  # > 0: a body compiled inside a step (a batch split)
    _NESTING.depth = depth + 1
    try:
        return _run(gm, job, steps, folder, depth)
    finally:
        _NESTING.depth = depth


def _run(gm: GraphModule, job: Job, steps, folder, depth: int) -> GraphModule:
    for i, step in enumerate(steps):
        start = time.perf_counter()
        try:
            gm = step.run(gm, job)
            gm.graph.lint()
        except Exception as e:
            e.add_note(f"fxstream: in compile step {i} {step.name!r} (fxstream/compiler.py STEPS)")
            raise
        log.info("step %d %s: %.2f s", i, step.name, time.perf_counter() - start, extra={"fxstream_depth": depth})
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:02d}-{step.name}.txt").write_text(gm.print_readable(print_output=False))
    return gm


# -- the driver ----------------------------------------------------------------------------------------------------
def compile_graph(gm: GraphModule, policy: Policy, counts: dict | None = None, inner_counts: list | None = None,
                  halo_keep: int | None = None, check_peak: bool = True, line_buffers: bool = True,
                  norms: tuple | None = None, cut_within: bool = True) -> CompiledGraph:
    """Slice ``gm`` (an exported graph with fake metadata) under ``policy``. ``Policy()`` returns it unchanged.

    With a batch split and other slicing both asked for, the batch is split first and each batch region's body
    (the graph for part of the batch) is compiled again with the rest of the policy: regions inside regions.
    ``counts`` ({region id: slice count}, see :func:`region_id`) overrides the policy's count for single regions
    (1: leave the region unsliced); ``inner_counts`` does the same for each inner graph, in the order of ``inner``.
    ``halo_keep``: with ``Policy(halo=...)``, halo regions are cut where one value of at most this many bytes
    crosses (it is kept whole; see :func:`fxstream.analysis.halo.find_halo_regions`). Default: the graph's
    largest activation over the halo count, about one band's size, so keeping a block's output whole costs about
    what its slices hold anyway and saves the statistics passes behind it from recomputing the block.
    ``check_peak``: leave whole the cut regions that would raise the planned peak (NOTE [A region must not raise
    the peak]); the budget turns it off (its search weighs every region's peak against the budget itself).
    ``line_buffers``: turn on halo loops' line buffers where they do not raise the planned peak (NOTE [Line
    buffers]); the halo budget turns it off (NOTE [Line buffers in the halo budget]). ``norms``: the GroupNorms an
    earlier compile of this graph and policy split (``MadeWith.norms``; NOTE [Split GroupNorms replayed]).
    ``cut_within``: a region asked for more slices than its axis has elements cuts each one-element body again
    along its own axes (NOTE [Slices within one element]); the budget's search turns it off (its counts are one
    element per slice at most, its floor "as many slices as elements").
    """
    made_with = MadeWith(policy, dict(counts) if counts is not None else None,
                         [dict(c) if c is not None else None for c in inner_counts] if inner_counts is not None
                         else None, halo_keep, check_peak=check_peak, cut_within=cut_within)
    if not policy.slices_anything:
        return CompiledGraph(gm, SlicePlan([], {}), gm, gm, made_with=made_with)
    # a batch split: its bodies check; min_region_fraction=0 keeps every region the rules allow (tests use it)
    check = check_peak and _job(policy, counts, inner_counts, halo_keep).inner is None and \
        policy.min_region_fraction > 0
    norm_log = _NormLog(list(norms) if norms is not None else None)
    out, job, made_with, planned = _compile(gm, policy, counts, inner_counts, halo_keep, check_peak, check,
                                            made_with, line_buffers=line_buffers, norms=norm_log)
    if check and _split_may_help(job, out, planned):  # NOTE [Regions split where they hold too much]
        tried = _compile(gm, policy, counts, inner_counts, halo_keep, check_peak, check, made_with, split=True,
                         line_buffers=line_buffers, norms=norm_log)
        if tried[3] is not None and tried[3].peak_bytes < planned.peak_bytes:  # kept where the planned peak falls
            out, job, made_with, planned = tried
    if check and planned is not None and _recompute_may_help(gm, out):
        # NOTE [Queries recompute what they share with keys and values]: kept where the planned peak falls
        tried = _compile(gm, policy, counts, inner_counts, halo_keep, check_peak, check, made_with, split=True,
                         recompute=True, line_buffers=line_buffers, norms=norm_log)
        if tried[3] is not None and tried[3].peak_bytes < planned.peak_bytes:
            out, job, made_with, planned = tried
    log.info("compiled: %d regions", len(job.plan.regions))
    made_with = replace(made_with, norms=tuple(norm_log.made))
    return CompiledGraph(out, job.plan, gm, job.prepared, job.bodies, job.halo, job.halo_reasons, made_with,
                         len(shared_chains(stripped_graph(gm))) if job.recompute else 0, job.within)


def _compile(gm, policy, counts, inner_counts, halo_keep, check_peak, check, made_with, split=False,
             recompute=False, line_buffers=True, norms=None):
    """One compile of ``gm``: the steps, then once more with the regions that raise the peak left whole. Returns
    the graph, its job, what it was made with and (with ``check``) its memory plan."""
    job = _job(policy, counts, inner_counts, halo_keep)
    job.check_peak, job.split, job.recompute, job.line_buffers = check_peak, split, recompute, line_buffers
    job.cut_within = made_with.cut_within
    norms = _NormLog(None) if norms is None else norms
    job.norms_given = norms.given()
    out = run_steps(gm, job)
    norms.made.append(job.norms)
    raising, planned = _raising_regions(job, out) if check else ({}, None)
    if raising:  # NOTE [A region must not raise the peak]: compile once more with those regions left whole
        counts = {**(counts or {}), **{rid: 1 for rid in raising}}
        made_with = replace(made_with, counts=dict(counts))
        raised = [(job.prepared, r) for r in job.plan.regions if region_id(r) in raising]
        job = _job(policy, counts, inner_counts, halo_keep)
        job.left_whole, job.check_peak, job.split, job.raised = raising, check_peak, split, raised
        job.cut_within = made_with.cut_within
        job.recompute, job.line_buffers, job.norms_given = recompute, line_buffers, norms.given()
        out = run_steps(gm, job)
        norms.made.append(job.norms)
        planned = None
    if check and planned is None and (job.plan.regions or job.raised):
        from .memory import plan_memory
        planned = plan_memory(out)
    return out, job, made_with, planned


class _NormLog:
    """The GroupNorm sets of one ``compile_graph`` call's runs of the steps: those given (an earlier compile's, in
    order; None: unknown) and those made (NOTE [Split GroupNorms replayed])."""

    def __init__(self, given: list | None):
        self._given, self.made = given, []

    def given(self) -> tuple | None:
        i = len(self.made)
        return None if self._given is None or i >= len(self._given) else self._given[i]


def _split_may_help(job: Job, grouped: GraphModule, planned) -> bool:
    """Whether splitting regions may lower the planned peak (NOTE [Regions split where they hold too much]): the
    split search would cut the cut region where ``planned`` (the memory plan of ``grouped``, ``job``'s graph)
    peaks, or a region left whole because it raised the peak."""
    if planned is None:
        return False
    found = list(job.raised)
    at = planned.peak_node.split("/")[0]
    found += [(job.prepared, g.region) for n, g in grouped_calls(grouped, "cut") if n.name == at]
    return any(would_split(gm, r, job.min_fraction) for gm, r in found)


def _recompute_may_help(gm: GraphModule, grouped: GraphModule) -> bool:
    """Whether copying the chains queries share with keys and values (passes/recompute_queries.py) may lower the
    planned peak of ``grouped`` (a compile of ``gm``): some shared value exists whole there (outside every cut
    region, or as a region's output)."""
    shared = {f.name for f, _, _ in shared_chains(stripped_graph(gm))}
    if not shared:
        return False
    regions = [g.region for _, g in grouped_calls(grouped, "cut")]
    interior = {n.name for r in regions for n in r.nodes} - {o.name for r in regions for o, _ in r.outputs}
    return bool(shared - interior)


def _raising_regions(job: Job, grouped: GraphModule) -> tuple:
    """({region id: why}, the memory plan of ``grouped``): the cut regions whose planned peak is above the unsliced
    graph's planned peak.

    NOTE [A region must not raise the peak]
    A region allocates all its outputs whole before its first slice and holds its whole inputs until its last.
    Where a region has many outputs that the unsliced ops would have made one after another (a rotary embedding's
    tables, made once and used by every block), its peak can be above anything the unsliced graph ever holds, and
    slicing it makes the whole compile worse than no slicing (Wan's transformer planned 1.26x its exported graph).
    Such a region is left whole (its id gets count 1, as a budget does; the reason says so); the others stay as
    planned. A region above the unsliced ops' local high point but below the graph's peak stays: it costs
    nothing the graph does not already need. Like the region floor, this is off with
    ``Policy(min_region_fraction=0)``, which keeps every region the rules allow. Exactness is not at stake: a
    region left whole runs the original ops."""
    regions = job.plan.regions if job.plan is not None else []
    if not regions:
        return {}, None
    from .memory import plan_memory
    compiled, original = plan_memory(grouped), plan_memory(job.prepared)
    out, names = {}, call_names(grouped, "cut")
    for r in regions:
        peak = compiled.region_peaks.get(names.get(region_id(r)))
        if peak is not None and peak > original.peak_bytes:
            out[region_id(r)] = (f"{r.axis.name}: sliced, this region would raise the planned peak "
                                 f"({peak / 2**20:.3f} MiB against {original.peak_bytes / 2**20:.3f} MiB unsliced)")
    return out, compiled


def _job(policy: Policy, counts, inner_counts, halo_keep) -> Job:
    rest = replace(policy, batch=None, halo=None)
    batch_split = policy.count_for("batch") > 1 and rest.slices_anything
    # a batch split plans the batch axis alone at the top; the bodies get the rest
    sliced = Policy(batch=policy.batch, min_region_fraction=policy.min_region_fraction) if batch_split else policy
    return Job(counts={name: sliced.count_for(kind) for name, kind in AXIS_KIND.items()},
               min_fraction=policy.min_region_fraction, in_flight=policy.pipeline, cpu_workers=policy.cpu_workers,
               region_counts=None if batch_split else counts, inner=rest if batch_split else None,
               inner_counts=inner_counts, halo_grid=policy.halo_grid if policy.halo_tiles > 1 else (1, 1),
               halo_frames=policy.count_for("spatial"), halo_keep=halo_keep, host_memory=policy.host_memory,
               halo_ranks=policy.halo_ranks)


def _plan(gm: GraphModule, job: Job) -> SlicePlan:
    counts = job.counts
    if job.halo_grid != (1, 1) and frames_in_batch(gm, job.axes):
        counts = {}  # halos own a graph whose frames ride in its batch (a VAE decoder): see frames_in_batch
    return plan_slicing(gm, counts, job.min_fraction, job.axes, split=job.split)


def _split_copy(gm: GraphModule, split: set) -> GraphModule:
    return split_group_norm(copy_module(gm), split)


def _loops(gm: GraphModule) -> list:
    return [m for m in gm.children() if isinstance(m, LoopRegion)]


def _with_counts(plan: SlicePlan, counts: dict, why: dict | None = None) -> SlicePlan:
    """The plan with per-region slice counts; a region given 1 slice is left out (its ops run whole); ``why``:
    the reason for a region id left whole otherwise than by a budget."""
    regions, reasons = [], dict(plan.reasons)
    for r in plan.regions:
        c = counts.get(region_id(r), r.count)
        if c > 1:
            regions.append(replace(r, count=min(c, r.axis.length)))
        else:
            for n in r.nodes:
                reasons[n] = (why or {}).get(region_id(r)) or \
                    f"{r.axis.name}: the memory budget is met without slicing here"
    return SlicePlan(regions, reasons, plan.axes)
