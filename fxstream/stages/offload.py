"""Compiling a pipeline in place: :func:`compile_pipeline` wraps the UNet and the VAE decoder in stage modules
that fit each new input signature into the budget, and registers forward pre-hooks that place each stage's
modules (``.to()``) as the decisions recorded in ``pipe.fxstream`` (:class:`PipelineState`) say."""
from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import replace

import torch

from ..api import CompiledModule
from ..api import compile as compile_module
from ..policy import Policy, check_policy
from .fitting import Fit, decode_tail_bytes, fit_step, fixed_attempt
from .parts import (HOOK_MARK, STAGES, check_offload, device_of, module_bytes, pipeline_kind, pipeline_units,
                    stage_policy, stage_units, tensor_bytes, unwrap)
from .planning import HaloFloor, plan_on_meta

log = logging.getLogger(__name__)

__all__ = ["compile_pipeline", "PipelineState", "StageModule", "planned_moves", "normal_device"]


class StageModule(CompiledModule):
    """A CompiledModule of one stage of a compiled pipeline: under a budget, each new input signature is
    compiled with ``max_memory`` = the budget less the other weights resident and what the pipeline holds,
    and the stage's offload decision is taken there."""

    # bookkeeping a structure guard skips (CompiledModule's, and these)
    _fxstream_unguarded = CompiledModule._fxstream_unguarded | {"base_policy", "pipeline_state", "stage", "unit"}

    def __init__(self, module, policy: Policy, state: PipelineState, stage: str, name: str):
        super().__init__(module, policy)
        self.base_policy = policy  # the stage's policy, before its max_memory
        self.pipeline_state = state  # the PipelineState of the pipeline it belongs to
        self.stage = stage  # "denoise" or "decode"
        self.unit = name  # the component it is: "unet" or "vae.decoder"

    def compiled_entry(self, kwargs: dict, policy: Policy | None = None):
        state = self.pipeline_state
        if policy is not None or state.budget is None or self.has_compiled(kwargs):
            return super().compiled_entry(kwargs, policy)
        return state._fit_compiled(self, kwargs)


class PipelineState:
    """What :func:`compile_pipeline` did to a pipeline, as ``pipe.fxstream``.

    ``offload[stage]``: whether the modules the stage does not use are moved off the accelerator during it
    (None: that stage has not run yet under a budget; decided at its first call, and kept once True).
    ``max_memory[module]``: the budget each step's module was last planned with. ``moves``: every ``.to()`` made,
    as (stage, component, device). ``device``: the accelerator the pipeline runs on (None: CPU, nothing moves).
    """

    def __init__(self, pipe, kind: str, policy: Policy, offload: str = "auto"):
        self.kind = kind
        self.policy = policy
        self.budget = policy.max_memory
        self.offload_mode = offload
        self.offload = {s: None for s in STAGES}
        self.max_memory: dict = {}
        self.moves: list = []
        self.device = None
        self._pipe = pipe
        self._encode_plans: dict = {}
        self._decode_held = 0
        self._handles: list = []
        self._decoder = None  # this pipeline's compiled VAE decoder (set by compile_pipeline)

    def __repr__(self) -> str:
        return (f"PipelineState({self.kind}, {self.policy.describe()}, offload={self.offload}, "
                f"moves={len(self.moves)})")

    # placement -----------------------------------------------------------------------------------------------
    def _exec_device(self):
        if self.device is None:
            for m in pipeline_units(self._pipe).values():
                d = device_of(m)
                if d is not None and d.type not in ("cpu", "meta"):
                    self.device = d
                    break
        return self.device

    def _place(self, stage: str) -> None:
        """Move the stage's modules to the accelerator and, if the stage offloads, the others to the CPU."""
        device = self._exec_device()
        if device is None:
            return  # a CPU pipeline: nothing to move
        units = pipeline_units(self._pipe)
        where = {k: device_of(m) for k, m in units.items()}
        for unit, target in planned_moves(where, stage_units(self.kind, units)[stage], bool(self.offload[stage]),
                                          device):
            units[unit].to(target)
            self.moves.append((stage, unit, str(target)))

    def _bytes_now(self) -> dict:
        return {k: module_bytes(m) for k, m in pipeline_units(self._pipe).items()}

    def _least(self, stage: str, now: dict) -> dict:
        used = stage_units(self.kind, pipeline_units(self._pipe))[stage]
        return {k: v for k, v in now.items() if k in used}

    # decisions ------------------------------------------------------------------------------------------------
    def _decide(self, stage: str, fit: Fit, name: str) -> None:
        self.offload[stage] = bool(self.offload[stage]) or fit.offload
        self.max_memory[name] = fit.max_memory

    def _fit_compiled(self, cm: StageModule, kwargs: dict):
        now = self._bytes_now()
        held = tensor_bytes(kwargs.values()) + (self._decode_held if cm.stage == "decode" else 0)

        tried = {}  # budget -> the signature its attempt compiled (the policy is part of it)

        def attempt(max_memory: int):
            tried[max_memory] = replace(cm.base_policy, max_memory=max_memory)
            return cm.compiled_entry(kwargs, tried[max_memory])

        floor = HaloFloor(cm.module, kwargs, cm.base_policy) if cm.stage == "decode" else None
        fit = fit_step(self.budget, cm.stage, cm.unit, module_bytes(cm.module), held, now,
                       self._least(cm.stage, now), attempt, bool(self.offload[cm.stage]), sliced=True,
                       mode=self.offload_mode, floor=floor)
        # the chosen attempt's policy serves the next calls; the others' compiled graphs are dropped
        chosen = max(fit.max_memory, 1)
        cm.policy = replace(cm.base_policy, max_memory=chosen)
        for budget, policy in tried.items():
            if budget != chosen:
                cm.forget(kwargs, policy)
        cm.compiled_entry(kwargs, cm.policy)  # the chosen attempt's (compiled already): explain() reports it
        self._decide(cm.stage, fit, cm.unit)
        self._place(cm.stage)
        return fit.result

    def _encode_hook(self, name: str):
        """Forward pre-hook of an encode-stage module: plan it (once per input signature, on a meta copy),
        decide, place."""
        def hook(module, args, kwargs):
            kw = _as_kwargs(module, args, kwargs)
            key = (name, tuple((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                               for k, v in kw.items()), next(module.parameters()).dtype)
            if key not in self._encode_plans:
                entry = plan_on_meta(module, kw, Policy())
                self._encode_plans[key] = entry.report if entry is not None else None
            report = self._encode_plans[key]
            now = self._bytes_now()
            if report is None:  # could not be planned: make the most room
                self._decide("encode", Fit(None, True, 0, {}), name)
            else:
                fit = fit_step(self.budget, "encode", name, 0, tensor_bytes(kw.values()), now,
                               self._least("encode", now), fixed_attempt(0, report.peak_bytes),
                               bool(self.offload["encode"]), sliced=False, mode=self.offload_mode)
                self._decide("encode", fit, name)
            self._place("encode")
        setattr(hook, HOOK_MARK, True)
        return hook

    def _stage_hook(self, stage: str):
        def hook(module, args):
            self._place(stage)
        setattr(hook, HOOK_MARK, True)
        return hook

    def _before_decode(self, latents: torch.Tensor, chunk: int) -> None:
        """Called by the wrapped ``decode_latents``: this pipeline's compiled decoder in place (a VAE shared with
        another compiled pipeline holds the one compiled last), what earlier chunks leave held, the tail's fit,
        placement."""
        pipe = self._pipe
        if self._decoder is not None and pipe.vae.decoder is not self._decoder \
                and unwrap(pipe.vae.decoder) is self._decoder.module:
            pipe.vae.decoder = self._decoder
        n = latents.shape[0] * (latents.shape[1] if self.kind == "svd" else latents.shape[2])
        chunk = max(1, min(int(chunk), n))
        vae = unwrap(pipe.vae)
        dtype = next(vae.parameters()).dtype
        per_frame = vae.config.out_channels * (latents.shape[-2] * pipe.vae_scale_factor) * \
            (latents.shape[-1] * pipe.vae_scale_factor) * dtype.itemsize
        self._decode_held = (math.ceil(n / chunk) - 1) * chunk * per_frame
        if self.budget is not None:
            now = self._bytes_now()
            fit = fit_step(self.budget, "decode", "decode_latents", 0, 0, now, self._least("decode", now),
                           fixed_attempt(0, decode_tail_bytes(n * per_frame, dtype.itemsize)),
                           bool(self.offload["decode"]), sliced=False, mode=self.offload_mode)
            self._decide("decode", fit, "decode_latents")
            self._place("decode")


def _as_kwargs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, as ``fxstream.explain`` takes them (``**kwargs`` spread out)."""
    sig = inspect.signature(module.forward)
    out = {}
    for name, value in sig.bind(*args, **kwargs).arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(module).__name__}.forward(*{name}): positional arguments beyond its named ones "
                            "cannot be planned")
        else:
            out[name] = value
    return out


def normal_device(device) -> torch.device:
    """``device`` with its index written out: ``"cuda"`` is the current CUDA device (``cuda:0`` unless set
    otherwise), as module weights report it, so that ``torch.device("cuda")`` equals ``cuda:0``."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        index = torch.cuda.current_device() if device.type == "cuda" and torch.cuda.is_available() else 0
        device = torch.device(device.type, index)
    return device


def planned_moves(where: dict, used: list, offload: bool, device) -> list:
    """The ``.to()`` calls that place a stage: with ``offload``, each component not in ``used`` on ``device`` to
    the CPU first (so that no moment holds both), then each component of ``used`` not on ``device`` onto it.
    ``where``: component -> the device its weights are on (None: no weights). Devices compare with their index
    written out (``"cuda"`` is ``cuda:0``)."""
    device = normal_device(device)
    where = {u: None if d is None else normal_device(d) for u, d in where.items()}
    moves = [(u, torch.device("cpu")) for u, d in where.items() if u not in used and d == device] if offload else []
    return moves + [(u, device) for u in used if where.get(u) is not None and where[u] != device]


def _check_pipeline(pipe, policy: Policy, units: dict, device):
    """ValueError / TypeError for a pipeline compile_pipeline cannot take as it is; ``device`` normalised."""
    for name in ("unet", "vae"):
        if name not in units:
            raise ValueError(f"pipe.{name}: expected a module, got {getattr(pipe, name, None)!r}")
    if getattr(pipe, "fxstream", None) is not None:
        raise TypeError("pipe: already compiled by fxstream; compile a pipeline built from the original modules")
    if policy.max_memory is not None:
        hooked = [k for k, m in units.items() if any(hasattr(s, "_hf_hook") for s in m.modules())]
        if hooked or getattr(pipe, "_offload_gpu_id", None) is not None:
            raise ValueError(f"pipe: accelerate offload hooks on {', '.join(hooked) or 'the pipeline'}: with "
                             "max_memory, compile_pipeline moves the modules itself; call pipe.remove_all_hooks() "
                             "(undo enable_model_cpu_offload / enable_sequential_cpu_offload) first")
    if device is None:
        return None
    device = normal_device(device)
    if device.type in ("cpu", "meta"):
        raise ValueError(f"device: expected an accelerator such as 'cuda', got {str(device)!r}; a pipeline on "
                         "the CPU needs no device")
    if policy.max_memory is None:
        raise ValueError("device: only used with a budget (the stages' modules are moved there as the budget "
                         "allows); without one, move the pipeline there: pipe.to('cuda')")
    return device


def compile_pipeline(pipe, policy: Policy | None = None, *, offload: str = "auto", device=None):
    """Compile every heavy module of a ``StableVideoDiffusionPipeline`` or ``AnimateDiffPipeline`` in place and
    return the same pipeline, usable as before.

    ``pipe.unet`` and ``pipe.vae.decoder`` become compiled modules (:class:`~fxstream.CompiledModule`; the UNet
    gets ``policy`` without ``halo``, the decoder ``halo`` and the runtime settings). With
    ``policy.max_memory`` the budget applies to each stage (see :mod:`fxstream.stages`): every compiled module
    gets ``max_memory`` = the budget less the other weights resident during its stage and what the pipeline
    holds, and the modules a stage does not use are moved to the CPU during it when the budget needs it or
    when that lets the stage recompute less (``offload="auto"``: see :mod:`fxstream.stages`).
    Decisions are taken at each stage's first call with new input shapes and recorded in ``pipe.fxstream``
    (:class:`PipelineState`); a stage that cannot fit raises :class:`PipelineBudgetError` (a
    MemoryBudgetError) naming it, before anything of that stage runs.

    ``offload="always"`` moves them off in every stage (the most room for activations: the fewest slices, at the
    cost of moving weights at every stage), ``"never"`` keeps everything on the accelerator.

    The accelerator is where the pipeline's modules are (``pipe.to("cuda")`` first), or ``device`` (with a
    budget): a pipeline whose weights together exceed the budget can stay on the CPU, each stage's modules are
    moved to ``device`` when it starts (the encode stage's ones at once, so that diffusers' execution device is
    ``device``).

    SVD's ``decode_latents`` is wrapped to decode all ``num_frames`` frames of a video at once (exact; see
    :mod:`fxstream.stages`).

    A UNet or VAE decoder compiled already (a pipeline built from another compiled pipeline's components) is
    compiled again from its original for this pipeline; a VAE shared by two compiled pipelines holds the decoder
    of the one decoding (each pipeline's ``decode_latents`` puts its own in place).
    """
    kind = pipeline_kind(pipe)
    policy = check_policy(policy)
    offload = check_offload(offload, policy)
    device = _check_pipeline(pipe, policy, pipeline_units(pipe), device)
    state = PipelineState(pipe, kind, policy, offload)
    state.device = device
    # a component compiled already (shared with a compiled pipeline, or compiled by hand): its original, compiled
    # for this pipeline; the other pipeline keeps its own compiled module (see PipelineState._before_decode)
    unet, decoder = _original(pipe.unet, "pipe.unet"), _original(pipe.vae.decoder, "pipe.vae.decoder")
    compile_module(unet, stage_policy(policy, "denoise"))  # the same checks fxstream.compile makes
    pipe.unet = StageModule(unet, stage_policy(policy, "denoise"), state, "denoise", "unet")
    pipe.vae.decoder = state._decoder = StageModule(decoder, stage_policy(policy, "decode"), state, "decode",
                                                    "vae.decoder")
    _wrap_decode_latents(pipe, kind, state)
    if policy.max_memory is not None:
        _register_hooks(pipe, kind, state)
    pipe.fxstream = state
    if device is not None:
        state._place("encode")  # diffusers creates its tensors on the first non-CPU module's device
    return pipe


def _register_hooks(pipe, kind: str, state: PipelineState) -> None:
    """The forward pre-hooks that fit and place the encode stage's modules, and place the other stages'."""
    encode = [("image_encoder", pipe.image_encoder), ("vae.encoder", pipe.vae.encoder)] if kind == "svd" else \
        [("text_encoder", getattr(pipe, "text_encoder", None))]
    for name, m in encode:
        if isinstance(m, torch.nn.Module):
            state._handles.append(m.register_forward_pre_hook(state._encode_hook(name), with_kwargs=True))
    state._handles.append(pipe.unet.register_forward_pre_hook(state._stage_hook("denoise")))
    for m in (pipe.vae.decoder, getattr(pipe.vae, "post_quant_conv", None)):
        if isinstance(m, torch.nn.Module):
            state._handles.append(m.register_forward_pre_hook(state._stage_hook("decode")))


def _original(module, name: str):
    if isinstance(module, CompiledModule):
        log.info("%s is compiled already (a component shared with another compiled pipeline?): compiling its "
                 "original %s for this pipeline", name, type(module.module).__name__)
    return unwrap(module)


def _wrap_decode_latents(pipe, kind: str, state: PipelineState) -> None:
    original = pipe.decode_latents  # the bound method

    if kind == "svd":
        @functools.wraps(original)
        def decode_latents(latents, num_frames, decode_chunk_size=None):
            # all frames of a video at once: SVD's temporal decoder mixes frames, chunks would change the video
            state._before_decode(latents, num_frames)
            return original(latents, num_frames, num_frames)
    else:
        @functools.wraps(original)
        def decode_latents(latents, decode_chunk_size=16):
            state._before_decode(latents, decode_chunk_size)
            return original(latents, decode_chunk_size)
    pipe.decode_latents = decode_latents
