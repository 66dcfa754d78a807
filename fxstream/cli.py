"""The ``fxstream`` command: see what the compiler does to a video UNet, without running it.

    fxstream explain --model svd --slices 8                 # table: regions, unsliced ops and why, planned peaks
    fxstream explain --model svd --max-memory 4GiB --json   # the report as JSON on stdout
    fxstream viz --model svd --slices 8 --batch-split 2     # svd-viz.svg and svd-viz.html: original vs compiled
    fxstream memory --model svd-xt --slices 8 -o out/       # out/svd-xt-memory.png: bytes live per node
    fxstream pipeline --model svd-xt --max-memory 6GiB --plot svd-xt.png   # every stage of the whole pipeline

Named models are built from the configs shipped in the package on the ``meta`` device (no memory, no compute;
full-size SVD plans in 10-20 s on two CPU cores); ``--model PATH`` loads a local diffusers UNet or pipeline folder.
Exit status: 0 done, 1 an fxstream error (one line on stderr), 2 a usage error.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

from .errors import FxstreamError
from .models import MODELS
from .policy import Policy, parse_bytes
from .rehash import StepRehash
from .progress import Progress
from .session import Session, UsageError, load_session, output_dir

__all__ = ["main", "build_parser"]

_EXAMPLES = {
    "explain": """examples:
  fxstream explain --model svd --slices 8
  fxstream explain --model svd-xt --slices 8 --batch-split 2 --lower-bound
  fxstream explain --model animatediff --max-memory 2GiB --json > report.json
  fxstream explain --model svd-xt --frames 25 --slices 8 --ranks 2 4 8
  fxstream explain --model ./stable-video-diffusion-img2vid/unet --height 320 --width 576 --frames 14""",
    "viz": """examples:
  fxstream viz --model svd --slices 8 --batch-split 2 -o docs/img        # docs/img/svd-viz.svg, .html
  fxstream viz --model svd --slices 8 --depth 1                          # one box per UNet block
  fxstream viz --model svd --slices 8 --expand down_blocks.0.resnets.1   # that module op by op
  fxstream viz --model svd --slices 8 --graph compiled --format dot      # DOT source only, no Graphviz needed""",
    "memory": """examples:
  fxstream memory --model svd --slices 8 --batch-split 2 -o docs/img     # docs/img/svd-memory.png
  fxstream memory --model svd-xt --max-memory 4GiB --name svdxt-4g""",
    "pipeline": """examples:
  fxstream pipeline --model svd-xt --height 576 --width 1024 --frames 25 --max-memory 6GiB --plot svd-xt.png
  fxstream pipeline --model animatediff --max-memory 4GiB --json > animatediff.json
  fxstream pipeline --model svd --halo 8 --slices 8                # fixed slice counts, no budget
  fxstream pipeline --model svd-xt --frames 25 --max-memory 6GiB --host-memory 32GiB  # decoder parks in host""",
}


# -- argument types: each names what it expected, argparse adds the option's name ---------------------------
def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


# torch's names of the three dtypes (and the short ones), each to the short name the reports print
_DTYPE_NAMES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
                "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def _dtype(text: str) -> str:
    """``fp16``/``bf16``/``fp32`` or torch's names (``float16``, ``torch.bfloat16``, ...)."""
    name = _DTYPE_NAMES.get(text.lower().removeprefix("torch."))
    if name is None:
        raise argparse.ArgumentTypeError(f"expected fp16, bf16 or fp32 (or torch's names: float16, half, bfloat16, "
                                         f"float32, float), got {text!r}")
    return name


def _halo(text: str) -> int | tuple[int, int]:
    """``N`` bands of rows or ``RxC`` tiles."""
    rows, sep, cols = text.lower().partition("x")
    try:
        value = (int(rows), int(cols)) if sep else int(rows)
    except ValueError:
        value = 0
    if min(value if isinstance(value, tuple) else (value,)) < 1:
        raise argparse.ArgumentTypeError(f"expected N (bands of rows) or RxC (rows x columns of tiles), whole numbers "
                                         f">= 1, got {text!r}; for example 8 or 8x8")
    return value


def _pixels(text: str) -> int:
    value = _count(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 pixels (the VAE downsamples by 8), got {value}; "
                                         f"try {value // 8 * 8 or 8}")
    return value


def _bytes(text: str) -> int:
    try:
        return parse_bytes(int(text) if text.isdigit() else text, "bytes")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected bytes or a size such as 6GiB, 6GB or 512MiB, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _model(text: str):
    if text in MODELS:
        return text
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "config.json").is_file() or (path / "unet" / "config.json").is_file()):
        return path
    where = f"{text!r} is a folder without config.json or unet/config.json" if path.is_dir() else \
        f"{text!r} is neither a known model name nor a folder"
    raise argparse.ArgumentTypeError(f"{where}; give one of {', '.join(sorted(MODELS))}, or the path of a local "
                                     "diffusers UNet folder (config.json + weights) or pipeline folder (unet/)")


def _formats(text: str) -> tuple:
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in ("svg", "html", "dot")]
    if bad or not formats:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of svg, html, dot; got {text!r}")
    return formats


def _stem(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"expected a file name stem of letters, digits, '_', '.', '-', got {text!r}")
    return text


# -- the parser --------------------------------------------------------------------------------------------
def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and input (defaults: the model's own size)")
    g.add_argument("--model", type=_model, default="svd", metavar="NAME|PATH",
                   help=f"a named model ({', '.join(sorted(MODELS))}; built from the shipped config on the meta "
                        "device, random weights) or a local diffusers UNet/pipeline folder loaded with "
                        "from_pretrained (default: svd). Example: --model svd-xt")
    g.add_argument("--height", type=_pixels, metavar="PX",
                   help="video height in pixels, a multiple of 8 (default: SVD 576, AnimateDiff 512). "
                        "Example: --height 320")
    g.add_argument("--width", type=_pixels, metavar="PX",
                   help="video width in pixels, a multiple of 8 (default: SVD 1024, AnimateDiff 512). "
                        "Example: --width 576")
    g.add_argument("--frames", type=_count, metavar="N",
                   help="frames per video (default: SVD 14, SVD-XT 25, AnimateDiff 16). Example: --frames 25")
    g.add_argument("--batch", type=_count, metavar="N",
                   help="videos per UNet call (default: 2, classifier-free guidance). Example: --batch 1")
    g.add_argument("--dtype", type=_dtype, metavar="DTYPE",
                   help="weights and activations: fp16, bf16 or fp32, or torch's names (float16, half, bfloat16, "
                        "float32, float) (default: fp16; fp32 for the -tiny and -mid models). Example: --dtype bf16")
    return p


def _policy_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("policy (fxstream.Policy; none given: slice nothing, the exported graph as is)")
    g.add_argument("--slices", type=_count, metavar="N",
                   help="slices in every spatial (frames) and temporal (height/width) region. Example: --slices 8")
    g.add_argument("--spatial", type=_count, metavar="N",
                   help="slices for spatial layers (cut along frames); overrides --slices. Example: --spatial 7")
    g.add_argument("--temporal", type=_count, metavar="N",
                   help="slices for temporal layers (cut along height or width); overrides --slices. "
                        "Example: --temporal 8")
    g.add_argument("--batch-split", type=_count, metavar="N", dest="batch_split",
                   help="split the video batch into N parts, most of the UNet in one loop (Policy.batch). "
                        "Example: --batch-split 2")
    g.add_argument("--max-memory", type=_bytes, metavar="SIZE",
                   help="memory budget, weights included: the fewest slices whose planned peak fits "
                        "(the counts above become upper limits). Example: --max-memory 6GiB")
    g.add_argument("--pipeline", type=_count, metavar="K", default=1,
                   help="the most slices of a region in flight at once (CUDA streams or CPU workers); the plan "
                        "counts K working sets per region (default: 1). Example: --pipeline 2")
    g.add_argument("--rehash-every", type=_count, metavar="N", dest="rehash_every",
                   help="Step Rehash, uniform: every N-th denoising step full, the others reuse a cached feature; "
                        "the report says what a rehash step skips and the drawing marks it. Example: --rehash-every 3")
    g.add_argument("--cache-point", metavar="MODULE", dest="cache_point",
                   help="with --rehash-every: the module whose output is cached (default: the last up block's "
                        "second-to-last temporal layer). Example: --cache-point up_blocks.2")
    g.add_argument("--min-region-fraction", type=_fraction, metavar="F",
                   help="skip regions whose largest tensor is below this share of the largest activation "
                        "(default: 0.05). Example: --min-region-fraction 0.1")
    return p


def _output_options(files: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    if files:
        g.add_argument("-o", "--output", type=Path, default=Path("."), metavar="DIR",
                       help="folder for the files written, created if missing (default: the current folder). "
                            "Example: -o docs/img")
        g.add_argument("--name", type=_stem, metavar="STEM",
                       help="file name stem (default: the model name, or the model folder's name). "
                            "Example: --name svd-8slices")
    g.add_argument("--json", action="store_true",
                   help="print machine-readable JSON on stdout instead of text. Example: --json | jq .peak_bytes")
    g.add_argument("-v", "--verbose", action="store_true", help="log what the compiler does (to stderr). Example: -v")
    return p


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="fxstream", description=__doc__.replace("``", ""), formatter_class=fmt)
    ap.add_argument("--version", action="version", version=f"fxstream {__import__('fxstream').__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_model_options(), _policy_options()]
    e = sub.add_parser("explain", parents=common + [_output_options(False)], formatter_class=fmt,
                       epilog=_EXAMPLES["explain"],
                       help="what was sliced, what was not and why, planned memory (a table or --json)",
                       description=_wrap("Plan the model under the policy and print the explain report: each region "
                                   "(module, axis, slices), the largest unsliced ops with the reason, planned peaks."))
    e.add_argument("--lower-bound", action="store_true",
                   help="also compute the lowest peak any slicing allows (about doubles the time). "
                        "Example: --lower-bound")
    e.add_argument("--top", type=_count, default=10, metavar="N",
                   help="largest unsliced ops listed in the table (default: 10). Example: --top 25")
    e.add_argument("--ranks", type=_count, nargs="+", metavar="N",
                   help="also plan Policy(distributed=...) on N devices (several: one row each), without any "
                        "process group: per-rank peak, bytes moved, predicted speedup. Example: --ranks 2 4 8")
    e.add_argument("--link", choices=("nvlink", "pcie5", "pcie4"), default="nvlink",
                   help="the link between devices in the --ranks prediction (default: nvlink). Example: --link pcie4")
    e.set_defaults(func=cmd_explain)
    v = sub.add_parser("viz", parents=common + [_output_options(True)], formatter_class=fmt, epilog=_EXAMPLES["viz"],
                       help="draw the original and the compiled graph (SVG via Graphviz, self-contained HTML)",
                       description=_wrap("Draw the exported graph and the compiled one side by side, one box per module "
                                   "(regions coloured by slice axis, labelled with their slice count; the planned "
                                   "peak in red; arrows labelled with shapes and bytes). Writes STEM-viz.svg and "
                                   "STEM-viz.html (pan: drag, zoom: wheel, click a box for its details). SVG and "
                                   "HTML need Graphviz's dot: sudo apt-get install graphviz."))
    v.add_argument("--depth", type=_count, default=2, metavar="N",
                   help="module levels per box: 1 = down_blocks.0, 2 = down_blocks.0.resnets.1 (default: 2), "
                        "3 = down_blocks.0.resnets.1.temporal_res_block. Example: --depth 1")
    v.add_argument("--expand", metavar="MODULE",
                   help="draw the ops of this module one by one (regions holding them are drawn around their "
                        "body). Example: --expand down_blocks.0.attentions.0.temporal_transformer_blocks.0")
    v.add_argument("--graph", choices=("both", "original", "compiled"), default="both",
                   help="which graph to draw (default: both). Example: --graph compiled")
    v.add_argument("--format", type=_formats, default=("svg", "html"), metavar="LIST",
                   help="files to write: svg, html, dot (default: svg,html; dot needs no Graphviz). "
                        "Example: --format svg,html,dot")
    v.set_defaults(func=cmd_viz)
    m = sub.add_parser("memory", parents=common + [_output_options(True)], formatter_class=fmt,
                       epilog=_EXAMPLES["memory"],
                       help="plot the memory timeline, original against compiled (PNG)",
                       description=_wrap("Plot the planned bytes live after every node, the exported graph against the "
                                   "compiled one, lined up block by block, with the start of each UNet block "
                                   "marked and both peaks annotated. Writes STEM-memory.png."))
    m.set_defaults(func=cmd_memory)
    pl = sub.add_parser("pipeline", parents=[_pipeline_options(), _policy_options(), _output_options(False)],
                        formatter_class=fmt, epilog=_EXAMPLES["pipeline"],
                        help="plan a whole SVD or AnimateDiff pipeline under one budget, stage by stage",
                        description=_wrap("Build the whole pipeline on the meta device (UNet, VAE, image or text "
                                    "encoder from the shipped configs) and plan its stages as "
                                    "fxstream.compile_pipeline runs them: encode, denoise (the UNet), decode (the "
                                    "VAE decoder, halo-sliced along height). Prints per stage the weights "
                                    "resident, what is offloaded, the original and planned peaks (weights "
                                    "included) and the lower bound; --plot draws the timeline across the stages."))
    pl.set_defaults(func=cmd_pipeline)
    return ap


def _pipeline_options() -> argparse.ArgumentParser:
    from .pipelines import PIPELINES
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("pipeline and video (defaults: the pipeline's own)")
    g.add_argument("--model", choices=sorted(PIPELINES), default="svd-xt",
                   help="the pipeline, built from the shipped configs on the meta device, random weights "
                        "(default: svd-xt). Example: --model animatediff")
    g.add_argument("--height", type=_pixels, metavar="PX",
                   help="video height in pixels (default: SVD 576, AnimateDiff 512). Example: --height 320")
    g.add_argument("--width", type=_pixels, metavar="PX",
                   help="video width in pixels (default: SVD 1024, AnimateDiff 512). Example: --width 576")
    g.add_argument("--frames", type=_count, metavar="N",
                   help="frames per video (default: SVD 14, SVD-XT 25, AnimateDiff 16). Example: --frames 14")
    g.add_argument("--batch", type=_count, default=1, metavar="N",
                   help="videos generated at once (default: 1; classifier-free guidance doubles the UNet's "
                        "batch). Example: --batch 2")
    g.add_argument("--no-guidance", action="store_true", dest="no_guidance",
                   help="plan without classifier-free guidance (the UNet's batch is not doubled). Example: --no-guidance")
    g.add_argument("--decode-chunk-size", type=_count, metavar="N", dest="decode_chunk_size",
                   help="frames the original pipeline decodes at once (default: diffusers' own, SVD all "
                        "frames, AnimateDiff 16); a compiled SVD pipeline always decodes all frames at once. "
                        "Example: --decode-chunk-size 8")
    g.add_argument("--dtype", type=_dtype, metavar="DTYPE",
                   help="weights and activations: fp16, bf16 or fp32, or torch's names (float16, half, bfloat16, "
                        "float32, float) (default: fp16; fp32 for the -tiny pipelines). Example: --dtype bf16")
    g.add_argument("--halo", type=_halo, metavar="N|RxC",
                   help="the VAE decoder's halo slicing: N bands of rows or RxC tiles (with --max-memory the most "
                        "tiles it may use, 64 if not given). Example: --halo 8 or --halo 8x8")
    g.add_argument("--host-memory", type=_bytes, metavar="SIZE", dest="host_memory",
                   help="host memory the VAE decoder may park GroupNorm inputs in, so its statistics passes do not "
                        "recompute them (pinned CPU memory on CUDA; the report shows host bytes and traffic). "
                        "Example: --host-memory 32GiB")
    g.add_argument("--offload", choices=("auto", "always", "never"), default="auto",
                   help="with --max-memory: move the modules a stage does not use off the accelerator when the "
                        "budget needs it or it plans less recomputation (auto, default), in every stage (always: "
                        "the fewest slices), or never. "
                        "Example: --offload always")
    g.add_argument("--plot", type=Path, metavar="PNG",
                   help="write the memory timeline across the stages, original against planned, with the "
                        "budget, to this PNG. Example: --plot svd-xt.png")
    return p


def _policy(args) -> Policy:
    """The Policy the options ask for (their types already checked each value; Policy checks them again)."""
    fraction = {} if args.min_region_fraction is None else {"min_region_fraction": args.min_region_fraction}
    if args.cache_point is not None and args.rehash_every is None:
        raise UsageError("argument --cache-point: only used with --rehash-every N; add --rehash-every 3, or "
                         "drop --cache-point")
    rehash = None if args.rehash_every is None else StepRehash(full_every=args.rehash_every,
                                                               cache_point=args.cache_point)
    return Policy(slices=args.slices, spatial=args.spatial, temporal=args.temporal, batch=args.batch_split,
                  max_memory=args.max_memory, pipeline=args.pipeline, rehash=rehash, **fraction)


# -- commands ----------------------------------------------------------------------------------------------
def cmd_explain(args, session: Session, progress: Progress) -> int:
    from .report import explain_table, report_json
    report = session.report
    if args.ranks:
        from .entry import plan_ranks
        with progress.step(f"planning on {', '.join(map(str, args.ranks))} devices"):
            report.ranks = plan_ranks(session.entry, report.policy, args.ranks, args.link)
    known = args.lower_bound or report.policy.max_memory is not None  # a budget computes it anyway
    if args.lower_bound:
        with progress.step("lower bound (the finest slicing the rules allow)"):
            report.lower_bound_bytes  # noqa: B018  (computed on first access)
    if args.json:
        print(json.dumps(report_json(report, session, lower_bound=known), indent=1))
        return 0
    print(f"{session.describe()}; planned in {session.seconds:.1f} s")
    print(explain_table(report, top=args.top, lower_bound=known, missing="not computed: add --lower-bound"))
    if not report.policy.slices_anything and report.policy.max_memory is None:
        print("\nnote: the policy slices nothing; try --slices 8, --batch-split 2 or --max-memory 6GiB",
              file=sys.stderr)
    return 0


def cmd_viz(args, session: Session, progress: Progress) -> int:
    from .render import graphs_json, to_dot, to_html, to_svg
    graphs = session.draw(args.graph, depth=args.depth, expand=args.expand, progress=progress)
    folder, stem = output_dir(args.output), args.name or session.stem
    title = session.describe()
    written = []
    if "dot" in args.format:
        written.append(_write(folder / f"{stem}-viz.dot", to_dot(graphs, title)))
    if "svg" in args.format or "html" in args.format:
        with progress.step("drawing with Graphviz (dot)"):
            svg = to_svg(graphs, title)
        if "svg" in args.format:
            written.append(_write(folder / f"{stem}-viz.svg", svg))
        if "html" in args.format:
            written.append(_write(folder / f"{stem}-viz.html", to_html(graphs, svg, title)))
    if args.json:
        print(json.dumps({"files": [str(p) for p in written], "graphs": graphs_json(graphs)}, indent=1))
    else:
        print("\n".join(str(p) for p in written))
    return 0


def cmd_memory(args, session: Session, progress: Progress) -> int:
    from .timeline import memory_timeline, plot_memory
    report = session.report
    tl = memory_timeline(report, title=f"{session.describe()}\n{report.policy.describe()}")
    path = output_dir(args.output) / f"{args.name or session.stem}-memory.png"
    with progress.step("plotting"):
        plot_memory(tl, path)
    if args.json:
        print(json.dumps({"files": [str(path)], "weight_bytes": report.weight_bytes,
                          "original_peak_bytes": report.original_peak_bytes, "peak_bytes": report.peak_bytes,
                          "blocks": [asdict(b) for b in tl.boundaries]}, indent=1))
    else:
        print(path)
    return 0


def cmd_pipeline(args, policy: Policy, progress: Progress) -> int:
    from .pipelines import build_pipeline
    from .session import DTYPES
    from .stages import explain_pipeline
    if args.plot is not None and not args.plot.parent.is_dir():
        raise UsageError(f"argument --plot: folder {args.plot.parent} does not exist; create it or choose another path")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UsageError(f"argument --plot: expected a .png path, got {args.plot}")
    dtype = args.dtype or ("fp32" if args.model.endswith("-tiny") else "fp16")
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # the fp16 cast notice of from_config models is not for CLI users
    start = time.perf_counter()
    with progress.step(f"building the {args.model} pipeline on the meta device"):
        pipe = build_pipeline(args.model, device="meta", dtype=DTYPES[dtype])
    with progress.step(f"planning encode, denoise and decode under {policy.describe()}"):
        try:
            report = explain_pipeline(pipe, height=args.height, width=args.width, num_frames=args.frames,
                                      policy=policy, batch=args.batch, guidance=not args.no_guidance,
                                      decode_chunk_size=args.decode_chunk_size,
                                      offload=args.offload if policy.max_memory is not None else "auto")
        except ValueError as e:  # a size the pipeline's VAE cannot take
            raise UsageError(str(e)) from None
        report.lower_bound_bytes  # noqa: B018  (computed on first access: inside the progress step)
    report.seconds = time.perf_counter() - start
    if args.plot is not None:
        with progress.step("plotting"):
            report.plot(args.plot)
    if args.json:
        print(json.dumps(dict(report.to_json(), files=[str(args.plot)] if args.plot else []), indent=1))
        return 0
    print(report.table())
    print(f"planned in {report.seconds:.1f} s" + (f"; timeline: {args.plot}" if args.plot else ""))
    return 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _one_line(e: BaseException, limit: int = 600) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    progress = Progress(enabled=sys.stderr.isatty())
    start = time.perf_counter()
    try:
        policy = _policy(args)
        if args.command == "pipeline":  # plans a whole pipeline, not one UNet session
            code = args.func(args, replace(policy, halo=args.halo, host_memory=args.host_memory), progress)
        else:
            if args.command == "viz" and {"svg", "html"} & set(args.format):
                from .render import require_dot
                require_dot()  # before the planning, not after
            if getattr(args, "ranks", None):  # planned for spread regions (NOTE [No region floor across devices])
                from .distributed import compile_policy
                policy = compile_policy(policy)
            session = load_session(args, policy, progress)
            code = args.func(args, session, progress)
    except UsageError as e:  # an argument found wrong only once the model is known (--expand)
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FxstreamError, OSError) as e:
        print(f"fxstream: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxstream: interrupted", file=sys.stderr)
        return 130
    progress.note(f"done in {time.perf_counter() - start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
