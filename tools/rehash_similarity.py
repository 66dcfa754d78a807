"""How much every temporal layer's output changes between denoising steps: the heat map for choosing a cache point.

    python tools/rehash_similarity.py --model svd-mid --steps 25            # random weights, tiny VAE/encoder
    python tools/rehash_similarity.py --pipeline /path/to/svd-folder --steps 25 --latent 72x128 --frames 14

Runs one real generation (``StableVideoDiffusionPipeline`` / ``AnimateDiffPipeline``; a local folder is loaded with
``from_pretrained(..., local_files_only=True)``, never from a hub) with a forward hook on every temporal layer
(``fxstream.rehash.temporal_layers``), and records the cosine similarity of each layer's output to its output at
the previous step. For each layer it also plans, on the captured graph, the share of a step's FLOPs a rehash step
would skip if that layer were the cache point. Writes a PNG heat map (layers in call order x steps), a JSON file
and prints a table. With random weights the features do not behave like trained ones: the map then says how the
tool works, not where to cache in a trained model.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from fxstream.analysis.cost import node_flops
from fxstream.compiler import capture
from fxstream.graph_utils import strip_asserts
from fxstream.models import MODELS, build_unet
from fxstream.passes.step_rehash import cut_at, module_output
from fxstream.pipelines import pipeline_inputs, tiny_pipeline
from fxstream.rehash import default_cache_point, similarity, temporal_layers

ROOT = Path(__file__).resolve().parents[1]


class _Recorder:
    """Forward hooks on the temporal layers: similarity of each output to the same layer's previous output."""

    def __init__(self, unet, layers):
        self.order, self.sims, self.prev, self.kwargs = [], {name: [] for name in layers}, {}, None
        self.handles = [unet.get_submodule(name).register_forward_hook(self._hook(name)) for name in layers]
        self.handles.append(unet.register_forward_pre_hook(self._first_call, with_kwargs=True))

    def _first_call(self, module, args, kwargs):
        if self.kwargs is None:
            names = list(inspect.signature(module.forward).parameters)
            self.kwargs = {**dict(zip(names, args)), **kwargs}

    def _hook(self, name):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            if name not in self.order:
                self.order.append(name)
            if name in self.prev:
                self.sims[name].append(similarity(out, self.prev[name]))
            self.prev[name] = out.detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def skipped_shares(unet, kwargs, layers) -> dict:
    """{layer: planned share of a step's FLOPs a rehash step skips with that layer as the cache point}."""
    gm = strip_asserts(capture(unet, kwargs).graph_module)
    flops = node_flops(gm)
    total = sum(flops.values()) or 1
    out = {}
    for name in layers:
        cut = cut_at(gm, module_output(gm, name).name)
        kept = {n.name for n in cut.graph.nodes}
        out[name] = sum(f for n, f in flops.items() if n not in kept) / total
    return out


def measure(pipe, *, steps: int, frames: int, latent: tuple, seed: int = 0) -> dict:
    unet = pipe.unet
    layers = temporal_layers(unet)
    rec = _Recorder(unet, layers)
    try:
        with torch.no_grad():
            pipe(**pipeline_inputs(pipe, steps=steps, frames=frames, latent=latent, seed=seed))
    finally:
        rec.close()
    shares = skipped_shares(unet, rec.kwargs, rec.order)
    return {"layers": rec.order, "similarity": {n: rec.sims[n] for n in rec.order}, "skipped_share": shares,
            "default_cache_point": default_cache_point(unet), "steps": steps}


def heat_map(result: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    data = [result["similarity"][n] for n in layers]
    fig, ax = plt.subplots(figsize=(max(9, 0.3 * len(data[0]) + 6), 0.3 * len(layers) + 2.2))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=min(map(min, data)), vmax=1.0)
    labels = [f"{n}  ({result['skipped_share'][n]:.0%} skipped)" + ("  <- default" if n ==
              result["default_cache_point"] else "") for n in layers]
    ax.set_yticks(range(len(layers)), labels, fontsize=7)
    ax.set_xticks(range(len(data[0])), [str(i) for i in range(1, len(data[0]) + 1)], fontsize=7)
    ax.set_xlabel("denoising step")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _size(text: str) -> tuple:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in latent pixels, such as 64x64, got {text!r}")
    return h, w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", choices=[m for m in MODELS if m.endswith(("-mid", "-tiny"))], default="svd-mid",
                     help="a UNet built from the shipped configs with random weights (default svd-mid)")
    src.add_argument("--pipeline", type=Path, metavar="FOLDER",
                     help="a local diffusers pipeline folder with trained weights (SVD or AnimateDiff)")
    ap.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    ap.add_argument("--frames", type=int, help="frames (default: the model's)")
    ap.add_argument("--latent", type=_size, help="latent HEIGHTxWIDTH (default: the model's)")
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "docs" / "img", help="folder for the PNG and JSON")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps: at least 2 (similarity is between consecutive steps)")
    if args.pipeline is not None:
        from diffusers import DiffusionPipeline
        if not (args.pipeline / "model_index.json").is_file():
            ap.error(f"--pipeline: {args.pipeline} has no model_index.json; expected a diffusers pipeline folder")
        pipe = DiffusionPipeline.from_pretrained(str(args.pipeline), local_files_only=True)
        name, frames, latent = args.pipeline.name, args.frames or 14, args.latent or (72, 128)
        note = "trained weights"
    else:
        spec = MODELS[args.model]
        pipe = tiny_pipeline(spec.kind, unet=build_unet(args.model))
        name, frames, latent = args.model, args.frames or spec.frames, args.latent or (spec.height, spec.width)
        note = "random weights"
    result = measure(pipe, steps=args.steps, frames=frames, latent=latent)
    rows = [(n, f"{min(s):.4f}", f"{sum(s) / len(s):.4f}", f"{result['skipped_share'][n]:.1%}",
             "default" if n == result["default_cache_point"] else "") for n, s in result["similarity"].items()]
    print(tabulate(rows, headers=["temporal layer", "min similarity", "mean", "FLOPs skipped if cached", ""]))
    png = args.out / f"rehash-similarity-{name}.png"
    heat_map(result, png, f"{name} ({note}), {frames} frames, latent {latent[0]}x{latent[1]}, {args.steps} steps\n"
                          "cosine similarity of each temporal layer's output to its output at the previous step")
    (args.out / f"rehash-similarity-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
