"""The compile policy: what to slice and how much. A frozen dataclass checked on construction.

    >>> Policy()                          # slices nothing: the compiled module is the exported graph
    >>> Policy(slices=8)                  # 8 slices in every spatial and temporal region
    >>> Policy(spatial=8, temporal=4)     # per kind
    >>> Policy(max_memory="6GiB")         # the fewest slices (and a batch split if needed) that fit 6 GiB
    >>> Policy(slices=8, pipeline=2)      # up to 2 slices of a region in flight (CUDA streams / CPU workers)
    >>> Policy(slices=8, rehash=StepRehash(full_every=3, steps=25))  # and reuse a cached feature on 2 steps in 3
    >>> Policy(halo=16)                   # convolution chains (a VAE decoder) in 16 bands of rows, with halos
    >>> Policy(halo=16, host_memory="32GiB")  # and GroupNorm inputs parked in host memory, not recomputed
    >>> Policy(slices=8, distributed=True)  # each region's slices spread over the ranks of the process group
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

from .distributed import Distributed
from .rehash import StepRehash

__all__ = ["Policy", "AXIS_KIND", "parse_bytes", "format_bytes", "check_policy"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value, name: str = "max_memory") -> int:
    """Bytes from an int or a string such as ``"6GiB"``, ``"6 GB"``, ``"512MiB"`` (GiB = 2**30, GB = 10**9)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected bytes (an int) or a string such as '6GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name}: expected a positive number of bytes, got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).upper() if m else None
        if m and unit in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[unit])
    raise ValueError(f"{name}: expected bytes (an int) or a string such as '6GiB', '6GB' or '512MiB', got {value!r}")


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"

# Which policy field governs a region sliced along a named axis.
# Axis names come from the ops (fxstream/analysis/axes.py); an axis with another name is not sliced.
AXIS_KIND = {"frames": "spatial", "tokens": "spatial", "batch": "batch", "height": "temporal", "width": "temporal"}


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
        spatial: slice count for spatial layers (cut along frames; a transformer's layers along tokens); overrides
            ``slices``.
        temporal: slice count for temporal layers (cut along height or width); overrides ``slices``.
        batch: split the video batch into this many parts (``None`` or 1: no split).
        max_memory: a memory budget, weights included (bytes, or a string such as ``"6GiB"``). The compiler
            chooses for each region the fewest slices, and whether to split the batch, whose planned peak fits;
            ``slices``/``spatial``/``temporal``/``batch`` are then the most it may use. A budget no slicing can
            meet raises :class:`~fxstream.MemoryBudgetError` before any compute.
        pipeline: the most slices of a region in flight at once (1: one after another). On CUDA, ``k`` streams;
            on the CPU, a pool of ``k`` workers where measurement shows it faster than the serial loop (each region
            measures both on its first calls). The planner counts ``k`` working sets per region; with
            ``max_memory`` it is the most the budget may use (fewer where ``k`` would not fit).
        cpu_workers: on the CPU with ``pipeline > 1``, True runs the slices on a worker pool, False one after
            another; None (default) lets each region measure both on its first call and keep the faster.
        rehash: Step Rehash across denoising steps (:class:`~fxstream.StepRehash`): on the steps its schedule
            does not make full, a cached temporal-layer feature is reused and every op that only fed it is skipped.
            None (default): every call computes everything.
        halo: slice count along height for chains of convolutions, upsamplings and GroupNorms (a VAE decoder):
            each band of rows is computed with the halo of rows its convolutions need, and GroupNorm statistics
            by extra passes (see :mod:`fxstream.analysis.halo`); exact up to float rounding. Block outputs up to
            about one band's size (the largest activation / N) are kept whole, so the passes do not recompute
            the blocks before them. A pair ``(rows, columns)`` cuts each band into columns too: a grid of tiles
            with halos along height and width, whose halos cost less than those of thin bands. ``None``: no halo
            slicing. With ``max_memory``, an int is the most tiles in all the budget may use (it chooses between
            bands and grids, and what to keep whole), a pair the most rows and columns.
        host_memory: host memory a halo region may park values in (bytes, or a string as ``max_memory``):
            the inputs of its GroupNorms, written once by their statistics pass and read back band by band by
            the passes after it, which then do not recompute what fed them (NOTE [Host checkpoints] in
            :mod:`fxstream.analysis.halo`; pinned CPU memory on CUDA). The planner counts these bytes apart from
            the device's; with ``max_memory`` the budget parks only where that plans faster than recomputing.
            ``None`` (default): nothing parked.
        min_region_fraction: a region is made only if its largest interior tensor is at least this fraction of
            the graph's largest activation (small regions cost loop overhead and save nothing), and only if it
            does not raise the planned peak over its ops; 0 keeps every region the rules allow.
        cache_size: the most input signatures kept compiled at once (least recently used evicted).
        verify: the first call of each signature also runs the original module and compares; beyond float
            rounding it raises :class:`~fxstream.VerificationError` with the max difference and the first region
            whose output differs.
        cache_dir: the folder of the plan cache (:mod:`fxstream.plan_cache`): a budget search's decision is kept
            there, so another process compiling the same graph under the same policy makes one compile instead
            of the search. ``None`` (default): the folder the environment variable ``FXSTREAM_CACHE_DIR`` names,
            no cache where it is unset; ``""`` or ``False``: no cache. It does not change what is compiled.
        distributed: spread each region's slices over the ranks of a ``torch.distributed`` process group
            (:mod:`fxstream.distributed`): ``True`` (the default group), a ProcessGroup, a 1-D DeviceMesh, or
            :class:`~fxstream.Distributed` (with a timeout). Every rank calls the module with the same inputs and
            returns the one-process result. ``None`` (default): this process alone. It does not change what is
            compiled (the other fields keep their meaning per rank).
        halo_ranks: the ranks the ``halo`` bands are spread over (``halo`` counting the bands of all of them):
            set by ``Policy(distributed=...)`` on N ranks, which compiles ``halo=h`` as ``halo=h * N,
            halo_ranks=N`` (:func:`fxstream.distributed.compile_policy`). A value kept whole between halo regions
            is then held in rows, a rank holding about 1/N of it, so values up to the largest activation over the
            bands *per rank* are kept (NOTE [Checkpoints across ranks]). 1 (default): one device.
    """

    slices: int | None = None
    spatial: int | None = None
    temporal: int | None = None
    batch: int | None = None
    max_memory: int | str | None = None
    pipeline: int = 1
    cpu_workers: bool | None = None
    rehash: StepRehash | None = None
    halo: int | tuple[int, int] | None = None
    host_memory: int | str | None = None
    min_region_fraction: float = 0.05
    cache_size: int = 8
    verify: bool = False
    cache_dir: str | bool | None = None
    distributed: Distributed | bool | None = None
    halo_ranks: int = 1

    def __post_init__(self):
        for name in ("slices", "spatial", "temporal", "batch"):
            _check_count(name, getattr(self, name))
        h = self.halo
        if isinstance(h, list):
            h = tuple(h)
            object.__setattr__(self, "halo", h)
        if isinstance(h, tuple):
            if len(h) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in h):
                raise ValueError(f"Policy.halo: expected None, an int >= 1 (bands of rows) or a pair of ints >= 1 "
                                 f"(rows, columns of tiles), got {self.halo!r}")
        else:
            _check_count("halo", h)
        p = self.pipeline
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"Policy.pipeline: expected an int >= 1 (slices in flight; 1: one at a time), got {p!r}")
        if self.cpu_workers is not None and not isinstance(self.cpu_workers, bool):  # 1 == True: not a bool
            raise ValueError(f"Policy.cpu_workers: expected None (measure), True or False, got {self.cpu_workers!r}")
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_bytes(self.max_memory, "Policy.max_memory"))
        if self.host_memory is not None:
            object.__setattr__(self, "host_memory", parse_bytes(self.host_memory, "Policy.host_memory"))
        if self.rehash is not None and not isinstance(self.rehash, StepRehash):
            raise TypeError(f"Policy.rehash: expected None or fxstream.StepRehash, got {type(self.rehash).__name__}; "
                            "write Policy(rehash=fxstream.StepRehash(full_every=3, steps=25))")
        c = self.cache_size
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"Policy.cache_size: expected an int >= 1 (compiled signatures kept), got {c!r}")
        if not isinstance(self.verify, bool):
            raise ValueError(f"Policy.verify: expected True or False, got {self.verify!r}")
        d = self.cache_dir
        if isinstance(d, os.PathLike):
            d = os.fspath(d)
            object.__setattr__(self, "cache_dir", d)
        if not (d is None or d is False or isinstance(d, str)):
            raise ValueError(f"Policy.cache_dir: expected None (the environment variable FXSTREAM_CACHE_DIR), a "
                             f"folder (a str or a path) or '' / False (no plan cache), got {d!r}")
        object.__setattr__(self, "distributed", Distributed.of(self.distributed))
        r = self.halo_ranks
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"Policy.halo_ranks: expected an int >= 1 (the ranks the halo bands spread over; "
                             f"Policy(distributed=...) sets it), got {r!r}")
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
        return any(self.count_for(k) > 1 for k in ("spatial", "temporal", "batch")) or self.halo_tiles > 1

    @property
    def halo_grid(self) -> tuple[int, int]:
        """``halo`` as (rows, columns) of tiles: (N, 1) for N bands of rows, (1, 1) for None."""
        h = self.halo
        return (1, 1) if h is None else tuple(h) if isinstance(h, tuple) else (h, 1)

    @property
    def halo_tiles(self) -> int:
        r, c = self.halo_grid
        return r * c

    def describe(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                parts.append(f"{f.name}={format_bytes(v)!r}" if f.name in ("max_memory", "host_memory") else
                             f"{f.name}={v.describe()}" if f.name in ("rehash", "distributed") else f"{f.name}={v!r}")
        return "Policy(" + ", ".join(parts) + ")"


def check_policy(policy) -> Policy:
    """``policy`` itself, ``Policy()`` for None; TypeError naming the argument for anything else."""
    if policy is None:
        return Policy()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy: expected fxstream.Policy, got {type(policy).__name__}; "
                        "write policy=fxstream.Policy(slices=8)")
    return policy
