"""The pipeline's parts: its kind, its components and which stage runs which, their bytes, the policy each
stage's compiled module gets, and the error a stage that cannot meet the budget raises."""
from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from ..api import CompiledModule
from ..catalog import PIPELINE_KINDS
from ..errors import MemoryBudgetError
from ..policy import Policy

__all__ = ["STAGES", "HOOK_MARK", "PipelineBudgetError", "pipeline_kind", "pipeline_units", "stage_units",
           "device_of", "unwrap", "module_bytes", "tensor_bytes", "needs_upcast", "stage_policy", "check_offload"]

STAGES = ("encode", "denoise", "decode")
HOOK_MARK = "_fxstream_stage_hook"  # set on the pre-hooks compile_pipeline registers


class PipelineBudgetError(MemoryBudgetError):
    """A stage of a pipeline cannot meet ``Policy.max_memory``: ``stage`` (``"encode"``, ``"denoise"`` or
    ``"decode"``) and ``module`` name it; ``weight_bytes`` are the fewest weights resident during it (every
    module it does not use offloaded), ``held_bytes`` what the pipeline holds across the call,
    ``lower_bound_bytes`` the lowest activations any slicing fxstream allows plans."""

    def __init__(self, message: str, *, stage: str, module: str, max_memory: int, weight_bytes: int,
                 held_bytes: int, lower_bound_bytes: int):
        super().__init__(message, max_memory=max_memory, weight_bytes=weight_bytes,
                         lower_bound_bytes=lower_bound_bytes)
        self.stage = stage
        self.module = module
        self.held_bytes = held_bytes


def pipeline_kind(pipe) -> str:
    """``"svd"`` or ``"animatediff"``; ValueError naming the class and the supported ones otherwise."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_KINDS and cls.__module__.startswith("diffusers"):
            return PIPELINE_KINDS[cls.__name__]
    raise ValueError(
        f"pipe: a {type(pipe).__name__}; whole-pipeline compilation supports diffusers' "
        f"{' and '.join(PIPELINE_KINDS)}. For another pipeline, compile its UNet alone: "
        "pipe.unet = fxstream.compile(pipe.unet, policy)")


def pipeline_units(pipe) -> dict:
    """The pipeline's modules by component name (``unet``, ``vae``, ``image_encoder``, ...)."""
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def stage_units(kind: str, units: dict) -> dict:
    """The components each stage runs (the rest may be offloaded during it)."""
    encode = ["image_encoder", "vae"] if kind == "svd" else ["text_encoder"]
    return {"encode": [u for u in encode if u in units], "denoise": ["unet"], "decode": ["vae"]}


def device_of(module: torch.nn.Module):
    """The device of ``module``'s first parameter or buffer (None: it has none)."""
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return t.device if t is not None else None


def unwrap(module):
    """The original of a compiled module; any other module as it is."""
    return module.module if isinstance(module, CompiledModule) else module


def module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers (floating-point ones counted in ``dtype`` if given)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(t.numel() * (size if size is not None and t.is_floating_point() else t.element_size())
               for t in itertools.chain(module.parameters(), module.buffers()))


def tensor_bytes(values) -> int:
    """Bytes of the tensors among ``values`` (each distinct tensor once, a view by its own size)."""
    seen, total = set(), 0
    for v in values:
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            total += v.numel() * v.element_size()
    return total


def needs_upcast(kind: str, vae) -> bool:
    """SVD encodes the conditioning image with its VAE in float32 when the VAE is float16 and force_upcast."""
    return kind == "svd" and module_bytes(vae) > 0 and next(vae.parameters()).dtype == torch.float16 \
        and bool(getattr(vae.config, "force_upcast", False))


def stage_policy(policy: Policy, stage: str) -> Policy:
    """The policy a stage's compiled module gets (before its ``max_memory``): the UNet everything but ``halo`` and
    ``host_memory``; the VAE decoder ``halo``, ``host_memory`` (its halo regions park values there), ``spatial``
    (its slices of frames for what halos cannot take) and the runtime settings, ``distributed`` included (it has
    no video axis to slice)."""
    if stage == "denoise":
        return replace(policy, halo=None, max_memory=None, host_memory=None)
    return Policy(halo=policy.halo, spatial=policy.spatial, pipeline=policy.pipeline, cpu_workers=policy.cpu_workers,
                  min_region_fraction=policy.min_region_fraction, cache_size=policy.cache_size, verify=policy.verify,
                  cache_dir=policy.cache_dir, distributed=policy.distributed, host_memory=policy.host_memory)


def check_offload(offload, policy: Policy) -> str:
    """``offload`` checked: ``"auto"``, or ``"always"`` / ``"never"`` with a budget."""
    if offload not in ("auto", "always", "never"):
        raise ValueError(f"offload: expected 'auto' (move the modules a stage does not use off the accelerator "
                         f"when the budget needs it or it saves recomputation), 'always' or 'never', got {offload!r}")
    if offload != "auto" and policy.max_memory is None:
        raise ValueError(f"offload={offload!r}: only used with a budget; write "
                         "policy=fxstream.Policy(max_memory='6GiB')")
    return offload
