"""Step Rehash: which steps of a denoising loop run the full UNet, and where the cached feature comes from.

    >>> Policy(rehash=StepRehash(full_every=3, steps=25))    # steps 0, 3, ..., 21 and 24 full (DeepCache's uniform)
    >>> Policy(rehash=StepRehash(schedule=[0, 1, 3, 6, 24]))  # full steps from a key-step search (a plain list)
    >>> Policy(rehash=StepRehash(adaptive=0.05))              # full when the probe moved by more than 5%

On a *full* step the compiled UNet runs its whole graph and keeps the output of the cache point (by default a
temporal layer of the last up block, see :func:`default_cache_point`); on a *rehash* step it runs a graph in which
that feature is an input and every op that only fed it is gone. See ``passes/step_rehash.py`` for the graphs and
``docs/design.md`` ("Step Rehash") for the runtime state.

Key-step search (the paper's): record the cached feature on every step of one generation with every step full,
then :func:`key_steps` makes a step full where the feature's similarity to the last full step's falls below a
threshold::

    >>> unet = fxstream.compile(pipe.unet, policy=Policy(rehash=StepRehash(full_every=1)))
    >>> pipe.unet = unet
    >>> with fxstream.rehash.record(unet) as rec:
    ...     pipe(image, num_inference_steps=25)
    >>> sched = rec.key_steps(threshold=0.95)      # StepRehash(schedule=[...])
    >>> sched.save("key_steps.json"); StepRehash.load("key_steps.json")
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..catalog import DEFAULT_PROBE, TEMPORAL_LAYERS, UP_BLOCKS
from ..errors import FxstreamError

__all__ = ["StepRehash", "temporal_layers", "default_cache_point", "key_steps", "similarity",
           "record", "Recording"]



def temporal_layers(unet: torch.nn.Module) -> list:
    """Module paths of every temporal layer of a video UNet (blocks named in :data:`TEMPORAL_LAYERS`)."""
    out = []
    for name, block in unet.named_modules():
        attr = TEMPORAL_LAYERS.get(type(block).__name__)
        layers = getattr(block, attr, None) if attr else None
        if layers is not None:
            out += [f"{name}.{attr}.{i}" for i in range(len(layers))]
    return out


def default_cache_point(unet: torch.nn.Module) -> str:
    """The last up block's second-to-last temporal layer (its last when it has one).

    Why there: a rehash step then runs only what comes after it (the last resnet and temporal layer of the last up
    block, which also take the fresh skip connection from ``conv_in``, and the output head), so it skips the whole
    down path, the mid block and every other up block. Of all temporal layers it is the deepest point that still
    leaves a full-resolution layer to combine the cached feature with the current step's input, as DeepCache's
    shallowest branch does. ``tools/rehash_similarity.py`` measures the similarity of every temporal layer across
    steps to choose another (``StepRehash(cache_point=...)``).
    """
    ups = getattr(unet, UP_BLOCKS, None)
    if not ups:
        raise FxstreamError(f"StepRehash.cache_point: {type(unet).__name__} has no up_blocks; name the module whose "
                            "output to cache, e.g. StepRehash(full_every=3, cache_point='decoder.blocks.3')")
    last = ups[-1]
    attr = TEMPORAL_LAYERS.get(type(last).__name__)
    if attr is None:
        raise FxstreamError(f"StepRehash.cache_point: the last up block is a {type(last).__name__}, whose temporal "
                            f"layers fxstream does not know; name the module to cache, e.g. "
                            f"StepRehash(full_every=3, cache_point='up_blocks.{len(ups) - 1}.resnets.0')")
    n = len(getattr(last, attr))
    return f"up_blocks.{len(ups) - 1}.{attr}.{max(0, n - 2)}"


def _check_int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"StepRehash.{name}: expected an int >= {low}, got {v!r}")


@dataclass(frozen=True)
class StepRehash:
    """Which denoising steps run the full UNet; the others reuse a cached feature (exactly one schedule).

    Attributes:
        full_every: every ``full_every``-th step is full (0, N, 2N, ...), and the last when ``steps`` is given
            (DeepCache's uniform schedule). 1: every step full (the output is the uncompiled module's).
        steps: the number of steps of one generation, so that the last step can be made full (uniform only).
        schedule: the full steps, a list of step indices (0 must be in it); steps past its end are full.
        adaptive: full when the probe's relative change since the last full step exceeds this (e.g. 0.05), or after
            ``max_rehash`` rehash steps in a row; the probe is computed on every step.
        max_rehash: the most rehash steps in a row under ``adaptive``.
        cache_point: module path whose output is cached (default: :func:`default_cache_point`).
        probe: module path of the adaptive probe, an early feature computed on every step (default ``"conv_in"``).

    A new generation starts when a call's timestep does not decrease against the previous call's (or on
    ``compiled.reset()``): the step counter restarts at 0 and every cached feature is dropped.
    """

    full_every: int | None = None
    steps: int | None = None
    schedule: tuple | list | None = None
    adaptive: float | None = None
    max_rehash: int = 4
    cache_point: str | None = None
    probe: str | None = None

    def __post_init__(self):
        chosen = [n for n in ("full_every", "schedule", "adaptive") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError("StepRehash: give exactly one schedule: full_every=N (uniform), schedule=[full steps] "
                             f"(key steps) or adaptive=threshold; got {chosen or 'none'}")
        if self.full_every is not None:
            _check_int("full_every", self.full_every, 1)
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
            if self.full_every is None:
                raise ValueError("StepRehash.steps: only used with full_every (to make the last step full)")
        if self.schedule is not None:
            s = self.schedule
            if isinstance(s, (str, bytes)) or not hasattr(s, "__iter__"):
                raise ValueError(f"StepRehash.schedule: expected a list of full step indices, got {s!r}")
            s = tuple(s)
            for v in s:
                _check_int("schedule[...]", v, 0)
            if 0 not in s:
                raise ValueError(f"StepRehash.schedule: step 0 must be full (nothing is cached before it); got {list(s)}")
            object.__setattr__(self, "schedule", tuple(sorted(set(s))))
        if self.adaptive is not None:
            a = self.adaptive
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
                raise ValueError(f"StepRehash.adaptive: expected a relative change > 0 such as 0.05, got {a!r}")
        _check_int("max_rehash", self.max_rehash, 1)
        for name in ("cache_point", "probe"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"StepRehash.{name}: expected a module path such as 'up_blocks.3.attentions.1', "
                                 f"got {v!r}")
        if self.probe is not None and self.adaptive is None:
            raise ValueError("StepRehash.probe: only used with adaptive=...")

    @property
    def kind(self) -> str:
        return "uniform" if self.full_every is not None else "key steps" if self.schedule is not None else "adaptive"

    @property
    def probe_point(self) -> str | None:
        return (self.probe or DEFAULT_PROBE) if self.adaptive is not None else None

    def is_full(self, step: int) -> bool:
        """Whether ``step`` (0-based) is full by the schedule alone (adaptive: only step 0; the probe decides)."""
        if self.full_every is not None:
            return step % self.full_every == 0 or (self.steps is not None and step >= self.steps - 1)
        if self.schedule is not None:
            return step in self.schedule or step > self.schedule[-1]
        return step == 0

    def describe(self) -> str:
        if self.full_every is not None:
            s = f"full_every={self.full_every}" + (f", steps={self.steps}" if self.steps else "")
        elif self.schedule is not None:
            s = f"schedule={list(self.schedule)}"
        else:
            s = f"adaptive={self.adaptive}, max_rehash={self.max_rehash}" + (f", probe={self.probe!r}" if self.probe else "")
        return f"StepRehash({s}" + (f", cache_point={self.cache_point!r}" if self.cache_point else "") + ")"

    def save(self, path) -> None:
        """Write the key-step schedule as a plain JSON list of full steps (schedules only)."""
        if self.schedule is None:
            raise ValueError("StepRehash.save: only a key-step schedule (schedule=[...]) is saved as a list")
        Path(path).write_text(json.dumps(list(self.schedule)) + "\n")

    @classmethod
    def load(cls, path, **kwargs) -> "StepRehash":
        """A key-step schedule from a JSON list of full steps (as :meth:`save` writes); ``kwargs`` as the class."""
        try:
            steps = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"path: {path} is not a JSON list of full steps ({e})") from None
        if not isinstance(steps, list):
            raise ValueError(f"path: {path} holds a {type(steps).__name__}; expected a JSON list of full steps")
        return cls(schedule=steps, **kwargs)


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two features, flattened (computed in float64)."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def key_steps(features: list, threshold: float, *, last: bool = True, **kwargs) -> StepRehash:
    """The paper's key-step search over one generation's cached features (one per step, every step full).

    Step 0 is full; a later step is full when its feature's cosine similarity to the last full step's is below
    ``threshold`` (and the last step when ``last``). ``kwargs`` go to :class:`StepRehash` (e.g. ``cache_point``).
    """
    if not features:
        raise ValueError("features: empty; record a generation with every step full first")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a cosine similarity in (0, 1], got {threshold!r}")
    full, ref = [0], features[0]
    for i, f in enumerate(features[1:], start=1):
        if similarity(f, ref) < threshold:
            full.append(i)
            ref = f
    if last and full[-1] != len(features) - 1:
        full.append(len(features) - 1)
    return StepRehash(schedule=full, **kwargs)


@dataclass
class Recording:
    """The cached feature of every full step of the generations run while recording (on the CPU, float32)."""

    features: list = field(default_factory=list)  # one list per generation

    def add(self, step: int, feature: torch.Tensor) -> None:
        """Keep ``feature`` (a copy, on the CPU in float32) as step ``step``'s; step 0 starts a generation."""
        if step == 0 or not self.features:
            self.features.append([])
        self.features[-1].append(feature.detach().to("cpu", torch.float32, copy=True))

    def key_steps(self, threshold: float = 0.95, **kwargs) -> StepRehash:
        if not self.features:
            raise FxstreamError("Recording.key_steps: nothing was recorded; run a generation inside record(...)")
        return key_steps(self.features[-1], threshold, **kwargs)

    def similarities(self) -> list:
        """Cosine similarity of each step's feature to the previous step's (the last generation)."""
        f = self.features[-1] if self.features else []
        return [similarity(a, b) for a, b in zip(f[1:], f[:-1])]


@contextlib.contextmanager
def record(compiled):
    """Record the cached feature on every full step of ``compiled`` (a module compiled with ``rehash``)."""
    rehash = getattr(getattr(compiled, "policy", None), "rehash", None)
    if rehash is None:
        raise FxstreamError("record: the module was not compiled with Policy(rehash=StepRehash(...)); compile it "
                            "with StepRehash(full_every=1) to record every step")
    rec = Recording()
    compiled.recording = rec
    try:
        yield rec
    finally:
        compiled.recording = None


def with_cache_point(rehash: StepRehash, unet: torch.nn.Module) -> StepRehash:
    """``rehash`` with its cache point filled in for ``unet``."""
    return rehash if rehash.cache_point else replace(rehash, cache_point=default_cache_point(unet))
