"""The explain report: what was sliced, what was not and why, and the planned memory."""
from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from .analysis.slicer import module_path, tensor_bytes
from .memory import planned_peak
from .policy import Policy

__all__ = ["Report", "RegionInfo", "UnslicedOp", "build_report"]


@dataclass(frozen=True)
class RegionInfo:
    module: str  # common module path of the region's ops
    dim: str  # named axis: batch, frames, height, width
    length: int  # elements of that axis
    slices: int
    ops: int
    saved_bytes: int  # bytes of interior values that never exist whole


@dataclass(frozen=True)
class UnslicedOp:
    node: str
    op: str
    module: str
    reason: str
    bytes: int


@dataclass
class Report:
    policy: Policy
    regions: list = field(default_factory=list)
    unsliced: list = field(default_factory=list)
    original_peak_bytes: int = 0
    peak_bytes: int = 0
    original_peak_node: str = ""
    peak_node: str = ""

    @property
    def sliced_ops(self) -> int:
        return sum(r.ops for r in self.regions)

    def table(self) -> str:
        rows = [(r.module or "(top)", r.dim, r.length, r.slices, r.ops, f"{r.saved_bytes / 2**20:.1f}")
                for r in self.regions]
        head = tabulate(rows, headers=["module", "dim", "length", "slices", "ops", "MiB never whole"])
        big = sorted(self.unsliced, key=lambda u: -u.bytes)[:10]
        rows2 = [(u.module or "(top)", u.op, f"{u.bytes / 2**20:.2f}", u.reason) for u in big]
        tail = tabulate(rows2, headers=["largest unsliced: module", "op", "MiB", "reason"])
        mem = (f"planned activation peak: {self.original_peak_bytes / 2**20:.1f} MiB original "
               f"(at {self.original_peak_node}), {self.peak_bytes / 2**20:.1f} MiB compiled (at {self.peak_node})")
        return f"{self.policy.describe()}: {len(self.regions)} regions, {self.sliced_ops} ops sliced\n" \
               f"{head}\n\n{tail}\n\n{mem}"

    def __str__(self) -> str:
        return self.table()


def build_report(compiled, policy: Policy) -> Report:
    plans = [compiled.plan] + [c.plan for c in compiled.inner]
    regions = [RegionInfo(r.module, r.axis.name, r.axis.length, r.count, len(r.nodes), r.saved_bytes)
               for plan in plans for r in plan.regions]
    in_region = {n for r in compiled.plan.regions for n in r.nodes}
    unsliced = []
    for n in compiled.prepared.graph.nodes:
        if n.op != "call_function" or n in in_region:
            continue
        reason = compiled.plan.reasons.get(n) or (
            "policy slices nothing" if not policy.slices_anything else "not reached by any sliced axis")
        unsliced.append(UnslicedOp(n.name, str(n.target), module_path(n), reason, tensor_bytes(n)))
    orig_peak, orig_at = planned_peak(compiled.original)
    peak, at = planned_peak(compiled.graph_module)
    return Report(policy, regions, unsliced, orig_peak, peak, orig_at, at)
