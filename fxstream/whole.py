"""Whole pipelines: every heavy module of a diffusers video pipeline under one memory budget.

    >>> pipe = fxstream.compile_pipeline(pipe, fxstream.Policy(max_memory="6GiB"))   # same object, compiled
    >>> fxstream.explain_pipeline(pipe, height=576, width=1024, num_frames=25,
    ...                           policy=fxstream.Policy(max_memory="6GiB")).table()

A pipeline runs in three **stages**, one after another:

- ``encode``: SVD's CLIP image encoder, then its VAE encoder on the conditioning image (in float32 when the VAE is
  float16 and ``force_upcast`` is set, as the pipeline does); AnimateDiff's text encoder (once per prompt, and
  once more for the negative prompt under classifier-free guidance);
- ``denoise``: the UNet, once per denoising step (classifier-free guidance doubles its batch);
- ``decode``: the VAE decoder, chunk by chunk, then ``decode_latents`` concatenates the chunks' frames and casts
  them to float32.

The budget (``Policy.max_memory``, weights included) applies to each stage: the weights resident during it (its
own modules', and those of the modules it does not use unless they are offloaded), the tensors the pipeline
holds across the call (the module's inputs; while decoding, the frames of earlier chunks) and the module's
planned activations. :func:`compile_pipeline` compiles the UNet and the VAE decoder (halo slicing along height:
:class:`~fxstream.Policy` ``halo``) each with ``max_memory = budget - the other weights resident - what the
pipeline holds``. Modules a stage does not use stay where they are while that budget can be met with them
resident at no more than 1.5x the stage's FLOPs (``AUTO_OFFLOAD_COMPUTE``: the halo passes a tight decoder budget
costs), and move to the CPU (plain ``.to()`` calls, from forward pre-hooks) when it cannot or when moving them
plans less compute (``offload=`` changes the rule); on a pipeline that runs on the CPU nothing moves and the decisions are only recorded (``pipe.fxstream``).
The accelerator is where the pipeline's modules are, or ``compile_pipeline(..., device="cuda")`` for a pipeline
left on the CPU whose weights together exceed the budget.

Exact decoding: SVD's temporal decoder mixes frames, so decoding in chunks of ``decode_chunk_size < num_frames``
frames changes the video. A compiled SVD pipeline always decodes ``num_frames`` frames at once (its
``decode_latents`` is wrapped; the ``decode_chunk_size`` argument is ignored): the frames of the uncompiled
pipeline called with ``decode_chunk_size=num_frames`` (diffusers' default), at the memory the budget allows.
AnimateDiff's VAE decodes every frame on its own, so its chunks (``decode_chunk_size``, default 16) never change
the video and are kept.

Not counted: the pipeline's small tensors besides a module's inputs (latents, scheduler temporaries: a few
latent-sized tensors), and ``postprocess_video`` after ``decode_latents`` (the conversion to the output type).
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace

import torch

from .catalog import PIPELINE_KINDS
from .api import CompiledModule, FallbackWarning
from .entry import Entry
from .policy import check_policy
from .api import compile as compile_module
from .errors import CaptureError, MemoryBudgetError
from .policy import Policy, format_bytes

log = logging.getLogger(__name__)

__all__ = ["compile_pipeline", "explain_pipeline", "PipelineReport", "StageReport", "StepReport", "PipelinePoint",
           "PipelineState", "PipelineBudgetError", "STAGES"]

STAGES = ("encode", "denoise", "decode")
_HOOK_MARK = "_fxstream_stage_hook"  # set on the pre-hooks compile_pipeline registers


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


# -- the pipeline's parts -------------------------------------------------------------------------------------
def pipeline_kind(pipe) -> str:
    """``"svd"`` or ``"animatediff"``; ValueError naming the class and the supported ones otherwise."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_KINDS and cls.__module__.startswith("diffusers"):
            return PIPELINE_KINDS[cls.__name__]
    raise ValueError(
        f"pipe: a {type(pipe).__name__}; whole-pipeline compilation supports diffusers' "
        f"{' and '.join(PIPELINE_KINDS)}. For another pipeline, compile its UNet alone: "
        "pipe.unet = fxstream.compile(pipe.unet, policy)")



def _units(pipe) -> dict:
    """The pipeline's modules by component name (``unet``, ``vae``, ``image_encoder``, ...)."""
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _stage_units(kind: str, units: dict) -> dict:
    """The components each stage runs (the rest may be offloaded during it)."""
    encode = ["image_encoder", "vae"] if kind == "svd" else ["text_encoder"]
    return {"encode": [u for u in encode if u in units], "denoise": ["unet"], "decode": ["vae"]}


def _device_of(module: torch.nn.Module):
    """The device of ``module``'s first parameter or buffer (None: it has none)."""
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return t.device if t is not None else None


def _inner(module):
    return module.module if isinstance(module, CompiledModule) else module


def module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers (floating-point ones counted in ``dtype`` if given)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(t.numel() * (size if size is not None and t.is_floating_point() else t.element_size())
               for t in itertools.chain(module.parameters(), module.buffers()))


def _tensor_bytes(values) -> int:
    """Bytes of the tensors among ``values`` (each distinct tensor once, a view by its own size)."""
    seen, total = set(), 0
    for v in values:
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            total += v.numel() * v.element_size()
    return total


def _needs_upcast(kind: str, vae) -> bool:
    """SVD encodes the conditioning image with its VAE in float32 when the VAE is float16 and force_upcast."""
    return kind == "svd" and module_bytes(vae) > 0 and next(vae.parameters()).dtype == torch.float16 \
        and bool(getattr(vae.config, "force_upcast", False))


def stage_policy(policy: Policy, stage: str) -> Policy:
    """The policy a stage's compiled module gets (before its ``max_memory``): the UNet everything but ``halo``;
    the VAE decoder ``halo``, ``spatial`` (its slices of frames for what halos cannot take) and the runtime
    settings (it has no video axis to slice)."""
    if stage == "denoise":
        return replace(policy, halo=None, max_memory=None)
    return Policy(halo=policy.halo, spatial=policy.spatial, pipeline=policy.pipeline, cpu_workers=policy.cpu_workers,
                  min_region_fraction=policy.min_region_fraction, cache_size=policy.cache_size, verify=policy.verify)


# -- fitting one step into the budget -------------------------------------------------------------------------
AUTO_OFFLOAD_COMPUTE = 1.5  # offload="auto" also tries offloading when the resident fit plans more compute


def _planned_compute(result) -> float:
    """Planned FLOPs of a fitted module over its unsliced ones, from its report's halo regions (1.0 without)."""
    report = getattr(result, "report", None)
    regions = [r for r in getattr(report, "regions", []) if r.dim.startswith("height")]
    ops = sum(r.ops for r in regions)
    return sum(r.compute * r.ops for r in regions) / ops if ops else 1.0


@dataclass
class _Fit:
    result: object
    offload: bool
    max_memory: int  # what the module got: the budget less the other weights resident and what is held
    resident: dict


def _fit(budget: int, stage: str, step: str, own: int, held: int, keep: dict, least: dict, attempt,
         offloaded: bool, sliced: bool, mode: str = "auto", floor=None) -> _Fit:
    """Fit one step of ``stage``: first with every module resident (``keep``: component -> weight bytes), then
    with the ones the stage does not use offloaded (``least``); ``mode`` ``"always"`` / ``"never"`` tries only
    the one. ``attempt(max_memory)`` plans the module with that budget for its own weights (``own``) and
    activations, raising MemoryBudgetError when it cannot. ``floor()``: a lower bound of those activations (a
    try below it is skipped unless it is the last: a failing halo budget search compiles every slicing)."""
    if sum(least.values()) >= sum(keep.values()):
        modes = [True]  # nothing to offload
    elif mode == "never":
        modes = [False]
    else:
        modes = [True] if offloaded or mode == "always" else [False, True]
    last, fits = None, []
    for offload in modes:
        resident = least if offload else keep
        room = budget - (sum(resident.values()) - own) - held
        if offload != modes[-1] and (room <= own or (floor is not None and room - own < floor())):
            continue  # the weights alone, or with the activations' lower bound, do not fit: offloading is needed
        try:
            fits.append(_Fit(attempt(max(room, 1)), offload, room, resident))
        except MemoryBudgetError as e:
            last = e
            continue
        # "auto" keeps the modules resident unless the slicing that fits them recomputes much (halo passes):
        # moving weights costs a copy each way, a decoder planned at 80x its FLOPs costs far more
        if offload == modes[-1] or _planned_compute(fits[-1].result) <= AUTO_OFFLOAD_COMPUTE:
            break
    if fits:
        return min(fits, key=lambda f: _planned_compute(f.result))
    resident = least if modes[-1] else keep  # the last try: the fewest weights this mode allows
    w, lb = sum(resident.values()), last.lower_bound_bytes
    parts = " + ".join(f"{k} {format_bytes(v)}" for k, v in resident.items()) or "none"
    others = "; every module the stage does not use offloaded" if len(keep) > len(resident) else \
        "; offload='never' keeps the modules it does not use" if len(keep) > len(least) else ""
    how = "the lowest any slicing fxstream allows" if sliced else "planned; fxstream does not slice it"
    hint = {"decode": "decode fewer frames at once or a smaller resolution",
            "denoise": "make the video smaller (frames, resolution, batch) or the dtype narrower",
            "encode": "use a smaller batch or a narrower dtype"}[stage]
    raise PipelineBudgetError(
        f"{stage} stage ({step}) cannot meet Policy.max_memory={format_bytes(budget)}: weights resident "
        f"{format_bytes(w)} ({parts}{others}), held by the pipeline {format_bytes(held)}, activations lower bound "
        f"{format_bytes(lb)} ({how}): at least {format_bytes(w + held + lb)} needed. Raise max_memory, or {hint}.",
        stage=stage, module=step, max_memory=budget, weight_bytes=w, held_bytes=held, lower_bound_bytes=lb,
    ) from last


def _fixed(own: int, activations: int):
    """``attempt`` for a step fxstream does not slice: it fits or not."""
    def attempt(max_memory: int):
        if own + activations > max_memory:
            raise MemoryBudgetError("does not fit", max_memory=max_memory, weight_bytes=own,
                                    lower_bound_bytes=activations)
    return attempt


def _decode_tail_bytes(frames_bytes: int, itemsize: int) -> int:
    """``decode_latents`` after the decoder: ``torch.cat`` of the chunks' frames (a copy: both live), then
    ``.float()`` (a float32 copy while the concatenated frames live; no copy if they are float32 already)."""
    return max(2 * frames_bytes, frames_bytes + (frames_bytes * 4 // itemsize if itemsize != 4 else 0))


# -- compile_pipeline ------------------------------------------------------------------------------------------
class _StageModule(CompiledModule):
    """A CompiledModule of one stage of a compiled pipeline: under a budget, each new input signature is
    compiled with ``max_memory`` = the budget less the other weights resident and what the pipeline holds,
    and the stage's offload decision is taken there."""

    def __init__(self, module, policy: Policy, state: PipelineState, stage: str, name: str):
        super().__init__(module, policy)
        self._base_policy = policy
        self._state = state
        self._stage = stage
        self._name = name

    def compiled_entry(self, kwargs: dict, policy: Policy | None = None):
        state = self._state
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
            for m in _units(self._pipe).values():
                d = _device_of(m)
                if d is not None and d.type not in ("cpu", "meta"):
                    self.device = d
                    break
        return self.device

    def _place(self, stage: str) -> None:
        """Move the stage's modules to the accelerator and, if the stage offloads, the others to the CPU."""
        device = self._exec_device()
        if device is None:
            return  # a CPU pipeline: nothing to move
        units = _units(self._pipe)
        where = {k: _device_of(m) for k, m in units.items()}
        for unit, target in planned_moves(where, _stage_units(self.kind, units)[stage], bool(self.offload[stage]),
                                          device):
            units[unit].to(target)
            self.moves.append((stage, unit, str(target)))

    def _bytes_now(self) -> dict:
        return {k: module_bytes(m) for k, m in _units(self._pipe).items()}

    def _least(self, stage: str, now: dict) -> dict:
        used = _stage_units(self.kind, _units(self._pipe))[stage]
        return {k: v for k, v in now.items() if k in used}

    # decisions ------------------------------------------------------------------------------------------------
    def _decide(self, stage: str, fit: _Fit, name: str) -> None:
        self.offload[stage] = bool(self.offload[stage]) or fit.offload
        self.max_memory[name] = fit.max_memory

    def _fit_compiled(self, cm: _StageModule, kwargs: dict):
        now = self._bytes_now()
        held = _tensor_bytes(kwargs.values()) + (self._decode_held if cm._stage == "decode" else 0)

        tried = {}  # budget -> the signature its attempt compiled (the policy is part of it)

        def attempt(max_memory: int):
            tried[max_memory] = replace(cm._base_policy, max_memory=max_memory)
            return cm.compiled_entry(kwargs, tried[max_memory])

        floor = _halo_floor(cm.module, kwargs, cm._base_policy) if cm._stage == "decode" else None
        fit = _fit(self.budget, cm._stage, cm._name, module_bytes(cm.module), held, now,
                   self._least(cm._stage, now), attempt, bool(self.offload[cm._stage]), sliced=True,
                   mode=self.offload_mode, floor=floor)
        # the chosen attempt's policy serves the next calls; the others' compiled graphs are dropped
        chosen = max(fit.max_memory, 1)
        cm.policy = replace(cm._base_policy, max_memory=chosen)
        for budget, policy in tried.items():
            if budget != chosen:
                cm.forget(kwargs, policy)
        cm.compiled_entry(kwargs, cm.policy)  # the chosen attempt's (compiled already): explain() reports it
        self._decide(cm._stage, fit, cm._name)
        self._place(cm._stage)
        return fit.result

    def _encode_hook(self, name: str):
        """Forward pre-hook of an encode-stage module: plan it (once per input signature, on a meta copy),
        decide, place."""
        def hook(module, args, kwargs):
            kw = _as_kwargs(module, args, kwargs)
            key = (name, tuple((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                               for k, v in kw.items()), next(module.parameters()).dtype)
            if key not in self._encode_plans:
                entry = _plan(module, kw, Policy())
                self._encode_plans[key] = entry.report if entry is not None else None
            report = self._encode_plans[key]
            now = self._bytes_now()
            if report is None:  # could not be planned: make the most room
                self._decide("encode", _Fit(None, True, 0, {}), name)
            else:
                fit = _fit(self.budget, "encode", name, 0, _tensor_bytes(kw.values()), now, self._least("encode", now),
                           _fixed(0, report.peak_bytes), bool(self.offload["encode"]), sliced=False,
                           mode=self.offload_mode)
                self._decide("encode", fit, name)
            self._place("encode")
        setattr(hook, _HOOK_MARK, True)
        return hook

    def _stage_hook(self, stage: str):
        def hook(module, args):
            self._place(stage)
        setattr(hook, _HOOK_MARK, True)
        return hook

    def _before_decode(self, latents: torch.Tensor, chunk: int) -> None:
        """Called by the wrapped ``decode_latents``: this pipeline's compiled decoder in place (a VAE shared with
        another compiled pipeline holds the one compiled last), what earlier chunks leave held, the tail's fit,
        placement."""
        pipe = self._pipe
        if self._decoder is not None and pipe.vae.decoder is not self._decoder \
                and _inner(pipe.vae.decoder) is self._decoder.module:
            pipe.vae.decoder = self._decoder
        n = latents.shape[0] * (latents.shape[1] if self.kind == "svd" else latents.shape[2])
        chunk = max(1, min(int(chunk), n))
        vae = _inner(pipe.vae)
        dtype = next(vae.parameters()).dtype
        per_frame = vae.config.out_channels * (latents.shape[-2] * pipe.vae_scale_factor) * \
            (latents.shape[-1] * pipe.vae_scale_factor) * dtype.itemsize
        self._decode_held = (math.ceil(n / chunk) - 1) * chunk * per_frame
        if self.budget is not None:
            now = self._bytes_now()
            fit = _fit(self.budget, "decode", "decode_latents", 0, 0, now, self._least("decode", now),
                       _fixed(0, _decode_tail_bytes(n * per_frame, dtype.itemsize)), bool(self.offload["decode"]),
                       sliced=False, mode=self.offload_mode)
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


def _check_offload(offload, policy: Policy) -> str:
    if offload not in ("auto", "always", "never"):
        raise ValueError(f"offload: expected 'auto' (move the modules a stage does not use off the accelerator "
                         f"when the budget needs it or it saves recomputation), 'always' or 'never', got {offload!r}")
    if offload != "auto" and policy.max_memory is None:
        raise ValueError(f"offload={offload!r}: only used with a budget; write "
                         "policy=fxstream.Policy(max_memory='6GiB')")
    return offload


def compile_pipeline(pipe, policy: Policy | None = None, *, offload: str = "auto", device=None):
    """Compile every heavy module of a ``StableVideoDiffusionPipeline`` or ``AnimateDiffPipeline`` in place and
    return the same pipeline, usable as before.

    ``pipe.unet`` and ``pipe.vae.decoder`` become compiled modules (:class:`~fxstream.CompiledModule`; the UNet
    gets ``policy`` without ``halo``, the decoder ``halo`` and the runtime settings). With
    ``policy.max_memory`` the budget applies to each stage (see the module docstring): every compiled module
    gets ``max_memory`` = the budget less the other weights resident during its stage and what the pipeline
    holds, and the modules a stage does not use are moved to the CPU during it when the budget needs it or
    when that lets the stage recompute less (``offload="auto"``: see the module docstring).
    Decisions are taken at each stage's first call with new input shapes and recorded in ``pipe.fxstream``
    (:class:`PipelineState`); a stage that cannot fit raises :class:`PipelineBudgetError` (a
    MemoryBudgetError) naming it, before anything of that stage runs.

    ``offload="always"`` moves them off in every stage (the most room for activations: the fewest slices, at the
    cost of moving weights at every stage), ``"never"`` keeps everything on the accelerator.

    The accelerator is where the pipeline's modules are (``pipe.to("cuda")`` first), or ``device`` (with a
    budget): a pipeline whose weights together exceed the budget can stay on the CPU, each stage's modules are
    moved to ``device`` when it starts (the encode stage's ones at once, so that diffusers' execution device is
    ``device``).

    SVD's ``decode_latents`` is wrapped to decode all ``num_frames`` frames of a video at once (exact; see the
    module docstring).

    A UNet or VAE decoder compiled already (a pipeline built from another compiled pipeline's components) is
    compiled again from its original for this pipeline; a VAE shared by two compiled pipelines holds the decoder
    of the one decoding (each pipeline's ``decode_latents`` puts its own in place).
    """
    kind = pipeline_kind(pipe)
    policy = check_policy(policy)
    offload = _check_offload(offload, policy)
    units = _units(pipe)
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
    if device is not None:
        device = normal_device(device)
        if device.type in ("cpu", "meta"):
            raise ValueError(f"device: expected an accelerator such as 'cuda', got {str(device)!r}; a pipeline on "
                             "the CPU needs no device")
        if policy.max_memory is None:
            raise ValueError("device: only used with a budget (the stages' modules are moved there as the budget "
                             "allows); without one, move the pipeline there: pipe.to('cuda')")
    state = PipelineState(pipe, kind, policy, offload)
    state.device = device
    # a component compiled already (shared with a compiled pipeline, or compiled by hand): its original, compiled
    # for this pipeline; the other pipeline keeps its own compiled module (see PipelineState._before_decode)
    unet, decoder = _original(pipe.unet, "pipe.unet"), _original(pipe.vae.decoder, "pipe.vae.decoder")
    compile_module(unet, stage_policy(policy, "denoise"))  # the same checks fxstream.compile makes
    pipe.unet = _StageModule(unet, stage_policy(policy, "denoise"), state, "denoise", "unet")
    pipe.vae.decoder = state._decoder = _StageModule(decoder, stage_policy(policy, "decode"), state, "decode",
                                                     "vae.decoder")
    _wrap_decode_latents(pipe, kind, state)
    if policy.max_memory is not None:
        encode = [("image_encoder", pipe.image_encoder), ("vae.encoder", pipe.vae.encoder)] if kind == "svd" else \
            [("text_encoder", getattr(pipe, "text_encoder", None))]
        for name, m in encode:
            if isinstance(m, torch.nn.Module):
                state._handles.append(m.register_forward_pre_hook(state._encode_hook(name), with_kwargs=True))
        state._handles.append(pipe.unet.register_forward_pre_hook(state._stage_hook("denoise")))
        for m in (pipe.vae.decoder, getattr(pipe.vae, "post_quant_conv", None)):
            if isinstance(m, torch.nn.Module):
                state._handles.append(m.register_forward_pre_hook(state._stage_hook("decode")))
    pipe.fxstream = state
    if device is not None:
        state._place("encode")  # diffusers creates its tensors on the first non-CPU module's device
    return pipe


def _original(module, name: str):
    if isinstance(module, CompiledModule):
        log.info("%s is compiled already (a component shared with another compiled pipeline?): compiling its "
                 "original %s for this pipeline", name, type(module.module).__name__)
    return _inner(module)


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


# -- planning without compute ----------------------------------------------------------------------------------
def _meta_clone(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``module`` on the meta device (floating-point weights in ``dtype`` if given), without fxstream's stage
    hooks; ``module`` itself when it needs no change."""
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    hooked = any(getattr(h, _HOOK_MARK, False) for m in module.modules() for h in m._forward_pre_hooks.values())
    if not hooked and all(t.device.type == "meta" and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
                          for t in tensors):
        return module
    memo = {}
    for t in tensors:
        d = dtype if dtype is not None and t.is_floating_point() else t.dtype
        new = torch.empty(t.shape, dtype=d, device="meta")
        memo[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) \
            else new
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():
        for k in [k for k, h in m._forward_pre_hooks.items() if getattr(h, _HOOK_MARK, False)]:
            del m._forward_pre_hooks[k]
            m._forward_pre_hooks_with_kwargs.pop(k, None)
    return clone


def _on_meta(kwargs: dict) -> dict:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
            for k, v in kwargs.items()}


def _plan(module, kwargs: dict, policy: Policy, dtype: torch.dtype | None = None):
    """fxstream's plan (``fxstream.entry.Entry``: the captured program and its report) of ``module`` on these inputs, on a
    meta copy (nothing computed); None with a warning where torch.export cannot capture it."""
    try:
        return Entry(_meta_clone(_inner(module), dtype), _on_meta(kwargs), policy)
    except CaptureError as e:
        warnings.warn(f"fxstream: cannot plan {type(_inner(module)).__name__}: {e}", FallbackWarning, stacklevel=3)
        return None


@dataclass(frozen=True)
class PipelinePoint:
    """One point of a pipeline's memory timeline: bytes on the accelerator after a node of a stage's module
    (weights resident + held + activations live), and the most while it ran. ``x``: stage ``i`` spans
    ``[i, i + 1)``, shared among its steps by their node counts, each step's nodes spread evenly over its share."""

    stage: str
    step: str
    node: str
    module: str
    x: float
    live_bytes: int
    peak_bytes: int


@dataclass
class StepReport:
    """One module run within a stage (or ``decode_latents``' concatenation and float32 copy), original and
    planned. Bytes: ``resident`` (component -> weights on the accelerator while it runs), ``held_bytes`` (what the
    pipeline holds across the call), ``activation_bytes`` (the module's planned peak, its output included)."""

    stage: str
    name: str
    runs: str
    resident: dict
    original_resident: dict
    held_bytes: int
    original_held_bytes: int
    activation_bytes: int
    original_activation_bytes: int
    _lower_bound: object  # bytes, or a callable computing them on first access (a compile)
    least_resident_bytes: int  # the stage's own weights: everything else offloaded
    sliced: bool  # compiled by fxstream (False: planned, run as diffusers runs it)
    max_memory: int | None = None  # the budget the compiled module got
    report: object = field(default=None, repr=False)  # fxstream.Report of the module (compiled)
    original_report: object = field(default=None, repr=False)  # fxstream.Report of its original call

    @property
    def slicing(self) -> str:
        """The compiled module's slicing in a few words (regions, most slices; a halo region's passes and planned
        compute, which recomputes halo rows and GroupNorm statistics)."""
        if self.report is None or not self.sliced:
            return "-"
        regions = self.report.regions
        if not regions:
            return "none"
        text = f"{len(regions)} region{'s' if len(regions) > 1 else ''}, up to {max(r.slices for r in regions)} slices"
        halo = [r for r in regions if r.dim.endswith("(halo)")]
        if halo:
            worst = max(halo, key=lambda r: r.compute)
            text += f"; halo up to {worst.passes} passes, {worst.compute:.1f}x compute"
        return text

    @property
    def lower_bound_activation_bytes(self) -> int:
        """The lowest activations any slicing fxstream allows plans (computed on first access where the
        budget did not need it: a compile at the finest slicing)."""
        if callable(self._lower_bound):
            self._lower_bound = self._lower_bound()
        return self._lower_bound

    @property
    def weight_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.held_bytes + self.activation_bytes

    @property
    def original_peak_bytes(self) -> int:
        return sum(self.original_resident.values()) + self.original_held_bytes + self.original_activation_bytes

    @property
    def lower_bound_bytes(self) -> int:
        return self.least_resident_bytes + self.held_bytes + self.lower_bound_activation_bytes


@dataclass
class StageReport:
    name: str
    steps: list
    offload: bool  # the modules this stage does not use are offloaded during it
    offloaded: list  # their names

    @property
    def modules(self) -> list:
        return [s.name for s in self.steps if s.report is not None or not s.sliced]

    def _most(self, attr: str) -> int:
        return max((getattr(s, attr) for s in self.steps), default=0)

    weight_bytes = property(lambda self: self._most("weight_bytes"))
    peak_bytes = property(lambda self: self._most("peak_bytes"))
    original_peak_bytes = property(lambda self: self._most("original_peak_bytes"))
    lower_bound_bytes = property(lambda self: self._most("lower_bound_bytes"))


@dataclass
class PipelineReport:
    """What :func:`explain_pipeline` says: per stage, the weights resident, original and planned peaks (weights
    included), the lower bound; and a timeline across the stages (``timeline["original"]``,
    ``timeline["compiled"]``: lists of :class:`PipelinePoint`)."""

    pipeline: str
    height: int
    width: int
    num_frames: int
    batch: int
    guidance: bool
    dtype: str
    policy: Policy
    stages: list
    timeline: dict
    seconds: float = 0.0

    @property
    def budget(self) -> int | None:
        return self.policy.max_memory

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    @property
    def original_peak_bytes(self) -> int:
        return max(s.original_peak_bytes for s in self.stages)

    @property
    def lower_bound_bytes(self) -> int:
        return max(s.lower_bound_bytes for s in self.stages)

    def stage(self, name: str) -> StageReport:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"stage: expected one of {[s.name for s in self.stages]}, got {name!r}")

    def describe(self) -> str:
        return (f"{self.pipeline}: {self.height}x{self.width} px, {self.num_frames} frames, batch {self.batch}"
                f"{' (x2 classifier-free guidance)' if self.guidance else ''}, {self.dtype}, {self.policy.describe()}")

    def table(self) -> str:
        from tabulate import tabulate

        def b(n):
            return format_bytes(n) if n is not None else "-"
        rows = []
        for st in self.stages:
            if not st.steps:
                rows.append((st.name, "(nothing runs)", "", "", "", "", "", "", "", "", ""))
            for s in st.steps:
                rows.append((st.name, s.name + ("" if s.sliced else " *"), s.runs,
                             b(s.weight_bytes) + f" ({', '.join(s.resident) or '-'})",
                             ", ".join(st.offloaded) if st.offload else "-", b(s.held_bytes),
                             b(s.original_peak_bytes), b(s.peak_bytes), b(s.lower_bound_bytes), b(s.max_memory),
                             s.slicing))
        head = tabulate(rows, headers=["stage", "module", "runs", "weights resident", "offloaded", "held",
                                       "original peak", "planned peak", "lower bound", "max_memory given",
                                       "slicing"])
        budget = f", budget {format_bytes(self.budget)}" if self.budget is not None else ""
        fits = "" if self.budget is None else (" (fits)" if self.peak_bytes <= self.budget else " (over budget)")
        return (f"{self.describe()}\n{head}\n* planned as diffusers runs it (fxstream does not slice it)\n"
                f"pipeline peak: original {format_bytes(self.original_peak_bytes)}, planned "
                f"{format_bytes(self.peak_bytes)}{budget}{fits}; lower bound {format_bytes(self.lower_bound_bytes)}")

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict:
        return {
            "pipeline": self.pipeline, "height": self.height, "width": self.width, "num_frames": self.num_frames,
            "batch": self.batch, "guidance": self.guidance, "dtype": self.dtype, "policy": self.policy.describe(),
            "budget_bytes": self.budget, "peak_bytes": self.peak_bytes,
            "original_peak_bytes": self.original_peak_bytes, "lower_bound_bytes": self.lower_bound_bytes,
            "seconds": round(self.seconds, 2),
            "stages": [{
                "name": st.name, "offload": st.offload, "offloaded": st.offloaded, "peak_bytes": st.peak_bytes,
                "original_peak_bytes": st.original_peak_bytes, "lower_bound_bytes": st.lower_bound_bytes,
                "weight_bytes": st.weight_bytes,
                "steps": [{"module": s.name, "runs": s.runs, "sliced": s.sliced, "resident": s.resident,
                           "weight_bytes": s.weight_bytes, "held_bytes": s.held_bytes,
                           "activation_bytes": s.activation_bytes,
                           "original_activation_bytes": s.original_activation_bytes,
                           "lower_bound_activation_bytes": s.lower_bound_activation_bytes,
                           "peak_bytes": s.peak_bytes, "original_peak_bytes": s.original_peak_bytes,
                           "lower_bound_bytes": s.lower_bound_bytes, "max_memory": s.max_memory,
                           "regions": len(s.report.regions) if s.report is not None else 0,
                           "slicing": s.slicing}
                          for s in st.steps],
            } for st in self.stages],
        }

    def plot(self, path, dpi: int = 130) -> None:
        """Draw original against planned bytes on the accelerator across the stages (weights included) into a PNG
        at ``path``, with the budget line and the stage boundaries."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        top = max([self.original_peak_bytes, self.peak_bytes] + ([self.budget] if self.budget else []))
        unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
        fig = Figure(figsize=(12, 5), layout="constrained")
        ax = fig.add_subplot()
        style = {"original": ("#7f7f7f", 0.25), "compiled": ("#1f77b4", 0.35)}
        for name, points in self.timeline.items():
            if not points:
                continue
            colour, alpha = style[name]
            x = [p.x for p in points] + [len(self.stages)]
            live = [p.live_bytes / scale for p in points] + [points[-1].live_bytes / scale]
            during = [p.peak_bytes / scale for p in points] + [points[-1].peak_bytes / scale]
            peak = self.original_peak_bytes if name == "original" else self.peak_bytes
            ax.fill_between(x, live, step="post", color=colour, alpha=alpha, lw=0)
            ax.step(x, during, where="post", color=colour, lw=0.9,
                    label=f"{'original (diffusers defaults)' if name == 'original' else 'planned'}: peak "
                          f"{format_bytes(peak)}")
        if self.budget is not None:
            ax.axhline(self.budget / scale, color="#d62728", ls="--", lw=1.0,
                       label=f"budget {format_bytes(self.budget)}")
        for i, st in enumerate(self.stages):
            if i:
                ax.axvline(i, color="#bbbbbb", lw=0.8, ls="--", zorder=0)
            ax.text(i + 0.5, 1.0, f"{st.name}: {', '.join(s.name for s in st.steps) or 'nothing'}",
                    transform=ax.get_xaxis_transform(), fontsize=8, va="bottom", ha="center", color="#555555")
        ax.set_xlim(0, len(self.stages))
        ax.set_ylim(0, top / scale * 1.15)
        ax.set_xticks([])
        ax.set_xlabel("stages in order (each stage's module nodes spread over its span; denoise: one step)")
        ax.set_ylabel(f"planned bytes on the accelerator ({unit}), weights included")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(axis="y", lw=0.3, alpha=0.5)
        fig.suptitle(self.describe(), fontsize=9)
        fig.savefig(path, dpi=dpi)


def _positive(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1 ({what}), got {value!r}")
    return value


def _call_default(pipe, name: str):
    return inspect.signature(type(pipe).__call__).parameters[name].default


def _required(entry, name: str):
    if entry is None:
        raise CaptureError(f"{name}: torch.export could not capture it, so it cannot be planned (see the warning)")
    return entry


class _Planner:
    """Plans the steps of the stages in order under one budget (the same decisions compile_pipeline takes)."""

    def __init__(self, kind: str, units: dict, policy: Policy, offload: str = "auto"):
        self.kind, self.policy, self.budget, self.mode = kind, policy, policy.max_memory, offload
        self.used = _stage_units(kind, units)
        self.bytes = {k: module_bytes(m) for k, m in units.items()}
        self.offload = {s: False for s in STAGES}
        self.steps = {s: [] for s in STAGES}

    def add(self, stage: str, name: str, runs: str, module, kwargs: dict, *, sliced: bool, held: int = 0,
            original_kwargs: dict | None = None, original_held: int | None = None, upcast: dict | None = None,
            dtype: torch.dtype | None = None, lower_bound=None, tail: int | None = None, floor=None) -> StepReport:
        """Plan one step. ``held``: bytes the pipeline holds besides the module's inputs; ``upcast``: component ->
        weight bytes during this step (SVD's VAE in float32, planned in ``dtype``); ``tail``: the activations of
        a step that runs no module; ``lower_bound(entry)``: its activations' lower bound if not the report's;
        ``floor()``: the same, computed before planning (see :func:`_fit`)."""
        now = dict(self.bytes, **(upcast or {}))
        least = {k: v for k, v in now.items() if k in self.used[stage]}
        held_in = held + _tensor_bytes(kwargs.values())
        o_held = held_in if original_held is None else \
            original_held + _tensor_bytes((original_kwargs or kwargs).values())
        own = module_bytes(_inner(module)) if sliced else 0
        if tail is not None:
            attempt = _fixed(0, tail)
        elif sliced:
            pol = stage_policy(self.policy, stage)

            def attempt(max_memory):
                return _required(_plan(module, kwargs, replace(pol, max_memory=max_memory)), name)
        else:
            fixed = _required(_plan(module, kwargs, Policy(), dtype), name)
            attempt = _fixed(0, fixed.report.peak_bytes)
        entry, max_memory = None, None
        if self.budget is not None:
            fit = _fit(self.budget, stage, name, own, held_in, now, least, attempt, self.offload[stage], sliced,
                       self.mode, floor)
            self.offload[stage] = self.offload[stage] or fit.offload
            if sliced and tail is None:
                entry, max_memory = fit.result, fit.max_memory
        elif sliced and tail is None:
            entry = _required(_plan(module, kwargs, stage_policy(self.policy, stage)), name)
        if tail is None and not sliced:
            entry = fixed
        if tail is not None:
            act = o_act = lb = tail
            report = original = None
        else:
            report = original = entry.report
            if original_kwargs is not None:
                original = _required(_plan(module, original_kwargs, Policy(), dtype), name).report
            act, o_act = report.peak_bytes, original.original_peak_bytes
            lb = functools.partial(lower_bound, entry) if lower_bound is not None else \
                (functools.partial(getattr, report, "lower_bound_bytes") if sliced else report.peak_bytes)
        resident = least if self.offload[stage] else now
        step = StepReport(stage, name, runs, dict(resident), dict(now), held_in, o_held, act, o_act, lb,
                          sum(least.values()), sliced and tail is None, max_memory, report, original)
        self.steps[stage].append(step)
        return step

    def stages(self) -> list:
        out = []
        for s in STAGES:
            # a later step may have made the stage offload: earlier steps then ran with the others offloaded too
            for st in self.steps[s]:
                if self.offload[s]:
                    st.resident = {k: v for k, v in st.resident.items() if k in self.used[s]}
            out.append(StageReport(s, self.steps[s], self.offload[s],
                                   [k for k in self.bytes if k not in self.used[s] and self.bytes[k]]))
        return out


def explain_pipeline(pipe, *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                     policy: Policy | None = None, batch: int = 1, guidance: bool = True,
                     decode_chunk_size: int | None = None, offload: str = "auto") -> PipelineReport:
    """Plan a whole ``StableVideoDiffusionPipeline`` or ``AnimateDiffPipeline`` run under ``policy`` without
    computing anything (a pipeline built on the meta device works: :func:`fxstream.pipelines.build_pipeline`).

    Lower bounds are computed on first access (``lower_bound_bytes``, ``table()``, ``to_json()``) where the budget
    did not need them: each is a compile at the finest slicing.

    ``height``/``width``/``num_frames``: the video (default: the pipeline's own defaults); ``batch``: videos
    generated at once (SVD: conditioning images; AnimateDiff: prompts); ``guidance``: classifier-free guidance
    (on by default in both pipelines: it doubles the UNet's batch); ``decode_chunk_size``: what the *original*
    pipeline is called with (default: diffusers' default, SVD ``num_frames``, AnimateDiff 16); the compiled SVD
    pipeline decodes ``num_frames`` at once, the compiled AnimateDiff pipeline uses the same chunks.

    Each stage is planned with the same decisions :func:`compile_pipeline` takes (``offload`` as there); a stage that cannot fit the
    budget raises :class:`PipelineBudgetError` naming it. The original figures are the uncompiled pipeline's
    with every module resident.
    """
    start = time.perf_counter()
    kind = pipeline_kind(pipe)
    policy = check_policy(policy)
    offload = _check_offload(offload, policy)
    units = _units(pipe)
    for name in ("unet", "vae"):
        if name not in units:
            raise ValueError(f"pipe.{name}: expected a module, got {getattr(pipe, name, None)!r}")
    unet, vae = _inner(pipe.unet), pipe.vae
    sf = pipe.vae_scale_factor
    if height is None:
        height = _call_default(pipe, "height") or unet.config.sample_size * sf
    if width is None:
        width = _call_default(pipe, "width") or unet.config.sample_size * sf
    for name, v in (("height", height), ("width", width)):
        _positive(name, v, "pixels")
        if v % sf:
            raise ValueError(f"{name}: expected a multiple of {sf} pixels (the VAE's scale factor), got {v}; "
                             f"try {max(sf, v // sf * sf)}")
    if num_frames is None:
        num_frames = _call_default(pipe, "num_frames") or unet.config.num_frames
    _positive("num_frames", num_frames, "frames per video")
    _positive("batch", batch, "videos generated at once")
    if not isinstance(guidance, bool):
        raise ValueError(f"guidance: expected True or False (classifier-free guidance), got {guidance!r}")
    if decode_chunk_size is None:
        decode_chunk_size = _call_default(pipe, "decode_chunk_size") or num_frames
    _positive("decode_chunk_size", decode_chunk_size, "frames decoded at once")
    h, w, f = height // sf, width // sf, num_frames
    b2 = batch * (2 if guidance else 1)
    p_unet = next(unet.parameters())
    dt, dev = p_unet.dtype, "meta"

    def empty(*shape, dtype=dt):
        return torch.empty(shape, dtype=dtype, device=dev)

    plan = _Planner(kind, units, policy, offload)
    # encode ---------------------------------------------------------------------------------------------------
    if kind == "svd":
        enc = pipe.image_encoder
        size = enc.config.image_size
        plan.add("encode", "image_encoder", f"once ({batch} image{'s' if batch > 1 else ''})", enc,
                 {"pixel_values": empty(batch, 3, size, size, dtype=next(enc.parameters()).dtype)}, sliced=False)
        upcast = _needs_upcast(kind, vae)
        vdt = torch.float32 if upcast else next(vae.parameters()).dtype
        plan.add("encode", "vae.encoder", "once" + (" (float32: force_upcast)" if upcast else ""), vae.encoder,
                 {"sample": empty(batch, 3, height, width, dtype=vdt)}, sliced=False, dtype=vdt,
                 upcast={"vae": module_bytes(vae, torch.float32)} if upcast else None)
    elif getattr(pipe, "text_encoder", None) is not None:
        te = pipe.text_encoder
        tokens = te.config.max_position_embeddings
        out = batch * tokens * te.config.hidden_size * next(te.parameters()).dtype.itemsize
        plan.add("encode", "text_encoder", "once per prompt" + (", once per negative prompt" if guidance else ""),
                 te, {"input_ids": empty(batch, tokens, dtype=torch.int64)}, sliced=False,
                 held=out if guidance else 0)  # the prompt's embeddings, held while the negative prompt's run
    # denoise --------------------------------------------------------------------------------------------------
    cross = unet.config.cross_attention_dim
    if kind == "svd":
        kw = {"sample": empty(b2, f, unet.config.in_channels, h, w), "timestep": empty(dtype=torch.float32),
              "encoder_hidden_states": empty(b2, 1, cross), "added_time_ids": empty(b2, 3), "return_dict": False}
    else:
        te = getattr(pipe, "text_encoder", None)
        tokens = te.config.max_position_embeddings if te is not None else 77
        kw = {"sample": empty(b2, unet.config.in_channels, f, h, w), "timestep": empty(dtype=torch.int64),
              "encoder_hidden_states": empty(b2 * f, tokens, cross), "return_dict": False}
    plan.add("denoise", "unet", "each denoising step", unet, kw, sliced=True)
    # decode ---------------------------------------------------------------------------------------------------
    vdt = next(vae.parameters()).dtype
    lat = vae.config.latent_channels
    frames_total = batch * f
    per_frame = vae.config.out_channels * height * width * vdt.itemsize
    chunk = f if kind == "svd" else min(decode_chunk_size, frames_total)  # the compiled pipeline's chunks
    o_chunk = min(decode_chunk_size, frames_total)

    def decoder_kwargs(c):
        if kind == "svd":
            return {"sample": empty(c, lat, h, w, dtype=vdt), "image_only_indicator": empty(1, c, dtype=vdt),
                    "num_frames": c}
        return {"sample": empty(c, lat, h, w, dtype=vdt)}

    n_chunks, o_chunks = math.ceil(frames_total / chunk), math.ceil(frames_total / o_chunk)
    tail = _decode_tail_bytes(frames_total * per_frame, vdt.itemsize)
    plan.add("decode", "decode_latents", "once (cat + float32 copy)", None, {}, sliced=False, tail=tail)
    dec_policy = stage_policy(policy, "decode")
    floor = _halo_floor(vae.decoder, decoder_kwargs(chunk), dec_policy)
    plan.add("decode", "vae.decoder", f"{n_chunks} chunk{'s' if n_chunks > 1 else ''} of {chunk} frames", vae.decoder,
             decoder_kwargs(chunk), sliced=True, held=(n_chunks - 1) * chunk * per_frame,
             original_kwargs=decoder_kwargs(o_chunk) if o_chunk != chunk else None,
             original_held=(o_chunks - 1) * o_chunk * per_frame,
             lower_bound=lambda entry: floor.value if floor.value is not None else _decoder_floor(entry, dec_policy),
             floor=floor)
    # the decode tail runs after the decoder: show it last
    steps = plan.steps["decode"]
    steps.append(steps.pop(0))
    stages = plan.stages()
    report = PipelineReport(type(pipe).__name__, height, width, num_frames, batch, guidance,
                            str(dt).replace("torch.", ""), policy, stages, {}, 0.0)
    report.timeline = _timeline(stages)
    report.seconds = time.perf_counter() - start
    return report


class _halo_floor:
    """The VAE decoder's halo floor on these inputs (:func:`fxstream.budget.halo_lower_bound`), computed on the
    first call (a capture and one compile at the most slices) and kept."""

    def __init__(self, module, kwargs: dict, policy: Policy):
        self.module, self.kwargs, self.policy = module, kwargs, replace(policy, max_memory=None)
        self.value = None

    def __call__(self) -> int:
        if self.value is None:
            from .budget import halo_lower_bound
            entry = _required(_plan(self.module, self.kwargs, Policy()), "vae.decoder")
            self.value = halo_lower_bound(entry.program.graph_module, self.policy).peak_bytes
        return self.value


def _decoder_floor(entry, policy: Policy) -> int:
    """The decoder's lowest activations: halo slicing at the most slices ``policy.halo`` allows (64 if None),
    nothing kept whole (:func:`fxstream.budget.halo_lower_bound`)."""
    from .budget import halo_lower_bound
    if policy.halo is not None or entry.report.policy.max_memory is not None:
        return entry.report.lower_bound_bytes  # fxstream.explain's bound is the halo floor then
    return halo_lower_bound(entry.program.graph_module, policy).peak_bytes


def _timeline(stages: list) -> dict:
    """Both series across the stages: stage ``i`` spans ``[i, i + 1)``, shared among its steps in proportion to
    their nodes (a step that runs no module gets a tenth of the stage's nodes), each step's nodes spread evenly
    over its share."""
    out = {"original": [], "compiled": []}
    for i, st in enumerate(stages):
        sizes = [len(s.original_report.timeline["original"]) if s.original_report is not None else 0
                 for s in st.steps]
        sizes = [n or max(1, sum(sizes) // 10) for n in sizes]
        x0 = float(i)
        for s, n in zip(st.steps, sizes):
            width = n / sum(sizes)
            for which in ("original", "compiled"):
                if which == "original":
                    base = sum(s.original_resident.values()) + s.original_held_bytes
                    rep, act = s.original_report, s.original_activation_bytes
                else:
                    base = s.weight_bytes + s.held_bytes
                    rep, act = s.report, s.activation_bytes
                pts = rep.timeline[which] if rep is not None else []
                series = out[which]
                series.append(PipelinePoint(st.name, s.name, "(enter)", "", x0, base, base))
                if not pts:  # a step that runs no module: one point
                    series.append(PipelinePoint(st.name, s.name, s.name, "", x0 + width / 2, base + act, base + act))
                    continue
                for k, t in enumerate(pts):
                    series.append(PipelinePoint(st.name, s.name, t.node, t.module,
                                                x0 + width * (k + 1) / (len(pts) + 1),
                                                base + t.live_bytes, base + t.peak_bytes))
            x0 += width
    return out
