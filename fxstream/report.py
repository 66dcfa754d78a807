"""The explain report: what was sliced, what was not and why, and the planned memory."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from tabulate import tabulate

from .analysis.slicer import module_path, tensor_bytes
from .memory import MemoryPlan, plan_memory
from .meta import grouped_calls, region_id
from .policy import Policy, format_bytes

__all__ = ["Report", "RegionInfo", "AxisInfo", "UnslicedOp", "RehashInfo", "build_report", "explain_table", "report_json"]


@dataclass(frozen=True)
class AxisInfo:
    """An axis of the graph's inputs (fxstream/analysis/axes.py): its name, where it is, what the name comes from,
    and whether the compile sliced along it (and if not, why)."""

    name: str  # batch, frames, height, width, tokens, channels, or its place when the ops give it no meaning
    place: str  # input and dim: ``sample[1]``; a factor of a dim: ``x[0] (factor 4 of 8)``
    length: int
    why: str  # the positions at anchor ops that gave the name
    slicing: str  # "3 regions", or why none


@dataclass(frozen=True)
class RegionInfo:
    module: str  # common module path of the region's ops
    dim: str  # named axis: batch, frames, height, width
    length: int  # elements of that axis
    slices: int
    ops: int
    saved_bytes: int  # bytes of interior values that never exist whole
    peak_bytes: int = 0  # planned bytes live while the region runs (whole values around it + working set)
    working_bytes: int = 0  # the slices' working set: its share of that peak
    in_flight: int = 1  # slices run at once (Policy.pipeline, or fewer where the budget needs it)
    node: str = ""  # the region's node in the compiled graph (``region_0``; inside a batch region ``region_0/region_3``)
    passes: int = 1  # sweeps over the slices: a halo region's GroupNorm statistics passes and its output pass
    compute: float = 1.0  # planned FLOPs over the unsliced ops' (halo rows and statistics passes computed again)
    flops: int = 0  # planned FLOPs of the region's ops run once, unsliced (halo regions)
    axis: str = ""  # where the axis is: an input and its dim (``sample[1]``), as the flood found it
    host_bytes: int = 0  # host memory its parked values take at once (halo regions; NOTE [Host checkpoints])
    host_traffic: int = 0  # bytes it copies between device and host per call
    kind: str = "cut"  # "cut" or "halo" (NOTE [One region model])
    within: int = 1  # > 1: each one-element slice cut again about this many ways (NOTE [Slices within one element])


@dataclass(frozen=True)
class UnslicedOp:
    node: str
    op: str
    module: str
    reason: str
    bytes: int


@dataclass(frozen=True)
class RehashInfo:
    """What a rehash step skips (``Policy(rehash=...)``). FLOPs are planned (``fxstream.analysis.cost``)."""

    schedule: str
    cache_point: str  # module path whose output is cached
    cache_node: str
    cache_shape: tuple
    cache_bytes: int  # held between steps (the cached feature, and the adaptive probe's reference)
    probe: str | None
    ops: int  # ops of the captured graph
    ops_skipped: int  # of those, not run on a rehash step
    flops: int  # planned FLOPs of a full step
    flops_rehash: int  # of a rehash step (the probe included)
    skipped_modules: list  # modules (two levels deep) none of whose ops run on a rehash step
    rehash_peak_bytes: int  # planned activation peak of a rehash step (the cached feature not included)

    @property
    def skipped_share(self) -> float:
        """The planned share of a full step's FLOPs that a rehash step does not run."""
        return 1.0 - self.flops_rehash / self.flops if self.flops else 0.0

    def table(self) -> str:
        return tabulate([
            ("schedule", self.schedule),
            ("cache point", f"{self.cache_point} ({self.cache_node}), {list(self.cache_shape)}, "
                            f"{format_bytes(self.cache_bytes)} held between steps"),
            ("ops skipped on a rehash step", f"{self.ops_skipped} of {self.ops}"),
            ("planned FLOPs skipped", f"{self.skipped_share:.1%} ({self.flops_rehash / 1e9:.1f} of "
                                      f"{self.flops / 1e9:.1f} GFLOP run)"),
            ("modules skipped", ", ".join(self.skipped_modules) or "-"),
            ("activations, rehash step", format_bytes(self.rehash_peak_bytes)),
        ] + ([("probe", self.probe)] if self.probe else []), headers=["step rehash", ""])


@dataclass
class Report:
    """What ``fxstream.explain`` says. Bytes are activations unless named ``weight_bytes``.

    ``timeline`` holds, for ``"original"`` and ``"compiled"``, a list of
    :class:`~fxstream.memory.TimelinePoint` (node, module, bytes live after it, most bytes live while it ran).
    ``lower_bound_bytes`` is the smallest activation peak the budget's search can plan for this graph and input
    (every region at one element per slice, see :mod:`fxstream.budget`; slices within one element can go below
    it: NOTE [Slices within one element]); computed on first access when the policy did not need it.
    """

    policy: Policy
    regions: list = field(default_factory=list)
    unsliced: list = field(default_factory=list)
    weight_bytes: int = 0
    original_peak_bytes: int = 0
    peak_bytes: int = 0
    original_peak_node: str = ""
    peak_node: str = ""
    original_peak_module: str = ""
    peak_module: str = ""
    timeline: dict = field(default_factory=dict)
    _lower_bound: Callable | int | None = field(default=None, repr=False)
    rehash: RehashInfo | None = None  # with Policy(rehash=...): what a rehash step skips
    axes: list = field(default_factory=list)  # AxisInfo of every axis found (empty when the policy slices nothing)
    _total_flops: int = field(default=0, repr=False)  # planned FLOPs of the original graph (with halo regions)
    ranks: list = field(default_factory=list)  # fxstream.distributed.RankPlan per device count planned
    recomputed: int = 0  # shared chains copied for attention queries (passes/recompute_queries.py)

    @property
    def lower_bound_bytes(self) -> int:
        if callable(self._lower_bound):
            self._lower_bound = self._lower_bound()
        return self._lower_bound

    @property
    def compute_factor(self) -> float:
        """Planned FLOPs of the compiled graph over the original's: halo regions recompute halo rows and run
        GroupNorm statistics passes (1.0 without halo regions)."""
        halo = [r for r in self.regions if r.flops]
        if not halo:
            return 1.0
        total = self._total_flops if self._total_flops else sum(r.flops for r in halo)
        return (total + sum((r.compute - 1.0) * r.flops for r in halo)) / total

    @property
    def sliced_ops(self) -> int:
        return sum(r.ops for r in self.regions)

    @property
    def host_bytes(self) -> int:
        """Planned host memory for parked values (``Policy(host_memory=...)``): the most one region takes (a
        region's buffers go before the next region runs)."""
        return max((r.host_bytes for r in self.regions), default=0)

    @property
    def host_traffic(self) -> int:
        """Planned bytes copied between device and host per call, over every region."""
        return sum(r.host_traffic for r in self.regions)

    def table(self, top: int = 10) -> str:
        """Regions, the ``top`` largest unsliced ops with their reason, the planned peaks (the lower bound
        computed if it is not known yet), and what a rehash step skips: :func:`explain_table`."""
        return explain_table(self, top=top)

    def __str__(self) -> str:
        return self.table()


_REGION_HEADERS = ["module", "dim", "length", "slices", "in flight", "ops", "MiB never whole", "MiB at its peak",
                   "MiB its slices", "passes", "compute"]


def _region_rows(report: Report) -> list:
    # a region cut within one element: "14 x 5" (NOTE [Slices within one element]; its inner regions follow)
    return [(r.module or "(top)", r.dim, r.length, r.slices if r.within == 1 else f"{r.slices} x {r.within}",
             r.in_flight, r.ops, f"{r.saved_bytes / 2**20:.1f}", f"{r.peak_bytes / 2**20:.1f}",
             f"{r.working_bytes / 2**20:.1f}", r.passes, f"{r.compute:.2f}x")
            for r in report.regions]


def _peak_rows(report: Report, lower_bound: bool, missing: str) -> list:
    return [("weights", format_bytes(report.weight_bytes), ""),
            ("activations, original", format_bytes(report.original_peak_bytes),
             f"{report.original_peak_node} ({report.original_peak_module or 'top'})"),
            ("activations, compiled", format_bytes(report.peak_bytes),
             f"{report.peak_node} ({report.peak_module or 'top'})"),
            ("activations, lower bound", format_bytes(report.lower_bound_bytes), "one element per slice")
            if lower_bound else ("activations, lower bound", "-", missing)] + \
        ([("host memory, parked", format_bytes(report.host_bytes),
           f"{format_bytes(report.host_traffic)} copied per call; {report.compute_factor:.2f}x compute")]
         if report.host_bytes else []) + \
        ([("chains recomputed", str(report.recomputed),
           "made again for attention queries instead of kept whole (passes/recompute_queries.py)")]
         if report.recomputed else [])


def explain_table(report: Report, top: int = 10, lower_bound: bool = True, missing: str = "not computed") -> str:
    """The explain report as text, for :meth:`Report.table` and ``fxstream explain``: each region (module, axis,
    length, slices, slices in flight, ops, MiB never whole, MiB live at its peak, MiB of its slices' working set,
    passes, planned compute), the ``top`` largest unsliced ops with the reason, the planned peaks, and what a
    rehash step skips. ``lower_bound=False`` leaves the lower bound (about as long again as the plan) out,
    saying ``missing`` instead."""
    rows = _region_rows(report)
    regions = tabulate(rows, headers=_REGION_HEADERS) if rows else "(no regions)"
    big = sorted(report.unsliced, key=lambda u: -u.bytes)[:top]
    unsliced = tabulate([(u.module or "(top)", u.op, f"{u.bytes / 2**20:.2f}", u.reason) for u in big],
                        headers=["largest unsliced: module", "op", "MiB", "reason"])
    mem = tabulate(_peak_rows(report, lower_bound, missing), headers=["planned peak", "bytes", "where"])
    head = f"{report.policy.describe()}: {len(report.regions)} regions, {report.sliced_ops} ops sliced"
    text = f"{head}\n{regions}\n\n{unsliced}\n\n{mem}"
    if report.axes:
        axes = tabulate([(a.name, a.place, a.length, a.why, a.slicing) for a in report.axes],
                        headers=["axis", "input dim", "length", "named from", "slicing"])
        text = f"{head}\n{axes}\n\n{regions}\n\n{unsliced}\n\n{mem}"
    if report.ranks:
        text += "\n\n" + ranks_table(report.ranks)
    return text + (f"\n\n{report.rehash.table()}" if report.rehash is not None else "")


def ranks_table(plans) -> str:
    """The plans across devices (:func:`fxstream.distributed.rank_plan`): per-rank planned peak, what a rank
    receives per call, and the latency model's speedup over one device."""
    def split(p) -> str:  # NOTE [Batch splits across ranks]: whole parts per rank, or a part per group of ranks
        if p.batch_split <= 1:
            return "-"
        return f"{p.batch_split} parts" + (f", groups of {p.ranks // p.batch_split}" if p.ranks > p.batch_split else "")

    rows = [(p.ranks, p.link, split(p), f"{p.peak_bytes / 2**30:.3f}",
             f"{p.one_device_peak_bytes / 2**30:.3f}", f"{p.spread_share:.1%}", f"{p.bytes_received / 2**30:.2f}",
             p.collectives, f"{p.seconds * 1e3:.1f}", f"{p.speedup:.2f}x") for p in plans]
    return tabulate(rows, headers=["ranks", "link", "batch split", "GiB per rank", "GiB one device",
                                   "FLOPs spread", "GiB received per call", "collectives", "planned ms", "speedup"])


def report_json(report: Report, session=None, lower_bound: bool = False) -> dict:
    """The explain report as plain data (``fxstream explain --json``): regions, every unsliced op with its
    reason, bytes (ints); ``session`` (the command line's) adds the input and the planning time."""
    policy = {f.name: getattr(report.policy, f.name) for f in fields(report.policy)}
    if policy.get("rehash") is not None:
        policy["rehash"] = asdict(policy["rehash"])
    if policy.get("distributed") is not None:  # a process group is not data
        policy["distributed"] = policy["distributed"].describe()
    return {
        "input": session.input_json() if session is not None else None,
        "policy": {"text": report.policy.describe(), **policy},
        "seconds": round(session.seconds, 2) if session is not None else None,
        "weight_bytes": report.weight_bytes,
        "original_peak_bytes": report.original_peak_bytes,
        "peak_bytes": report.peak_bytes,
        "original_peak": {"node": report.original_peak_node, "module": report.original_peak_module},
        "peak": {"node": report.peak_node, "module": report.peak_module},
        "lower_bound_bytes": report.lower_bound_bytes if lower_bound else None,
        "sliced_ops": report.sliced_ops,
        "compute_factor": report.compute_factor,
        "host_bytes": report.host_bytes,
        "host_traffic": report.host_traffic,
        "axes": [asdict(a) for a in report.axes],
        "regions": [asdict(r) for r in report.regions],
        "unsliced": [asdict(u) for u in report.unsliced],
        "rehash": None if report.rehash is None else {**asdict(report.rehash),
                                                      "skipped_share": report.rehash.skipped_share},
        "ranks": [{**asdict(p), "speedup": p.speedup} for p in report.ranks],
        "recomputed": report.recomputed,
    }


def _region_infos(plan, gm, mem: MemoryPlan, offset: int = 0, prefix: str = "") -> list:
    out, calls = [], {g.id: n for n, g in grouped_calls(gm, "cut")}
    for r in plan.regions:
        call = calls[region_id(r)]
        loop = gm.get_submodule(call.target)
        out.append(RegionInfo(r.module, r.axis.name, r.axis.length, r.count, len(r.nodes), r.saved_bytes,
                              offset + mem.region_peaks.get(call.name, 0), mem.region_working_bytes.get(call.name, 0),
                              loop.in_flight, prefix + call.name, axis=r.axis.place, within=loop.within))
    return out


def _axis_infos(compiled, policy: Policy) -> list:
    """AxisInfo of every axis the compile found, with the regions along it or why there are none."""
    from .analysis.axes import NAMED
    from .policy import AXIS_KIND
    plans = [compiled.plan] + [inner.plan for inner in compiled.inner]
    along: dict = {}
    for plan in plans:
        for r in plan.regions:
            along[r.axis.key] = along.get(r.axis.key, 0) + 1
    knobs = {"spatial": "slices or spatial", "temporal": "slices or temporal", "batch": "batch"}
    out = []
    for a in compiled.plan.axes:
        n = along.get(a.key, 0)
        if n:
            slicing = f"{n} region{'s' if n > 1 else ''}"
        elif a.name not in NAMED:
            slicing = "never: channels are mixed by the ops that take them" if a.name == "channels" else \
                "never: the ops give it no meaning that can be cut"
        elif policy.count_for(AXIS_KIND[a.name]) <= 1:
            slicing = f"not asked (Policy {knobs[AXIS_KIND[a.name]]})"
        elif policy.halo_tiles > 1 and not compiled.plan.regions:
            slicing = "halos own this graph (Policy.halo)"
        else:
            slicing = ("no region: an outer axis took its ops (NOTE [Outermost axis first]), the rules refuse "
                       "it, or no region pays for its loop (see the unsliced ops)")
        out.append(AxisInfo(a.name, a.place, a.length, a.why, slicing))
    return out


def _halo_infos(compiled, mem: MemoryPlan) -> tuple[list, int]:
    """RegionInfo of each halo region (``Policy(halo=...)``), with its passes and planned compute, and the
    planned FLOPs of the whole graph (0 without halo regions)."""
    from .analysis.cost import node_flops
    from .analysis.slicer import common_module_path
    out = []
    loops = [(n.name, compiled.graph_module.get_submodule(n.target))
             for n, _ in grouped_calls(compiled.graph_module, "halo")]
    flops = node_flops(compiled.prepared) if loops else {}
    for name, loop in loops:
        r = loop.region
        hp = loop.plan(flops)
        largest = max(r.outputs, key=lambda o: r.length(o))
        axis = f"{r.along} (halo)" if r.cols == 1 else "height x width (halo)"
        out.append(RegionInfo(common_module_path(r.nodes), axis, r.length(largest), r.count, len(r.nodes),
                              r.saved_bytes, mem.region_peaks.get(name, 0), mem.region_working_bytes.get(name, 0), 1, name,
                              hp.passes, hp.compute_factor, sum(flops.get(n.name, 0) for n in r.nodes),
                              host_bytes=hp.host_bytes, host_traffic=hp.host_traffic, kind="halo"))
    return out, sum(flops.values())


def build_report(compiled, policy: Policy, weight_bytes: int = 0, lower_bound=None) -> Report:
    """The report of a :class:`~fxstream.compiler.CompiledGraph`; ``lower_bound`` is bytes or a callable."""
    original = plan_memory(compiled.original)
    mem = plan_memory(compiled.graph_module)
    regions = _region_infos(compiled.plan, compiled.graph_module, mem)
    if compiled.inner:  # regions inside batch regions: their peaks sit on top of what the outer graph holds
        loops = [n.name for n, _ in grouped_calls(compiled.graph_module, "cut")]
        around = [mem.region_peaks[n] - mem.region_working_bytes[n] for n in loops]
        per_loop = max(1, len(compiled.inner) // max(1, len(loops)))
        for k, inner in enumerate(compiled.inner):
            at = min(k // per_loop, len(around) - 1)
            regions += _region_infos(inner.plan, inner.graph_module, plan_memory(inner.graph_module), around[at],
                                     f"{loops[at]}/")
    for name, inner in compiled.within:  # NOTE [Slices within one element]: on top of what the region holds around
        around = mem.region_peaks[name] - mem.region_working_bytes[name]
        regions += _region_infos(inner.plan, inner.graph_module, plan_memory(inner.graph_module), around, f"{name}/")
    halo_infos, total_flops = _halo_infos(compiled, mem)
    regions += halo_infos
    in_region = {n for r in compiled.plan.regions for n in r.nodes}
    in_halo = {n.name for r in compiled.halo for n in r.nodes}
    unsliced = []
    for n in compiled.prepared.graph.nodes:
        if n.op != "call_function" or n in in_region or n.name in in_halo:
            continue
        reason = compiled.plan.reasons.get(n) or compiled.halo_reasons.get(n.name) or (
            "the memory budget is met without slicing" if policy.max_memory is not None and not in_region else
            "policy slices nothing" if not policy.slices_anything else "not reached by any sliced axis")
        unsliced.append(UnslicedOp(n.name, str(n.target), module_path(n), reason, tensor_bytes(n)))
    rep = Report(policy, regions, unsliced, weight_bytes, original.peak_bytes, mem.peak_bytes,
                 original.peak_node, mem.peak_node, original.peak_module, mem.peak_module,
                 {"original": original.timeline, "compiled": mem.timeline}, lower_bound)
    rep._total_flops = total_flops
    rep.recomputed = compiled.recomputed
    rep.axes = _axis_infos(compiled, policy)
    return rep
