"""Public entry points: :func:`compile` returns a drop-in module, :func:`explain` reports without computing.

    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(slices=8))
    >>> fxstream.explain(unet, example_kwargs, policy=fxstream.Policy(slices=8)).table()
"""
from __future__ import annotations

import inspect
import logging
import warnings
from collections import OrderedDict
from dataclasses import replace

import torch
import torch.utils._pytree as pytree

from .catalog import TIMESTEP_ARG
from .distributed import LINKS, compile_policy
from .entry import Entry, capture_module, first_differing_region, plan_ranks
from .errors import CaptureError, FxstreamError, MemoryBudgetError, VerificationError
from .guard import StructureGuard
from .policy import Policy, check_policy
from .rehash.runtime import run_step, timestep_of
from .report import Report
from .tolerance import verify_tolerance

log = logging.getLogger(__name__)

__all__ = ["compile", "explain", "CompiledModule", "FallbackWarning"]


class FallbackWarning(UserWarning):
    """fxstream could not compile the module for some inputs and runs the original module for them."""


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type, x.device.index)
    return ("value", type(x).__name__, repr(x))


def timestep_as_tensor(kwargs: dict) -> dict:
    """``kwargs`` with a Python-number ``timestep`` made the tensor diffusers' UNets make of it themselves
    (``torch.tensor([t])``: float64 for a float, int64 for an int, float32/int32 on MPS; on the device of the first
    tensor argument), so that it is a graph input like any tensor: one compile for a whole denoising loop instead
    of one per step (a number is a constant of the captured graph). The arithmetic is the same as the module's own
    conversion, so the result is bitwise the same."""
    t = kwargs.get(TIMESTEP_ARG)
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return kwargs
    device = next((v.device for v in kwargs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    small = device.type in ("mps", "npu")
    dtype = (torch.float32 if small else torch.float64) if isinstance(t, float) else \
        (torch.int32 if small else torch.int64)
    return dict(kwargs, **{TIMESTEP_ARG: torch.tensor([t], dtype=dtype, device=device)})


def _as_kwargs(module: torch.nn.Module, args, kwargs) -> dict:
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"arguments do not fit {type(module).__name__}.forward: {e}") from None
    return dict(bound.arguments)


_TRAINING = ("{what}: fxstream compiles inference graphs (no gradients through the sliced regions, no "
             "gradient checkpointing). For inference call it under torch.no_grad() (diffusers pipelines do) after "
             ".eval(); to train, use the original module (compiled.module) and compile again afterwards.")


_POLICY_AT = 4  # where the policy sits in a signature (CompiledModule._signature)


def _without_policy(key: tuple) -> tuple:
    return key[:_POLICY_AT] + key[_POLICY_AT + 1:]


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
    _fxstream_unguarded = frozenset({"policy", "_entries", "_last", "recording", "step_log", "_last_t", "_new",
                                     "_fallbacks", "_guard", "_step", "_slot", "_short_generations",
                                     "__module__"})

    def __init__(self, module: torch.nn.Module, policy: Policy):
        super().__init__()
        self.module = module
        self.training = module.training
        self.__module__ = type(module).__module__  # diffusers names a component's library by it
        self.policy = policy
        self._entries: OrderedDict = OrderedDict()
        self._last = None
        self.recording = None  # a fxstream.rehash.Recording while one is active (fxstream.rehash.record)
        self.step_log: list = []  # the current generation: "full" / "rehash" per call (Step Rehash only)
        self._last_t = None
        self._step, self._slot = 0, 0  # the denoising step of the current generation, and the call within it
        self._short_generations = 0  # generations in a row that ended after their first step
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
        state.update(_entries=OrderedDict(), _last=None, _fallbacks={}, recording=None, _new=False)
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
        """Moves whenever the wrapped module's structure may have changed (``Entry.weights``)."""
        return (id(self._guard), self._guard.walks)

    def _signature(self, kwargs, policy: Policy | None = None) -> tuple:
        """The compiled-signature key (the policy at ``_POLICY_AT``; :func:`_without_policy` drops it)."""
        flat, spec = pytree.tree_flatten(kwargs)
        p = next(self.module.parameters(), None)
        weights = (p.dtype, p.device.type, p.device.index) if p is not None else None
        # the policy too: compile_pipeline's stage fitting tries several budgets on one module (issue 19)
        return (str(spec), tuple(_leaf_key(x) for x in flat), weights, self.module.training, policy or self.policy,
                self._guard.key())

    def compiled_entry(self, kwargs: dict, policy: Policy | None = None):
        """The compiled signature for these inputs under ``policy`` (default: ``self.policy``), compiled now if
        new, or None where capture failed: the original module then runs these inputs (one FallbackWarning per
        signature). It becomes the one :meth:`explain` reports."""
        policy = policy or self.policy
        key = self._signature(kwargs, policy)
        if key in self._fallbacks:  # capture failed for these inputs before: the original module runs them
            self._new = False
            return None
        if key in self._entries:
            self._entries.move_to_end(key)
            entry = self._entries[key]
            self._new = False
        else:
            log.info("compiling %s for a new input signature", type(self.module).__name__)
            # the same inputs compiled under another policy (a budget's attempts): its capture serves this one too
            # (the guard's key is in the signature: the module has not changed since)
            same = next((e for k, e in reversed(self._entries.items()) if _without_policy(k) == _without_policy(key)),
                        None)
            try:
                entry = Entry(self.module, kwargs, policy, program=same.program if same is not None else None)
            except CaptureError as e:
                warnings.warn(f"fxstream: running the original {type(self.module).__name__} for these inputs, "
                              f"uncompiled (no slicing, no Step Rehash): {e}", FallbackWarning, stacklevel=3)
                # kept apart from the compiled signatures, so that a failure never evicts one of them
                self._fallbacks[key] = e
                while len(self._fallbacks) > self.policy.cache_size:
                    self._fallbacks.pop(next(iter(self._fallbacks)))
                self._new = True
                return None
            self._entries[key] = entry
            self._new = True
            if self._guard.key() != key[-1]:
                log.info("%s changed its own attributes while being captured: the next call compiles again",
                         type(self.module).__name__)
            while len(self._entries) > self.policy.cache_size:
                self._entries.popitem(last=False)
        self._last = entry
        return entry

    def has_compiled(self, kwargs: dict, policy: Policy | None = None) -> bool:
        """Whether these inputs under ``policy`` (default: ``self.policy``) have been compiled (or found not to
        capture, so that the original module runs them)."""
        key = self._signature(kwargs, policy)
        return key in self._entries or key in self._fallbacks

    def forget(self, kwargs: dict, policy: Policy) -> None:
        """Drop the compiled signature of these inputs under ``policy`` (if any)."""
        entry = self._entries.pop(self._signature(kwargs, policy), None)
        if entry is not None and entry is self._last:
            self._last = None

    def forward(self, *args, **kwargs):
        given = _as_kwargs(self.module, args, kwargs)
        kwargs = timestep_as_tensor(given)  # a number would be baked into the graph: one compile per step
        t = timestep_of(kwargs) if self.policy.rehash is not None else None  # fails cleanly before compiling
        entry = self.compiled_entry(kwargs)
        if entry is None:
            try:
                return self.module(**given)
            except Exception as e:  # the module fails too: bad inputs, which export's message names (e chained)
                raise self._fallbacks[self._signature(kwargs)] from e
        out = self._rehash_step(entry, kwargs, t) if t is not None else entry.run(self.module, kwargs, self._stamp)
        if self.policy.verify and self._new:
            self._verify(entry, kwargs, out)
        return out

    def _rehash_step(self, entry: Entry, kwargs: dict, t: float):
        """One call of a denoising loop. A timestep above the previous call's starts a new generation; the same
        timestep again is another call of the same step (classifier-free guidance run as two calls, FreeNoise's
        windows), which keeps a cached feature of its own (``slot``); a lower one is the next step."""
        if self._last_t is None or t > self._last_t:
            self._new_generation()
        elif t == self._last_t:
            self._slot += 1
        else:
            self._step, self._slot = self._step + 1, 0
        self._last_t = t
        out, full = run_step(entry, self.module, kwargs, self._step, self._slot, self._stamp, self.recording)
        self.step_log.append("full" if full else "rehash")
        return out

    def _new_generation(self) -> None:
        """A new generation starts; warn once when generations keep ending after their first step (timesteps that
        never decrease), where no step can reuse a feature."""
        if self.step_log:  # a generation ends: did it get past its first step?
            one_step = self._step == 0 and not self.policy.rehash.is_full(1)  # (its step 1 could have rehashed)
            self._short_generations = self._short_generations + 1 if one_step else 0
        if self._short_generations == 3:
            warnings.warn(
                f"fxstream: Step Rehash on {type(self.module).__name__}: the last 3 generations each ended after one "
                "denoising step, because the timestep did not decrease from one call to the next (it starts a new "
                "generation), so every step ran the full UNet. Pass the scheduler's timesteps in their (decreasing) "
                "order, or call compiled.reset() between generations.", RuntimeWarning, stacklevel=4)
        self.reset()

    def _verify(self, entry: Entry, kwargs: dict, out) -> None:
        ref = self.module(**kwargs)
        got, want = pytree.tree_leaves(out), pytree.tree_leaves(ref)
        worst = 0.0
        for a, b in zip(got, want):
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                worst = max(worst, float((a.float() - b.float()).abs().max()) if b.numel() else 0.0)
        tol = verify_tolerance(want)  # the dtype's and the backend's rounding (TF32 on CUDA)
        if len(got) != len(want) or worst > tol:
            region = first_differing_region(entry, self.module, kwargs, tol)
            raise VerificationError(
                f"Policy(verify=True): the compiled {type(self.module).__name__} differs from the original by "
                f"{worst:.3g} (tolerance {tol:.3g}); first region that differs: {region or 'none (outside regions)'}. "
                "Please report it with the policy and the input shapes; Policy() runs the exported graph unsliced.",
                max_abs_diff=worst, region=region)

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
        self._step, self._slot = 0, 0
        for entry in self._entries.values():
            if entry is not None and entry.rehash is not None:
                entry.rehash.clear()
        if compiled:
            self._entries.clear()
            self._fallbacks.clear()
            self._last = None


def compile(module: torch.nn.Module, policy: Policy | None = None) -> CompiledModule:  # noqa: A001
    """Wrap ``module`` so that each forward runs its sliced, loop-tiled graph. Compiles lazily on first call."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, CompiledModule):
        raise TypeError("module: already compiled by fxstream; compile the original module instead")
    policy = check_policy(policy)
    if policy.rehash is not None and "timestep" not in inspect.signature(module.forward).parameters:
        raise TypeError(f"policy.rehash: {type(module).__name__}.forward has no 'timestep' argument, which Step "
                        "Rehash needs to count denoising steps; use it on a diffusion UNet, or drop rehash")
    return CompiledModule(module, policy)


def explain(module: torch.nn.Module, example_kwargs: dict, policy: Policy | None = None, ranks=None,
            link: str = "nvlink") -> Report:
    """Capture and plan ``module`` for these inputs without running it (a meta-device module works).

    ``ranks`` (an int or several): also plan ``Policy(distributed=...)`` on that many devices, without any process
    group (:func:`fxstream.distributed.rank_plan`: per-rank peak, bytes moved, predicted speedup over ``link``:
    ``"nvlink"``, ``"pcie5"`` or ``"pcie4"``); the compile is then the one spread regions use (NOTE [No region
    floor across devices])."""
    if isinstance(module, CompiledModule):
        module = module.module
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs: expected a dict of the module's keyword arguments, "
                        f"got {type(example_kwargs).__name__}")
    policy = check_policy(policy)
    if ranks is None:
        return Entry(module, example_kwargs, policy).report
    counts = [ranks] if isinstance(ranks, int) and not isinstance(ranks, bool) else list(ranks)
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"ranks: expected an int >= 1 or a list of them (devices to plan for), got {ranks!r}")
    if link not in LINKS:
        raise ValueError(f"link: expected one of {', '.join(repr(k) for k in LINKS)}, got {link!r}")
    program = capture_module(module, example_kwargs)  # one capture for every compile below
    try:
        entry = Entry(module, example_kwargs, compile_policy(policy), program=program)
    except MemoryBudgetError:  # NOTE [A budget per rank]: the ranks may meet what one device cannot; the
        if policy.max_memory is None:  # one-device figures are then the policy's without its budget
            raise
        entry = Entry(module, example_kwargs, compile_policy(replace(policy, max_memory=None)), program=program)
    plans = plan_ranks(entry, policy, counts, link)
    entry.report.ranks = plans
    return entry.report
