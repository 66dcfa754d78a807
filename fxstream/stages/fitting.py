"""Fitting one step of a stage into the budget: the module's ``max_memory`` is the budget less the other weights
resident and what the pipeline holds; the modules the stage does not use stay resident or are offloaded."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MemoryBudgetError
from ..policy import format_bytes
from .parts import PipelineBudgetError

__all__ = ["AUTO_OFFLOAD_COMPUTE", "Fit", "fit_step", "fixed_attempt", "decode_tail_bytes"]

AUTO_OFFLOAD_COMPUTE = 1.5  # offload="auto" also tries offloading when the resident fit plans more compute


def _planned_compute(result) -> float:
    """Planned FLOPs of a fitted module over its unsliced ones, from its report's halo regions (1.0 without)."""
    report = getattr(result, "report", None)
    regions = [r for r in getattr(report, "regions", []) if r.kind == "halo"]
    ops = sum(r.ops for r in regions)
    return sum(r.compute * r.ops for r in regions) / ops if ops else 1.0


@dataclass
class Fit:
    """One step fitted: what ``attempt`` returned, whether the stage offloads, the module's budget."""

    result: object
    offload: bool
    max_memory: int  # what the module got: the budget less the other weights resident and what is held
    resident: dict


def _modes(keep: dict, least: dict, offloaded: bool, mode: str) -> list:
    """Offload decisions to try, in order."""
    if sum(least.values()) >= sum(keep.values()):
        return [True]  # nothing to offload
    if mode == "never":
        return [False]
    return [True] if offloaded or mode == "always" else [False, True]


def fit_step(budget: int, stage: str, step: str, own: int, held: int, keep: dict, least: dict, attempt,
             offloaded: bool, sliced: bool, mode: str = "auto", floor=None) -> Fit:
    """Fit one step of ``stage``: first with every module resident (``keep``: component -> weight bytes), then
    with the ones the stage does not use offloaded (``least``); ``mode`` ``"always"`` / ``"never"`` tries only
    the one. ``attempt(max_memory)`` plans the module with that budget for its own weights (``own``) and
    activations, raising MemoryBudgetError when it cannot. ``floor()``: a lower bound of those activations (a
    try below it is skipped unless it is the last: a failing halo budget search compiles every slicing)."""
    modes = _modes(keep, least, offloaded, mode)
    last, fits = None, []
    for offload in modes:
        resident = least if offload else keep
        room = budget - (sum(resident.values()) - own) - held
        if offload != modes[-1] and (room <= own or (floor is not None and room - own < floor())):
            continue  # the weights alone, or with the activations' lower bound, do not fit: offloading is needed
        try:
            fits.append(Fit(attempt(max(room, 1)), offload, room, resident))
        except MemoryBudgetError as e:
            last = e
            continue
        # "auto" keeps the modules resident unless the slicing that fits them recomputes much (halo passes):
        # moving weights costs a copy each way, a decoder planned at 80x its FLOPs costs far more
        if offload == modes[-1] or _planned_compute(fits[-1].result) <= AUTO_OFFLOAD_COMPUTE:
            break
    if fits:
        return min(fits, key=lambda f: _planned_compute(f.result))
    raise _budget_error(budget, stage, step, held, keep, least if modes[-1] else keep, least, last, sliced) from last


def _budget_error(budget: int, stage: str, step: str, held: int, keep: dict, resident: dict, least: dict,
                  last: MemoryBudgetError, sliced: bool) -> PipelineBudgetError:
    """The error of a step that fits in no mode; ``resident``: the last try's (the fewest weights its mode allows)."""
    w, lb = sum(resident.values()), last.lower_bound_bytes
    parts = " + ".join(f"{k} {format_bytes(v)}" for k, v in resident.items()) or "none"
    others = "; every module the stage does not use offloaded" if len(keep) > len(resident) else \
        "; offload='never' keeps the modules it does not use" if len(keep) > len(least) else ""
    how = "the lowest any slicing fxstream allows" if sliced else "planned; fxstream does not slice it"
    hint = {"decode": "decode fewer frames at once or a smaller resolution",
            "denoise": "make the video smaller (frames, resolution, batch) or the dtype narrower",
            "encode": "use a smaller batch or a narrower dtype"}[stage]
    return PipelineBudgetError(
        f"{stage} stage ({step}) cannot meet Policy.max_memory={format_bytes(budget)}: weights resident "
        f"{format_bytes(w)} ({parts}{others}), held by the pipeline {format_bytes(held)}, activations lower bound "
        f"{format_bytes(lb)} ({how}): at least {format_bytes(w + held + lb)} needed. Raise max_memory, or {hint}.",
        stage=stage, module=step, max_memory=budget, weight_bytes=w, held_bytes=held, lower_bound_bytes=lb,
    )


def fixed_attempt(own: int, activations: int):
    """``attempt`` for a step fxstream does not slice: it fits or not."""
    def attempt(max_memory: int):
        if own + activations > max_memory:
            raise MemoryBudgetError("does not fit", max_memory=max_memory, weight_bytes=own,
                                    lower_bound_bytes=activations)
    return attempt


def decode_tail_bytes(frames_bytes: int, itemsize: int) -> int:
    """``decode_latents`` after the decoder: ``torch.cat`` of the chunks' frames (a copy: both live), then
    ``.float()`` (a float32 copy while the concatenated frames live; no copy if they are float32 already)."""
    return max(2 * frames_bytes, frames_bytes + (frames_bytes * 4 // itemsize if itemsize != 4 else 0))
