"""What :func:`~fxstream.explain_pipeline` says: per step, per stage and for the pipeline, the weights
resident, what the pipeline holds, original and planned peaks (weights included), the lower bound, and a
timeline across the stages (a table, JSON and a PNG plot)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..policy import Policy, format_bytes

__all__ = ["PipelinePoint", "StepReport", "StageReport", "PipelineReport", "stages_timeline"]


@dataclass(frozen=True)
class PipelinePoint:
    """One point of a pipeline's memory timeline: bytes on the accelerator after a node of a stage's module
    (weights resident + held + activations live), and the most while it ran. ``x``: stage ``i`` spans
    ``[i, i + 1)``, shared among its steps by their node counts, each step's nodes spread evenly over its share."""

    stage: str
    step: str
    node: str
    module: str
    x: float
    live_bytes: int
    peak_bytes: int


@dataclass
class StepReport:
    """One module run within a stage (or ``decode_latents``' concatenation and float32 copy), original and
    planned. Bytes: ``resident`` (component -> weights on the accelerator while it runs), ``held_bytes`` (what the
    pipeline holds across the call), ``activation_bytes`` (the module's planned peak, its output included)."""

    stage: str
    name: str
    runs: str
    resident: dict
    original_resident: dict
    held_bytes: int
    original_held_bytes: int
    activation_bytes: int
    original_activation_bytes: int
    _lower_bound: object  # bytes, or a callable computing them on first access (a compile)
    least_resident_bytes: int  # the stage's own weights: everything else offloaded
    sliced: bool  # compiled by fxstream (False: planned, run as diffusers runs it)
    max_memory: int | None = None  # the budget the compiled module got
    report: object = field(default=None, repr=False)  # fxstream.Report of the module (compiled)
    original_report: object = field(default=None, repr=False)  # fxstream.Report of its original call

    @property
    def slicing(self) -> str:
        """The compiled module's slicing in a few words (regions, most slices; a halo region's passes and planned
        compute, which recomputes halo rows and GroupNorm statistics)."""
        if self.report is None or not self.sliced:
            return "-"
        regions = self.report.regions
        if not regions:
            return "none"
        text = f"{len(regions)} region{'s' if len(regions) > 1 else ''}, up to {max(r.slices for r in regions)} slices"
        halo = [r for r in regions if r.kind == "halo"]
        if halo:
            worst = max(halo, key=lambda r: r.compute)
            text += f"; halo up to {worst.passes} passes, {worst.compute:.1f}x compute"
        if self.report.host_bytes:
            text += (f"; {format_bytes(self.report.host_bytes)} parked in host memory, "
                     f"{format_bytes(self.report.host_traffic)} copied")
        return text

    @property
    def lower_bound_activation_bytes(self) -> int:
        """The lowest activations any slicing fxstream allows plans (computed on first access where the
        budget did not need it: a compile at the finest slicing)."""
        if callable(self._lower_bound):
            self._lower_bound = self._lower_bound()
        return self._lower_bound

    @property
    def weight_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.held_bytes + self.activation_bytes

    @property
    def original_peak_bytes(self) -> int:
        return sum(self.original_resident.values()) + self.original_held_bytes + self.original_activation_bytes

    @property
    def lower_bound_bytes(self) -> int:
        return self.least_resident_bytes + self.held_bytes + self.lower_bound_activation_bytes

    def to_json(self) -> dict:
        return {"module": self.name, "runs": self.runs, "sliced": self.sliced, "resident": self.resident,
                "weight_bytes": self.weight_bytes, "held_bytes": self.held_bytes,
                "activation_bytes": self.activation_bytes,
                "original_activation_bytes": self.original_activation_bytes,
                "lower_bound_activation_bytes": self.lower_bound_activation_bytes,
                "peak_bytes": self.peak_bytes, "original_peak_bytes": self.original_peak_bytes,
                "lower_bound_bytes": self.lower_bound_bytes, "max_memory": self.max_memory,
                "regions": len(self.report.regions) if self.report is not None else 0,
                "compute_factor": self.report.compute_factor if self.report is not None else 1.0,
                "host_bytes": self.report.host_bytes if self.report is not None else 0,
                "host_traffic": self.report.host_traffic if self.report is not None else 0,
                "slicing": self.slicing}


@dataclass
class StageReport:
    name: str
    steps: list
    offload: bool  # the modules this stage does not use are offloaded during it
    offloaded: list  # their names

    @property
    def modules(self) -> list:
        return [s.name for s in self.steps if s.report is not None or not s.sliced]

    def _most(self, attr: str) -> int:
        return max((getattr(s, attr) for s in self.steps), default=0)

    weight_bytes = property(lambda self: self._most("weight_bytes"))
    peak_bytes = property(lambda self: self._most("peak_bytes"))
    original_peak_bytes = property(lambda self: self._most("original_peak_bytes"))
    lower_bound_bytes = property(lambda self: self._most("lower_bound_bytes"))

    def to_json(self) -> dict:
        return {"name": self.name, "offload": self.offload, "offloaded": self.offloaded, "peak_bytes": self.peak_bytes,
                "original_peak_bytes": self.original_peak_bytes, "lower_bound_bytes": self.lower_bound_bytes,
                "weight_bytes": self.weight_bytes, "steps": [s.to_json() for s in self.steps]}


def _bytes_or_dash(n) -> str:
    return format_bytes(n) if n is not None else "-"


@dataclass
class PipelineReport:
    """What :func:`explain_pipeline` says: per stage, the weights resident, original and planned peaks (weights
    included), the lower bound; and a timeline across the stages (``timeline["original"]``,
    ``timeline["compiled"]``: lists of :class:`PipelinePoint`)."""

    pipeline: str
    height: int
    width: int
    num_frames: int
    batch: int
    guidance: bool
    dtype: str
    policy: Policy
    stages: list
    timeline: dict
    seconds: float = 0.0

    @property
    def budget(self) -> int | None:
        return self.policy.max_memory

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    @property
    def original_peak_bytes(self) -> int:
        return max(s.original_peak_bytes for s in self.stages)

    @property
    def lower_bound_bytes(self) -> int:
        return max(s.lower_bound_bytes for s in self.stages)

    def stage(self, name: str) -> StageReport:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"stage: expected one of {[s.name for s in self.stages]}, got {name!r}")

    def describe(self) -> str:
        return (f"{self.pipeline}: {self.height}x{self.width} px, {self.num_frames} frames, batch {self.batch}"
                f"{' (x2 classifier-free guidance)' if self.guidance else ''}, {self.dtype}, {self.policy.describe()}")

    def _rows(self) -> list:
        b = _bytes_or_dash
        rows = []
        for st in self.stages:
            if not st.steps:
                rows.append((st.name, "(nothing runs)", "", "", "", "", "", "", "", "", ""))
            for s in st.steps:
                rows.append((st.name, s.name + ("" if s.sliced else " *"), s.runs,
                             b(s.weight_bytes) + f" ({', '.join(s.resident) or '-'})",
                             ", ".join(st.offloaded) if st.offload else "-", b(s.held_bytes),
                             b(s.original_peak_bytes), b(s.peak_bytes), b(s.lower_bound_bytes), b(s.max_memory),
                             s.slicing))
        return rows

    def table(self) -> str:
        """The text the command line prints (``fxstream pipeline``): one row per step, then the pipeline's peaks."""
        from tabulate import tabulate
        head = tabulate(self._rows(), headers=["stage", "module", "runs", "weights resident", "offloaded", "held",
                                               "original peak", "planned peak", "lower bound", "max_memory given",
                                               "slicing"])
        budget = f", budget {format_bytes(self.budget)}" if self.budget is not None else ""
        fits = "" if self.budget is None else (" (fits)" if self.peak_bytes <= self.budget else " (over budget)")
        return (f"{self.describe()}\n{head}\n* planned as diffusers runs it (fxstream does not slice it)\n"
                f"pipeline peak: original {format_bytes(self.original_peak_bytes)}, planned "
                f"{format_bytes(self.peak_bytes)}{budget}{fits}; lower bound {format_bytes(self.lower_bound_bytes)}")

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict:
        """The report as plain data (``fxstream pipeline --json``)."""
        return {
            "pipeline": self.pipeline, "height": self.height, "width": self.width, "num_frames": self.num_frames,
            "batch": self.batch, "guidance": self.guidance, "dtype": self.dtype, "policy": self.policy.describe(),
            "budget_bytes": self.budget, "peak_bytes": self.peak_bytes,
            "original_peak_bytes": self.original_peak_bytes, "lower_bound_bytes": self.lower_bound_bytes,
            "seconds": round(self.seconds, 2),
            "stages": [st.to_json() for st in self.stages],
        }

    def plot(self, path, dpi: int = 130) -> None:
        """Draw original against planned bytes on the accelerator across the stages (weights included) into a PNG
        at ``path``, with the budget line and the stage boundaries."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        top = max([self.original_peak_bytes, self.peak_bytes] + ([self.budget] if self.budget else []))
        unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
        fig = Figure(figsize=(12, 5), layout="constrained")
        ax = fig.add_subplot()
        self._plot_series(ax, scale)
        if self.budget is not None:
            ax.axhline(self.budget / scale, color="#d62728", ls="--", lw=1.0,
                       label=f"budget {format_bytes(self.budget)}")
        for i, st in enumerate(self.stages):
            if i:
                ax.axvline(i, color="#bbbbbb", lw=0.8, ls="--", zorder=0)
            ax.text(i + 0.5, 1.0, f"{st.name}: {', '.join(s.name for s in st.steps) or 'nothing'}",
                    transform=ax.get_xaxis_transform(), fontsize=8, va="bottom", ha="center", color="#555555")
        ax.set_xlim(0, len(self.stages))
        ax.set_ylim(0, top / scale * 1.15)
        ax.set_xticks([])
        ax.set_xlabel("stages in order (each stage's module nodes spread over its span; denoise: one step)")
        ax.set_ylabel(f"planned bytes on the accelerator ({unit}), weights included")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(axis="y", lw=0.3, alpha=0.5)
        fig.suptitle(self.describe(), fontsize=9)
        fig.savefig(path, dpi=dpi)

    def _plot_series(self, ax, scale: int) -> None:
        """Both timelines: bytes live after each node (filled) and the most while it ran (a line)."""
        style = {"original": ("#7f7f7f", 0.25), "compiled": ("#1f77b4", 0.35)}
        for name, points in self.timeline.items():
            if not points:
                continue
            colour, alpha = style[name]
            x = [p.x for p in points] + [len(self.stages)]
            live = [p.live_bytes / scale for p in points] + [points[-1].live_bytes / scale]
            during = [p.peak_bytes / scale for p in points] + [points[-1].peak_bytes / scale]
            peak = self.original_peak_bytes if name == "original" else self.peak_bytes
            ax.fill_between(x, live, step="post", color=colour, alpha=alpha, lw=0)
            ax.step(x, during, where="post", color=colour, lw=0.9,
                    label=f"{'original (diffusers defaults)' if name == 'original' else 'planned'}: peak "
                          f"{format_bytes(peak)}")


def stages_timeline(stages: list) -> dict:
    """Both series across the stages: stage ``i`` spans ``[i, i + 1)``, shared among its steps in proportion to
    their nodes (a step that runs no module gets a tenth of the stage's nodes), each step's nodes spread evenly
    over its share."""
    out = {"original": [], "compiled": []}
    for i, st in enumerate(stages):
        sizes = [len(s.original_report.timeline["original"]) if s.original_report is not None else 0
                 for s in st.steps]
        sizes = [n or max(1, sum(sizes) // 10) for n in sizes]
        x0 = float(i)
        for s, n in zip(st.steps, sizes):
            width = n / sum(sizes)
            for which in ("original", "compiled"):
                out[which] += _step_points(st.name, s, which, x0, width)
            x0 += width
    return out


def _step_points(stage: str, s: StepReport, which: str, x0: float, width: float) -> list:
    """One step's points of one series over ``[x0, x0 + width)``: its entry, then one per node."""
    if which == "original":
        base = sum(s.original_resident.values()) + s.original_held_bytes
        rep, act = s.original_report, s.original_activation_bytes
    else:
        base = s.weight_bytes + s.held_bytes
        rep, act = s.report, s.activation_bytes
    pts = rep.timeline[which] if rep is not None else []
    series = [PipelinePoint(stage, s.name, "(enter)", "", x0, base, base)]
    if not pts:  # a step that runs no module: one point
        series.append(PipelinePoint(stage, s.name, s.name, "", x0 + width / 2, base + act, base + act))
        return series
    for k, t in enumerate(pts):
        series.append(PipelinePoint(stage, s.name, t.node, t.module, x0 + width * (k + 1) / (len(pts) + 1),
                                    base + t.live_bytes, base + t.peak_bytes))
    return series
