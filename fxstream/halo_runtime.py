"""Runtime of a halo region: its statistics passes, then its output pass, one band of rows per slice.

``HaloLoop`` holds the region's ops as a GraphModule (``body``: placeholders are the region's inputs, outputs its
values used outside) and, prepared when built, every pass's slices (:func:`fxstream.analysis.halo.passes`): the
rows of each value to compute. A slice walks the ops in order on bands (``(tensor, first row)``): each op reads
the rows it needs out of its inputs' bands, a convolution pads the rows its band lacks at the tensor's edge with
zeros (its own padding along height set to 0), a GroupNorm normalises with the statistics a previous pass gathered.
A band is dropped after its last use in the slice; output rows are copied into full-size buffers as soon as made.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx import GraphModule, Node

from .analysis.halo import (HALO_RULES, WHOLE, HaloRegion, carried_rows, conv_band, conv_params, kept_rows, norm_chunks,
                            passes, simulate_halo)
from .graph_utils import graph_key
from .distributed import block, fill_rows, hull
from .memory import host_storage
from .region_loop import RegionLoop
from .runtime import buffer_layout

aten = torch.ops.aten

__all__ = ["HaloLoop", "body_region", "set_line_buffers"]


def body_region(body: GraphModule, dims: list, count: int, wdims: list | None = None, cols: int = 1,
                along: str = "height", parked=()) -> HaloRegion:
    """The :class:`HaloRegion` of a body graph: ``dims[i]`` is the height dim of the i-th placeholder (None: read
    whole) followed by one per call_function node; ``wdims`` the width dims the same way (a grid of ``cols``
    columns; ``count`` tiles in all); ``parked``: indices (among the call_function nodes) of the values parked in
    host memory."""
    phs = [n for n in body.graph.nodes if n.op == "placeholder"]
    ops = [n for n in body.graph.nodes if n.op == "call_function"]
    out = list(next(n for n in body.graph.nodes if n.op == "output").args[0])
    named = {n: d for n, d in zip(phs + ops, dims) if d is not None}
    wnamed = {n: d for n, d in zip(phs + ops, wdims or []) if d is not None}
    return HaloRegion(ops, named, phs, out, count, wdims=wnamed, cols=cols, along=along,
                      parked=frozenset(ops[i] for i in parked))


class _Stats:
    """Per-group count, mean and M2 of a GroupNorm's input, merged slice by slice (Chan et al.) in float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, xg: torch.Tensor) -> None:
        part = self.part(xg)
        if part is not None:
            self.merge(*part)

    @staticmethod
    def part(xg: torch.Tensor):
        """(count, mean, M2) of one slice's rows (float64), or None for no rows."""
        dims = list(range(2, xg.dim()))
        k = math.prod(xg.shape[2:])
        if k == 0:
            return None
        x = xg if xg.dtype in (torch.float32, torch.float64) else xg.float()
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return k, mean.double(), var.double() * k

    def merge(self, k: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge a slice's (count, mean, M2) in: slices merged in the same order give the same bits."""
        if self.mean is None:
            self.n, self.mean, self.m2 = k, mean, m2
            return
        n = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * k / n)
        self.n = n

    def finish(self, eps: float, dtype) -> tuple:
        rstd = torch.rsqrt(self.m2 / self.n + eps)
        return self.mean.to(dtype), rstd.to(dtype)


class _Host:
    """The host buffers of a region's parked values during one call (NOTE [Host checkpoints] in
    :mod:`fxstream.analysis.halo`): pinned CPU memory when the region runs on CUDA, where rows go out and bands
    come back on a copy stream of their own (a band's storage is kept for the copy going out; the compute stream
    waits for a band coming back before using it); plain CPU memory on a CPU, each band read back a copy (as a
    device would make it), made under :func:`fxstream.memory.host_storage` so a tracker counts them apart. A slice's
    bands come back at its start (the planner counts them from there), so on CUDA their copies overlap the slice's
    first ops."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict = {}
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def park(self, v: Node, val: torch.Tensor) -> None:
        with host_storage():
            self.buffers[v] = torch.empty(tuple(val.shape), dtype=val.dtype, pin_memory=self.cuda)

    @staticmethod
    def _rows(t: torch.Tensor, reqs) -> torch.Tensor:
        for d, lo, hi in reqs:
            t = t.narrow(d, lo, hi - lo)
        return t

    def write(self, v: Node, reqs, band: torch.Tensor) -> None:
        """Copy ``band`` (the rows ``reqs``, one (dim, lo, hi) per axis, of ``v``) into its host buffer."""
        dst = self._rows(self.buffers[v], reqs)
        if not self.cuda:
            dst.copy_(band)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(band, non_blocking=True)
        band.record_stream(self.stream)

    def prefetch(self, wanted: list) -> dict:
        """The bands ``wanted`` ((value, reqs), in the order a slice uses them) back from their host buffers, as new
        tensors on the device: {value: (tensor, event or None)}. On CUDA the copies run on the copy stream while
        the compute stream goes on; :meth:`ready` makes it wait for one where the slice first uses it."""
        out = {}
        if self.cuda and wanted:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the bands' memory may be reused
        for v, reqs in wanted:
            src = self._rows(self.buffers[v], reqs)
            band = torch.empty(tuple(src.shape), dtype=src.dtype, device=self.device)
            if not self.cuda:
                out[v] = (band.copy_(src), None)
                continue
            with torch.cuda.stream(self.stream):
                band.copy_(src, non_blocking=True)
                out[v] = (band, self.stream.record_event())
        return out

    def ready(self, fetched: tuple) -> torch.Tensor:
        band, event = fetched
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return band

    def sync(self) -> None:
        """Make the compute stream wait for every copy issued so far (before the host buffers are read whole)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def drop(self, v: Node) -> None:
        """No later pass reads ``v``: its buffer goes (a pinned block is reused only once its copies are done)."""
        del self.buffers[v]


def _stat_shape(g: Node) -> tuple:
    """The (batch, groups) shape of a GroupNorm's statistics (a halo along height or width keeps the batch)."""
    return int(g.args[0].meta["val"].shape[0]), int(g.args[1])


def _groups(x: torch.Tensor, g: int) -> torch.Tensor:
    return x.unflatten(1, (g, x.shape[1] // g))


_PLANS: OrderedDict = OrderedDict()  # structure key -> HaloSimulation; see NOTE [Halo plans of equal regions]
_PLANS_KEPT = 4096


def _structure_key(body: GraphModule, dims: list, count: int, wdims: list, cols: int, along: str,
                   parked: tuple = ()) -> tuple:
    """What a halo region's plan depends on: the body's graph (ops and arguments; not its node names, which the
    plan never reads), its inputs' metadata and the slicing."""
    inputs = tuple((tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype) if isinstance(v, torch.Tensor)
                   else repr(v) for v in (n.meta.get("val") for n in body.graph.nodes if n.op == "placeholder"))
    graph = graph_key(body.graph)
    if graph is None:  # a tensor constant in an argument: the code names it
        graph = hashlib.sha256(body.code.encode()).hexdigest()
    return graph, inputs, tuple(dims), count, tuple(wdims), cols, along, tuple(parked)


class HaloLoop(RegionLoop):
    """A region sliced ``count`` ways along height with halos (see the module docstring): a
    :class:`~fxstream.region_loop.RegionLoop` of kind ``"halo"``."""

    kind = "halo"

    def __init__(self, body: GraphModule, dims: list, count: int, out_meta: list, wdims: list | None = None,
                 cols: int = 1, along: str = "height", parked=()):
        super().__init__()
        self.body = body
        self.dims = list(dims)
        self.wdims = list(wdims or [])
        self.count = count
        self.cols = cols
        self.out_meta = list(out_meta)  # (shape, strides, dtype) of each full output
        self.along = along
        self.parked = tuple(sorted(parked))  # indices of the body's ops parked in host memory
        self.region = body_region(body, self.dims, count, self.wdims, cols, along, self.parked)
        self._axes = self.region.axes
        self._passes = None
        self._key = _structure_key(body, self.dims, count, self.wdims, cols, along, self.parked)
        self._plans = None  # the slices' schedules, made on the first real call
        # convolutions along the sliced axis keep line buffers (NOTE [Line buffers])
        self._convs = {n for n in self.region.nodes if HALO_RULES[n.target].kind == "conv"}
        self.line_buffers = False  # set by set_line_buffers where they do not raise the planned peak
        self.shards = None  # a fxstream.distributed.Shards: this rank runs its run of each pass's slices
        self.rows = None  # a fxstream.distributed.HaloRows: outputs and arguments held in rows (spread only)

    # -- rows per rank (NOTE [Rows held in parts] in fxstream.distributed) --------------------------------------
    def made_rows(self, o: Node, ranks: int) -> list:
        """The rows of output ``o`` each of ``ranks`` ranks computes (``(lo, hi)``, None: none): the rows its run
        of slices is assigned in the output pass."""
        last = self.passes[-1]
        return [hull(last.assign[i][o] for i in block(self.count, ranks, r) if o in last.assign[i])
                for r in range(ranks)]

    def needed_rows(self, ph: Node, ranks: int) -> list:
        """The rows of input ``ph`` each of ``ranks`` ranks reads (``(lo, hi)``, None: none): over every pass, what
        its run of slices needs."""
        return [hull(p.slices[i][ph] for p in self.passes for i in block(len(p.slices), ranks, r)
                     if ph in p.slices[i]) for r in range(ranks)]

    def read_in_rows(self, ph: Node) -> bool:
        """Whether every op of the region reads input ``ph`` by rows along its dim (never whole): then it may be
        given only the rows its slices need."""
        d = self.region.dims.get(ph)
        if d is None or self.cols != 1:
            return False
        for n in self.region.nodes:
            if ph in n.all_input_nodes:
                req = HALO_RULES[n.target].need(n, self.region.dims[n], 0, self.region.length(n))
                r = req.get(ph, WHOLE)
                if r is WHOLE or r[0] != d:
                    return False
        return True

    @property
    def passes(self) -> list:
        """The region's passes (:func:`~fxstream.analysis.halo.passes`), made when first needed."""
        if self._passes is None:
            self._passes = passes(self.region)
        return self._passes

    def plan(self, flops: dict | None = None):
        """The region's :class:`~fxstream.analysis.halo.HaloPlan` (with planned compute when given FLOPs).

        NOTE [Halo plans of equal regions]: a memory budget compiles a decoder many times (every grid and
        checkpoint size it tries), and most regions come out the same in several compiles; a decoder also repeats
        equal blocks under other names. A plan depends only on the body's ops and arguments (not on node names:
        it reads shapes, dtypes and storages), its inputs' shapes, strides and dtypes, the slicing (dims, count,
        grid) and, for its planned compute, its ops' FLOPs, so its simulation (``simulate_halo``: every pass and slice)
        is kept under that key (``_structure_key``; no code is generated for it) and made once per distinct
        region; FLOPs, when given, only weigh the simulated rows (``HaloSimulation.plan``)."""
        key = (self._key, self.line_buffers)
        sim = _PLANS.get(key)
        if sim is None:
            sim = _PLANS[key] = simulate_halo(self.region, self.passes, self.line_buffers)
            while len(_PLANS) > _PLANS_KEPT:
                _PLANS.popitem(last=False)
        else:
            _PLANS.move_to_end(key)
        return sim.plan(self.region, flops)

    @property
    def working_bytes(self) -> int:
        """The planned peak of its slices' bands (on top of its whole outputs), as it runs now."""
        return self.plan().working_bytes

    @property
    def bodies(self) -> dict:
        """None to plan per slice size: the bands are planned by the rows simulation (``working_bytes``)."""
        return {}

    def extra_repr(self) -> str:
        axis = self.along if self.cols == 1 else f"height x width, grid={self.count // self.cols}x{self.cols}"
        parked = f", parked={len(self.parked)}" if self.parked else ""
        lines = ", line_buffers=True" if self.line_buffers else ""
        return f"axis={axis}, slices={self.count}, passes={len(self.passes)}{parked}{lines}"

    def _schedule(self, p, i: int) -> list:
        """(need, assign, [(node, bands, free after)]) for slice ``i`` of pass ``p`` (a value parked by an earlier
        pass is read back, not computed: it uses none of its inputs)."""
        need, assign = p.tile(i)
        todo = [n for n in self.region.nodes if n in need]
        last = {}
        for j, n in enumerate(todo):
            if n in p.read:
                continue
            for a in n.all_input_nodes:
                last[a] = j
        steps = []
        for j, n in enumerate(todo):
            steps.append((n, need[n], [a for a in n.all_input_nodes if last.get(a) == j] +
                          ([n] if n not in last else [])))
        return need, assign, steps

    def _dims(self, n: Node) -> list:
        return [ax[n] for ax in self._axes]

    def _narrow(self, t: torch.Tensor, n: Node, bands, offsets=None) -> torch.Tensor:
        """Bands ``((lo, hi), ...)`` of value ``n`` out of ``t``, which holds its rows from ``offsets``."""
        for k, (d, (lo, hi)) in enumerate(zip(self._dims(n), bands)):
            t = t.narrow(d, lo - (offsets[k] if offsets else 0), hi - lo)
        return t

    def forward(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device
        outs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                for shape, stride, dtype in self.out_meta]
        if any(is_fake(a) for a in tensors):
            return tuple(outs)
        if self._plans is None:
            self._plans = [[self._schedule(p, i) for i in range(len(p.slices))] for p in self.passes]
        full = dict(zip(self.region.inputs, args))
        held = self.rows if self.shards is not None else None  # NOTE [Rows held in parts]
        starts = {}  # an input or output held in rows -> (its part's first row,)
        if held is not None:
            r = self.shards.rank
            for ph, how in zip(self.region.inputs, held.ins):
                if how is not None:
                    starts[ph] = (how.start(r),)
            for j, (o, how) in enumerate(zip(self.region.outputs, held.outs)):
                if how is not None:
                    outs[j] = how.empty(r, device)
                    starts[o] = (how.start(r),)
        stats: dict = {}
        out_index = {o: j for j, o in enumerate(self.region.outputs)}
        sh = self.shards
        host = _Host(device) if self.parked else None  # parked values (NOTE [Host checkpoints])
        for p, plans in zip(self.passes, self._plans):
            for v in p.park:
                host.park(v, v.meta["val"])
            acc = {g: _Stats() for g in p.stats}
            summed: dict = {}  # GroupNorm input -> the GroupNorms this pass gathers statistics of
            for g in p.stats:
                summed.setdefault(g.args[0], []).append(g)
            parts: dict = {}  # spread: slice index -> {GroupNorm: its (count, mean, M2)}, merged in slice order
            mine = range(len(plans)) if sh is None else block(len(plans), sh.size, sh.rank)
            tails: dict = {}  # (convolution, column) -> (rows, first row): NOTE [Line buffers]
            carry = self.line_buffers
            for i in mine:
                need, assign, steps = plans[i]
                col, later = i % self.cols, i + self.cols
                nxt = plans[later][0] if later in mine else {}
                sink = acc if sh is None else parts.setdefault(i, {})
                env = {}
                for ph in self.region.inputs:
                    if ph in need and ph in self.region.dims:
                        env[ph] = (self._narrow(full[ph], ph, need[ph], starts.get(ph)),
                                   tuple(lo for lo, _ in need[ph]))
                for x in summed:
                    if x.op == "placeholder" and x in env:
                        self._gather(x, summed[x], sink, assign, env)
                fetched = host.prefetch([(n, [(d, lo, hi) for d, (lo, hi) in zip(self._dims(n), bands)])
                                         for n, bands, _ in steps if n in p.read]) if p.read else {}
                for n, bands, free in steps:
                    if n in p.read:
                        t = host.ready(fetched.pop(n))
                    elif carry and n in self._convs:
                        t = self._carried(n, bands, env, full, stats, tails.pop((n, col), None))
                        k = kept_rows(bands[0], nxt[n][0]) if n in nxt else None
                        if k is not None:
                            tails[(n, col)] = (t.narrow(self.region.dims[n], k[0] - bands[0][0], k[1] - k[0]).clone(),
                                               k[0])
                    else:
                        t = self._run(n, bands, env, full, stats)
                    env[n] = (t, tuple(lo for lo, _ in bands))
                    del t
                    if n in p.park and n in assign:
                        t, offsets = env[n]
                        host.write(n, [(d, lo, hi) for d, (lo, hi) in zip(self._dims(n), assign[n])],
                                   self._narrow(t, n, assign[n], offsets))
                        del t
                    if n in summed:
                        self._gather(n, summed[n], sink, assign, env)
                    if not p.stats and n in out_index and n in assign:
                        t, offsets = env[n]
                        self._narrow(outs[out_index[n]], n, assign[n], starts.get(n)).copy_(
                            self._narrow(t, n, assign[n], offsets))
                        del t  # else the band outlives its slice
                    for f in free:
                        env.pop(f, None)
            # the last slice's values and carried rows go before anything is gathered: a gather's copy is planned
            # after the slices' working sets are freed (RankParts.transit)
            env = fetched = None
            tails.clear()
            if sh is not None and p.stats:
                self._share_stats(p.stats, plans, parts, acc, device)
                if p.park:
                    host.sync()
                self._share_rows(plans, [(v, host.buffers[v]) for v in p.park], device, "a halo region's parked values")
            elif sh is not None:
                whole = [(n, outs[j]) for n, j in out_index.items() if held is None or held.outs[j] is None]
                self._share_rows(plans, whole, device, "a halo region's outputs")
                for j, how in enumerate(held.outs if held is not None else ()):
                    if how is not None and how.moves():
                        fill_rows(sh, outs[j], how, "a halo region's rows for its neighbours")
            for g, s in acc.items():
                x = g.args[0].meta["val"]
                compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
                eps = g.args[4] if len(g.args) > 4 else 1e-5
                stats[g] = s.finish(eps, compute)
            for v in p.free:
                host.drop(v)
        return tuple(outs)

    # -- spread over ranks (NOTE [Sharded regions] in fxstream.distributed) -------------------------------------
    def _share_stats(self, norms: list, plans: list, parts: dict, acc: dict, device) -> None:
        """Every slice's (count, mean, M2) of every GroupNorm from the rank that made it, merged in slice order on
        every rank, as the one-process loop merges them."""
        sh = self.shards
        width = {g: math.prod(_stat_shape(g)) for g in norms}
        row = sum(1 + 2 * width[g] for g in norms)  # per slice: for each GroupNorm its count, mean, M2
        runs = [block(len(plans), sh.size, q) for q in range(sh.size)]
        most = max(len(r) for r in runs)
        chunks = torch.zeros(sh.size * most * row, dtype=torch.float64, device=device)
        for t, i in enumerate(runs[sh.rank]):
            at = (sh.rank * most + t) * row
            for g in norms:
                part = parts.get(i, {}).get(g)
                if part is not None:
                    k, mean, m2 = part
                    chunks[at] = k
                    chunks[at + 1:at + 1 + width[g]] = mean.reshape(-1)
                    chunks[at + 1 + width[g]:at + 1 + 2 * width[g]] = m2.reshape(-1)
                at += 1 + 2 * width[g]
        sh.all_gather(chunks, chunks[sh.rank * most * row:(sh.rank + 1) * most * row],
                      "a halo region's GroupNorm statistics")
        for q, run in enumerate(runs):
            for t, _ in enumerate(run):
                at = (q * most + t) * row
                for g in norms:
                    k = int(chunks[at].item())
                    if k:
                        shape = _stat_shape(g)
                        acc[g].merge(k, chunks[at + 1:at + 1 + width[g]].view(shape).clone(),
                                     chunks[at + 1 + width[g]:at + 1 + 2 * width[g]].view(shape).clone())
                    at += 1 + 2 * width[g]

    def _share_rows(self, plans: list, targets: list, device, what: str) -> None:
        """Every slice's assigned rows of each (value, whole buffer) in ``targets`` (the region's outputs, or the
        host buffers of the values a pass parked) from the rank that computed them: one all-gather per value,
        each rank's slices packed in slice order in a chunk (on ``device``) of the largest rank's size."""
        sh = self.shards
        runs = [block(len(plans), sh.size, q) for q in range(sh.size)]
        for n, buf in targets:
            views = [[self._narrow(buf, n, plans[i][1][n]) for i in run if n in plans[i][1]] for run in runs]
            sizes = [sum(v.numel() for v in vs) for vs in views]
            per = max(sizes)
            if per == 0:
                continue
            chunks = torch.empty(sh.size * per, dtype=buf.dtype, device=device)
            at = sh.rank * per
            for v in views[sh.rank]:
                chunks[at:at + v.numel()].view(v.shape).copy_(v)
                at += v.numel()
            sh.all_gather(chunks, chunks[sh.rank * per:(sh.rank + 1) * per], what)
            for q, vs in enumerate(views):
                if q == sh.rank:
                    continue
                at = q * per
                for v in vs:
                    v.copy_(chunks[at:at + v.numel()].view(v.shape))
                    at += v.numel()
            del chunks  # before the next value's: one copy in transit at a time

    def _gather(self, x: Node, norms: list, acc: dict, assign: dict, env: dict) -> None:
        """Add this slice's rows of ``x`` (its assigned share, each row once) to the statistics of ``norms``:
        merged into ``acc[g]`` (a :class:`_Stats`), or, spread over ranks, kept as the slice's part."""
        if x not in assign:
            return
        t, offsets = env[x]
        band = self._narrow(t, x, assign[x], offsets)
        for g in norms:
            if isinstance(acc.get(g), _Stats):
                acc[g].add(_groups(band, g.args[1]))
            else:
                if g in acc:
                    raise AssertionError(f"{g.name}: two parts of one slice's statistics")
                acc[g] = _Stats.part(_groups(band, g.args[1]))

    def _arg(self, a, reqs, env, full):
        """Argument ``a`` of an op: whole, or the bands ``reqs`` (one (dim, lo, hi) per axis) out of its band."""
        if not isinstance(a, Node):
            return a
        if reqs is WHOLE or a not in env:
            return full.get(a, None) if a in full else env[a][0]
        t, offsets = env[a]
        for (d, lo, hi), off in zip(reqs, offsets):
            t = t.narrow(d, lo - off, hi - lo)
        return t

    def _run(self, n: Node, bands, env: dict, full: dict, stats: dict):
        rule = HALO_RULES[n.target]
        ds = self._dims(n)
        kind = rule.kind_at(ds[0])
        if kind == "conv":  # its bands come from conv_band; no requirement dict per slice
            return self._conv(n, ds, bands, env, full)
        reqs = [rule.need(n, d, lo, hi) for d, (lo, hi) in zip(ds, bands)]
        if kind == "upsample":
            return self._upsample(n, ds, bands, reqs, env)

        def arg(a):
            rs = [r.get(a, WHOLE) for r in reqs]
            return self._arg(a, WHOLE if any(r is WHOLE for r in rs) else rs, env, full)

        args, kwargs = torch.fx.map_arg((n.args, n.kwargs), arg)
        if kind == "view":
            shape = list(n.meta["val"].shape)
            for d, (lo, hi) in zip(ds, bands):
                shape[d] = hi - lo
            return aten.reshape.default(args[0], shape)
        if kind == "stats":
            return self._norm(n, args, stats[n])
        return n.target(*args, **kwargs)

    def _carried(self, n: Node, bands, env: dict, full: dict, stats: dict, tail):
        """A convolution's band whose first rows the tail of the slice before holds (NOTE [Line buffers]): only
        the rows past them computed, the two joined."""
        d = self.region.dims[n]
        lo, hi = bands[0]
        k = carried_rows((tail[1], tail[1] + tail[0].shape[d]), (lo, hi)) if tail is not None else 0
        if k == 0:
            return self._run(n, bands, env, full, stats)
        old = tail[0].narrow(d, lo - tail[1], k)
        if k == hi - lo:
            return old
        new = self._run(n, ((lo + k, hi), *bands[1:]), env, full, stats)
        return torch.cat([old, new], dim=d)

    def _conv(self, n: Node, ds: list, bands, env: dict, full: dict):
        x = n.args[0]
        shape = list(x.meta["val"].shape)
        wanted, clipped = [], []
        for d, (lo, hi) in zip(ds, bands):
            ilo, ihi = conv_band(*conv_params(n, d - 2), lo, hi)
            wanted.append((d, ilo, ihi))
            clipped.append((max(ilo, 0), min(ihi, shape[d])))
        w = full[n.args[1]] if n.args[1] in full else env[n.args[1]][0]
        if any(chi <= clo for clo, chi in clipped):  # every row this band needs is the convolution's zero padding
            for d, ilo, ihi in wanted:
                shape[d] = ihi - ilo
            band = torch.zeros(shape, dtype=x.meta["val"].dtype, device=w.device)
        else:
            t, offsets = env[x]
            pads = [0, 0] * len(shape)
            for (d, ilo, ihi), (clo, chi), off in zip(wanted, clipped, offsets):
                t = t.narrow(d, clo - off, chi - clo)
                pads[2 * (len(shape) - 1 - d)], pads[2 * (len(shape) - 1 - d) + 1] = clo - ilo, ihi - chi
            while pads and pads[-1] == 0 and pads[-2] == 0:
                pads = pads[:-2]
            band = aten.constant_pad_nd.default(t, pads, 0.0) if pads else t
        args = list(n.args) + [None] * (7 - len(n.args))
        nsp = band.dim() - 2
        padding = list(args[4]) if args[4] is not None else [0] * nsp
        padding = padding * nsp if len(padding) == 1 else padding
        for d in ds:
            padding[d - 2] = 0
        b = None if args[2] is None else (full[args[2]] if args[2] in full else env[args[2]][0])
        return n.target(band, w, b, args[3] or [1] * nsp, padding, args[5] or [1] * nsp, args[6] or 1)

    def _upsample(self, n: Node, ds: list, bands, reqs: list, env: dict):
        x = n.args[0]
        t, offsets = env[x]
        size = list(n.meta["val"].shape[2:])
        cuts = []
        for d, (lo, hi), req, off in zip(ds, bands, reqs, offsets):
            _, ilo, ihi = req[x]
            t = t.narrow(d, ilo - off, ihi - ilo)
            f = n.meta["val"].shape[d] // x.meta["val"].shape[d]
            size[d - 2] = (ihi - ilo) * f
            cuts.append((d, lo - ilo * f, hi - lo))
        if n.target is aten.upsample_nearest2d.vec:
            scales = n.args[2] if len(n.args) > 2 else None
            y = n.target(t, None if scales is not None else size, scales)
        else:
            y = n.target(t, size, *n.args[2:])
        for d, start, length in cuts:
            y = y.narrow(d, start, length)
        return y

    @staticmethod
    def _norm(n: Node, args, st):
        """GroupNorm of a band with the region's statistics, in float32 like the unsliced op (see
        :func:`~fxstream.analysis.halo.norm_chunks`): a half-precision band is normalised a few groups at a time
        into its output, so the float32 working copy is a fraction of the band."""
        x, g = args[0], args[1]
        w = args[2] if len(args) > 2 else None
        b = args[3] if len(args) > 3 else None
        mean, rstd = st
        shape = [mean.shape[0], mean.shape[1]] + [1] * (x.dim() - 1)
        mean, rstd = mean.reshape(shape), rstd.reshape(shape)
        per = x.shape[1] // g
        aff = [g, per] + [1] * (x.dim() - 2)
        w = None if w is None else w.reshape(aff)
        b = None if b is None else b.reshape(aff)
        xg = _groups(x, g)
        k = norm_chunks(x.dtype, g)
        if k == 1:
            y = torch.sub(xg, mean).mul_(rstd)
            if w is not None:
                y.mul_(w)
            if b is not None:
                y.add_(b)
            return y.flatten(1, 2).to(x.dtype)
        out = torch.empty_like(xg)
        step = -(-g // k)
        for lo in range(0, g, step):
            m = min(step, g - lo)
            y = torch.sub(xg.narrow(1, lo, m), mean.narrow(1, lo, m)).mul_(rstd.narrow(1, lo, m))
            if w is not None:
                y.mul_(w.narrow(0, lo, m))
            if b is not None:
                y.add_(b.narrow(0, lo, m))
            out.narrow(1, lo, m).copy_(y)
            del y
        return out.flatten(1, 2)


def out_meta_of(outputs) -> list:
    return [buffer_layout(o.meta["val"]) for o in outputs]


def set_line_buffers(gm: GraphModule, ceiling: int | None = None) -> None:
    """Turn on the line buffers (NOTE [Line buffers]) of every halo loop of ``gm`` whose planned peak with them
    stays within ``ceiling`` bytes (None: the graph's planned peak without any): they save the convolutions'
    halo rows and cost their tails, so where they would raise the peak past that they stay off."""
    from .memory import plan_memory
    loops = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), HaloLoop)}
    if not loops:
        return
    for loop in loops.values():
        loop.line_buffers = False
    if ceiling is None:
        ceiling = plan_memory(gm).peak_bytes
    for loop in loops.values():
        loop.line_buffers = True
    peaks = plan_memory(gm).region_peaks
    for name, loop in loops.items():
        loop.line_buffers = peaks.get(name, ceiling + 1) <= ceiling
