"""Runtime of a halo region: its statistics passes, then its output pass, one band of rows per slice.

``HaloLoop`` holds the region's ops as a GraphModule (``body``: placeholders are the region's inputs, outputs its
values used outside) and, prepared when built, every pass's slices (:func:`fxstream.analysis.halo.passes`): the
rows of each value to compute. A slice walks the ops in order on bands (``(tensor, first row)``): each op reads
the rows it needs out of its inputs' bands, a convolution pads the rows its band lacks at the tensor's edge with
zeros (its own padding along height set to 0), a GroupNorm normalises with the statistics a previous pass gathered.
A band is dropped after its last use in the slice; output rows are copied into full-size buffers as soon as made.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx import GraphModule, Node

from .analysis.halo import HALO_RULES, WHOLE, HaloRegion, conv_band, conv_params, passes, plan_halo
from .runtime import buffer_layout

aten = torch.ops.aten

__all__ = ["HaloLoop", "body_region"]


def body_region(body: GraphModule, dims: list, count: int) -> HaloRegion:
    """The :class:`HaloRegion` of a body graph: ``dims[i]`` is the height dim of the i-th placeholder (None: read
    whole) followed by one per call_function node."""
    phs = [n for n in body.graph.nodes if n.op == "placeholder"]
    ops = [n for n in body.graph.nodes if n.op == "call_function"]
    out = list(next(n for n in body.graph.nodes if n.op == "output").args[0])
    named = {n: d for n, d in zip(phs + ops, dims) if d is not None}
    return HaloRegion(ops, named, phs, out, count)


class _Stats:
    """Per-group count, mean and M2 of a GroupNorm's input, merged slice by slice (Chan et al.) in float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, xg: torch.Tensor) -> None:
        dims = list(range(2, xg.dim()))
        k = math.prod(xg.shape[2:])
        if k == 0:
            return
        x = xg if xg.dtype in (torch.float32, torch.float64) else xg.float()
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        mean, m2 = mean.double(), var.double() * k
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


def _groups(x: torch.Tensor, g: int) -> torch.Tensor:
    return x.unflatten(1, (g, x.shape[1] // g))


class HaloLoop(torch.nn.Module):
    """A region sliced ``count`` ways along height with halos (see the module docstring)."""

    def __init__(self, body: GraphModule, dims: list, count: int, out_meta: list):
        super().__init__()
        self.body = body
        self.dims = list(dims)
        self.count = count
        self.out_meta = list(out_meta)  # (shape, strides, dtype) of each full output
        self.region = body_region(body, self.dims, count)
        self.passes = passes(self.region)
        self.working_bytes = plan_halo(self.region, ps=self.passes).working_bytes
        self._plans = None  # the slices' schedules, made on the first real call

    def plan(self, flops: dict | None = None):
        """The region's :class:`~fxstream.analysis.halo.HaloPlan` (with planned compute when given FLOPs)."""
        return plan_halo(self.region, flops, self.passes)

    def extra_repr(self) -> str:
        return f"axis=height, slices={self.count}, passes={len(self.passes)}"

    def _schedule(self, p, i: int) -> list:
        """[(node, band, free after)] for slice ``i`` of pass ``p``."""
        need = p.slices[i]
        todo = [n for n in self.region.nodes if n in need and need[n][0] < need[n][1]]
        last = {}
        for j, n in enumerate(todo):
            for a in n.all_input_nodes:
                last[a] = j
        steps = []
        for j, n in enumerate(todo):
            steps.append((n, need[n], [a for a in n.all_input_nodes if last.get(a) == j] +
                          ([n] if n not in last else [])))
        return steps

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
        stats: dict = {}
        out_index = {o: j for j, o in enumerate(self.region.outputs)}
        for p, plans in zip(self.passes, self._plans):
            acc = {g: _Stats() for g in p.stats}
            summed: dict = {}  # GroupNorm input -> the GroupNorms this pass gathers statistics of
            for g in p.stats:
                summed.setdefault(g.args[0], []).append(g)
            for i, steps in enumerate(plans):
                assign, need = p.assign[i], p.slices[i]
                env = {}
                for ph in self.region.inputs:
                    if ph in need and ph in self.region.dims:
                        lo, hi = need[ph]
                        env[ph] = (full[ph].narrow(self.region.dims[ph], lo, hi - lo), lo)
                for x in summed:
                    if x.op == "placeholder" and x in env:
                        self._gather(x, summed[x], acc, assign, env)
                for n, band, free in steps:
                    env[n] = (self._run(n, band, env, full, stats), band[0])
                    if n in summed:
                        self._gather(n, summed[n], acc, assign, env)
                    if not p.stats and n in out_index and n in assign:
                        a, b = assign[n]
                        d = self.region.dims[n]
                        t, lo = env[n]
                        outs[out_index[n]].narrow(d, a, b - a).copy_(t.narrow(d, a - lo, b - a))
                        del t  # else the band outlives its slice
                    for f in free:
                        env.pop(f, None)
            for g, s in acc.items():
                x = g.args[0].meta["val"]
                compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
                eps = g.args[4] if len(g.args) > 4 else 1e-5
                stats[g] = s.finish(eps, compute)
        return tuple(outs)

    def _gather(self, x: Node, norms: list, acc: dict, assign: dict, env: dict) -> None:
        """Add this slice's rows of ``x`` (its assigned share, each row once) to the statistics of ``norms``."""
        if x not in assign:
            return
        a, b = assign[x]
        d = self.region.dims[x]
        t, lo = env[x]
        for g in norms:
            acc[g].add(_groups(t.narrow(d, a - lo, b - a), g.args[1]))

    def _arg(self, a, req, env, full):
        if not isinstance(a, Node):
            return a
        if req is WHOLE or a not in env:
            return full.get(a, None) if a in full else env[a][0]
        d, lo, hi = req
        t, tlo = env[a]
        return t.narrow(d, lo - tlo, hi - lo)

    def _run(self, n: Node, band, env: dict, full: dict, stats: dict):
        rule = HALO_RULES[n.target]
        d = self.region.dims[n]
        lo, hi = band
        if rule.kind == "conv":  # its band comes from conv_band; no requirement dict per slice
            return self._conv(n, d, lo, hi, env, full)
        req = rule.need(n, d, lo, hi)
        if rule.kind == "upsample":
            return self._upsample(n, d, lo, hi, req, env, full)

        def arg(a):
            return self._arg(a, req.get(a, WHOLE), env, full)

        args, kwargs = torch.fx.map_arg((n.args, n.kwargs), arg)
        if rule.kind == "view":
            shape = list(n.meta["val"].shape)
            shape[d] = hi - lo
            return aten.reshape.default(args[0], shape)
        if rule.kind == "stats":
            return self._norm(n, args, stats[n])
        return n.target(*args, **kwargs)

    def _conv(self, n: Node, d: int, lo: int, hi: int, env: dict, full: dict):
        x = n.args[0]
        k, s, p, dil = conv_params(n, d - 2)
        ilo, ihi = conv_band(k, s, p, dil, lo, hi)
        length = x.meta["val"].shape[d]
        clo, chi = max(ilo, 0), min(ihi, length)
        w = full[n.args[1]] if n.args[1] in full else env[n.args[1]][0]
        if chi <= clo:  # every row this band needs is the convolution's zero padding
            shape = list(x.meta["val"].shape)
            shape[d] = ihi - ilo
            band = torch.zeros(shape, dtype=x.meta["val"].dtype, device=w.device)
        else:
            t, tlo = env[x]
            band = t.narrow(d, clo - tlo, chi - clo)
            pads = [0, 0] * (band.dim() - 1 - d) + [clo - ilo, ihi - chi]
            band = aten.constant_pad_nd.default(band, pads, 0.0)
        args = list(n.args) + [None] * (7 - len(n.args))
        nsp = band.dim() - 2
        padding = list(args[4]) if args[4] is not None else [0] * nsp
        padding = padding * nsp if len(padding) == 1 else padding
        padding[d - 2] = 0
        b = None if args[2] is None else (full[args[2]] if args[2] in full else env[args[2]][0])
        return n.target(band, w, b, args[3] or [1] * nsp, padding, args[5] or [1] * nsp, args[6] or 1)

    def _upsample(self, n: Node, d: int, lo: int, hi: int, req: dict, env: dict, full: dict):
        x = n.args[0]
        _, ilo, ihi = req[x]
        t, tlo = env[x]
        band = t.narrow(d, ilo - tlo, ihi - ilo)
        f = n.meta["val"].shape[d] // x.meta["val"].shape[d]
        size = list(n.meta["val"].shape[2:])
        size[d - 2] = (ihi - ilo) * f
        if n.target is aten.upsample_nearest2d.vec:
            scales = n.args[2] if len(n.args) > 2 else None
            y = n.target(band, None if scales is not None else size, scales)
        else:
            y = n.target(band, size, *n.args[2:])
        return y.narrow(d, lo - ilo * f, hi - lo)

    @staticmethod
    def _norm(n: Node, args, st):
        x, g = args[0], args[1]
        w = args[2] if len(args) > 2 else None
        b = args[3] if len(args) > 3 else None
        mean, rstd = st
        shape = [mean.shape[0], mean.shape[1]] + [1] * (x.dim() - 1)
        y = torch.sub(_groups(x, g), mean.reshape(shape))
        y.mul_(rstd.reshape(shape))
        y = y.flatten(1, 2)
        aff = [x.shape[1]] + [1] * (x.dim() - 2)
        if w is not None:
            y.mul_(w.reshape(aff))
        if b is not None:
            y.add_(b.reshape(aff))
        return y.to(x.dtype)


def out_meta_of(outputs) -> list:
    return [buffer_layout(o.meta["val"]) for o in outputs]
