"""Check every slice rule in ``fxstream.analysis.rules.RULES`` against the real op on real tensors.

    python tools/validate_rules.py                      # every rule; exit status 1 if one is wrong or unchecked
    python tools/validate_rules.py --graphs svd-tiny animatediff-tiny   # also: ops of these models without a rule

For each op of the table, ``SAMPLES`` holds one or more calls (tensor arguments given by shape). A call becomes a
one-node fx graph whose ``meta["val"]`` are the real values. For every cut of the output the rule accepts (every
dim, every factorisation ``size = outer * L * inner`` with ``L >= 2``) the op runs on the slices its rule asks
for (2 and 3 slices, so one count does not divide ``L``), rewritten by the rule where it rewrites, and each
result must equal the same slice of the whole result (1e-5, fp32). A sum's partial cut is checked by adding the
slices' results. Findings:

- ``wrong``: the rule accepts a cut and a slice differs from the whole op's slice (or cannot run);
- ``error``: the rule raised something other than ``CantSlice``;
- ``unchecked``: an op of the table with no sample here, or whose samples no cut of the rule accepts;
- ``missing``: an op in the given graphs with no rule (never sliced: the report says "no slice rule").
"""
from __future__ import annotations

import argparse
import operator
import sys
from dataclasses import dataclass

import torch
from tabulate import tabulate

from fxstream.analysis import rules as R
from fxstream.analysis.cuts import PARTIAL, Cut, slice_bounds
from fxstream.errors import CantSlice
from fxstream.runtime import body_input

aten = torch.ops.aten

__all__ = ["SAMPLES", "Finding", "check_rule", "check_all", "missing_rules", "T"]


@dataclass(frozen=True)
class T:
    """A tensor argument of a sample call: its shape, and ``kind`` "pos" (positive floats), "bool" or "complex"."""

    shape: tuple
    kind: str = "float"

    def make(self, g: torch.Generator) -> torch.Tensor:
        if self.kind == "complex":
            return torch.randn(*self.shape, generator=g, dtype=torch.complex64)
        x = torch.randn(*self.shape, generator=g)
        return x.abs() + 0.1 if self.kind == "pos" else x > 0 if self.kind == "bool" else x


def t(*shape, kind="float") -> T:
    return T(tuple(shape), kind)


_X, _Y = t(2, 6, 4), t(6, 1)
_UNARY = [aten.neg.default, aten.abs.default, aten.silu.default, aten.gelu.default, aten.sigmoid.default,
          aten.tanh.default, aten.relu.default, aten.exp.default, aten.sin.default, aten.cos.default,
          aten.erf.default, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
          aten.ones_like.default, aten.zeros_like.default]
_POSITIVE = [aten.log.default, aten.sqrt.default, aten.rsqrt.default]
_BINARY = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
           aten.minimum.default, aten.rsub.Tensor]
_SCALAR = [aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar,
           aten.pow.Tensor_Scalar, aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.gt.Scalar]

# op -> [(args, kwargs)]; tensors as T(shape); a list of T is a list of tensors (cat)
SAMPLES: dict = {}
SAMPLES.update({op: [((_X,), {})] for op in _UNARY})
SAMPLES.update({op: [((t(2, 6, 4, kind="pos"),), {})] for op in _POSITIVE})
SAMPLES.update({op: [((_X, _Y), {}), ((t(1, 6, 4), t(2, 6, 4)), {})] for op in _BINARY})
SAMPLES.update({op: [((_X, 2.0), {})] for op in _SCALAR})
SAMPLES.update({
    aten.pow.Tensor_Tensor: [((t(2, 6, 4, kind="pos"), t(6, 1)), {})],
    aten.div.Tensor_mode: [((_X, t(6, 1, kind="pos")), {"rounding_mode": "floor"})],
    aten.clamp.default: [((_X, -0.5, 0.5), {})],
    aten.where.self: [((t(2, 6, 4, kind="bool"), t(6, 4), t(2, 1, 4)), {})],
    aten.masked_fill.Scalar: [((_X, t(6, 1, kind="bool"), 0.0), {})],
    aten.to.dtype: [((_X, torch.float64), {})],
    aten.to.dtype_layout: [((_X,), {"dtype": torch.float64})],
    aten.to.device: [((_X, torch.device("cpu"), torch.float64), {})],
    aten._to_copy.default: [((_X,), {"dtype": torch.float64})],
    aten.type_as.default: [((_X, t(1)), {}), ((_X, t(2, 6, 4)), {}), ((_X, t(3, 5, kind="bool")), {})],
    aten.dropout.default: [((_X, 0.0, False), {})],
    aten.lerp.Scalar: [((_X, t(2, 6, 4), 0.3), {})],
    aten.lerp.Tensor: [((_X, t(6, 4), t(4)), {})],
    aten.logical_not.default: [((t(2, 6, 4, kind="bool"),), {})],
    aten.view.default: [((t(2, 6, 4), [12, 4]), {}), ((t(12, 4), [2, 6, 2, 2]), {})],
    aten.reshape.default: [((t(2, 6, 4), [2, 24]), {}), ((t(4, 6), [2, 2, 3, 2]), {})],
    aten._unsafe_view.default: [((t(2, 6, 4), [12, 4]), {})],
    aten.flatten.using_ints: [((t(2, 6, 4, 3), 1, 2), {})],
    aten.unflatten.int: [((t(2, 12, 3), 1, [6, 2]), {})],
    aten.unsqueeze.default: [((t(2, 6), 1), {})],
    aten.squeeze.dim: [((t(2, 1, 6), 1), {})],
    aten.squeeze.dims: [((t(2, 1, 6, 1), [1, 3]), {})],
    aten.squeeze.default: [((t(2, 1, 6), ), {})],
    aten.permute.default: [((t(2, 6, 4), [2, 0, 1]), {})],
    aten.transpose.int: [((t(2, 6, 4), 0, 2), {})],
    aten.t.default: [((t(6, 4),), {})],
    aten.expand.default: [((t(1, 6, 1), [2, 6, 4]), {}), ((t(6, 1), [2, 6, 4]), {})],
    aten.broadcast_to.default: [((t(6, 1), [2, 6, 4]), {})],
    aten.linear.default: [((t(2, 6, 5), t(4, 5), t(4)), {})],
    aten.conv1d.default: [((t(2, 3, 6), t(4, 3, 1), t(4)), {}), ((t(2, 3, 6), t(4, 3, 3), None, [1], [1]), {})],
    aten.conv2d.default: [((t(2, 3, 6, 4), t(4, 3, 1, 1), t(4)), {}),
                          ((t(2, 3, 6, 4), t(4, 3, 3, 3), None, [1, 1], [1, 1]), {}),
                          ((t(2, 3, 6, 4), t(4, 3, 1, 1), None, [2, 2]), {})],
    aten.conv3d.default: [((t(2, 3, 4, 3, 2), t(2, 3, 3, 1, 1), None, [1, 1, 1], [1, 0, 0]), {})],
    aten.group_norm.default: [((t(2, 4, 3, 5), 2, t(4), t(4)), {}), ((t(2, 4, 3, 2, 2), 2), {})],
    aten.layer_norm.default: [((t(2, 3, 6), [6], t(6), t(6)), {}), ((t(2, 3, 4), [3, 4]), {})],
    aten.rms_norm.default: [((t(2, 3, 6), [6], t(6), 1e-6), {}), ((t(2, 3, 4), [3, 4]), {})],
    aten.scaled_dot_product_attention.default: [
        ((t(2, 2, 6, 4), t(2, 2, 5, 4), t(2, 2, 5, 4)), {}),
        ((t(2, 2, 6, 4), t(2, 2, 5, 4), t(2, 2, 5, 4), t(6, 5)), {}),
        ((t(2, 2, 6, 4), t(2, 2, 6, 4), t(2, 2, 6, 4)), {"is_causal": True})],
    aten.softmax.int: [((_X, -1), {})],
    aten._softmax.default: [((_X, 1, False), {})],
    aten.log_softmax.int: [((_X, 0), {})],
    aten.cat.default: [(([t(2, 3), t(2, 5)], 1), {}), (([t(2, 3), t(4, 3)],), {})],
    aten.stack.default: [(([t(2, 3), t(2, 3)], 1), {}), (([t(4, 3), t(4, 3)], -1), {}), (([t(2, 6)],), {})],
    aten.chunk.default: [((t(4, 6), 2, 1), {})],
    aten.split.Tensor: [((t(4, 6), 2), {})],
    aten.unbind.int: [((t(2, 3, 4), 1), {}), ((t(3, 4),), {}), ((t(2, 4, 2), -1), {})],
    aten.split_with_sizes.default: [((t(4, 6), [2, 4], 1), {})],
    aten.slice.Tensor: [((t(4, 6), 1, 1, 5), {})],
    aten.narrow.default: [((t(4, 6), 1, 2, 3), {}), ((t(6, 4, 2), 0, 1, 2), {})],
    aten.select.int: [((t(3, 4, 6), 1, 2), {})],
    operator.getitem: [((t(4, 6), 1), {})],  # item 1 of chunk(x, 2, 1): built specially below
    aten.mean.dim: [((_X, [1], True), {}), ((_X, [-1]), {})],
    aten.sum.dim_IntList: [((_X, [1]), {}), ((_X, [0, 2], True), {})],
    aten.amax.default: [((_X, [1], True), {})],
    aten.repeat.default: [((t(2, 3), [2, 1, 2]), {})],
    aten.repeat_interleave.self_int: [((t(2, 6), 3, 0), {}), ((t(4, 3), 2, 1), {})],
    aten.upsample_nearest2d.vec: [((t(2, 3, 4, 4), None, [2.0, 2.0]), {})],
    aten.upsample_nearest2d.default: [((t(2, 3, 4, 4), [8, 8]), {})],
    aten.adaptive_avg_pool2d.default: [((t(2, 4, 6, 4), [3, 2]), {}), ((t(4, 5, 3), [4, 4]), {})],
    aten.new_zeros.default: [((t(2, 3), [4, 0, 6]), {}), ((t(2, 3), [6, 4]), {"dtype": torch.float64})],
    aten.new_ones.default: [((t(2, 3), [4, 6]), {})],
    aten.real.default: [((t(2, 6, 4, kind="complex"),), {})],
    aten.imag.default: [((t(2, 6, 4, kind="complex"),), {})],
})


@dataclass(frozen=True)
class Finding:
    kind: str  # wrong | error | unchecked | missing
    op: str
    sample: str
    cut: str
    detail: str


def _build(op, args, kwargs, seed: int = 0):
    """A graph with one node calling ``op``; every node's ``meta["val"]`` is its real value."""
    g = torch.Generator().manual_seed(seed)
    graph = torch.fx.Graph()
    env: dict = {}

    def ph(spec: T):
        node = graph.placeholder(f"x{len(env)}")
        node.meta["val"] = env[node.name] = spec.make(g)
        return node

    def lift(a):
        if isinstance(a, T):
            return ph(a)
        if isinstance(a, list) and a and all(isinstance(x, T) for x in a):
            return [ph(x) for x in a]
        return a

    if op is operator.getitem:  # an item of a chunked tensor: the rule maps the item's cut to the list's
        src = graph.call_function(aten.chunk.default, (ph(args[0]), 2, 1))
        src.meta["val"] = env[src.name] = aten.chunk.default(env[src.args[0].name], 2, 1)
        node = graph.call_function(operator.getitem, (src, args[1]))
    else:
        node = graph.call_function(op, tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()})
    full = _call(node.target, node.args, node.kwargs, env)
    node.meta["val"] = full
    return node, env, full


def _call(target, args, kwargs, env):
    real = lambda a: env[a.name]  # noqa: E731
    return target(*torch.fx.map_arg(args, real), **torch.fx.map_arg(kwargs, real))


def _out_cuts(shape):
    """Every cut of a tensor of this shape: each dim, each length >= 2 with its outer and inner factors."""
    for d, s in enumerate(shape):
        for length in range(2, s + 1):
            if s % length:
                continue
            rest = s // length
            for outer in range(1, rest + 1):
                if rest % outer == 0:
                    yield Cut(d, outer, rest // outer), length


def _slice(v, c, start, n, length):
    if isinstance(v, (list, tuple)):
        return [body_input(x, c, start, n, length) for x in v]
    return body_input(v, c, start, n, length)


def _close(part, want) -> str | None:
    parts = part if isinstance(part, (list, tuple)) else [part]
    wants = want if isinstance(want, (list, tuple)) else [want]
    if len(parts) != len(wants):
        return f"{len(parts)} results, expected {len(wants)}"
    for p, w in zip(parts, wants):
        if tuple(p.shape) != tuple(w.shape):
            return f"shape {tuple(p.shape)}, expected {tuple(w.shape)}"
        wide = torch.complex128 if w.is_complex() else torch.float64  # complex results keep their imaginary part
        if not torch.allclose(p.to(wide), w.to(wide), rtol=1e-5, atol=1e-5):
            return f"values differ by up to {(p.to(wide) - w.to(wide)).abs().max().item():.3g}"
    return None


def _run_cut(node, rule, cut, length, req, env, full, counts) -> str | None:
    """None if every slice of ``cut`` equals the whole op's slice, else what differs."""
    bad = {p.name: c for p, c in req.items() if c is not R.WHOLE and not isinstance(c, Cut)}
    if bad:
        return f"inputs asked for as {bad}: an input is either cut or whole"
    for count in counts:
        acc = None
        for start, n in slice_bounds(length, count):
            try:
                local = {p.name: env[p.name] if c is R.WHOLE else _slice(env[p.name], c, start, n, length)
                         for p, c in req.items()}
                for p in node.all_input_nodes:
                    local.setdefault(p.name, env[p.name])  # an input the rule does not mention is passed whole
                target, args, kwargs = node.target, node.args, node.kwargs
                if rule.rewrite is not None and cut is not PARTIAL:
                    target, args, kwargs = rule.rewrite(node, cut, n, length)
                part = _call(target, args, kwargs, local)
            except (RuntimeError, ValueError, IndexError, TypeError, CantSlice) as e:
                return f"{count} slices: slice at {start} does not run: {type(e).__name__}: {e}"
            if cut is PARTIAL:
                acc = part if acc is None else acc + part
                continue
            why = _close(part, _slice(full, cut, start, n, length))
            if why:
                return f"{count} slices: slice [{start}, {start + n}): {why}"
        if cut is PARTIAL:
            why = _close(acc, full)
            if why:
                return f"{count} slices: the sum of partial results: {why}"
    return None


def _describe(args, kwargs) -> str:
    def d(a):
        if isinstance(a, T):
            return f"t({', '.join(map(str, a.shape))})" + ("" if a.kind == "float" else f"[{a.kind}]")
        if isinstance(a, list):
            return "[" + ", ".join(d(x) for x in a) + "]"
        return repr(a)
    return ", ".join([d(a) for a in args] + [f"{k}={d(v)}" for k, v in kwargs.items()])


def check_rule(op, samples=None, counts=(2, 3)) -> tuple[list, int]:
    """Findings for one op of the table, and how many (sample, cut) pairs its rule accepted and were checked."""
    rule = R.RULES.get(op)
    findings, checked = [], 0
    for args, kwargs in (SAMPLES.get(op, []) if samples is None else samples):
        node, env, full = _build(op, args, kwargs)
        where = _describe(args, kwargs)
        shape = (full[0] if isinstance(full, (list, tuple)) else full).shape
        cases = [(c, length, lambda p: None) for c, length in _out_cuts(shape)]
        x = node.args[0]
        if isinstance(x, torch.fx.Node) and isinstance(env.get(x.name), torch.Tensor):  # partial sums
            cases += [(PARTIAL, L, lambda p, c=c, x=x: c if p is x else None) for c, L in _out_cuts(env[x.name].shape)
                      if c.outer == 1 and c.inner == 1]
        for cut, length, cut_of in cases:
            try:
                req = rule.inputs(node, cut, R.RuleContext(length, cut_of))
            except CantSlice:
                continue
            except Exception as e:  # noqa: BLE001  a rule must raise CantSlice only: anything else is a finding
                findings.append(Finding("error", str(op), where, str(cut), f"{type(e).__name__}: {e}"))
                continue
            checked += 1
            why = _run_cut(node, rule, cut, length, req, env, full, counts)
            if why:
                findings.append(Finding("wrong", str(op), where, f"{cut} of length {length}", why))
    return findings, checked


def check_all(counts=(2, 3)) -> tuple[list, dict]:
    """Findings for every op of ``RULES`` (wrong, error, unchecked) and the checked count per op."""
    findings, checked = [], {}
    for op in R.RULES:
        if op not in SAMPLES:
            findings.append(Finding("unchecked", str(op), "", "", "no sample call in tools/validate_rules.py"))
            continue
        f, n = check_rule(op, counts=counts)
        findings += f
        checked[str(op)] = n
        if n == 0:
            findings.append(Finding("unchecked", str(op), "", "", "the rule accepts no cut of any sample"))
    return findings, checked


# ops that make tensors from nothing (nothing to slice) or only check metadata
NO_RULE_NEEDED = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default,
                  aten.ones.default, aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default,
                  aten._assert_tensor_metadata.default, aten.sym_size.int, aten.lift_fresh_copy.default}
# Left unsliced on purpose (docs/design.md, "In-place writes"): in-place writes pin their storage whatever their
# rule, and FFTs end regions (with rules, FreeU's skip filter joined the region that made the skip and raised the
# planned peak).
NO_RULE_NEEDED |= {aten.copy_.default, aten.fill_.Tensor, aten.fill_.Scalar, aten.fft_fftn.default,
                   aten.fft_ifftn.default, aten.fft_fftshift.default, aten.fft_ifftshift.default}


def missing_rules(graphs) -> list:
    """Findings for the ops of these GraphModules that have no rule (creation ops excepted)."""
    seen = {}
    for gm in graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target not in R.RULES and n.target not in NO_RULE_NEEDED:
                seen.setdefault(str(n.target), n.name)
    return [Finding("missing", op, f"e.g. node {name}", "", "no slice rule: never sliced")
            for op, name in sorted(seen.items())]


def _model_graphs(names):
    from fxstream.compiler import capture
    from fxstream.models import build_unet, example_inputs
    for name in names:
        unet = build_unet(name)
        yield capture(unet, example_inputs(name, unet)).graph_module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", nargs="*", default=[], metavar="MODEL",
                    help="also list ops of these models (fxstream.models names, e.g. svd-tiny) without a rule")
    ns = ap.parse_args(argv)
    findings, checked = check_all()
    findings += missing_rules(_model_graphs(ns.graphs))
    print(f"{len(R.RULES)} rules, {sum(checked.values())} (sample, cut) pairs checked against the real ops")
    if findings:
        print(tabulate([(f.kind, f.op, f.sample, f.cut, f.detail) for f in findings],
                       headers=["finding", "op", "sample", "cut", "detail"]))
    else:
        print("no wrong, unchecked or missing rules")
    return 1 if any(f.kind in ("wrong", "error", "unchecked") for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
