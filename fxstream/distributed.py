"""Exact multi-device inference on torch.distributed: each loop region's slices spread over the ranks.

``fxstream.compile(unet, Policy(slices=8, distributed=True))`` in every process of an initialised process group
(``torchrun --nproc-per-node N script.py``; NCCL on GPUs, gloo on CPUs): every rank holds the weights and calls
the module with the same inputs. Each cut region of the compiled graph (:class:`~fxstream.runtime.LoopRegion`)
runs on each rank only the slices of its block (rank ``r`` of ``N`` takes the ``r``-th of ``N`` contiguous runs
of slices), then every rank gets the other blocks' parts of the region's outputs by one broadcast per rank and
output: the same bytes on every rank, the bytes the one-process loop writes. Partial outputs (sums over the axis:
GroupNorm statistics) are broadcast slice by slice and added in slice order on every rank, so the sum is the one
the one-process loop makes, bit for bit. Ops outside regions, halo regions and regions whose bodies hold regions
of their own (a batch split: their inner regions are spread) run whole on every rank.

NOTE [Sharded regions]
What each rank computes is what the one-process compiled module computes for those slices (the same bodies on
the same inputs), and every byte a rank did not compute arrives from the rank that did: the output on every rank
equals the one-process compiled module's (bitwise where the kernels are the same: same thread counts, same
device kind) and is the same on every rank. Memory per rank is today that of one device (every rank holds every
region's whole outputs, plus one contiguous part in transit where a part is a strided view); the work of the
regions is divided by ``N``.

Checks and failures (:class:`Shards`):

- every call first all-gathers a digest of its inputs (the tree of arguments; each tensor's shape, dtype and the
  float64 sum of its values and of their absolute values; non-tensor values) and of the compiled plan (each
  region's slice bounds): a rank whose digest differs from rank 0's gets a :class:`DistributedError` naming it,
  on every rank, before any compute;
- every collective is started asynchronously and waited for by polling, with ``Distributed.timeout`` seconds at
  most; a rank that raises inside a compiled call writes its error into the process group's store before
  raising, and the ranks waiting for it raise a :class:`DistributedError` quoting it at their next poll; a rank
  that dies closes its connections (gloo raises at once) or is caught by the timeout. Never a hang. After such an
  error the group is not used again by this module (a collective was abandoned): restart the processes.
"""
from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from .errors import FxstreamError

__all__ = ["Distributed", "DistributedError", "Shards", "shards_for", "shard_regions", "block"]

_POLL_S = 0.0002  # first poll interval; doubles up to _POLL_MAX_S while a collective is not complete
_POLL_MAX_S = 0.005


class DistributedError(FxstreamError, RuntimeError):
    """A distributed call failed: another rank raised or died, a collective timed out, or the ranks were called
    with different inputs. The message names the rank and what happened."""


@dataclass(frozen=True)
class Distributed:
    """``Policy(distributed=...)``: run each region's slices spread over the ranks of a process group.

    Attributes:
        group: the ``torch.distributed`` ProcessGroup, or a one-dimensional DeviceMesh; None: the default group
            (``torch.distributed.init_process_group`` must have been called).
        timeout: the most seconds a rank waits in one collective for the others (a rank that raised or died is
            reported sooner when it could say so) before a :class:`DistributedError`.
    """

    group: object = None
    timeout: float = 300.0

    def __post_init__(self):
        t = self.timeout
        if isinstance(t, timedelta):
            object.__setattr__(self, "timeout", t.total_seconds())
        elif isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"Distributed.timeout: expected seconds > 0 (a number or a timedelta), got {t!r}")
        g = self.group
        if g is not None and not isinstance(g, dist.ProcessGroup) and not _is_mesh(g):
            raise TypeError(f"Distributed.group: expected None (the default process group), a "
                            f"torch.distributed.ProcessGroup or a 1-D DeviceMesh, got {type(g).__name__}")
        if _is_mesh(g) and g.ndim != 1:
            raise ValueError(f"Distributed.group: expected a one-dimensional DeviceMesh, got one of {g.ndim} "
                             "dimensions; pass mesh['name'] for the dimension the slices spread over")

    @staticmethod
    def of(value) -> "Distributed | None":
        """The ``Policy.distributed`` value as a :class:`Distributed`: None / False -> None, True -> the default
        group, a ProcessGroup or DeviceMesh -> that group."""
        if value is None or value is False:
            return None
        if value is True:
            return Distributed()
        if isinstance(value, Distributed):
            return value
        if isinstance(value, dist.ProcessGroup) or _is_mesh(value):
            return Distributed(group=value)
        raise TypeError(f"Policy.distributed: expected None/False, True (the default process group), a "
                        f"torch.distributed ProcessGroup or DeviceMesh, or fxstream.Distributed(...), got "
                        f"{type(value).__name__}")

    def describe(self) -> str:
        g = "default group" if self.group is None else type(self.group).__name__
        return f"Distributed({g}, timeout={self.timeout:g} s)"


def _is_mesh(x) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(x, DeviceMesh)


def block(n_slices: int, ranks: int, rank: int) -> range:
    """The slices rank ``rank`` of ``ranks`` runs: its run of the ``n_slices`` slices cut into ``ranks``
    contiguous runs whose lengths differ by at most one (the first ones longer); empty where there are fewer
    slices than ranks."""
    q, r = divmod(n_slices, ranks)
    start = rank * q + min(rank, r)
    return range(start, start + q + (rank < r))


class Shards:
    """One process group as the regions use it: this rank, the ranks, the store errors are written to, and the
    waits (see the module's docstring)."""

    def __init__(self, spec: Distributed):
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "Policy(distributed=...): torch.distributed has no process group in this process; call "
                "torch.distributed.init_process_group() first (torchrun sets the environment it reads), or pass "
                "distributed=None to run on one device")
        g = spec.group
        self.group = g.get_group() if _is_mesh(g) else g if g is not None else dist.group.WORLD
        self.spec = spec
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.globals = [dist.get_global_rank(self.group, q) for q in range(self.size)]
        self.backend = dist.get_backend(self.group)
        self.store = dist.distributed_c10d._get_process_group_store(self.group)
        self._key = f"fxstream/{self.group.group_name}/failed"
        self.failed: str | None = None  # why this group was given up (then every later call raises it)

    def __repr__(self) -> str:
        return f"Shards(rank {self.rank} of {self.size}, {self.backend})"

    # -- failures -----------------------------------------------------------------------------------------------
    def fail(self, error: BaseException) -> None:
        """Tell the other ranks that this one raised ``error`` inside a compiled call (they raise at their next
        poll) and give the group up here."""
        if isinstance(error, DistributedError):  # already a report of another rank's failure: nothing to add
            return
        msg = f"rank {self.rank} raised {type(error).__name__}: {error}"
        self.failed = self.failed or msg
        try:
            self.store.set(self._key, msg)
        except (RuntimeError, dist.DistStoreError):  # the store is gone too: the timeout reports it
            pass

    def _other_failed(self) -> str | None:
        try:
            if self.store.check([self._key]):
                return self.store.get(self._key).decode(errors="replace")
        except (RuntimeError, dist.DistStoreError) as e:
            return f"the process group's store is unreachable ({e}): a rank has probably died"
        return None

    def _given_up(self) -> DistributedError:
        return DistributedError(f"fxstream: the process group was given up after an earlier failure ({self.failed}); "
                                "restart the processes")

    def wait(self, work, what: str) -> None:
        """Wait for an asynchronous collective, at most ``timeout`` seconds, raising a DistributedError where a
        rank failed, died or is late."""
        deadline = time.monotonic() + self.spec.timeout
        pause = _POLL_S
        while True:
            try:
                if work.is_completed():
                    work.wait()  # raises the collective's own error, if any
                    return
            except RuntimeError as e:
                other = self._other_failed()
                self.failed = other or f"{what} failed: {e}"
                raise DistributedError(f"fxstream, rank {self.rank} of {self.size}: {what} failed"
                                       + (f" because {other}" if other else f": {e} (a rank has probably died)")) \
                    from e
            other = self._other_failed()
            if other is not None:
                self.failed = other
                raise DistributedError(f"fxstream, rank {self.rank} of {self.size}: {what} abandoned because {other}")
            if time.monotonic() > deadline:
                self.failed = f"{what} timed out"
                raise DistributedError(
                    f"fxstream, rank {self.rank} of {self.size}: {what} timed out after {self.spec.timeout:g} s: "
                    "another rank did not reach it (it died, hangs, or was called a different number of times); "
                    "Distributed(timeout=...) sets the wait")
            time.sleep(pause)
            pause = min(2 * pause, _POLL_MAX_S)

    # -- collectives --------------------------------------------------------------------------------------------
    def _ready(self) -> None:
        if self.failed is not None:
            raise self._given_up()

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> None:
        """``t`` (contiguous) from rank ``src`` of the group to every rank, in place."""
        self._ready()
        self.wait(dist.broadcast(t, self.globals[src], group=self.group, async_op=True), what)

    def broadcast_view(self, view: torch.Tensor, src: int, what: str) -> None:
        """The bytes of ``view`` (any strided view) from rank ``src`` to the same view on every rank: in place
        where it is contiguous, else through one contiguous copy."""
        if view.is_contiguous():
            self.broadcast(view, src, what)
            return
        tmp = view.contiguous() if self.rank == src else torch.empty(view.shape, dtype=view.dtype, device=view.device)
        self.broadcast(tmp, src, what)
        if self.rank != src:
            view.copy_(tmp)

    def check_same(self, digest: bytes, describe) -> None:
        """Every rank's ``digest`` (of its inputs and plan) must be rank 0's; else a DistributedError naming the
        ranks that differ and ``describe()`` (this rank's inputs)."""
        self._ready()
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        mine = torch.tensor(struct.unpack("<4q", digest[:32]), dtype=torch.int64, device=device)
        every = torch.empty(self.size * 4, dtype=torch.int64, device=device)
        self.wait(dist.all_gather_single(every, mine, group=self.group, async_op=True),
                  "the check that every rank has the same inputs")
        rows = every.view(self.size, 4).cpu().tolist()
        odd = [q for q, row in enumerate(rows) if row != rows[0]]
        if odd:
            raise DistributedError(
                f"fxstream, rank {self.rank} of {self.size}: rank(s) {', '.join(map(str, odd))} were called with other "
                f"inputs than rank 0 (shapes, dtypes, values or non-tensor arguments) or compiled another plan; every "
                f"rank must call the compiled module with the same inputs. This rank's: {describe()}")


def shards_for(value) -> Shards | None:
    """A :class:`Shards` for a ``Policy.distributed`` value (None where it asks for none)."""
    spec = Distributed.of(value)
    return None if spec is None else Shards(spec)


def shard_regions(gm: torch.nn.Module, shards: Shards | None) -> int:
    """Give every loop region of ``gm`` whose bodies hold no regions of their own ``shards`` (None: run whole on
    this process); the number of regions spread."""
    from .runtime import LoopRegion
    n = 0
    for m in gm.modules():
        if isinstance(m, LoopRegion):
            m.shards = None if m.nested else shards
            n += m.shards is not None
    return n


def inputs_digest(flat: list, plan: tuple) -> bytes:
    """A sha256 of the call's leaves (tensors by shape, dtype and two float64 sums; other values by repr) and
    ``plan``: equal on two ranks when they were called alike and compiled alike."""
    h = hashlib.sha256(repr(plan).encode())
    for x in flat:
        if isinstance(x, torch.Tensor):
            h.update(repr((tuple(x.shape), str(x.dtype))).encode())
            if x.numel() and (x.is_floating_point() or x.is_complex() or x.dtype not in (torch.bool,)):
                v = x.detach().to(torch.float64) if not x.is_complex() else x.detach().abs().to(torch.float64)
                h.update(struct.pack("<2d", float(v.sum()), float(v.abs().sum())))
        else:
            h.update(repr(x).encode())
    return h.digest()


def plan_digest(gm: torch.nn.Module) -> tuple:
    """What every rank must have compiled alike: each spread region's axis, length and slice bounds, in order."""
    from .runtime import LoopRegion
    return tuple((m.axis, m.length, tuple(m.bounds)) for m in gm.modules()
                 if isinstance(m, LoopRegion) and getattr(m, "shards", None) is not None)


def flat_leaves(kwargs: dict) -> list:
    return pytree.tree_leaves(kwargs)
