"""One compiled input signature (:class:`Entry`): the captured program, its compiled graph(s), and how to call them.

:class:`fxstream.CompiledModule` keeps one per input signature; :func:`fxstream.explain`, the command line and
``compile_pipeline``'s planner build one to report without running. The compile itself is
:func:`fxstream.budget.compile_for`, through the plan cache (:func:`fxstream.plan_cache.compile_cached`: a budget's
decision stored by an earlier process is compiled once instead of the search).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind

from .compiler import capture, describe_inputs
from .distributed import (compile_policy, feature_parts, inputs_digest, plan_digest, planned_flops,
                          rank_plan, shard_regions, shards_for, spread_loops)
from .errors import ExecutionError, MemoryBudgetError
from .graph_utils import output_values
from .guard import touched
from .memory import plan_memory, weight_bytes
from .meta import region_of
from .plan_cache import compile_cached, rank_budget_cached
from .policy import Policy, format_bytes
from .progress import library_progress
from .region_loop import RegionLoop
from .rehash.runtime import RehashState
from .report import Report, build_report

__all__ = ["Entry", "capture_module", "compile_ranks", "first_differing_region", "plan_ranks", "rank_budget",
           "rank_compile"]


def capture_module(module: torch.nn.Module, kwargs: dict) -> torch.export.ExportedProgram:
    """``module`` captured on ``kwargs`` (``fxstream.compiler.capture``), shown as a step of the library's progress;
    for several :class:`Entry` made from one capture (``Entry(..., program=)``)."""
    try:
        with library_progress().step(f"fxstream: capturing {type(module).__name__} (torch.export)"):
            return capture(module, kwargs)
    finally:
        touched()  # export rebinds some attributes behind nn.Module.__setattr__ (lists): guards walk again


class Entry:
    """One compiled input signature: the exported program, the compiled graph(s), and how to feed them.

    With ``Policy(rehash=...)`` it holds three graphs made from the one captured (``passes/step_rehash.py``): the
    full graph (``compiled``, which also returns the feature to cache), the rehash graph, and for adaptive
    schedules the probe graph; and this signature's cached feature between steps.
    """

    def __init__(self, module: torch.nn.Module, kwargs: dict, policy: Policy,
                 program: torch.export.ExportedProgram | None = None):
        """``program``: a capture of ``module`` on inputs of this signature made before (the same module
        unchanged since: a budget's attempts under several policies share one capture); else captured now."""
        progress, name = library_progress(), type(module).__name__
        self.program = program if program is not None else capture_module(module, kwargs)
        gm = self.program.graph_module
        weights = weight_bytes(self.program)
        # Policy(distributed=...): the regions compiled for one process run their slices spread
        self.shards = shards_for(policy.distributed)
        given, policy = policy, (compile_policy(policy, self.shards.size) if self.shards is not None else policy)
        self.rehash = None
        if policy.rehash is not None:
            self.rehash = RehashState(module, gm, policy.rehash)
            gm = self.rehash.graphs.full
        with progress.step(f"fxstream: compiling {name} under {policy.describe()}"):
            if self.shards is None:
                self.compiled, bound = compile_cached(gm, policy, weights)
            else:  # NOTE [Batch splits across ranks] (the guidance batch across the ranks), [A budget per rank]
                policy, self.compiled, bound = compile_ranks(gm, given, weights, self.shards.size)
                if given.batch is None and policy.batch is not None:
                    given = replace(given, batch=policy.batch)
        # how to fetch each lifted input at call time: weights from the live module, constants from the program
        fetch = {InputKind.PARAMETER: lambda m, t: m.get_parameter(t), InputKind.BUFFER: lambda m, t: m.get_buffer(t)}
        self.state = [(fetch.get(spec.kind, lambda m, t: self.program.constants[t]), spec.target)
                      for spec in self.program.graph_signature.input_specs if spec.kind != InputKind.USER_INPUT]
        self._held = None  # (stamp, the (dict, key) holding each lifted input): see weights()
        self.report: Report = build_report(self.compiled, given, weights, bound)
        if self.rehash is not None:
            r = self.rehash
            # a rehash step holds the cached feature (and the probe's reference) on top of the weights
            with progress.step(f"fxstream: compiling {name}'s rehash step"):
                r.compiled, _ = compile_cached(r.graphs.rehash, policy, weights + r.resident_bytes)
            self.report.rehash = r.info(r.compiled)
        # NOTE [A cached feature held in parts]: Step Rehash's feature cached by each rank in its own part, where it can
        self.cache_parts = None
        if self.shards is not None:
            full, last = self.compiled.graph_module, ()
            if self.rehash is not None:
                self.cache_parts = feature_parts(full, self.rehash.compiled.graph_module, self.shards.size)
                if self.cache_parts is not None:
                    last = (len(output_values(full)) - 1,)
            shard_regions(full, self.shards, outputs=last)
            if self.rehash is not None:
                rehash = self.rehash.compiled.graph_module
                given = None
                if self.cache_parts is not None:
                    given = {[n for n in rehash.graph.nodes if n.op == "placeholder"][-1]: self.cache_parts}
                shard_regions(rehash, self.shards, given=given)
                if self.rehash.graphs.probe is not None:
                    shard_regions(self.rehash.graphs.probe, self.shards)
            self._plan = tuple(plan_digest(g) for g in self._graphs())
            self.report.ranks = [rank_plan(self.compiled, self.shards.size, outputs=last)]

    def _graphs(self) -> list:
        """Every graph this signature runs (the rehash step's and probe's too)."""
        gms = [self.compiled.graph_module]
        if self.rehash is not None:
            gms += [g for g in (self.rehash.compiled.graph_module, self.rehash.graphs.probe) if g is not None]
        return gms

    def weights(self, module: torch.nn.Module, stamp=None) -> list:
        """The lifted inputs' live values: weights from the module, constants from the program. With ``stamp``
        (a value that moves whenever the module's structure may have changed: a CompiledModule's guard walk count)
        the dict holding each is found once per stamp and read at every call: 0.04 ms for full-size SVD's 1428
        weights, against 22 ms through ``get_parameter`` (diffusers' attribute lookups)."""
        if stamp is None:
            return [get(module, target) for get, target in self.state]
        if self._held is None or self._held[0] != stamp:
            self._held = (stamp, [_holder(module, get, target) for get, target in self.state])
        return [d[k] for d, k in self._held[1]]

    def call(self, graph, module: torch.nn.Module, kwargs: dict, extra=(), stamp=None) -> list:
        """Run one of this signature's graphs on the live weights and these inputs (plus ``extra`` inputs)."""
        flat, _ = pytree.tree_flatten(((), kwargs))
        state = self.weights(module, stamp)
        if self.shards is not None:
            return self._call_sharded(graph, module, kwargs, state, flat, extra)
        try:
            return list(graph(*state, *flat, *extra))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # export's fake kernels do not check everything (a linear's dtypes)
            raise ExecutionError(
                f"{type(module).__name__} compiled by fxstream failed on these inputs: {e}\n"
                f"called with {describe_inputs(module, kwargs)}\nCheck that the inputs fit the module (it fails the "
                "same way when called directly); if the module runs them, this is a bug in fxstream.") from e

    def _call_sharded(self, graph, module, kwargs, state, flat, extra) -> list:
        """A call on every rank (``fxstream.distributed``): the ranks' inputs and plans checked alike first; an
        error raised here is told to the other ranks (they raise too, instead of waiting)."""
        sh = self.shards
        checked = list(extra)
        if self.cache_parts is not None and graph is self.rehash.compiled.graph_module:
            checked.pop()  # this rank's own part of the cached feature (NOTE [A cached feature held in parts])
        sh.check_same(inputs_digest(list(flat) + checked, self._plan),
                      lambda: describe_inputs(module, kwargs))
        try:
            return list(graph(*state, *flat, *extra))
        except Exception as e:
            sh.fail(e)
            raise

    def unflatten(self, out: list):
        return pytree.tree_unflatten(out, self.program.call_spec.out_spec)

    def run(self, module: torch.nn.Module, kwargs: dict, stamp=None):
        return self.unflatten(self.call(self.compiled.graph_module, module, kwargs, stamp=stamp))


class _Live:
    """A lifted input read through ``get(module, target)`` at every call (``weights()``' fallback)."""

    def __init__(self, get, module: torch.nn.Module):
        self.get, self.module = get, module

    def __getitem__(self, target: str):
        return self.get(self.module, target)


def _holder(module: torch.nn.Module, get, target: str) -> tuple:
    """(dict, key) whose item is what ``get(module, target)`` gives now: the owning module's parameter or buffer
    dict; for anything else (a program constant, a property shadowing a weight) a :class:`_Live` reader."""
    value = get(module, target)
    prefix, _, name = target.rpartition(".")
    try:
        owner = module.get_submodule(prefix) if prefix else module
    except AttributeError:
        owner = None
    for d in (getattr(owner, "_parameters", None), getattr(owner, "_buffers", None)):
        if isinstance(d, dict) and d.get(name) is value:
            return d, name
    return _Live(get, module), target


def first_differing_region(entry: Entry, module, kwargs: dict, tol: float) -> str | None:
    """The first top-level loop region of the compiled graph whose outputs differ (beyond ``tol``) from the same
    values computed by the original graph on the same inputs."""
    flat, _ = pytree.tree_flatten(((), kwargs))
    args = [get(module, target) for get, target in entry.state] + flat
    if entry.rehash is not None and entry.rehash.graphs.probe is not None:  # the full graph takes the probe
        args += entry.call(entry.rehash.graphs.probe, module, kwargs)
    cg = entry.compiled
    wanted = {o.name for n in cg.graph_module.graph.nodes if region_of(n) is not None
              for o, _ in region_of(n).outputs}
    values = {}

    class _Original(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.name in wanted:
                values[n.name] = v
            return v

    class _Compiled(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            region = region_of(n)
            if region is not None:
                for (o, _), got in zip(region.outputs, v):
                    ref = values.get(o.name)
                    if ref is not None and float((got.float() - ref.float()).abs().max()) > tol:
                        raise _Found(n.name)
            return v

    class _Found(Exception):
        pass

    with torch.no_grad():
        _Original(cg.prepared).run(*args)  # the graph the regions were cut from: same inputs, node names
        try:
            _Compiled(cg.graph_module).run(*args)
        except _Found as found:
            return str(found)
    return None


log = logging.getLogger(__name__)


def _guidance_parts(ranks: int) -> set:
    """The batch cuts :func:`guidance_split` tries on ``ranks`` ranks: in ``ranks`` parts, and in 2 on an even
    number (the guidance halves on groups of ranks)."""
    return {ranks, 2} if ranks % 2 == 0 else {ranks}


def guidance_split(gm, policy: Policy, weights: int, compiled, ranks: int):
    """Under ``Policy(distributed=...)`` with no batch split asked for (``batch`` None) and no budget: the policy
    with the batch cut in ``ranks`` parts (each rank runs whole parts) or, on an even number of ranks, in 2 (the
    guidance halves, each on a group of ``ranks // 2`` ranks that spreads its regions), where that compile makes
    a batch split spread over the ranks (NOTE [Batch splits across ranks]) and the latency model plans it faster
    than ``compiled`` on the fastest link, NVLink (so on any slower one too); the fastest of the two. ``policy``:
    the one-device compile policy (``compile_policy(policy)``). Returns (policy, compiled, bound) or None."""
    if policy.batch is not None or policy.max_memory is not None or ranks < 2:
        return None
    best, fastest = None, rank_plan(compiled, ranks, "nvlink").seconds
    for k in sorted(_guidance_parts(ranks), reverse=True):
        alt_policy = compile_policy(replace(policy, batch=k), ranks)
        alt, bound = compile_cached(gm, alt_policy, weights)
        spread = spread_loops(alt.graph_module, ranks)
        # a split in k parts, spread (a batch shorter than k is split in fewer parts: the slice counts would not
        # be those of NOTE [Slices per rank])
        if not any(id(m) in spread and m.nested and len(m.bounds) == k
                   for m in alt.graph_module.modules() if isinstance(m, RegionLoop)):
            continue
        seconds = rank_plan(alt, ranks, "nvlink").seconds
        if seconds < fastest:
            best, fastest = (alt_policy, alt, bound), seconds
    if best is not None:
        log.info("distributed: the batch split in %d across the ranks (planned %.1f ms)", best[0].batch,
                 fastest * 1e3)
    return best


def rank_compile(entry: Entry, policy: Policy, ranks: int):
    """The compile a process group of ``ranks`` runs for ``policy`` (:func:`compile_ranks`), made without a process
    group. ``entry``: the one-device compile for spread regions (``compile_policy(policy)``), reused where the
    compile for ``ranks`` is the same."""
    gm, weights = entry.compiled.original, weight_bytes(entry.program)
    same = compile_policy(policy, ranks) == compile_policy(policy) and (policy.max_memory is None or ranks == 1)
    return compile_ranks(gm, policy, weights, ranks, made=entry.compiled if same else None)[1]


def compile_ranks(gm, policy: Policy, weights: int, ranks: int, made=None) -> tuple:
    """What ``Policy(distributed=...)`` compiles on ``ranks`` ranks for ``policy`` (the policy as given): the
    slice counts per rank (NOTE [Slices per rank]: ``compile_policy(policy, ranks)``), the guidance batch across
    the ranks where that plans faster (:func:`guidance_split`), and with ``max_memory`` a budget per rank (NOTE [A
    budget per rank]: :func:`rank_budget`). ``made``: the compile of ``compile_policy(policy, ranks)`` if already
    made. Returns (the policy compiled with, the compiled graph, its lower bound)."""
    n_policy = compile_policy(policy, ranks)
    if policy.max_memory is not None and ranks > 1:  # the search stored in the plan cache, where there is one
        return rank_budget_cached(gm, policy, weights, ranks, lambda: rank_budget(gm, policy, weights, ranks),
                                  lambda compiled: rank_plan(compiled, ranks).peak_bytes)
    compiled, bound = (made, None) if made is not None else compile_cached(gm, n_policy, weights)
    split = guidance_split(gm, compile_policy(policy), weights, compiled, ranks)
    return (n_policy, compiled, bound) if split is None else split


# NOTE [A budget per rank]
# Under ``Policy(distributed=...)`` every other field keeps its meaning per rank, ``max_memory`` too: it is each
# rank's budget, the weights (every rank holds them all) plus the busiest rank's planned peak (``rank_plan``: its
# parts of the values between regions, its slices' working sets, a gathered output's copy where it is made). The
# one-device search (``budget.compile_for``) fits the whole activations on each rank: it over-slices, and it refuses a budget
# that only the ranks together can meet (full-size SVD-XT's activations on 4 GPUs). So for a graph with a video
# axis the budget tries the policy's slices per rank at 1, 2, 4, ... up to the policy's own count (64 where it sets
# none), compiled as ``compile_policy`` spreads them, and keeps the first whose busiest rank fits: the fewest
# slices, so the fewest launches. Where none fits (and for a graph planned by halos, a VAE decoder, whose
# one-device search of bands, grids, checkpoints and parks plans both less memory and less recompute than any
# uniform band count tried per rank: SD 1.5's decoder at 600 MiB, 0.68x one device's speed on 2 ranks), the
# one-device search is kept if its busiest rank fits; else ``MemoryBudgetError`` gives the least any of them
# planned per rank, and says so where one device's plan would fit. At each count the guidance batch split across
# the ranks (``guidance_split``) is tried first where it plans faster, as without a budget, but only where the
# plain compile's busiest rank plans within ``SPLIT_MARGIN`` of the budget: a split holds the same values in
# parts, about as much (full-size SVD-XT on 4 ranks: 0.94x; on 2, 0.83x), and each try of it is two more
# compiles. The splits the margin left out are tried after every count, before the search gives up: the margin
# orders the tries, it never makes the search refuse a budget a split meets. Where the guidance split cannot be
# made (the batch of 2 on an odd number of ranks: the halves cannot run at once on groups), the batch is also
# tried cut in its parts run in turn, each spread over every rank (``_parts_in_turn``), after the plain compile at
# each count: it holds one part's values at a time, as one device's batch split does (tiny SVD on 3 ranks: 1.75 MiB
# per rank against 3.44 MiB without it at one slice per rank; the search refused 1.9 MiB before).
RANK_BUDGET_COUNTS = (1, 2, 4, 8, 16, 32, 64)
SPLIT_MARGIN = 1.25  # the guidance split is compiled only where the plain compile plans within this of the budget


def rank_budget(gm, policy: Policy, weights: int, ranks: int) -> tuple:
    """NOTE [A budget per rank]: the compile for ``ranks`` ranks whose busiest rank fits ``policy.max_memory``.
    Returns (the policy compiled with, the compiled graph, its lower bound); raises MemoryBudgetError."""
    from .budget import _video
    budget, least, tries, skipped = policy.max_memory, [], [], []

    def fits(made, peak=None) -> bool:  # (policy, compiled, bound): its busiest rank within the budget
        least.append(rank_plan(made[1], ranks).peak_bytes if peak is None else peak)
        if least[-1] + weights > budget:
            return False
        log.info("distributed: budget %s met per rank with %s", format_bytes(budget), made[0].describe())
        return True

    if _video(gm):
        caps = [v for v in (policy.slices, policy.spatial, policy.temporal) if v]
        free = replace(policy, max_memory=None, spatial=None, temporal=None)
        tries = [replace(free, slices=k) for k in RANK_BUDGET_COUNTS if k <= min(caps, default=RANK_BUDGET_COUNTS[-1])]
    for tried in tries:
        n_policy = compile_policy(tried, ranks)
        compiled, bound = compile_cached(gm, n_policy, weights)
        peak = rank_plan(compiled, ranks).peak_bytes
        if peak <= SPLIT_MARGIN * (budget - weights):  # the guidance split (faster where it is made) where it
            # might fit: it holds the same values in parts, and about as much (0.94x for SVD-XT on 4)
            split = guidance_split(gm, compile_policy(tried), weights, compiled, ranks)
            if split is not None and fits(split):
                return split
        else:
            skipped.append((tried, compiled))
        if fits((n_policy, compiled, bound), peak):
            return n_policy, compiled, bound
        halves = _parts_in_turn(gm, tried, weights, ranks)
        if halves is not None and fits(halves):
            return halves
    for tried, compiled in skipped:  # the splits the margin left out, before the search gives up
        split = guidance_split(gm, compile_policy(tried), weights, compiled, ranks)
        if split is not None and fits(split):
            return split
    least = min(least, default=None)
    n_policy, one = compile_policy(policy, ranks), None
    try:  # the one-device search: kept where its busiest rank fits
        compiled, bound = compile_cached(gm, n_policy, weights)
    except MemoryBudgetError as e:  # no slicing fits one device: its lower bound where no try was made
        compiled, least = None, e.lower_bound_bytes if least is None else least
    if compiled is not None:
        one, peak = plan_memory(compiled.graph_module).peak_bytes, rank_plan(compiled, ranks).peak_bytes
        least = peak if least is None else min(least, peak)
        if peak + weights <= budget:
            return n_policy, compiled, bound
    alone = "" if one is None else (f" One device's plan fits ({format_bytes(one)} of activations): run it without "
                                    "Policy.distributed, or raise max_memory.")
    raise MemoryBudgetError(
        f"Policy.max_memory={format_bytes(budget)} cannot be met on each of {ranks} ranks: every rank holds the "
        f"{format_bytes(weights)} of weights, and the least any slicing tried plans for the busiest rank's "
        f"activations is {format_bytes(least)} (NOTE [A budget per rank]), so at least "
        f"{format_bytes(weights + least)} is needed. Raise max_memory, use more ranks, or make the input smaller "
        f"(frames, resolution, batch) or the dtype narrower.{alone}",
        max_memory=budget, weight_bytes=weights, lower_bound_bytes=least)


def _parts_in_turn(gm, tried: Policy, weights: int, ranks: int):
    """NOTE [A budget per rank]: the batch cut in its parts, each part's regions spread over every rank and the
    parts run one after another (NOTE [Batch splits across ranks], a remainder either way: the guidance batch of 2
    on an odd number of ranks), where the guidance split does not try that cut (``guidance_split``: ``N`` parts,
    or 2 on an even ``N``) and the policy sets no ``batch``. Like one device's batch split it holds each part's
    values alone: a memory measure, never faster. Returns (policy, compiled, bound) or None."""
    from .budget import _batch_choices
    parts = _batch_choices(gm, tried)[-1]
    if tried.batch is not None or parts is None or parts in _guidance_parts(ranks):
        return None
    n_policy = compile_policy(replace(tried, batch=parts), ranks)
    compiled, bound = compile_cached(gm, n_policy, weights)
    return n_policy, compiled, bound


def plan_ranks(entry: Entry, policy: Policy, counts, link: str) -> list:
    """``Policy(distributed=...)`` planned on each of ``counts`` devices without a process group, as a process
    group of that size would run it (:func:`rank_compile`), against the planned peak of ``entry``, the
    one-device compile for spread regions (``compile_policy(policy)``)."""
    one, one_flops = plan_memory(entry.compiled.graph_module).peak_bytes, planned_flops(entry.compiled)
    return [rank_plan(rank_compile(entry, policy, n), n, link, one_device=one, one_flops=one_flops) for n in counts]
