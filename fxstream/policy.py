"""The compile policy: what to slice and how much. A frozen dataclass checked on construction.

    >>> Policy()                          # slices nothing: the compiled module is the exported graph
    >>> Policy(slices=8)                  # 8 slices in every spatial and temporal region
    >>> Policy(spatial=8, temporal=4)     # per kind
"""
from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Policy", "AXIS_KIND"]

# Which policy field governs a region sliced along a named axis.
AXIS_KIND = {"frames": "spatial", "batch": "batch", "height": "temporal", "width": "temporal"}


def _check_count(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Policy.{name}: expected None or an int >= 1 (number of slices), got {value!r}")


@dataclass(frozen=True)
class Policy:
    """How to slice a video UNet.

    Attributes:
        slices: slice count for every spatial and temporal region (``None``: slice nothing).
        spatial: slice count for spatial layers (cut along frames); overrides ``slices``.
        temporal: slice count for temporal layers (cut along height or width); overrides ``slices``.
        batch: split the video batch into this many parts (``None`` or 1: no split).
        min_region_fraction: a region is made only if its largest interior tensor is at least this fraction of
            the graph's largest activation (small regions cost loop overhead and save nothing).
    """

    slices: int | None = None
    spatial: int | None = None
    temporal: int | None = None
    batch: int | None = None
    min_region_fraction: float = 0.05

    def __post_init__(self):
        for name in ("slices", "spatial", "temporal", "batch"):
            _check_count(name, getattr(self, name))
        f = self.min_region_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"Policy.min_region_fraction: expected a number in [0, 1], got {f!r}")

    def count_for(self, kind: str) -> int:
        """Slice count for a region kind (``"spatial"``, ``"temporal"`` or ``"batch"``); 1 means do not slice."""
        if kind not in ("spatial", "temporal", "batch"):
            raise ValueError(f"kind: expected 'spatial', 'temporal' or 'batch', got {kind!r}")
        if kind == "batch":
            return self.batch or 1
        own = getattr(self, kind)
        if own is not None:
            return own
        return self.slices or 1

    @property
    def slices_anything(self) -> bool:
        return any(self.count_for(k) > 1 for k in ("spatial", "temporal", "batch"))

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return "Policy(" + ", ".join(parts) + ")"
