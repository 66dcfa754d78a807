"""Public entry points: :func:`compile` returns a drop-in module, :func:`explain` reports without computing.

    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(slices=8))
    >>> fxstream.explain(unet, example_kwargs, policy=fxstream.Policy(slices=8)).table()
"""
from __future__ import annotations

import copy
import inspect
import logging
import warnings
from collections import OrderedDict

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind

from .analysis.cost import node_flops
from .analysis.slicer import find_axes, module_path
from .budget import choose_halo, choose_slicing, halo_lower_bound, lower_bound
from .compiler import capture, compile_graph, describe_inputs, layout_of
from .errors import CaptureError, ExecutionError, FxstreamError, VerificationError
from .guard import StructureGuard, touched
from .tolerance import verify_tolerance
from .graph_utils import strip_asserts
from .memory import plan_memory, weight_bytes
from .passes.step_rehash import split_for_rehash
from .policy import Policy
from .rehash import StepRehash, with_cache_point
from .report import RehashInfo, Report, build_report
from .viz import MARK_KEY

log = logging.getLogger(__name__)

__all__ = ["compile", "explain", "CompiledModule", "FallbackWarning"]


class FallbackWarning(UserWarning):
    """fxstream could not compile the module for some inputs and runs the original module for them."""


def _check_policy(policy) -> Policy:
    if policy is None:
        return Policy()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy: expected fxstream.Policy, got {type(policy).__name__}; "
                        "write policy=fxstream.Policy(slices=8)")
    return policy


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type, x.device.index)
    return ("value", type(x).__name__, repr(x))


def _as_kwargs(module: torch.nn.Module, args, kwargs) -> dict:
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"arguments do not fit {type(module).__name__}.forward: {e}") from None
    return dict(bound.arguments)


class _Entry:
    """One compiled input signature: the exported program, the compiled graph(s), and how to feed them.

    With ``Policy(rehash=...)`` it holds three graphs made from the one captured (``passes/step_rehash.py``): the
    full graph (``compiled``, which also returns the feature to cache), the rehash graph, and for adaptive
    schedules the probe graph; and this signature's cached feature between steps.
    """

    def __init__(self, module: torch.nn.Module, kwargs: dict, policy: Policy):
        try:
            self.program = capture(module, kwargs)
        finally:
            touched()  # export rebinds some attributes behind nn.Module.__setattr__ (lists): every guard walks again
        gm, layout = self.program.graph_module, layout_of(module)
        weights = weight_bytes(self.program)
        self.rehash = None
        if policy.rehash is not None:
            self.rehash = _RehashState(module, gm, policy.rehash)
            gm = self.rehash.graphs.full
        self.compiled, bound = self._compile(gm, policy, layout, weights)
        # how to fetch each lifted input at call time: weights from the live module, constants from the program
        fetch = {InputKind.PARAMETER: lambda m, t: m.get_parameter(t), InputKind.BUFFER: lambda m, t: m.get_buffer(t)}
        self.state = [(fetch.get(spec.kind, lambda m, t: self.program.constants[t]), spec.target)
                      for spec in self.program.graph_signature.input_specs if spec.kind != InputKind.USER_INPUT]
        self._held = None  # (stamp, the (dict, key) holding each lifted input): see weights()
        self.report: Report = build_report(self.compiled, policy, weights, bound)
        if self.rehash is not None:
            r = self.rehash
            # a rehash step holds the cached feature (and the probe's reference) on top of the weights
            r.compiled, _ = self._compile(r.graphs.rehash, policy, layout, weights + r.resident_bytes)
            self.report.rehash = r.info(r.compiled)

    @staticmethod
    def _compile(gm, policy: Policy, layout, weights: int):
        if policy.max_memory is not None and not find_axes(gm, layout):
            # no named video axis (a VAE decoder): the budget slices along height with halos
            compiled, bound = choose_halo(gm, policy, weights)
            return compiled, bound if bound is not None else lambda: halo_lower_bound(gm, policy).peak_bytes
        if policy.max_memory is None and policy.halo and not find_axes(gm, layout):
            return compile_graph(gm, policy, layout), lambda: halo_lower_bound(gm, policy).peak_bytes
        if policy.max_memory is not None:
            compiled, floor = choose_slicing(gm, policy, layout, weights)
            return compiled, floor.peak_bytes
        # the lower bound is a compile: only on demand
        return compile_graph(gm, policy, layout), lambda: lower_bound(gm, policy, layout).peak_bytes

    def weights(self, module: torch.nn.Module, stamp=None) -> list:
        """The lifted inputs' live values: weights from the module, constants from the program. With ``stamp``
        (a value that moves whenever the module's structure may have changed: a CompiledModule's guard walk count)
        the dict holding each is found once per stamp and read at every call: 0.04 ms for full-size SVD's 1428
        weights, against 22 ms through ``get_parameter`` (diffusers' attribute lookups)."""
        if stamp is None:
            return [get(module, target) for get, target in self.state]
        if self._held is None or self._held[0] != stamp:
            self._held = (stamp, [_holder(module, get, target) for get, target in self.state])
        return [d[k] for d, k in self._held[1]]

    def call(self, graph, module: torch.nn.Module, kwargs: dict, extra=(), stamp=None) -> list:
        """Run one of this signature's graphs on the live weights and these inputs (plus ``extra`` inputs)."""
        flat, _ = pytree.tree_flatten(((), kwargs))
        state = self.weights(module, stamp)
        try:
            return list(graph(*state, *flat, *extra))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # export's fake kernels do not check everything (a linear's dtypes)
            raise ExecutionError(
                f"{type(module).__name__} compiled by fxstream failed on these inputs: {e}\n"
                f"called with {describe_inputs(module, kwargs)}\nCheck that the inputs fit the module (it fails the "
                "same way when called directly); if the module runs them, this is a bug in fxstream.") from e

    def unflatten(self, out: list):
        return pytree.tree_unflatten(out, self.program.call_spec.out_spec)

    def run(self, module: torch.nn.Module, kwargs: dict, stamp=None):
        return self.unflatten(self.call(self.compiled.graph_module, module, kwargs, stamp=stamp))


class _Live:
    """A lifted input read through ``get(module, target)`` at every call (``weights()``' fallback)."""

    def __init__(self, get, module: torch.nn.Module):
        self.get, self.module = get, module

    def __getitem__(self, target: str):
        return self.get(self.module, target)


def _holder(module: torch.nn.Module, get, target: str) -> tuple:
    """(dict, key) whose item is what ``get(module, target)`` gives now: the owning module's parameter or buffer
    dict; for anything else (a program constant, a property shadowing a weight) a :class:`_Live` reader."""
    value = get(module, target)
    prefix, _, name = target.rpartition(".")
    try:
        owner = module.get_submodule(prefix) if prefix else module
    except AttributeError:
        owner = None
    for d in (getattr(owner, "_parameters", None), getattr(owner, "_buffers", None)):
        if isinstance(d, dict) and d.get(name) is value:
            return d, name
    return _Live(get, module), target


class _RehashState:
    """Step Rehash for one signature: the graphs, and the feature cached by the last full step."""

    def __init__(self, module: torch.nn.Module, gm, rehash: StepRehash):
        self.schedule = with_cache_point(rehash, module)
        self.base = strip_asserts(copy.deepcopy(gm))  # the graph the others are cut from
        self.graphs = split_for_rehash(self.base, self.schedule.cache_point, self.schedule.probe_point)
        _mark(self.graphs.full, self.graphs)
        nodes = {n.name: n for n in gm.graph.nodes}
        self.cache_val = nodes[self.graphs.cache_node].meta["val"]
        probe_val = nodes[self.graphs.probe_node].meta["val"] if self.graphs.probe_node else None
        self.resident_bytes = sum(v.numel() * v.element_size() for v in (self.cache_val, probe_val) if v is not None)
        self.compiled = None  # the rehash graph, compiled (set by _Entry)
        self.clear()

    def clear(self) -> None:
        self.cache = None  # the feature of the last full step
        self.probe_ref = None  # the probe at the last full step
        self.since_full = 0

    def info(self, compiled_rehash) -> RehashInfo:
        flops = node_flops(self.base)
        kept = {n.name for n in self.graphs.rehash.graph.nodes if n.op == "call_function"}
        if self.graphs.probe is not None:
            kept |= {n.name for n in self.graphs.probe.graph.nodes if n.op == "call_function"}
        total = sum(flops.values())
        v = self.cache_val
        return RehashInfo(
            schedule=self.schedule.describe(), cache_point=self.schedule.cache_point, cache_node=self.graphs.cache_node,
            cache_shape=tuple(v.shape), cache_bytes=self.resident_bytes, probe=self.schedule.probe_point,
            ops=len(flops), ops_skipped=len(self.graphs.skipped), flops=total,
            flops_rehash=sum(f for name, f in flops.items() if name in kept),
            skipped_modules=_top_modules(self.base, set(self.graphs.skipped)),
            rehash_peak_bytes=plan_memory(compiled_rehash.graph_module).peak_bytes,
        )


def _mark(gm, graphs) -> None:
    """Marks for the drawing (``fxstream.viz``): the cached node, and the ops a rehash step skips."""
    skipped = set(graphs.skipped)
    for n in gm.graph.nodes:
        if n.name == graphs.cache_node:
            n.meta[MARK_KEY] = ("cache", "skip")
        elif n.name in skipped:
            n.meta[MARK_KEY] = ("skip",)


def _top_modules(gm, names: set, depth: int = 2) -> list:
    """The outermost module paths (at most ``depth`` levels deep) all of whose ops are in ``names``."""
    whole: dict = {}  # path prefix -> all its ops in names (graph order kept)
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        parts = module_path(n).split(".")
        for d in range(1, min(depth, len(parts)) + 1):
            p = ".".join(parts[:d])
            whole[p] = whole.get(p, True) and n.name in names
    return [p for p, all_in in whole.items()
            if p and all_in and not (p.rpartition(".")[0] and whole.get(p.rpartition(".")[0]))]


def _first_differing_region(entry: _Entry, module, kwargs: dict, tol: float) -> str | None:
    """The first top-level loop region of the compiled graph whose outputs differ (beyond ``tol``) from the same
    values computed by the original graph on the same inputs."""
    flat, _ = pytree.tree_flatten(((), kwargs))
    args = [get(module, target) for get, target in entry.state] + flat
    if entry.rehash is not None and entry.rehash.graphs.probe is not None:  # the full graph takes the probe
        args += entry.call(entry.rehash.graphs.probe, module, kwargs)
    cg = entry.compiled
    wanted = {o.name for n in cg.graph_module.graph.nodes if "fxstream.region" in n.meta
              for o, _ in n.meta["fxstream.region"].outputs}
    values = {}

    class _Original(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.name in wanted:
                values[n.name] = v
            return v

    class _Compiled(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            region = n.meta.get("fxstream.region")
            if region is not None:
                for (o, _), got in zip(region.outputs, v):
                    ref = values.get(o.name)
                    if ref is not None and float((got.float() - ref.float()).abs().max()) > tol:
                        raise _Found(n.name)
            return v

    class _Found(Exception):
        pass

    with torch.no_grad():
        _Original(cg.prepared).run(*args)  # the graph the regions were cut from: same inputs, node names
        try:
            _Compiled(cg.graph_module).run(*args)
        except _Found as found:
            return str(found)
    return None


def _timestep(kwargs: dict) -> float:
    t = kwargs.get("timestep")
    if isinstance(t, torch.Tensor) and t.numel() >= 1:
        return float(t.reshape(-1)[0])
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    raise FxstreamError(f"timestep: Step Rehash counts denoising steps by the timestep argument, got {t!r}; pass "
                        "the scheduler's timestep (a number or a tensor) as diffusers pipelines do")


_TRAINING = ("{what}: fxstream compiles inference graphs (no gradients through the sliced regions, no "
             "gradient checkpointing). For inference call it under torch.no_grad() (diffusers pipelines do) after "
             ".eval(); to train, use the original module (compiled.module) and compile again afterwards.")


def _unguarded(cls) -> frozenset:
    """Attribute names a structure guard skips on a module of class ``cls`` (fxstream's wrappers' bookkeeping)."""
    return getattr(cls, "_fxstream_unguarded", frozenset())


def _rebuild(cls):
    return cls.__new__(cls)


def _rename_keys(d: dict, old: str, new: str) -> None:
    """Rename the keys of ``d`` starting with ``old`` to start with ``new`` instead, keeping their order."""
    for k in [k for k in d if k.startswith(old)]:
        d[new + k[len(old):]] = d.pop(k)


class CompiledModule(torch.nn.Module):
    """A drop-in replacement for a video UNet: same arguments, same return types, sliced inside.

    The first call with a new input signature (tensor shapes, dtypes, devices, non-tensor values, the
    weights' dtype and device, and the module's structure: ``fxstream/guard.py``) captures and compiles the
    module; later calls with that signature reuse it. The weights are read from the wrapped module on every call,
    so ``.to()`` and weight updates take effect.

    A stand-in for the original in the machinery around it: attributes it does not have are the original's
    (``config``, ``dtype``, ``save_pretrained``, ...); ``state_dict()`` and ``load_state_dict()`` use the
    original's keys, also inside a module holding it; and ``__class__`` and ``__module__`` are the original's, as
    ``unittest.mock`` does it, so that ``isinstance`` checks and diffusers' pipelines (``register_modules``,
    ``save_pretrained``, ``model_index.json``) take it for the original. ``type(compiled)`` is CompiledModule.
    It compiles inference graphs: training-only features (gradient checkpointing) raise :class:`FxstreamError`.

    With ``Policy(rehash=...)`` the module also counts denoising steps: a call whose timestep does not decrease
    against the previous call's starts a new generation (step 0, every cached feature dropped), as does
    :meth:`reset`. ``step_log`` lists what each call of the current generation ran (``"full"`` or ``"rehash"``).
    """

    # bookkeeping, not structure: a guard of a tree holding a compiled module skips these attributes
    _fxstream_unguarded = frozenset({"policy", "_entries", "_last", "_recording", "step_log", "_last_t", "_new",
                                     "_fallbacks", "_guard", "__module__", "_base_policy", "_state", "_stage",
                                     "_name"})

    def __init__(self, module: torch.nn.Module, policy: Policy):
        super().__init__()
        self.module = module
        self.training = module.training
        self.__module__ = type(module).__module__  # diffusers names a component's library by it
        self.policy = policy
        self._entries: OrderedDict = OrderedDict()
        self._last = None
        self._recording = None  # a fxstream.rehash.Recording while one is active
        self.step_log: list = []  # the current generation: "full" / "rehash" per call (Step Rehash only)
        self._last_t = None
        self._new = False  # the last call compiled its signature
        self._fallbacks: dict = {}  # signature -> the CaptureError of a signature that runs the original module
        self._guard = StructureGuard(module, _unguarded)

    # -- the stand-in -------------------------------------------------------------------------------------------
    @property
    def __class__(self):  # isinstance(compiled, UNetSpatioTemporalConditionModel) holds
        modules = self.__dict__.get("_modules") or {}
        return type(modules["module"]) if "module" in modules else type(self)

    def __reduce_ex__(self, protocol):
        # pickle and copy rebuild the real class (``__class__`` names the original's, which pickle would check)
        return _rebuild, (type(self),), self.__getstate__()

    def __getstate__(self) -> dict:
        """A copy (or an unpickled module) compiles again at its first call: compiled graphs are not copied."""
        state = dict(self.__dict__)
        state.update(_entries=OrderedDict(), _last=None, _fallbacks={}, _recording=None, _new=False)
        return state

    def _get_name(self) -> str:
        return type(self).__name__

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """The wrapped module's tree under the original's names (no ``module.`` level): diffusers finds layers
        by their names (perturbed-attention guidance searches ``named_modules()`` with anchored patterns), and
        ``named_parameters()`` follows, as ``state_dict()`` does."""
        if "module" not in self.__dict__.get("_modules", ()):
            return super().named_modules(memo, prefix, remove_duplicate)
        return self._modules["module"].named_modules(memo, prefix, remove_duplicate)

    def __getattr__(self, name):
        own = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):  # what nn.Module.__getattr__ finds ("module" too)
            if name in own.get(store, ()):
                return own[store][name]
        if "module" not in own.get("_modules", ()):  # not initialised (being unpickled): no recursion
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (the module is not set yet)")
        return getattr(own["_modules"]["module"], name)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The wrapped module's state dict, with its own keys (no ``module.`` prefix)."""
        if len(args) > 1 and prefix == "":  # torch's deprecated positional form
            prefix = args[1]
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        _rename_keys(out, prefix + "module.", prefix)
        metadata = getattr(out, "_metadata", None)
        if metadata is not None:
            if prefix + "module" in metadata:
                metadata[prefix[:-1]] = metadata.pop(prefix + "module")
            _rename_keys(metadata, prefix + "module.", prefix)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the original's keys (as state_dict() writes them) go to the wrapped module
        _rename_keys(state_dict, prefix, prefix + "module.")
        metadata = getattr(state_dict, "_metadata", None)  # only the outermost dict carries it (module versions)
        if metadata is not None:
            own = prefix[:-1]
            for k in [k for k in metadata if k == own or k.startswith(prefix)]:
                metadata.setdefault(prefix + "module" + ("." + k[len(prefix):] if k != own else ""), metadata[k])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def enable_gradient_checkpointing(self, *args, **kwargs):
        raise FxstreamError(_TRAINING.format(what="enable_gradient_checkpointing()"))

    @property
    def _stamp(self) -> tuple:
        """Moves whenever the wrapped module's structure may have changed (``_Entry.weights``)."""
        return (id(self._guard), self._guard.walks)

    def _signature(self, kwargs):
        flat, spec = pytree.tree_flatten(kwargs)
        p = next(self.module.parameters(), None)
        weights = (p.dtype, p.device.type, p.device.index) if p is not None else None
        # the policy too: compile_pipeline's stage fitting tries several budgets on one module (issue 19)
        return (str(spec), tuple(_leaf_key(x) for x in flat), weights, self.module.training, self.policy,
                self._guard.key())

    def _entry(self, kwargs):
        """The compiled signature for these inputs (compiled now if new), or None where capture failed: the
        original module then runs these inputs (one FallbackWarning per signature)."""
        key = self._signature(kwargs)
        if key in self._entries:
            self._entries.move_to_end(key)
            entry = self._entries[key]
            self._new = False
        else:
            log.info("compiling %s for a new input signature", type(self.module).__name__)
            try:
                entry = _Entry(self.module, kwargs, self.policy)
            except CaptureError as e:
                warnings.warn(f"fxstream: running the original {type(self.module).__name__} for these inputs, "
                              f"uncompiled (no slicing, no Step Rehash): {e}", FallbackWarning, stacklevel=3)
                self._fallbacks[key] = e
                entry = None
            self._entries[key] = entry
            self._new = True
            if self._guard.key() != key[-1]:
                log.info("%s changed its own attributes while being captured: the next call compiles again",
                         type(self.module).__name__)
            while len(self._entries) > self.policy.cache_size:
                self._entries.popitem(last=False)
        if entry is not None:
            self._last = entry
        return entry

    def forward(self, *args, **kwargs):
        kwargs = _as_kwargs(self.module, args, kwargs)
        t = _timestep(kwargs) if self.policy.rehash is not None else None  # fails cleanly before compiling
        entry = self._entry(kwargs)
        if entry is None:
            try:
                return self.module(**kwargs)
            except Exception as e:  # the module fails too: bad inputs, which export's message names (e chained)
                raise self._fallbacks[self._signature(kwargs)] from e
        out = self._rehash_step(entry, kwargs, t) if t is not None else entry.run(self.module, kwargs, self._stamp)
        if self.policy.verify and self._new:
            self._verify(entry, kwargs, out)
        return out

    def _verify(self, entry: _Entry, kwargs: dict, out) -> None:
        ref = self.module(**kwargs)
        got, want = pytree.tree_leaves(out), pytree.tree_leaves(ref)
        worst = 0.0
        for a, b in zip(got, want):
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                worst = max(worst, float((a.float() - b.float()).abs().max()) if b.numel() else 0.0)
        tol = verify_tolerance(want)  # the dtype's and the backend's rounding (TF32 on CUDA)
        if len(got) != len(want) or worst > tol:
            region = _first_differing_region(entry, self.module, kwargs, tol)
            raise VerificationError(
                f"Policy(verify=True): the compiled {type(self.module).__name__} differs from the original by "
                f"{worst:.3g} (tolerance {tol:.3g}); first region that differs: {region or 'none (outside regions)'}. "
                "Please report it with the policy and the input shapes; Policy() runs the exported graph unsliced.",
                max_abs_diff=worst, region=region)

    def _rehash_step(self, entry: _Entry, kwargs: dict, t: float):
        if self._last_t is None or t >= self._last_t:
            self.reset()
        self._last_t = t
        step, r = len(self.step_log), entry.rehash
        sched = r.schedule
        full = sched.is_full(step) or r.cache is None
        extra = []
        if r.graphs.probe is not None:
            probe = entry.call(r.graphs.probe, self.module, kwargs, stamp=self._stamp)[0]
            extra = [probe]
            if not full:
                change = float(torch.linalg.vector_norm((probe - r.probe_ref).double())
                               / torch.linalg.vector_norm(r.probe_ref.double()).clamp_min(1e-30))
                full = change > sched.adaptive or r.since_full >= sched.max_rehash
        if full:
            r.cache = None  # the old feature goes before the full graph runs: it is planned without it
            out = entry.call(entry.compiled.graph_module, self.module, kwargs, extra, self._stamp)
            r.cache, r.since_full = out.pop(), 0
            r.probe_ref = extra[0] if extra else None
            if self._recording is not None:
                self._recording.add(step, r.cache)
        else:
            out = entry.call(r.compiled.graph_module, self.module, kwargs, extra + [r.cache], self._stamp)
            r.since_full += 1
        self.step_log.append("full" if full else "rehash")
        return entry.unflatten(out)

    def explain(self) -> Report:
        """The report of the most recently used compiled signature."""
        if self._last is None:
            raise FxstreamError("explain(): the compiled module has not been called yet; call it once, or use "
                                "fxstream.explain(module, example_kwargs, policy=...) to plan without running")
        return self._last.report

    def reset(self, compiled: bool = False) -> None:
        """Start a new generation: the step counter restarts and every cached feature (Step Rehash) is dropped.
        ``compiled=True`` also forgets every compiled signature."""
        self.step_log = []
        self._last_t = None
        for entry in self._entries.values():
            if entry is not None and entry.rehash is not None:
                entry.rehash.clear()
        if compiled:
            self._entries.clear()
            self._last = None


def compile(module: torch.nn.Module, policy: Policy | None = None) -> CompiledModule:  # noqa: A001
    """Wrap ``module`` so that each forward runs its sliced, loop-tiled graph. Compiles lazily on first call."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, CompiledModule):
        raise TypeError("module: already compiled by fxstream; compile the original module instead")
    policy = _check_policy(policy)
    if policy.rehash is not None and "timestep" not in inspect.signature(module.forward).parameters:
        raise TypeError(f"policy.rehash: {type(module).__name__}.forward has no 'timestep' argument, which Step "
                        "Rehash needs to count denoising steps; use it on a diffusion UNet, or drop rehash")
    return CompiledModule(module, policy)


def explain(module: torch.nn.Module, example_kwargs: dict, policy: Policy | None = None) -> Report:
    """Capture and plan ``module`` for these inputs without running it (a meta-device module works)."""
    if isinstance(module, CompiledModule):
        module = module.module
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs: expected a dict of the module's keyword arguments, "
                        f"got {type(example_kwargs).__name__}")
    return _Entry(module, example_kwargs, _check_policy(policy)).report
