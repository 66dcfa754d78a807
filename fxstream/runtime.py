"""The runtime of a loop-tiled region: run a body GraphModule once per slice.

Sliced inputs reach the body as views of the full tensors (``narrow``; a cut with ``outer > 1`` is a strided view
that the body reshapes). Cut outputs are written into full-size buffers allocated once, or into the buffer of an
input that dies at the region (``reuse``: slice ``i`` of the output occupies exactly the bytes slice ``i`` of the
input did, so each slice overwrites only what it has read); partial outputs (sums over the axis) are accumulated.
No full-size intermediate of the body ever exists.

Pipelining (``Policy(pipeline=k)``): up to ``k`` slices in flight. Everything a slice needs (its body, which
arguments it narrows and where, where its outputs go) is prepared once, when the region is built, as a list of
:class:`_Step`; a call only narrows views and calls bodies. Executors:

* serial: one slice after another (``k == 1``, and the CPU's choice where workers do not help);
* CUDA streams: slice ``i`` runs on stream ``i % k`` (stream 0 is the caller's). The side streams wait for an
  event recorded when the region starts (its inputs and output buffers exist); the caller's stream waits for
  them all before the region returns. Every slice writes disjoint bytes of the output buffers, so no slice waits
  for another, except partial outputs (sums over the axis), which are added in slice order through a chain of
  events so that the sum is the one ``k == 1`` computes. Memory made on a side stream and handed to another
  stream (the partial sums) is recorded on that stream for the caching allocator;
* CPU workers: a pool of ``k`` threads, the intra-op threads shared out among them. Whether it is faster than
  the serial loop depends on the machine and the slice sizes, so on its first call each region times its first
  ``k`` slices both ways and keeps the pool only if it is at least 10% faster (it costs k working sets) (``Policy(cpu_workers=True/False)`` decides instead). The choice
  holds from the first call on, so every call gives the same numbers. The two modes can differ by float
  rounding: some CPU kernels (oneDNN's Conv3d) choose their algorithm by the number of threads.

Short OpenMP waits under load (CPU): the intra-op threads of PyTorch's Linux builds are libgomp's, and libgomp's
threads spin (about 300,000 iterations) before they sleep, at every kernel's fork and join. When other processes
load the cores, a spinning thread takes the core from the very thread it waits for, so every parallel kernel
costs about a scheduler time slice; slicing multiplies the kernels (svd-mid, ``slices=8``: about 8x as many), so
the sliced graph suffered most (tools/bench_load.py). libgomp spins only 100 iterations when a process has more
OpenMP threads than CPUs (GOMP_SPINCOUNT in its manual; ``OMP_WAIT_POLICY`` is read when it loads, too early for
a library). So while the CPU is oversubscribed (``/proc/pressure/cpu``, else the load average) a CPU region call
keeps an idle OpenMP team on a helper thread (:class:`ShortWaits`) until shortly after the last such call. It
changes when threads sleep, never what they compute: same kernels, same thread counts, same numbers, no memory.
``FXSTREAM_SHORT_WAITS=0`` turns it off, ``=1`` holds it whenever a region runs with several threads.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .analysis.cuts import PARTIAL, Cut
from .region_loop import RegionLoop

__all__ = ["LoopRegion", "cpu_pool", "set_in_flight", "slice_view", "body_input", "contiguous_strides", "buffer_layout",
           "ShortWaits", "SHORT_WAITS", "cpu_pressure", "libgomp_path"]


def slice_view(x: torch.Tensor, cut: Cut, start: int, n: int, length: int) -> torch.Tensor:
    """The view of ``x`` holding elements ``[start, start+n)`` of the axis that ``cut`` locates in ``x``."""
    if cut.outer == 1:
        return x.narrow(cut.dim, start * cut.inner, n * cut.inner)
    x = x.unflatten(cut.dim, (cut.outer, length * cut.inner))
    return x.narrow(cut.dim + 1, start * cut.inner, n * cut.inner)


def body_input(x: torch.Tensor, cut: Cut, start: int, n: int, length: int) -> torch.Tensor:
    """The slice as an op inside a body sees it: the slice view, with ``outer > 1`` merged back into one dim."""
    v = slice_view(x, cut, start, n, length)
    return v if cut.outer == 1 else v.flatten(cut.dim, cut.dim + 1)


def contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(list(shape)):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def buffer_layout(val: torch.Tensor) -> tuple:
    """(shape, strides, dtype) of the buffer a region allocates for a value: the value's own strides when they
    are dense (the layout eager mode gives it, so later views stay valid), else contiguous."""
    shape = tuple(int(s) for s in val.shape)
    stride = tuple(int(s) for s in val.stride())
    dims = sorted((st, sz) for sz, st in zip(shape, stride) if sz != 1)
    expect, dense = 1, True
    for st, sz in dims:  # innermost first: each stride is the product of the sizes inside it
        dense = dense and st == expect
        expect *= sz
    return shape, stride if dense else contiguous_strides(shape), val.dtype


class _Step(NamedTuple):
    """One slice, prepared when the region is built."""

    body: str  # key into ``bodies``
    ins: tuple  # (argument index, dim, start, size): narrow the argument's base view
    outs: tuple  # (output index, dim, start, size, unflatten dim, unflatten sizes or None)


_POOLS: dict = {}
_POOL_LOCK = threading.Lock()


def cpu_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads sharing the caller's intra-op threads (at least one each); made once."""
    total = torch.get_num_threads()
    per = max(1, total // workers)
    with _POOL_LOCK:
        key = (workers, per)
        if key not in _POOLS:
            ready = threading.Barrier(workers + 1)

            def init():
                torch.get_num_threads()  # the thread's own OpenMP setting is made now, then changed
                torch.set_num_threads(per)
                ready.wait()

            pool = ThreadPoolExecutor(workers, thread_name_prefix=f"fxstream-{workers}x{per}", initializer=init)
            for _ in range(workers):
                pool.submit(int)
            ready.wait()
            torch.set_num_threads(total)  # the count new threads start from; the caller's own is unchanged
            _POOLS[key] = pool
        return _POOLS[key]


def cpu_pressure(text: str | None = None) -> float | None:
    """The share (percent) of the last 10 seconds in which some runnable task waited for a CPU (Linux pressure
    stall information, ``/proc/pressure/cpu``; ``text`` instead of reading it), None where it is not available."""
    if text is None:
        try:
            with open("/proc/pressure/cpu") as f:
                text = f.read()
        except OSError:
            return None
    for line in text.splitlines():
        if line.startswith("some "):
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            try:
                return float(fields["avg10"])
            except (KeyError, ValueError):
                return None
    return None


def libgomp_path() -> str | None:
    """The file of the libgomp this process has loaded (PyTorch's OpenMP on Linux), None without one."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libgomp" in line.rsplit("/", 1)[-1]:
                    return line.split(None, 5)[-1].strip()
    except OSError:
        pass
    return None


class ShortWaits:
    """Keeps libgomp's spin-waits short while loop regions run on an oversubscribed CPU.

    :meth:`hold` (called by every CPU region call with its intra-op thread count) checks the CPU pressure at most
    every ``check_s`` seconds; while it is at least ``pressure`` percent (or, without pressure information, the
    1-minute load average exceeds the CPUs) it keeps a helper thread with an idle OpenMP team of its own, sized so
    that the process has more OpenMP threads than CPUs: libgomp then spins 100 iterations instead of about 300,000
    before a waiting thread sleeps. The helper sets only its own OpenMP thread count (``omp_set_num_threads`` of
    the loaded libgomp: per thread), runs one parallel kernel to make its team, and exits ``hold_s`` seconds after
    the last call that asked for it; libgomp counts its threads out again when it exits. ``mode``: "auto" (under
    load), "on" (whenever a region has several threads), "off"; default from ``FXSTREAM_SHORT_WAITS`` (0 / 1)."""

    def __init__(self, mode: str | None = None, pressure: float = 25.0, check_s: float = 1.0, hold_s: float = 1.0):
        env = os.environ.get("FXSTREAM_SHORT_WAITS", "")
        self.mode = mode or {"0": "off", "1": "on"}.get(env.strip(), "auto")
        self.pressure, self.check_s, self.hold_s = pressure, check_s, hold_s
        self._lock = threading.Lock()
        self._until = 0.0
        self._thread = None
        self._checked, self._loaded = -math.inf, False
        self._gomp = None  # ctypes handle of the loaded libgomp; False where there is none

    @property
    def helper(self) -> threading.Thread | None:
        """The helper thread holding the idle team, None when there is none."""
        return self._thread

    @property
    def held(self) -> bool:
        """Whether the helper's team is held now."""
        t = self._thread
        return t is not None and t.is_alive()

    def oversubscribed(self) -> bool:
        p = cpu_pressure()
        if p is not None:
            return p >= self.pressure
        try:
            return os.getloadavg()[0] > len(os.sched_getaffinity(0))
        except (OSError, AttributeError):
            return False

    def hold(self, threads: int, seconds: float | None = None) -> bool:
        """Keep (or start) the helper for ``seconds`` (default ``hold_s``) more where the mode and the load ask
        for it; return whether it is held."""
        if self.mode == "off" or threads < 2:
            return False
        now = time.monotonic()
        if self.mode == "auto" and now - self._checked >= self.check_s:
            self._checked, self._loaded = now, self.oversubscribed()
        if self.mode == "auto" and not self._loaded:
            return self.held
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return False
        team = cpus - threads + 2  # the caller's team has `threads`: one more than the CPUs in all
        if team < 2 or not self._libgomp():
            return False  # more threads than CPUs already (libgomp spins briefly anyway), or no libgomp
        started = None
        with self._lock:
            self._until = max(self._until, now + (self.hold_s if seconds is None else seconds))
            if not self.held:
                started = threading.Event()
                self._thread = threading.Thread(target=self._helper, args=(team, started), daemon=True,
                                                name="fxstream-short-waits")
                self._thread.start()
        if started is not None:
            started.wait()  # its team exists before the region's kernels start
        return True

    def release(self) -> None:
        """End the helper now (it exits within its next wait)."""
        with self._lock:
            self._until = 0.0
            t = self._thread
        if t is not None:
            t.join()

    def _libgomp(self):
        if self._gomp is None:
            path = libgomp_path()
            try:
                self._gomp = ctypes.CDLL(path) if path else False
            except OSError:
                self._gomp = False
        return self._gomp

    def _helper(self, team: int, started: threading.Event) -> None:
        try:
            torch.get_num_threads()  # ATen's per-thread setting is made now (from the global count), then:
            self._gomp.omp_set_num_threads(team)  # this thread's own count only (no global or MKL setting)
            torch.ones(team * 65536).add_(1)  # one kernel split in `team` parts: the team is made and kept
        except Exception:  # no usable libgomp after all: never try again
            self._gomp = False
            with self._lock:
                self._thread = None
            return
        finally:
            started.set()
        while True:
            with self._lock:
                left = self._until - time.monotonic()
                if left <= 0:
                    self._thread = None
                    return
            time.sleep(min(left, 0.25))


SHORT_WAITS = ShortWaits()

_STREAMS: dict = {}
_POOL_MARGIN = 0.9  # a region takes the CPU pool only if its slices run in under 90% of the serial time


def _side_streams(device: torch.device, n: int) -> list:
    key = (device.index if device.index is not None else torch.cuda.current_device(), n)
    if key not in _STREAMS:
        _STREAMS[key] = [torch.cuda.Stream(device) for _ in range(n)]
    return _STREAMS[key]


def set_in_flight(gm: torch.nn.Module, k: int, cpu_workers: bool | None = None) -> None:
    """Give every loop region in ``gm`` (nested ones too) ``k`` slices in flight and the CPU mode that
    ``Policy.cpu_workers`` asks for (None: measured on the first call)."""
    mode = {None: None, True: "workers", False: "serial"}[cpu_workers]
    for loop in gm.modules():
        if isinstance(loop, LoopRegion):
            loop.pipeline, loop.cpu_mode = k, mode


def _in_callers_state(fn):
    """``fn`` wrapped to run in a worker thread with the calling thread's grad mode, inference mode and
    dispatch modes (a memory tracker, a FLOP counter): all of them are per thread."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    modes = _get_current_dispatch_mode_stack()

    def run(*args):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(inference))
            stack.enter_context(torch.set_grad_enabled(grad))
            for m in modes:
                stack.enter_context(m)
            return fn(*args)
    return run


class LoopRegion(RegionLoop):
    """A region sliced along one axis of ``length`` elements, as ``bounds`` (start, size) pairs.

    ``bodies[str(size)]`` is the region's GraphModule for a slice of ``size`` elements. ``in_cuts[i]`` says how
    argument ``i`` is sliced (None: passed whole); ``out_cuts[j]`` how output ``j`` is assembled; ``reuse[j]``
    is the index of the argument whose storage output ``j`` takes over (None: a buffer of its own).
    ``pipeline`` is the most slices in flight (set by the compiler; a region whose bodies hold regions of their
    own runs its parts one at a time and pipelines inside them). A :class:`~fxstream.region_loop.RegionLoop` of
    kind ``"cut"``.
    """

    kind = "cut"

    def __init__(self, bodies: dict, length: int, bounds, in_cuts, out_cuts, out_meta, axis: str = "",
                 pipeline: int = 1):
        super().__init__()
        self.bodies = torch.nn.ModuleDict({str(k): v for k, v in bodies.items()})
        self.length = length
        self.bounds = list(bounds)
        self.in_cuts = list(in_cuts)
        self.out_cuts = list(out_cuts)
        self.out_meta = list(out_meta)  # (shape, strides, dtype) of each full output (see buffer_layout)
        self.reuse = [None] * len(self.out_cuts)
        self.axis = axis
        self.pipeline = pipeline
        self.cpu_mode = None  # "serial" or "workers"; None: measured on the first call (see _measure_cpu)
        self.shards = None  # a fxstream.distributed.Shards: this rank runs its block of slices (_run_sharded)
        self.sharding = None  # what a spread region holds in parts (fxstream.distributed.held_values)
        self.cpu_timing = None  # (seconds per slice serial, with workers) where measured
        self.within = 1  # > 1: each one-element slice's body is a compiled graph of its own, cut about this many
        # ways along its own axes (NOTE [Slices within one element]; not a batch split)
        # base views, made once per call: an argument or output cut with outer > 1 is unflattened first
        self._unflat_in = [(i, c.dim, (c.outer, length * c.inner)) for i, c in enumerate(self.in_cuts)
                           if isinstance(c, Cut) and c.outer > 1]
        self._unflat_out = [(j, c.dim, (c.outer, length * c.inner)) for j, c in enumerate(self.out_cuts)
                            if isinstance(c, Cut) and c.outer > 1]
        self.partial = tuple(j for j, c in enumerate(self.out_cuts) if c is PARTIAL)
        self._steps = [self._step(start, n) for start, n in self.bounds]

    def _step(self, start: int, n: int) -> _Step:
        def at(c: Cut):
            return c.dim + (c.outer > 1), start * c.inner, n * c.inner
        ins = tuple((i, *at(c)) for i, c in enumerate(self.in_cuts) if c is not None)
        outs = tuple((j, *at(c), c.dim, (c.outer, n * c.inner) if c.outer > 1 else None)
                     for j, c in enumerate(self.out_cuts) if isinstance(c, Cut))
        return _Step(str(n), ins, outs)

    @property
    def holds_loops(self) -> bool:
        """Whether the bodies hold loop regions of their own: a batch split around other regions, or slices
        within one element (:attr:`within`)."""
        return any(isinstance(m, LoopRegion) for b in self.bodies.values() for m in b.modules())

    @property
    def nested(self) -> bool:
        """Whether this is a batch split around other regions (its bodies hold loop regions of their own, and
        it is not a region cut within one element: :attr:`within`)."""
        return self.within == 1 and self.holds_loops

    @property
    def in_flight(self) -> int:
        """The most slices whose working sets are live at once (1 where the bodies pipeline inside)."""
        return 1 if self.holds_loops else max(1, min(self.pipeline, len(self.bounds)))

    def extra_repr(self) -> str:
        within = f", within={self.within}" if self.within > 1 else ""
        return f"axis={self.axis}, length={self.length}, slices={len(self.bounds)}{within}, pipeline={self.pipeline}"

    def _out_buffers(self, args, device) -> list:
        outs = []
        for c, (shape, stride, dtype), i in zip(self.out_cuts, self.out_meta, self.reuse):
            if not isinstance(c, Cut):
                outs.append(None)
            elif i is None:
                outs.append(torch.empty_strided(shape, stride, dtype=dtype, device=device))
            else:
                outs.append(args[i].as_strided(shape, stride, 0))
        return outs

    def forward(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device
        if self.shards is not None and not any(is_fake(a) for a in tensors):
            return self._run_sharded(args, device)
        outs = self._out_buffers(args, device)
        if any(is_fake(a) for a in tensors):
            # fake-tensor propagation of the enclosing graph: the outputs' shapes and storages, without the loop
            return tuple(torch.empty_strided(shape, stride, dtype=dtype, device=device) if o is None else o
                         for o, (shape, stride, dtype) in zip(outs, self.out_meta))
        ins = list(args)
        for i, d, sizes in self._unflat_in:
            ins[i] = ins[i].unflatten(d, sizes)
        dsts = list(outs)
        for j, d, sizes in self._unflat_out:
            dsts[j] = dsts[j].unflatten(d, sizes)
        if device.type == "cpu":
            SHORT_WAITS.hold(torch.get_num_threads())
        k = self.in_flight
        if k == 1:
            self._run_serial(ins, dsts, outs)
        elif device.type == "cuda":
            self._run_streams(ins, dsts, outs, k, device)
        else:
            if self.cpu_mode is None:
                self.cpu_mode = self._measure_cpu(ins, k)
            if self.cpu_mode == "workers":
                self._run_workers(ins, dsts, outs, k)
            else:
                self._run_serial(ins, dsts, outs)
        return tuple(outs)

    def _body(self, step: _Step, ins: list):
        a = ins.copy()
        for i, d, s, n in step.ins:
            a[i] = ins[i].narrow(d, s, n)
        return self.bodies[step.body](*a)

    def _code_ready(self) -> None:
        """Generate every body's code now, on this thread, before workers call the bodies (their code is made
        when first needed: NOTE [Lazy code of compiled graphs] in ``graph_utils``)."""
        for body in self.bodies.values():
            _LazyGraphModule.force_recompile(body)

    def _measure_cpu(self, ins, k: int) -> str:
        """Time the first ``k`` slices' bodies one after another and on ``k`` workers (after a warm-up run of
        each: kernel selection, the pool's start) and return the faster mode. Bodies are pure functions of their
        arguments, so running them here changes nothing; the loop that follows computes the region's outputs."""
        steps = self._steps[:k]
        self._code_ready()
        pool = cpu_pool(k)
        run = _in_callers_state(lambda step: self._body(step, ins))  # for the workers only
        times = {}
        for mode in ("serial", "workers") * 2:  # the first of each is the warm-up; the second one counts
            t0 = time.perf_counter()
            if mode == "serial":
                for step in steps:
                    self._body(step, ins)
            else:
                for f in [pool.submit(run, step) for step in steps]:
                    f.result()
            times[mode] = (time.perf_counter() - t0) / len(steps)
        self.cpu_timing = (times["serial"], times["workers"])
        # the pool holds k working sets at once: it has to be clearly faster, not faster by noise
        return "workers" if times["workers"] < _POOL_MARGIN * times["serial"] else "serial"

    def _slice(self, step: _Step, ins: list, dsts: list):
        """Run one slice: narrow its arguments, call its body, write its cut outputs; return the body's results."""
        results = self._body(step, ins)
        for j, d, s, n, ud, us in step.outs:
            r = results[j]
            dsts[j].narrow(d, s, n).copy_(r if us is None else r.unflatten(ud, us))
        return results

    def _accumulate(self, results, outs: list) -> None:
        for j in self.partial:
            outs[j] = results[j] if outs[j] is None else outs[j].add_(results[j])

    def _run_serial(self, ins, dsts, outs) -> None:
        for step in self._steps:
            results = self._slice(step, ins, dsts)
            self._accumulate(results, outs)
            # drop this slice's results before the next body runs: holding them would add a slice to the peak
            del results

    def _run_workers(self, ins, dsts, outs, k: int) -> None:
        self._code_ready()
        pool = cpu_pool(k)
        pending: deque = deque()
        partial = self.partial

        @_in_callers_state
        def work(step):
            results = self._slice(step, ins, dsts)
            return [results[j] if j in partial else None for j in range(len(results))] if partial else ()

        try:
            for step in self._steps:
                if len(pending) == k:  # at most k slices in flight; partial sums added in slice order
                    self._accumulate(pending.popleft().result(), outs)
                pending.append(pool.submit(work, step))
            while pending:
                self._accumulate(pending.popleft().result(), outs)
        finally:  # on an error, let every started slice finish before the buffers are given up
            for f in pending:
                f.cancel() or f.exception()

    def _run_sharded(self, args, device) -> tuple:
        """This rank's block of slices; then every block's part of each output gathered from the rank that made
        it, except the outputs every rank keeps in parts (NOTE [Sharded regions], NOTE [Values held in parts] in
        ``fxstream.distributed``)."""
        from .distributed import block, equal_runs, rank_ranges, reshard
        from .memory import release_storage
        sh = self.shards
        n = len(self._steps)
        run = block(n, sh.size, sh.rank)
        lo = self.bounds[run[0]][0] if run else 0
        held = self.sharding
        what = f"a {self.axis} region's outputs"
        ins = list(args)
        shift_in = {}  # argument -> elements its part starts at (this rank's part, not the whole value)
        for i, how in enumerate(held.ins if held is not None else ()):
            if how is not None:
                if how != "part":
                    ins[i] = reshard(sh, args[i], how, f"the exchange of a region's input into {self.axis} parts")
                    if how.last:  # NOTE [An exchange frees its source]: no later node reads the producer's part
                        release_storage(args[i])
                shift_in[i] = lo * self.in_cuts[i].inner
        for i, d, sizes in self._unflat_in:  # a part is already in the form the bodies take
            if i not in shift_in:
                ins[i] = ins[i].unflatten(d, sizes)
        outs, dsts, shift_out = [], [], {}
        for j, (c, (shape, stride, dtype), i) in enumerate(zip(self.out_cuts, self.out_meta, self.reuse)):
            part = held.outs[j] if held is not None else None
            if part is not None:
                buf = torch.empty(part.part_shape(sh.rank), dtype=dtype, device=device)
                outs.append(buf)
                dsts.append(buf)
                shift_out[j] = lo * c.inner
            elif not isinstance(c, Cut):
                outs.append(None)
                dsts.append(None)
            else:  # whole: its storage taken over from an argument only where that argument is whole too
                buf = (args[i].as_strided(shape, stride, 0) if i is not None and i not in shift_in
                       else torch.empty_strided(shape, stride, dtype=dtype, device=device))
                outs.append(buf)
                dsts.append(buf.unflatten(c.dim, (c.outer, self.length * c.inner)) if c.outer > 1 else buf)
        partials = {}  # slice index -> this rank's partial results (those outputs' order)
        # the slices' offsets into this rank's parts, not into the whole values (once per call, not per slice)
        steps = {idx: self._steps[idx] for idx in run} if not (shift_in or shift_out) else {
            idx: _Step(st.body, tuple((i, d, s - shift_in.get(i, 0), m) for i, d, s, m in st.ins),
                       tuple((j, d, s - shift_out.get(j, 0), m, ud, us) for j, d, s, m, ud, us in st.outs))
            for idx, st in ((idx, self._steps[idx]) for idx in run)}
        for idx in run:
            results = self._slice(steps[idx], ins, dsts)
            if self.partial:
                partials[idx] = [results[j] for j in self.partial]
            del results
        del ins
        ranges = rank_ranges(self, sh.size)
        even = equal_runs(self, sh.size)
        for j, d, _, _, _, _ in self._steps[0].outs:
            if j in shift_out:  # NOTE [Values held in parts]: every rank keeps its own part
                continue
            inner = self.out_cuts[j].inner
            parts = [None if r is None else dsts[j].narrow(d, r[0] * inner, (r[1] - r[0]) * inner) for r in ranges]
            mine = parts[sh.rank]
            if even and dsts[j].is_contiguous() and mine.is_contiguous():  # the parts follow each other in memory
                sh.all_gather(dsts[j].view(-1), mine.view(-1), what)
                continue
            # through one copy: every rank's part in a chunk of the largest part's size
            per = max(p.numel() for p in parts if p is not None)
            chunks = torch.empty(sh.size * per, dtype=dsts[j].dtype, device=device)
            if mine is not None:
                chunks[sh.rank * per:sh.rank * per + mine.numel()].view(mine.shape).copy_(mine)
            sh.all_gather(chunks, chunks[sh.rank * per:(sh.rank + 1) * per], what)
            for q, p in enumerate(parts):
                if q != sh.rank and p is not None:
                    p.copy_(chunks[q * per:q * per + p.numel()].view(p.shape))
            del chunks
        if self.partial:
            self._gather_partials(partials, outs, device)
        return tuple(outs)

    def _gather_partials(self, partials: dict, outs: list, device) -> None:
        from .distributed import block
        sh = self.shards
        n = len(self._steps)
        # partial sums: every slice's, gathered in one collective, added in slice order as _run_serial does
        runs = [block(n, sh.size, q) for q in range(sh.size)]
        most = max(len(r) for r in runs)
        for k, j in enumerate(self.partial):
            shape, stride, dtype = self.out_meta[j]
            size = math.prod(shape)
            chunks = torch.zeros(sh.size * most * size, dtype=dtype, device=device)
            for t, i in enumerate(runs[sh.rank]):
                at = (sh.rank * most + t) * size
                chunks[at:at + size].view(shape).copy_(partials[i][k])
            sh.all_gather(chunks, chunks[sh.rank * most * size:(sh.rank + 1) * most * size],
                          f"a {self.axis} region's partial sums")
            acc = None
            for q, run in enumerate(runs):
                for t, _ in enumerate(run):
                    p = chunks[(q * most + t) * size:(q * most + t + 1) * size].view(shape)
                    if acc is None:  # one layout on every rank, whichever made the first slice
                        acc = torch.empty_strided(shape, stride, dtype=dtype, device=device).copy_(p)
                    else:
                        acc.add_(p)
            outs[j] = acc

    def _run_streams(self, ins, dsts, outs, k: int, device) -> None:
        main = torch.cuda.current_stream(device)
        streams = [main] + _side_streams(device, k - 1)
        start = main.record_event()  # the region's inputs and output buffers are ready
        for s in streams[1:]:
            s.wait_event(start)
        summed = None  # event after the last partial sum
        for idx, step in enumerate(self._steps):
            s = streams[idx % k]
            with torch.cuda.stream(s):
                results = self._slice(step, ins, dsts)
                if self.partial:
                    if summed is not None:
                        s.wait_event(summed)
                    for j in self.partial:
                        if outs[j] is not None and s is not main:
                            outs[j].record_stream(s)  # made on another stream, now written on this one
                    self._accumulate(results, outs)
                    summed = s.record_event()
            del results
        for s in streams[1:]:
            main.wait_stream(s)
        for j in self.partial:
            outs[j].record_stream(main)  # a side stream may have made it; the caller uses it on main
