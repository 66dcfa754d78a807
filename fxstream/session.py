"""What a command of the ``fxstream`` tool works on: one model at one input size, captured and planned once.

Named models are built on the ``meta`` device from the configs shipped in the package (no memory, no compute);
a folder is loaded with diffusers' ``from_pretrained`` (local files only). The plan is
:class:`fxstream.entry.Entry`, the same object ``fxstream.explain`` builds, so the command line reports what
the library does.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .entry import Entry
from .errors import FxstreamError
from .catalog import UNET_KINDS
from .models import MODELS, build_unet, example_inputs
from .viz import human_bytes

__all__ = ["Session", "UsageError", "load_session", "output_dir"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
VAE_FACTOR = 8  # pixels per latent element (SVD's and SD1.5's VAEs)
# Default pixel size and frames of a folder's model, per kind (SVD's frames come from its config).
_FOLDER_DEFAULTS = {"svd": (576, 1024, 14), "animatediff": (512, 512, 16)}


class UsageError(Exception):
    """An argument found wrong only once the model is known; reported like argparse's errors (exit status 2)."""


@dataclass
class Session:
    """A planned model: how it was made, the input size, and the plan (``entry``)."""

    label: str  # the model's name or folder
    stem: str  # default file name stem
    height: int  # pixels
    width: int
    frames: int
    batch: int
    dtype: str
    device: str
    entry: Entry
    seconds: float = 0.0  # capture and planning time

    @property
    def report(self):
        return self.entry.report

    def describe(self) -> str:
        return (f"{self.label}: {self.height}x{self.width} px (latent {self.height // VAE_FACTOR}x"
                f"{self.width // VAE_FACTOR}), {self.frames} frames, batch {self.batch}, {self.dtype} on "
                f"{self.device}")

    def input_json(self) -> dict:
        return {"model": self.label, "height": self.height, "width": self.width,
                "latent": [self.height // VAE_FACTOR, self.width // VAE_FACTOR], "frames": self.frames,
                "batch": self.batch, "dtype": self.dtype, "device": self.device}

    def draw(self, which: str, depth: int, expand: str | None, progress) -> list:
        """The :class:`~fxstream.viz.DrawGraph` of the original and/or the compiled graph."""
        from .viz import draw_graph, module_paths
        compiled, r = self.entry.compiled, self.report
        if expand is not None:
            _check_module(expand, module_paths(compiled.original) | module_paths(compiled.graph_module), self.label)
        regions = f"{len(r.regions)} regions" if r.regions else "nothing sliced"
        todo = {"original": (compiled.original, "original", r.original_peak_node,
                             f"original (exported graph): planned peak {human_bytes(r.original_peak_bytes)}"),
                "compiled": (compiled.graph_module, "compiled", r.peak_node,
                             f"compiled {r.policy.describe()}: {regions}, planned peak {human_bytes(r.peak_bytes)}")}
        keys = ["original", "compiled"] if which == "both" else [which]
        users = self.entry.program.graph_signature.user_inputs
        with progress.step("collapsing the graphs by module"):
            return [draw_graph(todo[k][0], title=todo[k][3], timeline=r.timeline[todo[k][1]], peak_node=todo[k][2],
                               depth=depth, expand=expand, user_inputs=users, prefix=k[0]) for k in keys]


def _check_module(path: str, known: set, label: str) -> None:
    if path in known:
        return
    close = difflib.get_close_matches(path, sorted(known), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "module paths look like down_blocks.0.resnets.1"
    raise UsageError(f"argument --expand: no module {path!r} in {label}; {hint}")


def output_dir(path: Path) -> Path:
    """The folder for written files, created if missing."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"argument -o/--output: {path} is a file; expected a folder (created if missing)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _folder_kind(path: Path) -> tuple[Path, str | None, str, dict]:
    """(folder, subfolder, kind, config) of a UNet folder or a pipeline folder holding unet/."""
    sub = None if (path / "config.json").is_file() else "unet"
    cfg_file = path / (sub or "") / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise FxstreamError(f"--model {path}: cannot read {cfg_file}: {e}") from None
    cls = cfg.get("_class_name")
    if cls not in UNET_KINDS:
        raise FxstreamError(f"--model {path}: {cfg_file} describes a {cls!r}; the command line makes inputs for "
                            f"{', '.join(UNET_KINDS)} (SVD, AnimateDiff); for another UNet call "
                            "fxstream.explain(unet, example_kwargs) from Python")
    return path, sub, UNET_KINDS[cls], cfg


def _stem_of(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "model"


def _model(args, dtype: torch.dtype, progress):
    """(unet, kind for example_inputs, label, stem, default (height, width, frames) in pixels, device)."""
    if isinstance(args.model, str):
        spec = MODELS[args.model]
        with progress.step(f"building {args.model} on the meta device"):
            unet = build_unet(args.model, device="meta", dtype=dtype)
        defaults = (spec.height * VAE_FACTOR, spec.width * VAE_FACTOR, spec.frames)
        return unet, args.model, args.model, args.model, defaults, "meta"
    from .models import load_unet
    folder, sub, kind, cfg = _folder_kind(args.model)
    h, w, f = _FOLDER_DEFAULTS[kind]
    if kind == "svd":
        f = int(cfg.get("num_frames") or f)
    with progress.step(f"loading {folder} with from_pretrained"):
        try:
            unet = load_unet(folder, dtype=dtype, subfolder=sub)
        except (OSError, ValueError) as e:
            raise FxstreamError(f"--model {folder}: from_pretrained could not load it: {e}") from None
    name = folder.resolve().name if sub else (folder.resolve().parent.name if folder.resolve().name == "unet"
                                              else folder.resolve().name)
    return unet, kind, str(folder), _stem_of(name), (h, w, f), "cpu"


def load_session(args, policy, progress) -> Session:
    """Build or load ``args.model`` and plan it for the input size the options ask for under ``policy``."""
    import time

    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # the fp16 cast notice of from_config models is not for CLI users
    tiny = isinstance(args.model, str) and args.model.endswith(("-tiny", "-mid"))
    dtype = args.dtype or ("fp32" if tiny else "fp16")
    unet, kind, label, stem, (h, w, f), device = _model(args, DTYPES[dtype], progress)
    height, width, frames = args.height or h, args.width or w, args.frames or f
    batch = args.batch or 2
    kwargs = example_inputs(kind, unet, batch=batch, frames=frames, height=height // VAE_FACTOR,
                            width=width // VAE_FACTOR)
    start = time.perf_counter()
    with progress.step(f"capturing (torch.export) and planning {label} under {policy.describe()}"):
        entry = Entry(unet, kwargs, policy)
    return Session(label, stem, height, width, frames, batch, dtype, device, entry, time.perf_counter() - start)
