"""The explain report for the command line: a text table (tabulate) and a JSON-ready dict.

Same columns as :meth:`fxstream.Report.table`, except that the lower bound, which costs about as much again as
the plan, is shown only when it is known (``--lower-bound``, or a ``--max-memory`` policy, which needs it).
"""
from __future__ import annotations

from dataclasses import asdict, fields

from tabulate import tabulate

from .policy import format_bytes

__all__ = ["explain_table", "report_json"]


def explain_table(report, top: int = 10, lower_bound: bool = False) -> str:
    """Regions, the ``top`` largest unsliced ops with their reason, and the planned peaks."""
    rows = [(r.module or "(top)", r.dim, r.length, r.slices, r.in_flight, r.ops, f"{r.saved_bytes / 2**20:.1f}",
             f"{r.peak_bytes / 2**20:.1f}", f"{r.working_bytes / 2**20:.1f}") for r in report.regions]
    regions = tabulate(rows, headers=["module", "dim", "length", "slices", "in flight", "ops", "MiB never whole",
                                      "MiB at its peak", "MiB its slices"]) if rows else "(no regions)"
    big = sorted(report.unsliced, key=lambda u: -u.bytes)[:top]
    unsliced = tabulate([(u.module or "(top)", u.op, f"{u.bytes / 2**20:.2f}", u.reason) for u in big],
                        headers=["largest unsliced: module", "op", "MiB", "reason"])
    mem = [("weights", format_bytes(report.weight_bytes), ""),
           ("activations, original", format_bytes(report.original_peak_bytes),
            f"{report.original_peak_node} ({report.original_peak_module or 'top'})"),
           ("activations, compiled", format_bytes(report.peak_bytes),
            f"{report.peak_node} ({report.peak_module or 'top'})")]
    if lower_bound:
        mem.append(("activations, lower bound", format_bytes(report.lower_bound_bytes), "any slicing the rules allow"))
    else:
        mem.append(("activations, lower bound", "-", "not computed: add --lower-bound"))
    head = f"{report.policy.describe()}: {len(report.regions)} regions, {report.sliced_ops} ops sliced"
    text = f"{head}\n{regions}\n\n{unsliced}\n\n{tabulate(mem, headers=['planned peak', 'bytes', 'where'])}"
    return text + (f"\n\n{report.rehash.table()}" if report.rehash is not None else "")


def report_json(report, session=None, lower_bound: bool = False) -> dict:
    """The report as plain data: regions, every unsliced op with its reason, bytes (ints)."""
    policy = {f.name: getattr(report.policy, f.name) for f in fields(report.policy)}
    if policy.get("rehash") is not None:
        policy["rehash"] = asdict(policy["rehash"])
    out = {
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
        "regions": [asdict(r) for r in report.regions],
        "unsliced": [asdict(u) for u in report.unsliced],
        "rehash": None if report.rehash is None else {**asdict(report.rehash),
                                                      "skipped_share": report.rehash.skipped_share},
    }
    return out
