"""Planning a pipeline without computing anything: :func:`explain_pipeline` builds each stage's inputs (SVD's
or AnimateDiff's), plans its modules on meta copies and takes the decisions :func:`compile_pipeline` takes."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import math
import time
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch

from ..api import FallbackWarning
from ..distributed import compile_policy
from ..entry import Entry
from ..errors import CaptureError
from ..policy import Policy, check_policy
from .fitting import decode_tail_bytes, fit_step, fixed_attempt
from .parts import (HOOK_MARK, STAGES, check_offload, module_bytes, needs_upcast, pipeline_kind, pipeline_units,
                    stage_policy, stage_units, tensor_bytes, unwrap)
from .reports import PipelineReport, StageReport, StepReport, stages_timeline

__all__ = ["explain_pipeline", "plan_on_meta", "meta_clone", "HaloFloor"]


# -- plans on meta copies ---------------------------------------------------------------------------------------
def meta_clone(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``module`` on the meta device (floating-point weights in ``dtype`` if given), without fxstream's stage
    hooks; ``module`` itself when it needs no change."""
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    hooked = any(getattr(h, HOOK_MARK, False) for m in module.modules() for h in m._forward_pre_hooks.values())
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
        for k in [k for k, h in m._forward_pre_hooks.items() if getattr(h, HOOK_MARK, False)]:
            del m._forward_pre_hooks[k]
            m._forward_pre_hooks_with_kwargs.pop(k, None)
    return clone


def _on_meta(kwargs: dict) -> dict:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
            for k, v in kwargs.items()}


_CAPTURES: ContextVar = ContextVar("fxstream_planning_captures", default=None)


@contextlib.contextmanager
def shared_captures():
    """Within it, :func:`plan_on_meta` makes one meta copy and one capture of each module, dtype and input
    signature, and every plan of them (a budget's attempts, the decoder's floor) is compiled from that capture.
    Opened around one planning call (``explain_pipeline``): nothing is kept after it, so a module changed between
    two calls is captured again."""
    token = _CAPTURES.set({})
    try:
        yield
    finally:
        _CAPTURES.reset(token)


def _input_key(kwargs: dict) -> tuple:
    return tuple((k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)) for k, v in kwargs.items())


def plan_on_meta(module, kwargs: dict, policy: Policy, dtype: torch.dtype | None = None):
    """fxstream's plan (``fxstream.entry.Entry``: the captured program and its report) of ``module`` on these inputs, on a
    meta copy (nothing computed); None with a warning where torch.export cannot capture it. Inside
    :func:`shared_captures` the copy and the capture are made once."""
    shared, key = _CAPTURES.get(), (id(unwrap(module)), dtype, _input_key(kwargs))
    if policy.distributed is not None:  # planned as spread regions compile, without a process group
        policy = compile_policy(policy)
    try:
        if shared is not None and key in shared:
            _, clone, kw, program = shared[key]
            return Entry(clone, kw, policy, program=program)
        clone, kw = meta_clone(unwrap(module), dtype), _on_meta(kwargs)
        entry = Entry(clone, kw, policy)
        if shared is not None:  # the module is kept too: its id stays its own while the scope lasts
            shared[key] = (unwrap(module), clone, kw, entry.program)
        return entry
    except CaptureError as e:
        warnings.warn(f"fxstream: cannot plan {type(unwrap(module)).__name__}: {e}", FallbackWarning, stacklevel=3)
        return None


def _required(entry, name: str):
    if entry is None:
        raise CaptureError(f"{name}: torch.export could not capture it, so it cannot be planned (see the warning)")
    return entry


class HaloFloor:
    """The VAE decoder's halo floor on these inputs (:func:`fxstream.budget.halo_lower_bound`), computed on the
    first call (a capture and one compile at the most slices) and kept."""

    def __init__(self, module, kwargs: dict, policy: Policy):
        self.module, self.kwargs, self.policy = module, kwargs, replace(policy, max_memory=None)
        self.value = None

    def __call__(self) -> int:
        if self.value is None:
            from ..budget import halo_lower_bound
            entry = _required(plan_on_meta(self.module, self.kwargs, Policy()), "vae.decoder")
            self.value = halo_lower_bound(entry.program.graph_module, self.policy).peak_bytes
        return self.value


def _decoder_floor(entry, policy: Policy) -> int:
    """The decoder's lowest activations: halo slicing at the most slices ``policy.halo`` allows (64 if None),
    nothing kept whole (:func:`fxstream.budget.halo_lower_bound`)."""
    from ..budget import halo_lower_bound
    if policy.halo is not None or entry.report.policy.max_memory is not None:
        return entry.report.lower_bound_bytes  # fxstream.explain's bound is the halo floor then
    return halo_lower_bound(entry.program.graph_module, policy).peak_bytes


# -- the planner --------------------------------------------------------------------------------------------------
class _Planner:
    """Plans the steps of the stages in order under one budget (the same decisions compile_pipeline takes)."""

    def __init__(self, kind: str, units: dict, policy: Policy, offload: str = "auto"):
        self.kind, self.policy, self.budget, self.mode = kind, policy, policy.max_memory, offload
        self.used = stage_units(kind, units)
        self.bytes = {k: module_bytes(m) for k, m in units.items()}
        self.offload = {s: False for s in STAGES}
        self.steps = {s: [] for s in STAGES}

    def _attempt(self, stage: str, name: str, module, kwargs: dict, *, sliced: bool, dtype, tail):
        """``attempt(max_memory)`` of the step (see :func:`fit_step`), and the plan of a step fxstream does not
        slice (None otherwise)."""
        if tail is not None:
            return fixed_attempt(0, tail), None
        if sliced:
            pol = stage_policy(self.policy, stage)

            def attempt(max_memory):
                return _required(plan_on_meta(module, kwargs, replace(pol, max_memory=max_memory)), name)
            return attempt, None
        fixed = _required(plan_on_meta(module, kwargs, Policy(), dtype), name)
        return fixed_attempt(0, fixed.report.peak_bytes), fixed

    def _entry(self, stage: str, name: str, module, kwargs: dict, now: dict, least: dict, own: int, held_in: int,
               *, sliced: bool, dtype, tail, floor):
        """The step's plan (None: a step that runs no module) and the budget its module got."""
        attempt, fixed = self._attempt(stage, name, module, kwargs, sliced=sliced, dtype=dtype, tail=tail)
        entry, max_memory = None, None
        if self.budget is not None:
            fit = fit_step(self.budget, stage, name, own, held_in, now, least, attempt, self.offload[stage], sliced,
                           self.mode, floor)
            self.offload[stage] = self.offload[stage] or fit.offload
            if sliced and tail is None:
                entry, max_memory = fit.result, fit.max_memory
        elif sliced and tail is None:
            entry = _required(plan_on_meta(module, kwargs, stage_policy(self.policy, stage)), name)
        if tail is None and not sliced:
            entry = fixed
        return entry, max_memory

    def add(self, stage: str, name: str, runs: str, module, kwargs: dict, *, sliced: bool, held: int = 0,
            original_kwargs: dict | None = None, original_held: int | None = None, upcast: dict | None = None,
            dtype: torch.dtype | None = None, lower_bound=None, tail: int | None = None, floor=None) -> StepReport:
        """Plan one step. ``held``: bytes the pipeline holds besides the module's inputs; ``upcast``: component ->
        weight bytes during this step (SVD's VAE in float32, planned in ``dtype``); ``tail``: the activations of
        a step that runs no module; ``lower_bound(entry)``: its activations' lower bound if not the report's;
        ``floor()``: the same, computed before planning (see :func:`fit_step`)."""
        now = dict(self.bytes, **(upcast or {}))
        least = {k: v for k, v in now.items() if k in self.used[stage]}
        held_in = held + tensor_bytes(kwargs.values())
        o_held = held_in if original_held is None else \
            original_held + tensor_bytes((original_kwargs or kwargs).values())
        own = module_bytes(unwrap(module)) if sliced else 0
        entry, max_memory = self._entry(stage, name, module, kwargs, now, least, own, held_in, sliced=sliced,
                                        dtype=dtype, tail=tail, floor=floor)
        if tail is not None:
            act = o_act = lb = tail
            report = original = None
        else:
            report = original = entry.report
            if original_kwargs is not None:
                original = _required(plan_on_meta(module, original_kwargs, Policy(), dtype), name).report
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


# -- the video and each stage's inputs ------------------------------------------------------------------------------
def _positive(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1 ({what}), got {value!r}")
    return value


def _call_default(pipe, name: str):
    return inspect.signature(type(pipe).__call__).parameters[name].default


@dataclass
class _Video:
    """What is planned: the video in pixels and in latents, the batches, the dtype of the UNet's inputs."""

    height: int
    width: int
    num_frames: int
    batch: int
    guidance: bool
    decode_chunk_size: int
    dtype: torch.dtype
    sf: int  # the VAE's scale factor

    h = property(lambda self: self.height // self.sf)
    w = property(lambda self: self.width // self.sf)
    b2 = property(lambda self: self.batch * (2 if self.guidance else 1))  # the UNet's batch

    def empty(self, *shape, dtype=None) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype if dtype is None else dtype, device="meta")


def _video(pipe, unet, height, width, num_frames, batch, guidance, decode_chunk_size) -> _Video:
    """The video asked for, defaults filled in from the pipeline, each value checked."""
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
    return _Video(height, width, num_frames, batch, guidance, decode_chunk_size, next(unet.parameters()).dtype, sf)


def _plan_encode(plan: _Planner, pipe, kind: str, v: _Video) -> None:
    """SVD: the CLIP image encoder, then the VAE encoder (float32 under force_upcast); AnimateDiff: the text encoder."""
    batch, vae = v.batch, pipe.vae
    if kind == "svd":
        enc = pipe.image_encoder
        size = enc.config.image_size
        plan.add("encode", "image_encoder", f"once ({batch} image{'s' if batch > 1 else ''})", enc,
                 {"pixel_values": v.empty(batch, 3, size, size, dtype=next(enc.parameters()).dtype)}, sliced=False)
        upcast = needs_upcast(kind, vae)
        vdt = torch.float32 if upcast else next(vae.parameters()).dtype
        plan.add("encode", "vae.encoder", "once" + (" (float32: force_upcast)" if upcast else ""), vae.encoder,
                 {"sample": v.empty(batch, 3, v.height, v.width, dtype=vdt)}, sliced=False, dtype=vdt,
                 upcast={"vae": module_bytes(vae, torch.float32)} if upcast else None)
    elif getattr(pipe, "text_encoder", None) is not None:
        te = pipe.text_encoder
        tokens = te.config.max_position_embeddings
        out = batch * tokens * te.config.hidden_size * next(te.parameters()).dtype.itemsize
        plan.add("encode", "text_encoder", "once per prompt" + (", once per negative prompt" if v.guidance else ""),
                 te, {"input_ids": v.empty(batch, tokens, dtype=torch.int64)}, sliced=False,
                 held=out if v.guidance else 0)  # the prompt's embeddings, held while the negative prompt's run


def _unet_kwargs(pipe, kind: str, unet, v: _Video) -> dict:
    """One denoising step's UNet inputs (SVD: ``BFCHW`` latents; AnimateDiff: ``BCFHW``, text per frame)."""
    cross, f, empty = unet.config.cross_attention_dim, v.num_frames, v.empty
    if kind == "svd":
        return {"sample": empty(v.b2, f, unet.config.in_channels, v.h, v.w), "timestep": empty(dtype=torch.float32),
                "encoder_hidden_states": empty(v.b2, 1, cross), "added_time_ids": empty(v.b2, 3),
                "return_dict": False}
    te = getattr(pipe, "text_encoder", None)
    tokens = te.config.max_position_embeddings if te is not None else 77
    return {"sample": empty(v.b2, unet.config.in_channels, f, v.h, v.w), "timestep": empty(dtype=torch.int64),
            "encoder_hidden_states": empty(v.b2 * f, tokens, cross), "return_dict": False}


def _plan_decode(plan: _Planner, vae, kind: str, policy: Policy, v: _Video) -> None:
    """``decode_latents``' tail (cat + float32 copy) and the VAE decoder, chunk by chunk; the tail shown last."""
    vdt = next(vae.parameters()).dtype
    lat = vae.config.latent_channels
    frames_total = v.batch * v.num_frames
    per_frame = vae.config.out_channels * v.height * v.width * vdt.itemsize
    chunk = v.num_frames if kind == "svd" else min(v.decode_chunk_size, frames_total)  # the compiled pipeline's
    o_chunk = min(v.decode_chunk_size, frames_total)

    def decoder_kwargs(c):
        if kind == "svd":
            return {"sample": v.empty(c, lat, v.h, v.w, dtype=vdt), "image_only_indicator": v.empty(1, c, dtype=vdt),
                    "num_frames": c}
        return {"sample": v.empty(c, lat, v.h, v.w, dtype=vdt)}

    n_chunks, o_chunks = math.ceil(frames_total / chunk), math.ceil(frames_total / o_chunk)
    tail = decode_tail_bytes(frames_total * per_frame, vdt.itemsize)
    plan.add("decode", "decode_latents", "once (cat + float32 copy)", None, {}, sliced=False, tail=tail)
    dec_policy = stage_policy(policy, "decode")
    floor = HaloFloor(vae.decoder, decoder_kwargs(chunk), dec_policy)
    plan.add("decode", "vae.decoder", f"{n_chunks} chunk{'s' if n_chunks > 1 else ''} of {chunk} frames", vae.decoder,
             decoder_kwargs(chunk), sliced=True, held=(n_chunks - 1) * chunk * per_frame,
             original_kwargs=decoder_kwargs(o_chunk) if o_chunk != chunk else None,
             original_held=(o_chunks - 1) * o_chunk * per_frame,
             lower_bound=lambda entry: floor.value if floor.value is not None else _decoder_floor(entry, dec_policy),
             floor=floor)
    steps = plan.steps["decode"]
    steps.append(steps.pop(0))  # the decode tail runs after the decoder: show it last


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
    offload = check_offload(offload, policy)
    units = pipeline_units(pipe)
    for name in ("unet", "vae"):
        if name not in units:
            raise ValueError(f"pipe.{name}: expected a module, got {getattr(pipe, name, None)!r}")
    unet = unwrap(pipe.unet)
    v = _video(pipe, unet, height, width, num_frames, batch, guidance, decode_chunk_size)
    plan = _Planner(kind, units, policy, offload)
    with shared_captures():  # each module captured once, whatever the budget tries
        _plan_encode(plan, pipe, kind, v)
        plan.add("denoise", "unet", "each denoising step", unet, _unet_kwargs(pipe, kind, unet, v), sliced=True)
        _plan_decode(plan, pipe.vae, kind, policy, v)
        stages = plan.stages()
    report = PipelineReport(type(pipe).__name__, v.height, v.width, v.num_frames, batch, guidance,
                            str(v.dtype).replace("torch.", ""), policy, stages, {}, 0.0)
    report.timeline = stages_timeline(stages)
    report.seconds = time.perf_counter() - start
    return report
