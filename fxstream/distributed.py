"""Exact multi-device inference on torch.distributed: each loop region's slices spread over the ranks.

``fxstream.compile(unet, Policy(slices=8, distributed=True))`` in every process of an initialised process group
(``torchrun --nproc-per-node N script.py``; NCCL on GPUs, gloo on CPUs): every rank holds the weights and calls
the module with the same inputs. The compile for ``N`` ranks cuts each region in ``8 * N`` slices (NOTE [Slices
per rank]). Each cut region of the compiled graph (:class:`~fxstream.runtime.LoopRegion`) runs on each rank only
the slices of its block (rank ``r`` of ``N`` takes the ``r``-th of ``N`` contiguous runs of slices). A region
output that only spread regions read stays in parts: each rank keeps its own part, and a reader cutting another
dim of it gets its part by one all-to-all (NOTE [Values held in parts]); any other output is gathered whole on
every rank by one all-gather: the same bytes on every rank, the bytes the one-process loop writes. Partial outputs
(sums over the axis: GroupNorm statistics) are gathered slice by slice and added in slice order on every rank, so
the sum is the one the one-process loop makes, bit for bit. Halo regions (VAE decoders, ``fxstream.halo_runtime``)
spread each pass's slices the same way: the statistics passes gather every slice's (count, mean, M2) and merge
them in slice order; an output only halo regions read stays in rows, each rank holding the rows it made and its
readers' halo rows, filled from the neighbours (NOTE [Rows held in parts]); any other output is gathered from
every slice's rows. Ops outside regions run whole on every rank.

NOTE [Batch splits across ranks]
A batch split (``Policy(batch=k)``: regions whose bodies hold regions of their own, the classifier-free-guidance
batch cut in ``k`` parts) is spread itself where its parts divide evenly over the ranks (``k % N == 0``): each
rank runs its parts whole, its inner regions on the rank alone, and the loop's outputs are gathered once. Its
FLOPs per rank are then exactly ``1/N`` of the loop's, which spreading the inner regions cannot beat (their ops
outside regions run on every rank), and it moves only the loop's outputs where the inner regions move each of
theirs: never more planned time. Where the ranks divide evenly into the parts (``N % k == 0``), the ranks form
``k`` groups of ``N // k`` consecutive ranks (:meth:`Shards.groups`): group ``g`` runs part ``g``, spreading its
inner regions over its own ranks, and the parts' outputs are gathered over the *cross* groups (the ranks at one
position in every group). On 4 GPUs with the guidance batch in 2 parts, ranks 0-1 run the conditional half and
ranks 2-3 the unconditional one at once, each pair dividing its half's regions. Otherwise (a remainder either
way) the inner regions are spread over all ranks and the parts run one after another on every rank.
``Policy(batch=2, slices=8, distributed=True)`` on 2 GPUs runs the conditional and the unconditional halves of a
guided step at once. Where the policy sets no ``batch`` (and no budget), the compile for N ranks also tries the
batch cut in N parts and, on an even N, in 2, and keeps the fastest where such a split is spread (over ranks or
groups) and the latency model plans it faster on NVLink, the fastest link (so on any slower one too):
``fxstream.entry.guidance_split``; ``explain(..., ranks=...)`` plans the same choice (``RankPlan.batch_split``).
``Policy(batch=1)`` keeps the batch whole.

NOTE [Sharded regions]
What each rank computes is what the one-process compiled module computes for those slices (the same bodies on
the same inputs), and every byte a rank did not compute arrives from the rank that did: the output on every rank
equals the one-process compiled module's (bitwise where the kernels are the same: same thread counts, same
device kind) and is the same on every rank. The work of the regions is divided by ``N``; so is what a rank holds
of the values between spread regions and of each slice's working set (NOTE [Values held in parts], NOTE [Slices
per rank]), while values that ops outside regions read are whole on every rank.

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
import math
import operator
import struct
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef

from .analysis.cuts import PARTIAL, Cut
from .errors import FxstreamError
from .graph_utils import output_values
from .meta import grouped_calls
from .runtime import contiguous_strides

__all__ = ["Distributed", "DistributedError", "Shards", "shards_for", "shard_regions", "block", "rank_ranges",
           "equal_runs", "held_values", "Held", "Reshard", "Sharding", "reshard", "Rows", "HaloRows", "halo_rows",
           "fill_rows", "compile_policy", "inputs_digest", "plan_digest", "rank_plan", "RankPlan", "Link", "LINKS",
           "H200_SVD_FLOPS_PER_S", "spread_loops", "feature_parts", "gather_parts", "planned_flops"]

_SUBGROUPS: dict = {}  # (parent group's name, global ranks) -> the ProcessGroup made for them (Shards.groups)
_POLL_S = 0.00005  # first poll interval; doubles up to _POLL_MAX_S while a collective is not complete
_POLL_MAX_S = 0.002
_CHECK_S = 0.05  # how often a wait asks the store whether another rank failed, and looks at the clock


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
        self.backend = dist.get_backend(self.group)
        self.store = dist.distributed_c10d._get_process_group_store(self.group)
        self._key = f"fxstream/{self.group.group_name}/failed"
        self._root = self  # whose failure state this one shares (a group of ranks made by groups(): its parent's)
        self._failed: str | None = None  # why this group was given up (then every later call raises it)
        self._members = None  # a group of ranks: its global ranks until its process group is made
        self._groups: dict = {}  # k -> (cross group, own group): see groups()

    @property
    def failed(self) -> str | None:
        return self._root._failed

    @failed.setter
    def failed(self, why: str | None) -> None:
        self._root._failed = why

    def __repr__(self) -> str:
        return f"Shards(rank {self.rank} of {self.size}, {self.backend})"

    def groups(self, k: int) -> tuple["Shards", "Shards"]:
        """The ranks as ``k`` groups of ``size // k`` consecutive ranks (NOTE [Batch splits across ranks]): this
        rank's *cross* group (the rank at its position in every group; its rank there is its group's index) and
        its own group. Their process groups are made on their first collective (after the call's input check;
        ``new_group`` with local synchronisation: only the members take part, and each process makes each group
        once, whatever compiled it). They share this group's failure state and store: a rank that raises, dies or
        times out in one stops the others, and the whole group is given up."""
        if k not in self._groups:
            if k < 2 or self.size % k or self.size == k:
                raise ValueError(f"Shards.groups: expected k dividing {self.size} ranks, 1 < k < {self.size}, got {k}")
            m = self.size // k
            g, i = divmod(self.rank, m)
            world = [dist.get_global_rank(self.group, r) for r in range(self.size)]
            self._groups[k] = (self._sub([world[h * m + i] for h in range(k)], g),
                               self._sub([world[g * m + j] for j in range(m)], i))
        return self._groups[k]

    def _sub(self, members: list, rank: int) -> "Shards":
        sub = object.__new__(Shards)
        sub.group, sub._members, sub._groups = None, (self.group.group_name, tuple(members)), {}
        sub.spec, sub.backend, sub.store, sub._key, sub._root = self.spec, self.backend, self.store, self._key, self._root
        sub.size, sub.rank = len(members), rank
        return sub

    def _made(self) -> None:
        """A group of ranks' process group, made on its first collective (one per process and members)."""
        if self._members not in _SUBGROUPS:
            _SUBGROUPS[self._members] = dist.new_group(list(self._members[1]), use_local_synchronization=True)
        self.group = _SUBGROUPS[self._members]
        if dist.get_rank(self.group) != self.rank:
            raise DistributedError(
                f"fxstream: the ranks of the process group are not in the order of their global ranks (this rank is "
                f"{dist.get_rank(self.group)} in its group of ranks {list(self._members[1])}, expected {self.rank}); "
                "pass distributed= a group whose ranks follow the global order, or Policy(batch=1)")

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
        rank failed, died or is late. The collective is polled often; the store (a round trip to rank 0's server)
        and the clock only every ``_CHECK_S``."""
        start = time.monotonic()
        deadline, check = start + self.spec.timeout, start + _CHECK_S
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
            now = time.monotonic()
            if now >= check:
                check = now + _CHECK_S
                other = self._other_failed()
                if other is not None:
                    self.failed = other
                    raise DistributedError(f"fxstream, rank {self.rank} of {self.size}: {what} abandoned because {other}")
                if now > deadline:
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
        if self.group is None:
            self._made()

    def all_gather(self, out: torch.Tensor, mine: torch.Tensor, what: str) -> None:
        """Every rank's ``mine`` (1-D, contiguous, the same size on every rank) into ``out`` (1-D, ``size`` times
        as long), in rank order; ``mine`` may be this rank's part of ``out`` (in place)."""
        self._ready()
        self.wait(dist.all_gather_single(out, mine, group=self.group, async_op=True), what)

    def all_to_all(self, out: torch.Tensor, send: torch.Tensor, out_sizes: list, send_sizes: list, what: str) -> None:
        """``send`` (1-D, contiguous) cut in ``send_sizes`` elements, the ``q``-th run to rank ``q``; ``out`` (1-D)
        gets, in rank order, what every rank sent this one (``out_sizes``)."""
        self._ready()
        self.wait(dist.all_to_all_single(out, send, out_sizes, send_sizes, group=self.group, async_op=True), what)

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


def compile_policy(policy, ranks: int = 1):
    """The policy a compile for ``ranks`` ranks of spread regions uses: ``distributed`` dropped, the region floor
    at 0 where it is left at its default (NOTE [No region floor across devices]), and the slice counts per rank
    (NOTE [Slices per rank])."""
    from dataclasses import fields, replace
    default = next(f.default for f in fields(policy) if f.name == "min_region_fraction")
    floor = 0.0 if policy.min_region_fraction == default else policy.min_region_fraction
    changes = dict(distributed=None, min_region_fraction=floor)
    parts = policy.batch or 1
    # the ranks a region's slices spread over: all, those of a group (ranks // parts), or none (whole parts)
    per = ranks if parts == 1 or ranks % parts and parts % ranks else 1 if parts % ranks == 0 else ranks // parts
    if per > 1:
        changes.update({name: getattr(policy, name) * per for name in ("slices", "spatial", "temporal")
                        if getattr(policy, name)})
    if ranks > 1 and policy.halo is not None:  # halo regions spread over every rank, their bands of rows too
        rows, cols = policy.halo_grid
        changes["halo"] = rows * ranks if isinstance(policy.halo, int) else (rows * ranks, cols)
        changes["halo_ranks"] = ranks  # NOTE [Checkpoints across ranks]
    return replace(policy, **changes)


# NOTE [Checkpoints across ranks]
# A halo region is cut where a value at most ``halo_keep`` bytes whole crosses (a checkpoint, kept between the
# regions; NOTE [Statistics passes]): by default the largest activation over the bands, about one band's size. The
# compile for ``N`` ranks cuts ``h * N`` bands (NOTE [Slices per rank]), and over ``h * N`` bands that threshold
# would keep ``N`` times fewer values: full-size SVD's temporal decoder, ``Policy(halo=8)``, would plan 11 regions
# at 2 ranks and 2 at 8 (17 on one device), its statistics passes computing 31x / 110x its ops' FLOPs (13x on one
# device), slower on 2 ranks than on one. But a value kept between spread halo regions is held in rows (NOTE [Rows
# held in parts]): a rank holds about ``1/N`` of it. So the threshold stays the one device's, the largest
# activation over ``h`` (the bands per rank): a rank's part of a kept value costs what it costs on one device
# against a band, and the regions are the one device's (17; compute 15.6x / 20.2x / 29.0x at 2 / 4 / 8 ranks,
# spread: 7.8x / 5.0x / 3.6x per rank), for a per-rank peak of 0.58 / 0.40 / 0.34 of one device's (0.50 / 0.35
# / 0.34 with the threshold over ``h * N``). ``compile_policy`` says so with ``Policy(halo_ranks=N)``, so that the
# one-process compile of ``compile_policy(policy, N)`` is the same graph. A budget (``max_memory``) chooses its own.


# NOTE [Slices per rank]
# ``Policy(slices=k)`` keeps its meaning on each rank: a rank cuts its part of each region in ``k`` slices, so a
# compile for ``N`` ranks cuts each region in ``k * N`` (fewer where the axis is shorter) and rank ``r`` runs the
# ``r``-th run of them. A slice's working set is then about ``1/N`` of one device's, as the parts a rank holds
# between regions are (NOTE [Values held in parts]); where ``k * N`` is more than the axis has elements, each
# element's body is cut again along its own axes (NOTE [Slices within one element]). With a batch split
# (``batch=b``; NOTE [Batch splits across ranks]) the counts follow ``b``: where ``b`` is a multiple of ``N`` each
# rank runs whole parts, sliced ``k`` ways as on one device; where ``N`` is a multiple of ``b`` the parts run on
# groups of ``m = N // b`` ranks and the counts are ``k * m`` (``1/m`` of a part's working set per rank). The counts
# are chosen from the policy before the compile: a batch shorter than ``b`` is cut in fewer parts, whose slices
# then differ from ``k`` per rank. ``Policy(halo=h)`` likewise: halo regions are spread over all ``N`` ranks, so
# the compile cuts them in ``h * N`` bands of rows (a grid: ``h * N`` rows of tiles), each rank computing ``h`` of
# them and holding their rows (NOTE [Rows held in parts]); thinner bands recompute more halo rows. The output is
# the one-process output of that compile (``compile_policy(policy, N)``), within float rounding of ``policy``'s own.


# NOTE [No region floor across devices]
# On one device a region must hold at least ``min_region_fraction`` of the largest activation (a small region
# saves no memory and costs its loop). Across devices every region divides its work: at full size the regions the
# floor leaves out hold 6% of SVD's FLOPs, which would run on every rank (planned 2.98x at 4 NVLink GPUs for
# SVD-XT against 3.40x without the floor). So a compile for spread regions (or planned for them: ``explain(...,
# ranks=N)``) takes every region the rules allow unless the policy sets the floor itself.


def shards_for(value) -> Shards | None:
    """A :class:`Shards` for a ``Policy.distributed`` value (None where it asks for none)."""
    spec = Distributed.of(value)
    return None if spec is None else Shards(spec)


def spread_loops(gm: torch.nn.Module, ranks: int) -> dict:
    """The loop regions of ``gm`` spread over ``ranks`` ranks, each with the number of ranks (or rank groups) its
    slices are spread over (NOTE [Batch splits across ranks]): a batch split of ``k`` parts over all ``ranks``
    where ``k % ranks == 0`` (its inner regions run whole on each rank), over ``k`` groups of ``ranks // k`` ranks
    where ``ranks % k == 0`` (its inner regions spread over the ``ranks // k`` ranks of a group), else not (its
    inner regions spread over all ``ranks``); every other loop region over ``ranks``. Halo loops are always
    spread (they are not LoopRegions). Returns {id(region): ranks or groups}."""
    from .runtime import LoopRegion
    # the regions inside a region cut within one element run whole on the rank running its slice (NOTE [Slices
    # within one element])
    local = {id(x) for m in gm.modules() if isinstance(m, LoopRegion) and m.within > 1
             for b in m.bodies.values() for x in b.modules() if isinstance(x, LoopRegion)}
    loops = [m for m in gm.modules() if isinstance(m, LoopRegion) and id(m) not in local]
    out, inside = {}, {}
    for m in loops:
        if not m.nested:
            continue
        k = len(m.bounds)
        if k % ranks == 0:
            out[id(m)], share = ranks, None
        elif k > 1 and ranks % k == 0:
            out[id(m)], share = k, ranks // k
        else:
            share = ranks
        for b in m.bodies.values():
            for x in b.modules():
                if isinstance(x, LoopRegion) and not x.nested:
                    inside[id(x)] = share
    for m in loops:
        if not m.nested:
            share = inside.get(id(m), ranks)
            if share is not None:
                out[id(m)] = share
    return out


def shard_regions(gm: torch.nn.Module, shards: Shards | None, outputs=(), given=None) -> int:
    """Give every loop region :func:`spread_loops` spreads its :class:`Shards` (all of ``shards``' ranks, or a
    group of them: :meth:`Shards.groups`; None: run whole on this process), and what each holds in parts
    (:func:`held_values`; ``outputs`` and ``given``: NOTE [A cached feature held in parts]); the number of regions
    spread."""
    from .halo_runtime import HaloLoop
    from .runtime import LoopRegion
    spread = spread_loops(gm, shards.size) if shards is not None else {}
    n = 0
    for m in gm.modules():
        if isinstance(m, LoopRegion):
            size = spread.get(id(m))
            m.shards = None
            if size is not None:
                m.shards = shards if size == shards.size else (
                    shards.groups(size)[0] if m.nested else shards.groups(shards.size // size)[1])
            m.sharding = None
            n += m.shards is not None
        elif isinstance(m, HaloLoop):  # each pass's slices spread, statistics gathered (halo_runtime)
            m.shards, m.rows = shards, None
            n += shards is not None
    if shards is not None:
        for _, _, loop, sharding in rank_shardings(gm, shards.size, spread, outputs, given):
            loop.sharding = sharding
        for _, _, loop, rows in halo_rows(gm, shards.size):  # NOTE [Rows held in parts]
            loop.rows = rows
    return n


def rank_ranges(loop, ranks: int) -> list:
    """The elements of the axis each rank computes in ``loop``: ``(start, end)`` per rank (``None``: none)."""
    out = []
    for r in range(ranks):
        run = block(len(loop.bounds), ranks, r)
        out.append((loop.bounds[run[0]][0], loop.bounds[run[-1]][0] + loop.bounds[run[-1]][1]) if run else None)
    return out


def equal_runs(loop, ranks: int) -> bool:
    """Whether every rank computes the same number of elements of ``loop``'s axis (then an output whose parts
    follow each other in memory is gathered in place; else through chunks of the largest part)."""
    ranges = rank_ranges(loop, ranks)
    return all(r is not None for r in ranges) and len({hi - lo for lo, hi in ranges}) == 1


# -- values held in parts between spread regions -------------------------------------------------------------------
@dataclass(frozen=True)
class Held:
    """How rank ``r`` holds a value cut along a region axis: the elements ``ranges[r]`` (``(lo, hi)``, None: none)
    of the axis of ``length`` elements in ``cut.dim`` of the whole value (``shape``, ``dtype``), as one contiguous
    tensor in the form a region's body takes it (``cut.dim`` unflattened into ``(outer, n * inner)`` where
    ``outer > 1``)."""

    cut: Cut
    length: int
    ranges: tuple
    shape: tuple
    dtype: torch.dtype

    def count(self, rank: int) -> int:
        r = self.ranges[rank]
        return 0 if r is None else r[1] - r[0]

    def start(self, rank: int) -> int:
        r = self.ranges[rank]
        return 0 if r is None else r[0]

    def part_shape(self, rank: int) -> tuple:
        c, d = self.cut, self.cut.dim
        n = self.count(rank) * c.inner
        mid = (c.outer, n) if c.outer > 1 else (n,)
        return tuple(self.shape[:d]) + mid + tuple(self.shape[d + 1:])

    def part_bytes(self, rank: int) -> int:
        return math.prod(self.part_shape(rank)) * torch.empty((), dtype=self.dtype).element_size()

    def most_bytes(self) -> int:
        """The largest part's bytes over the ranks."""
        return max(self.part_bytes(r) for r in range(len(self.ranges)))

    def canonical(self, part: torch.Tensor, rank: int) -> torch.Tensor:
        """``part`` (this rank's) with ``cut.dim`` always as two dims ``(outer, n * inner)``."""
        c = self.cut
        return part if c.outer > 1 else part.unflatten(c.dim, (1, self.count(rank) * c.inner))

    def select(self, canonical: torch.Tensor, at: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s elements of this value's axis in ``canonical`` (a view of the value in which this
        axis's dim, at position ``at``, is whole and every other dim stays as it is)."""
        c = self.cut
        v = canonical.unflatten(at, (c.outer, self.length * c.inner))
        return v.narrow(at + 1, self.start(rank) * c.inner, self.count(rank) * c.inner)


@dataclass(frozen=True)
class Reshard:
    """A region argument held by its producer as ``src`` and taken by the region as ``dst`` (another dim of the
    value): each rank sends every other rank the block of its part that the other's part holds (one
    all-to-all). ``last``: this region is the value's last reader, so its producer's part is released once the
    exchange has sent it (NOTE [An exchange frees its source])."""

    src: Held
    dst: Held
    last: bool = False


@dataclass
class Sharding:
    """What a spread region holds in parts (NOTE [Values held in parts]): ``outs[j]``, the :class:`Held` layout of
    output ``j`` when every rank keeps only its own part (None: the whole value, gathered); ``ins[i]``: None (the
    argument is a whole value), ``"part"`` (this region's own layout: this rank's part as it is) or a
    :class:`Reshard`."""

    outs: list
    ins: list


def held_layout(loop, cut, shape, dtype, ranks: int) -> Held:
    return Held(cut, loop.length, tuple(rank_ranges(loop, ranks)), tuple(shape), dtype)


def held_values(gm, ranks: int, spread, outputs=(), given=None, nested: bool = False) -> dict:
    """NOTE [Values held in parts]
    Every rank holds one device's plan as long as each region output is gathered whole on every rank. A spread
    region's cut output whose every reader is a spread region taking it cut (along any axis, all in one graph,
    not through a view, not a graph output) is instead kept by each rank as its own part only, a tensor of the
    part's size: nothing else ever reads it whole. A reader that takes it cut the same way (same dim and layout,
    same element ranges per rank: "same axis: nothing") reads its part as it is; a reader that cuts another dim
    of it (frames to height: a spatial region's output into a temporal one) gets its part by one all-to-all, each
    rank sending every other the block of its part that the other's part holds, and frees it when it ends. So
    between spread regions a rank holds ``1/N`` of each value (its run of slices), and with the slice count per
    rank (``compile_policy``) each slice's working set is ``1/N`` too. Readers cutting the same dim another way
    (another length or layout, other ranges) keep the value gathered whole.

    NOTE [A cached feature held in parts]: Step Rehash's full graph returns the feature it caches as its last
    output, and the rehash graph takes it back as its last input. Where the feature is a spread region's cut
    output and every reader of it in both graphs is a spread region taking it cut (:func:`feature_parts`), each
    rank caches its own part between steps (``outputs``: the graph outputs that may stay in parts; ``given``:
    {placeholder: its :class:`Held` layout}, inputs that arrive in parts), as it would hold it between regions. A
    batch split spread itself over all the ranks is such a region (``nested``): on 2 GPUs with the guidance halves
    each rank caches its half's feature.

    ``spread(loop)``: whether a region of ``gm`` is spread. Returns {region: :class:`Sharding`} for the spread
    regions without inner regions, and with ``nested`` for the batch splits spread themselves over all ``ranks``
    too (each rank runs whole parts: NOTE [Batch splits across ranks]; their outputs are parts alike)."""
    from .runtime import LoopRegion
    loops = {n: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    loops = {n: m for n, m in loops.items() if isinstance(m, LoopRegion) and (nested or not m.nested) and spread(m)}
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    out = {m: Sharding([None] * len(m.out_cuts), [None] * len(m.in_cuts)) for m in loops.values()}
    allowed = _output_items(gm, outputs)
    for ph, src in (given or {}).items():
        takes = _takes([ph], src, loops, ranks, allowed)
        if takes is None:
            raise ValueError(f"held_values: input {ph.name} is given in parts, but a reader takes it otherwise")
        for (reader, i), how in takes.items():
            out[reader].ins[i] = how
    for node, loop in loops.items():
        items: dict = {}  # output index -> the getitems reading it (one, unless a pass left two)
        for item in node.users:
            if item.op != "call_function" or item.target is not operator.getitem:
                items = None  # the tuple itself is read: every output stays whole
                break
            items.setdefault(item.args[1], []).append(item)
        for j, its in (items or {}).items():
            cut = loop.out_cuts[j]
            if not isinstance(cut, Cut):
                continue
            shape, _, dtype = loop.out_meta[j]
            src = held_layout(loop, cut, shape, dtype, ranks)
            takes = _takes(its, src, loops, ranks, allowed)
            if takes is not None and (takes or any(item in allowed for item in its)):
                out[loop].outs[j] = src
                last = _last_reader(its, order) if not any(item in allowed for item in its) else None
                for (reader, i), how in takes.items():
                    if isinstance(how, Reshard) and last is not None and loops.get(last) is reader:
                        how = replace(how, last=True)
                    out[reader].ins[i] = how
    return out


# NOTE [An exchange frees its source]
# A region taking an argument in other parts than its producer's (frames to height) gets its own part by one
# all-to-all (``reshard``); the producer's part stays live until the graph drops it, after the region returns, so
# while the region runs a rank held both parts of that value. Where the region is the value's last reader (no later
# node reads it, it is not a graph output, and the region takes it in one argument only), ``_run_sharded`` releases
# the producer's part as soon as the exchange has sent it (``fxstream.memory.release_storage``: the tensor becomes
# empty in place, so its storage dies with it though the graph still names it; nothing later reads it). The plan
# counts it so (``RankParts``: the region's working set less the parts it frees; the exchange itself still holds
# them).
def _last_reader(items: list, order: dict):
    """The one node reading ``items`` (a value's getitems) after every other reader, in one argument only; None
    where two readers tie (the same node reading two getitems of one value) or it reads the value twice."""
    readers = [u for item in items for u in item.users]
    last = max(readers, key=lambda u: order[u])
    if sum(1 for u in readers if u is last) != 1 or sum(1 for a in last.args if a in items) != 1 or \
            any(a in items for a in last.kwargs.values()):
        return None
    return last


def _output_items(gm, outputs) -> set:
    """The nodes at the graph output positions ``outputs`` of ``gm``."""
    if not outputs:
        return set()
    ret = output_values(gm)
    return {ret[k] for k in outputs}


def _takes(items: list, src: Held, loops: dict, ranks: int, allowed=frozenset()) -> dict | None:
    """How each spread region reading the nodes ``items`` (a region output's getitems, or a placeholder), held as
    ``src``, takes them: {(region, argument index): "part" or :class:`Reshard`}; None where a reader is anything
    else or takes it whole or cut the same dim another way. The graph output may read an item of ``allowed``
    (NOTE [A cached feature held in parts]), once."""
    shape, dtype = src.shape, src.dtype
    cut = src.cut
    takes = {}
    for item in items:
        if not item.users:
            return None
        for user in item.users:
            if user.op == "output" and item in allowed:
                ret = user.args[0]
                if sum(a is item for a in (ret if isinstance(ret, (tuple, list)) else [ret])) != 1:
                    return None
                continue
            reader = loops.get(user)
            if reader is None or item in user.kwargs.values():
                return None
            for i in (i for i, a in enumerate(user.args) if a is item):
                c = reader.in_cuts[i]
                if not isinstance(c, Cut):
                    return None
                dst = held_layout(reader, c, shape, dtype, ranks)
                if dst == src:
                    takes[(reader, i)] = "part"
                elif c.dim != cut.dim:
                    takes[(reader, i)] = Reshard(src, dst)
                else:
                    return None
    return takes


def feature_parts(full, rehash, ranks: int) -> Held | None:
    """NOTE [A cached feature held in parts]: the :class:`Held` layout in which each of ``ranks`` ranks keeps Step
    Rehash's cached feature, the last output of the full graph ``full`` and the last input of the rehash graph
    ``rehash``; None where it is cached whole (it is not a cut output of a region spread over all the ranks, or a
    reader of it in either graph takes it otherwise than cut)."""
    from torch.fx import Node

    from .runtime import LoopRegion
    ret = output_values(full)
    item = ret[-1]
    if not isinstance(item, Node) or item.op != "call_function" or item.target is not operator.getitem:
        return None
    node, j = item.args
    loop = full.get_submodule(node.target) if node.op == "call_module" else None
    spread = spread_loops(full, ranks)
    if not isinstance(loop, LoopRegion) or spread.get(id(loop)) != ranks or not isinstance(loop.out_cuts[j], Cut):
        return None
    held = held_values(full, ranks, lambda x: spread.get(id(x)) == ranks, outputs=(len(ret) - 1,), nested=True)
    src = held[loop].outs[j]
    if src is None:
        return None
    ph = [n for n in rehash.graph.nodes if n.op == "placeholder"][-1]
    later = spread_loops(rehash, ranks)
    loops = {n: rehash.get_submodule(n.target) for n in rehash.graph.nodes if n.op == "call_module"}
    loops = {n: m for n, m in loops.items() if isinstance(m, LoopRegion) and later.get(id(m)) == ranks}
    return src if _takes([ph], src, loops, ranks) else None


def gather_parts(sh: Shards, part: torch.Tensor, held: Held, what: str) -> torch.Tensor:
    """The whole value from every rank's part (``part``: this rank's, in ``held``'s layout): one all-gather
    through chunks of the largest part's size."""
    per = max(math.prod(held.part_shape(q)) for q in range(sh.size))
    chunks = part.new_empty(sh.size * per)
    chunks[sh.rank * per:sh.rank * per + part.numel()].view(part.shape).copy_(part)
    sh.all_gather(chunks, chunks[sh.rank * per:(sh.rank + 1) * per], what)
    out = part.new_empty(held.shape)
    for q in range(sh.size):
        if held.count(q):
            shape = held.part_shape(q)
            held.select(out, held.cut.dim, q).copy_(
                held.canonical(chunks[q * per:q * per + math.prod(shape)].view(shape), q))
    return out


def reshard(sh: Shards, part: torch.Tensor, how: Reshard, what: str) -> torch.Tensor:
    """This rank's part of a value in ``how.dst``'s layout, from every rank's part in ``how.src``'s (``part`` is
    this rank's): one all-to-all of the blocks where the two layouts' parts meet (NOTE [Values held in parts]).
    Besides ``part`` it holds the send and receive buffers during the collective, then the receive buffer and the
    new part while it copies: ``max(src, dst) + dst`` bytes at most (``RankParts``)."""
    src, dst, r = how.src, how.dst, sh.rank
    d, e = src.cut.dim, dst.cut.dim
    at_e, at_d = e + (e > d), d + (d > e)  # a dim's position once the other layout's dim is split in two
    pieces = [dst.select(src.canonical(part, r), at_e, q) for q in range(sh.size)]
    send = part.new_empty(sum(p.numel() for p in pieces))
    at = 0
    for p in pieces:  # each block copied into its run of the buffer (no copy of its own)
        send[at:at + p.numel()].view(p.shape).copy_(p)
        at += p.numel()
    shape = dst.part_shape(r)
    layout = dst.canonical(torch.empty(shape, device="meta"), r)
    sizes = [src.select(layout, at_d, q).numel() for q in range(sh.size)]
    got = part.new_empty(sum(sizes))
    sh.all_to_all(got, send, sizes, [p.numel() for p in pieces], what)
    del send, pieces
    out = part.new_empty(shape)
    view, at = dst.canonical(out, r), 0
    for q in range(sh.size):
        slot = src.select(view, at_d, q)
        slot.copy_(got[at:at + slot.numel()].view(slot.shape))
        at += slot.numel()
    return out


# -- halo regions' values held in rows ------------------------------------------------------------------------------
def hull(ranges) -> tuple | None:
    """The smallest ``(lo, hi)`` holding every range of ``ranges`` that is not None and not empty; None if none."""
    ranges = [x for x in ranges if x is not None and x[0] < x[1]]
    return (min(x[0] for x in ranges), max(x[1] for x in ranges)) if ranges else None


@dataclass(frozen=True)
class Rows:
    """How the ranks hold a halo region's output in rows (NOTE [Rows held in parts]): along ``dim`` of the value
    (``shape``, ``stride``, ``dtype``), rank ``r`` computes the rows ``made[r]`` (``(lo, hi)``; None: none; the
    ranks' runs of slices partition the rows) and holds ``span[r]``: those and the rows its readers' slices need
    beyond them (their halos), which the ranks that made them send it."""

    dim: int
    made: tuple
    span: tuple
    shape: tuple
    stride: tuple
    dtype: torch.dtype

    def part_shape(self, rank: int) -> tuple:
        s = self.span[rank]
        shape = list(self.shape)
        shape[self.dim] = 0 if s is None else s[1] - s[0]
        return tuple(shape)

    def start(self, rank: int) -> int:
        s = self.span[rank]
        return 0 if s is None else s[0]

    def part_bytes(self, rank: int) -> int:
        return math.prod(self.part_shape(rank)) * torch.empty((), dtype=self.dtype).element_size()

    def most_bytes(self) -> int:
        return max(self.part_bytes(r) for r in range(len(self.span)))

    def sent(self, src: int, dst: int):
        """The rows rank ``src`` sends rank ``dst`` (None: none): those it made that ``dst`` holds and did not."""
        if src == dst:
            return None
        a, b = self.made[src], self.span[dst]
        if a is None or b is None or max(a[0], b[0]) >= min(a[1], b[1]):
            return None
        return max(a[0], b[0]), min(a[1], b[1])

    def moves(self) -> bool:
        """Whether any rank sends another rows (else the exchange is skipped on every rank alike)."""
        n = len(self.span)
        return any(self.sent(q, r) is not None for q in range(n) for r in range(n))

    def row_bytes(self) -> int:
        return math.prod(self.shape) // max(self.shape[self.dim], 1) * torch.empty((), dtype=self.dtype).element_size()

    def exchange_bytes(self, rank: int) -> tuple[int, int]:
        """(bytes ``rank`` sends, bytes it receives) in the exchange."""
        n = len(self.span)
        rows = lambda x: 0 if x is None else x[1] - x[0]  # noqa: E731
        return (sum(rows(self.sent(rank, q)) for q in range(n)) * self.row_bytes(),
                sum(rows(self.sent(q, rank)) for q in range(n)) * self.row_bytes())

    def empty(self, rank: int, device) -> torch.Tensor:
        """This rank's part: its span's rows, its dims in the memory order of the whole value's strides."""
        shape = self.part_shape(rank)
        order = sorted(range(len(shape)), key=lambda i: (-self.stride[i], i))
        t = torch.empty([shape[i] for i in order], dtype=self.dtype, device=device)
        return t.permute([order.index(i) for i in range(len(shape))])


@dataclass
class HaloRows:
    """What a spread halo region holds in rows: ``outs[j]``, the :class:`Rows` of output ``j`` (None: gathered
    whole); ``ins[i]``: the producer's :class:`Rows` of argument ``i`` (None: a whole value)."""

    outs: list
    ins: list


def halo_rows(gm, ranks: int) -> list:
    """NOTE [Rows held in parts]
    A halo region spread over ``N`` ranks gathers each output whole on every rank (one all-gather of every slice's
    rows): each rank then holds the decoder's whole values, one device's plan. Where every reader of an output is
    a spread halo region taking it in rows along the same dim (in the same graph, as a positional argument that
    none of its ops reads whole, neither on a grid), each rank instead keeps only the rows its run of slices made
    (:func:`block`: contiguous runs, so contiguous rows) and the rows its readers' slices on this rank need around
    them (the halo of their convolutions, in every pass): ``span``. When the output pass ends, each rank sends each
    other the rows it made that the other's span holds and it did not make: neighbours' halo rows, one all-to-all
    in which every other pair sends nothing (:func:`fill_rows`). A reader reads its argument's rows out of the part
    at the span's offset. So between halo regions a rank holds ``1/N`` of each value plus halo rows; the
    statistics passes still gather every slice's statistics (a few numbers per group) and merge them in slice
    order. Every row a rank reads is the row the one-process loop computes, made by the same slice.

    Returns (graph, node, region, :class:`HaloRows`) for every halo region of ``gm`` and the graphs inside it
    (each region spread over all ``ranks``)."""
    from torch.fx import GraphModule

    from .halo_runtime import HaloLoop
    out = []
    for m in gm.modules():
        if not isinstance(m, GraphModule):
            continue
        loops = {n: m.get_submodule(n.target) for n in m.graph.nodes if n.op == "call_module"}
        loops = {n: x for n, x in loops.items() if isinstance(x, HaloLoop)}
        rows = {x: HaloRows([None] * len(x.out_meta), [None] * len(x.region.inputs)) for x in loops.values()}
        for node, loop in loops.items():
            items: dict = {}
            for item in node.users:
                if item.op != "call_function" or item.target is not operator.getitem:
                    items = None
                    break
                items.setdefault(item.args[1], []).append(item)
            for j, its in (items or {}).items():
                takes = _rows_takes(its, loop, j, loops, ranks)
                if takes is None:
                    continue
                o = loop.region.outputs[j]
                shape, stride, dtype = loop.out_meta[j]
                made = loop.made_rows(o, ranks)
                needed = [reader.needed_rows(reader.region.inputs[i], ranks) for reader, i in takes]
                span = [hull([made[r]] + [rows_of[r] for rows_of in needed]) for r in range(ranks)]
                held = Rows(loop.region.dims[o], tuple(made), tuple(span), tuple(shape), tuple(stride), dtype)
                rows[loop].outs[j] = held
                for reader, i in takes:
                    rows[reader].ins[i] = held
        out += [(m, n, x, rows[x]) for n, x in loops.items() if any(rows[x].outs) or any(rows[x].ins)]
    return out


def _rows_takes(items: list, loop, j: int, loops: dict, ranks: int) -> list | None:
    """The (reader, argument index) of every spread halo region reading output ``j`` of ``loop`` through the
    getitems ``items`` in rows along its dim; None where a reader is anything else or may read it whole."""
    if loop.cols != 1:
        return None
    d = loop.region.dims.get(loop.region.outputs[j])
    takes = []
    for item in items:
        if not item.users:
            return None
        for user in item.users:
            reader = loops.get(user)
            if reader is None or reader.cols != 1 or item in user.kwargs.values():
                return None
            for i in (i for i, a in enumerate(user.args) if a is item):
                ph = reader.region.inputs[i]
                if d is None or reader.region.dims.get(ph) != d or not reader.read_in_rows(ph):
                    return None
                takes.append((reader, i))
    return takes


def fill_rows(sh: Shards, part: torch.Tensor, rows: Rows, what: str) -> None:
    """Fill this rank's ``part`` (its span's rows of a value held in :class:`Rows`, those it made already
    written) with the rows other ranks made: one all-to-all, each rank sending each other the rows it made that
    the other holds (NOTE [Rows held in parts])."""
    r, n, d = sh.rank, sh.size, rows.dim
    start = rows.start(r)
    blocks = []
    for q in range(n):
        x = rows.sent(r, q)
        blocks.append(None if x is None else part.narrow(d, x[0] - start, x[1] - x[0]))
    send = part.new_empty(sum(b.numel() for b in blocks if b is not None))
    at = 0
    for b in blocks:
        if b is not None:
            send[at:at + b.numel()].view(b.shape).copy_(b)
            at += b.numel()
    slots = []
    for q in range(n):
        x = rows.sent(q, r)
        slots.append(None if x is None else part.narrow(d, x[0] - start, x[1] - x[0]))
    got = part.new_empty(sum(s.numel() for s in slots if s is not None))
    sh.all_to_all(got, send, [0 if s is None else s.numel() for s in slots],
                  [0 if b is None else b.numel() for b in blocks], what)
    del send, blocks
    at = 0
    for s in slots:
        if s is not None:
            s.copy_(got[at:at + s.numel()].view(s.shape))
            at += s.numel()


def inputs_digest(flat: list, plan: tuple) -> bytes:
    """A sha256 of the call's leaves (tensors by shape, dtype and two float64 sums; other values by repr) and
    ``plan``: equal on two ranks when they were called alike and compiled alike."""
    h = hashlib.sha256(repr(plan).encode())
    for x in flat:
        if isinstance(x, torch.Tensor):
            h.update(repr((tuple(x.shape), str(x.dtype))).encode())
            if x.numel():
                v = (x.detach().abs() if x.is_complex() else x.detach()).to(torch.float64)
                h.update(struct.pack("<2d", float(v.sum()), float(v.abs().sum())))
        else:
            h.update(repr(x).encode())
    return h.digest()


def plan_digest(gm: torch.nn.Module) -> tuple:
    """What every rank must have compiled alike: each spread region's axis, length and slice bounds, in order."""
    from .halo_runtime import HaloLoop
    from .runtime import LoopRegion
    return tuple((m.axis, m.length, tuple(m.bounds)) if isinstance(m, LoopRegion) else (m.along, m.count, m.cols)
                 for m in gm.modules() if isinstance(m, (LoopRegion, HaloLoop)) and m.shards is not None)




# -- planning: what N ranks would hold, move and compute (no process group needed) ----------------------------------
@dataclass(frozen=True)
class Link:
    """A device-to-device link for the latency model: bytes per second one GPU receives (one direction) and the
    fixed cost of one collective."""

    name: str
    bytes_per_s: float
    latency_s: float
    source: str


# NOTE [Link figures]: nominal one-direction bandwidths (half the bidirectional figures the vendors quote) at 80%
# efficiency (an assumption: a broadcast reaches about that share of a link in NCCL's own benchmarks), and an
# assumed 20 us (NVLink) / 30 us (PCIe) per collective.
LINKS = {
    "nvlink": Link("NVLink 4 (H100/H200 SXM)", 0.8 * 450e9, 20e-6,
                   "NVIDIA H100/H200 datasheets: NVLink 900 GB/s per GPU, both directions together"),
    "pcie5": Link("PCIe 5.0 x16", 0.8 * 64e9, 30e-6, "PCI-SIG: PCIe 5.0 x16 128 GB/s, both directions together"),
    "pcie4": Link("PCIe 4.0 x16", 0.8 * 32e9, 30e-6, "PCI-SIG: PCIe 4.0 x16 64 GB/s, both directions together"),
}
# The compute rate of the model: full-size SVD (fp16, batch 2, 14x576x1024), the exported graph on one H200: the
# graph's planned FLOPs (fxstream.analysis.cost) over its measured latency, 0.374 s (docs/benchmarks.md, "CUDA").
H200_SVD_FLOPS_PER_S = 2.40e14  # 89.6 TFLOP / 0.374 s


@dataclass(frozen=True)
class RankPlan:
    """``ranks`` devices running one compiled graph (:func:`rank_plan`): per-rank planned activation peak, what
    each rank receives per call, and the latency model's prediction against one device.

    ``flops``: the graph's planned FLOPs; ``flops_per_rank``: the busiest rank's (ops outside spread regions run
    on every rank; a spread region's slices are divided as :func:`block` divides them); ``spread_share``: the share
    of FLOPs in spread regions. ``bytes_received``: per call, by the rank that receives most; ``collectives``: per
    call. ``seconds_one`` / ``seconds``: planned time on one device / on ``ranks`` (compute at ``flops_per_s`` plus
    the bytes over ``link``); ``speedup`` their ratio."""

    ranks: int
    peak_bytes: int
    one_device_peak_bytes: int
    flops: int
    flops_per_rank: int
    spread_share: float
    bytes_received: int
    collectives: int
    link: str
    flops_per_s: float
    seconds_one: float
    seconds: float
    batch_split: int = 1  # a batch split of this many parts spread over the ranks itself (1: none)

    @property
    def speedup(self) -> float:
        return self.seconds_one / self.seconds if self.seconds else 1.0


def _busiest_share(bounds, length: int, ranks: int) -> float:
    """The largest share of an axis of ``length`` elements that one rank computes when ``bounds`` (start, size)
    are spread as :func:`block` spreads slices."""
    n = len(bounds)
    runs = [block(n, ranks, r) for r in range(ranks)]
    return max(sum(bounds[i][1] for i in run) for run in runs) / length


def _loop_traffic(loop, ranks: int, sharding: Sharding | None = None) -> tuple[int, int, int]:
    """(bytes each rank receives, collectives, largest copy in transit) for one spread region, as
    ``LoopRegion._run_sharded`` moves them: one all-to-all per argument it takes in other parts than its
    producer's, nothing for an output kept in parts (NOTE [Values held in parts]), one all-gather per other
    output, in place where the parts follow each other in memory, else through chunks of the largest part's
    size; partial sums: every slice's, in chunks of the longest run."""
    n = len(loop.bounds)
    most = max(len(block(n, ranks, r)) for r in range(ranks))
    in_place = equal_runs(loop, ranks)
    longest = max(hi - lo for lo, hi in (r for r in rank_ranges(loop, ranks) if r is not None))
    received = collectives = transit = 0
    for how in (sharding.ins if sharding is not None else ()):
        if isinstance(how, Reshard):  # the busiest rank's part, less the block it holds itself
            received += how.dst.most_bytes() * (ranks - 1) // ranks
            collectives += 1
    for j, (c, (shape, stride, dtype)) in enumerate(zip(loop.out_cuts, loop.out_meta)):
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if c is None or (sharding is not None and sharding.outs[j] is not None):
            continue
        collectives += 1
        if c is PARTIAL:
            moved = ranks * most * size
        elif in_place and c.outer == 1 and all(s == 1 for s in shape[:c.dim]) and \
                tuple(stride) == tuple(contiguous_strides(shape)):
            received += size * (ranks - 1) // ranks
            continue
        else:
            moved = ranks * (size * longest // loop.length)
        received += moved * (ranks - 1) // ranks
        transit = max(transit, moved)
    return received, collectives, transit


class RankParts:
    """What the busiest rank holds where values are kept in parts, for :func:`fxstream.memory.plan_memory` (NOTE
    [Values held in parts]): a kept output costs its largest part over the ranks (the ranks' runs differ by a
    slice at most, and not always the first rank's is the longest), and a region taking an argument in other parts
    holds that part while it runs; each exchange holds, on top of the parts made before it, the larger of its send
    buffer (its producer's part) and its new part, plus its receive buffer (:func:`reshard`). An output that would take over the storage of an argument held in parts gets a
    buffer of its own (``_run_sharded``): its values keep their own storage here, which nothing else holds.
    ``transit``: region node -> the largest copy its gathers hold (an output gathered through a chunk of every
    rank's part, :func:`_loop_traffic`): made after its slices are done and their working sets freed, with its
    whole outputs already live, so it counts at that region instead of its working set where it is larger. A halo
    region's exchange of rows (``fill_rows``) runs then too, and counts alike."""

    def __init__(self, shardings: list, rows: list = (), transit: dict | None = None):
        self.nodes = {}  # node -> [(storage key, bytes)] where they differ from its values' own
        # cut region node -> (bytes held while it runs, held only during its exchanges, which run before it
        # allocates its outputs, released after them)
        self.extra = {}
        self.transit = dict(transit or {})
        for gm, node, loop, held in rows:  # NOTE [Rows held in parts]: a halo region's outputs as spans of rows
            val = node.meta.get("val")
            if not isinstance(val, (tuple, list)):
                continue
            sts = []
            for j, t in enumerate(val):
                st = t.untyped_storage()
                key, nbytes = StorageWeakRef(st), st.nbytes()
                if held.outs[j] is not None:
                    key, nbytes = ("part", node, j), held.outs[j].most_bytes()
                    for item in node.users:
                        if item.op == "call_function" and item.target is operator.getitem and item.args[1] == j:
                            self.nodes[item] = [(key, nbytes)]
                sts.append((key, nbytes))
            self.nodes[node] = sts
            moves = [h for h in held.outs if h is not None and h.moves()]
            if moves:  # fill_rows, after its slices: its send and receive buffers, one output after another
                rows_bytes = max(sum(h.exchange_bytes(r)) for h in moves for r in range(len(h.span)))
                self.transit[node] = max(self.transit.get(node, 0), rows_bytes)
        for gm, node, loop, sharding in shardings:
            val = node.meta.get("val")
            if not isinstance(val, (tuple, list)):
                continue
            items: dict = {}
            for u in node.users:
                if u.op == "call_function" and u.target is operator.getitem:
                    items.setdefault(u.args[1], []).append(u)
            sts = []
            for j, t in enumerate(val):
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                key, nbytes = StorageWeakRef(st), st.nbytes()
                if sharding.outs[j] is not None:
                    key, nbytes = ("part", node, j), sharding.outs[j].most_bytes()
                    for item in items.get(j, ()):
                        self.nodes[item] = [(key, nbytes)]
                sts.append((key, nbytes))
            self.nodes[node] = sts
            moves = [h for h in sharding.ins if isinstance(h, Reshard)]
            if moves:  # the new parts held while it runs; an exchange's buffers on top of them (reshard), made
                # before its outputs; the sources it releases after the exchange (NOTE [An exchange frees its source])
                self.extra[node] = (sum(h.dst.most_bytes() for h in moves),
                                    max(max(h.src.most_bytes(), h.dst.most_bytes()) for h in moves),
                                    sum(h.src.most_bytes() for h in moves if h.last))

    def storages(self, node):
        return self.nodes.get(node)

    def working(self, node, nbytes: int, made: int = 0) -> int:
        """Bytes ``node`` (a region) holds on top of the values live at it, ``made`` of which are its outputs
        (allocated by itself): the largest of its exchanges with its new parts (a cut region's run before it
        allocates its outputs, ``_run_sharded``), its slices' working set ``nbytes`` with its new parts less the
        sources it has released by then, and its copies after its slices (``transit``: the new parts freed,
        outputs made)."""
        held, exchange, freed = self.extra.get(node, (0, 0, 0))
        return max(held + exchange - made, held + nbytes - freed, self.transit.get(node, 0))


def rank_shardings(gm, ranks: int, spread: dict, outputs=(), given=None) -> list:
    """(graph, node, region, :class:`Sharding`) for every spread region without inner regions of ``gm`` and of
    the graphs inside it, as :func:`shard_regions` would set them on ``ranks`` ranks (``spread``:
    :func:`spread_loops`; ``outputs``, ``given``: of ``gm`` itself, see :func:`held_values`)."""
    from torch.fx import GraphModule

    from .runtime import LoopRegion
    out = []
    for m in gm.modules():
        if isinstance(m, GraphModule):
            calls = [(n, m.get_submodule(n.target)) for n in m.graph.nodes if n.op == "call_module"]
            sizes = {spread[id(x)] for _, x in calls if isinstance(x, LoopRegion) and id(x) in spread
                     and (not x.nested or spread[id(x)] == ranks)}
            for size in sizes:
                top = m is gm and size == ranks
                held = held_values(m, size, lambda x, size=size: spread.get(id(x)) == size,
                                   outputs if top else (), given if top else None, nested=size == ranks)
                out += [(m, n, x, held[x]) for n, x in calls if x in held]
    return out


def planned_flops(compiled, flops: dict | None = None) -> int:
    """The FLOPs ``compiled`` runs per call on one device: its ops' (:func:`~fxstream.analysis.cost.node_flops`),
    each halo region's weighted by its planned compute (halo rows and statistics passes computed again:
    ``HaloPlan.compute_factor``)."""
    from .analysis.cost import node_flops
    flops = node_flops(compiled.prepared) if flops is None else flops
    extra = 0.0
    for node, _ in grouped_calls(compiled.graph_module, "halo"):
        loop = compiled.graph_module.get_submodule(node.target)
        extra += (loop.plan(flops).compute_factor - 1.0) * sum(flops.get(n.name, 0) for n in loop.region.nodes)
    return int(sum(flops.values()) + extra)


def rank_plan(compiled, ranks: int, link: str = "nvlink", flops_per_s: float = H200_SVD_FLOPS_PER_S,
              flops: dict | None = None, one_device: int | None = None, outputs=(),
              one_flops: int | None = None) -> RankPlan:
    """The plan of ``compiled`` (a :class:`~fxstream.compiler.CompiledGraph`, compiled for ``ranks``:
    :func:`compile_policy`) on ``ranks`` devices under ``Policy(distributed=...)``, made without any process
    group: see :class:`RankPlan`, NOTE [Sharded regions] and NOTE [Values held in parts] (the busiest rank's
    planned peak, a gathered output's copy in transit counted at the region gathering it: ``RankParts``).
    ``one_device``: the planned peak of the policy's compile for one device (default: this compile's, as one
    process would run it); ``one_flops``: its
    planned FLOPs (:func:`planned_flops`; default this compile's). FLOPs count what the plan computes: a halo
    region's weighted by its planned compute, which thinner bands raise. ``outputs``: graph outputs kept in parts
    (NOTE [A cached feature held in parts])."""
    from torch.fx import GraphModule

    from .analysis.cost import node_flops
    from .memory import plan_memory
    from .runtime import LoopRegion
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks: expected an int >= 1 (devices), got {ranks!r}")
    if link not in LINKS:
        raise ValueError(f"link: expected one of {', '.join(LINKS)}, got {link!r}")
    flops = node_flops(compiled.prepared) if flops is None else flops
    total = planned_flops(compiled, flops)
    gm = compiled.graph_module
    spread = spread_loops(gm, ranks)
    shardings = rank_shardings(gm, ranks, spread, outputs) if ranks > 1 else []
    held = {loop: sharding for _, _, loop, sharding in shardings}  # NOTE [Values held in parts]
    spread_flops = busiest = received = collectives = 0
    transit: dict = {}  # region node -> the largest copy its gathers hold (RankParts)
    caller = {id(m.get_submodule(n.target)): n for m in gm.modules() if isinstance(m, GraphModule)
              for n in m.graph.nodes if n.op == "call_module"}

    def moves(node, b, c, t):
        nonlocal received, collectives
        received, collectives = received + b, collectives + c
        if t:
            transit[node] = max(transit.get(node, 0), t)
    for node, grouped in grouped_calls(gm, "cut"):
        loop, r = gm.get_submodule(node.target), grouped.region
        f = sum(flops.get(n.name, 0) for n in r.nodes)
        size = spread.get(id(loop))
        if loop.nested and size != ranks:
            # its parts one after another (size None) or spread over groups of ranks // size ranks; its inner
            # regions spread over the ranks of a group (all of them where the parts are not spread)
            n, m = len(loop.bounds), ranks // (size or 1)
            steps = [loop._steps[i] for i in (block(n, size, 0) if size else range(n))]
            if compiled.inner:
                body = rank_plan(compiled.inner[0], m, link, flops_per_s)
                busy = body.flops_per_rank / body.flops if body.flops else 1.0
                if size:  # the busiest group's parts, on the busiest rank of the group
                    spread_flops += f
                    busiest += f * _busiest_share(loop.bounds, loop.length, size) * busy
                else:  # the busiest rank's share of the spread part: its share of the body less the unspread part
                    spread_flops += f * body.spread_share
                    busiest += f * (busy - (1.0 - body.spread_share))
            if size:  # the parts' outputs gathered over the cross groups (or kept in parts: NOTE [A cached...])
                moves(node, *_loop_traffic(loop, size, held.get(loop)))
            for step in steps:
                for x in loop.bodies[step.body].modules():
                    if isinstance(x, LoopRegion) and not x.nested and id(x) in spread:
                        moves(caller[id(x)], *_loop_traffic(x, m, held.get(x)))
            continue
        n = len(loop.bounds)
        spread_flops += f
        busiest += f * _busiest_share(loop.bounds, loop.length, ranks)
        moves(node, *_loop_traffic(loop, ranks, held.get(loop)))
    rows = halo_rows(gm, ranks) if ranks > 1 else []
    in_rows = {loop: held for _, _, loop, held in rows}  # NOTE [Rows held in parts]
    for node, _ in grouped_calls(gm, "halo"):  # halo regions: each pass's slices spread, statistics gathered
        loop = gm.get_submodule(node.target)
        f = loop.plan(flops).compute_factor * sum(flops.get(n.name, 0) for n in loop.region.nodes)
        spread_flops += f
        busiest += f * len(block(loop.count, ranks, 0)) / loop.count  # block: the first runs are the longer
        held = in_rows.get(loop)
        for j, (shape, _, dtype) in enumerate(loop.out_meta):
            how = held.outs[j] if held is not None else None
            if how is not None:  # its span's rows from the neighbours (the busiest rank's), where any move
                if how.moves():
                    received += max(how.exchange_bytes(r)[1] for r in range(ranks))
                    collectives += 1
                continue
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            moves(node, size * (ranks - 1) // ranks, 1, size)
        collectives += sum(1 for p in loop.passes if p.stats)
        for v in loop.region.parked:  # parked values gathered whole into host memory through a device chunk
            size = v.meta["val"].numel() * v.meta["val"].element_size()
            moves(node, size * (ranks - 1) // ranks, 1, size)
    if ranks == 1:
        received = collectives = 0
    per_rank = int(total - spread_flops + busiest)
    whole = plan_memory(gm).peak_bytes
    peak = plan_memory(gm, parts=RankParts(shardings, rows, transit)).peak_bytes if ranks > 1 else whole
    lk = LINKS[link]
    one = (total if one_flops is None else one_flops) / flops_per_s
    many = per_rank / flops_per_s + received / lk.bytes_per_s + collectives * lk.latency_s
    parts = max((len(m.bounds) for m in gm.modules() if isinstance(m, LoopRegion) and m.nested and id(m) in spread),
                default=1)
    return RankPlan(ranks, peak, whole if one_device is None else one_device, int(total), per_rank,
                    spread_flops / total if total else 0.0, int(received), collectives, lk.name, flops_per_s, one, many if ranks > 1 else one,
                    parts if ranks > 1 else 1)
