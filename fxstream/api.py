"""Public entry points: :func:`compile` returns a drop-in module, :func:`explain` reports without computing.

    >>> pipe.unet = fxstream.compile(pipe.unet, policy=fxstream.Policy(slices=8))
    >>> fxstream.explain(unet, example_kwargs, policy=fxstream.Policy(slices=8)).table()
"""
from __future__ import annotations

import inspect
import logging
from collections import OrderedDict

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind

from .budget import choose_slicing, lower_bound
from .compiler import capture, compile_graph, describe_inputs, layout_of
from .memory import weight_bytes
from .errors import ExecutionError, FxstreamError
from .policy import Policy
from .report import Report, build_report

log = logging.getLogger(__name__)

__all__ = ["compile", "explain", "CompiledModule"]

_CACHE_SIZE = 8


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
    """One compiled input signature: the exported program, the compiled graph, and how to feed it."""

    def __init__(self, module: torch.nn.Module, kwargs: dict, policy: Policy):
        self.program = capture(module, kwargs)
        gm, layout = self.program.graph_module, layout_of(module)
        weights = weight_bytes(self.program)
        if policy.max_memory is not None:
            self.compiled, floor = choose_slicing(gm, policy, layout, weights)
            bound = floor.peak_bytes
        else:
            self.compiled = compile_graph(gm, policy, layout)
            bound = lambda: lower_bound(gm, policy, layout).peak_bytes  # noqa: E731  (a compile: only on demand)
        # how to fetch each lifted input at call time: weights from the live module, constants from the program
        fetch = {InputKind.PARAMETER: lambda m, t: m.get_parameter(t), InputKind.BUFFER: lambda m, t: m.get_buffer(t)}
        self.state = [(fetch.get(spec.kind, lambda m, t: self.program.constants[t]), spec.target)
                      for spec in self.program.graph_signature.input_specs if spec.kind != InputKind.USER_INPUT]
        self.report: Report = build_report(self.compiled, policy, weights, bound)

    def run(self, module: torch.nn.Module, kwargs: dict):
        flat, _ = pytree.tree_flatten(((), kwargs))
        state = [get(module, target) for get, target in self.state]
        try:
            out = self.compiled.graph_module(*state, *flat)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # export's fake kernels do not check everything (a linear's dtypes)
            raise ExecutionError(
                f"{type(module).__name__} compiled by fxstream failed on these inputs: {e}\n"
                f"called with {describe_inputs(module, kwargs)}\nCheck that the inputs fit the module (it fails the "
                "same way when called directly); if the module runs them, this is a bug in fxstream.") from e
        return pytree.tree_unflatten(list(out), self.program.call_spec.out_spec)


class CompiledModule(torch.nn.Module):
    """A drop-in replacement for a video UNet: same arguments, same return types, sliced inside.

    The first call with a new input signature (tensor shapes, dtypes, devices, non-tensor values, the
    weights' dtype and device) captures and compiles the module; later calls with that signature reuse it.
    The weights are read from the wrapped module on every call, so ``.to()`` and weight updates take effect.
    """

    def __init__(self, module: torch.nn.Module, policy: Policy):
        super().__init__()
        self.module = module
        self.policy = policy
        self._entries: OrderedDict = OrderedDict()
        self._last = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self._modules["module"], name)

    def _signature(self, kwargs):
        flat, spec = pytree.tree_flatten(kwargs)
        p = next(self.module.parameters(), None)
        weights = (p.dtype, p.device.type, p.device.index) if p is not None else None
        return (str(spec), tuple(_leaf_key(x) for x in flat), weights, self.module.training)

    def _entry(self, kwargs) -> _Entry:
        key = self._signature(kwargs)
        entry = self._entries.get(key)
        if entry is None:
            log.info("compiling %s for a new input signature", type(self.module).__name__)
            entry = _Entry(self.module, kwargs, self.policy)
            self._entries[key] = entry
            while len(self._entries) > _CACHE_SIZE:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        self._last = entry
        return entry

    def forward(self, *args, **kwargs):
        kwargs = _as_kwargs(self.module, args, kwargs)
        return self._entry(kwargs).run(self.module, kwargs)

    def explain(self) -> Report:
        """The report of the most recently used compiled signature."""
        if self._last is None:
            raise FxstreamError("explain(): the compiled module has not been called yet; call it once, or use "
                                "fxstream.explain(module, example_kwargs, policy=...) to plan without running")
        return self._last.report

    def reset(self) -> None:
        """Forget every compiled signature."""
        self._entries.clear()
        self._last = None


def compile(module: torch.nn.Module, policy: Policy | None = None) -> CompiledModule:  # noqa: A001
    """Wrap ``module`` so that each forward runs its sliced, loop-tiled graph. Compiles lazily on first call."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, CompiledModule):
        raise TypeError("module: already compiled by fxstream; compile the original module instead")
    return CompiledModule(module, _check_policy(policy))


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
