"""Benchmark: ``Policy(distributed=...)`` (fxstream/distributed.py), measured on the CPU and planned at full size.

    python tools/bench_distributed.py                      # both tables; writes docs/benchmarks.md
    python tools/bench_distributed.py --no-full --no-write
    python tools/bench_distributed.py --no-cpu --ranks 2 4 8
    python tools/bench_distributed.py --budget             # only the budget per rank; its own section

Two tables:

- *Measured on the CPU* (gloo on 127.0.0.1, fp32, random weights): a UNet (``--model``, default svd-mid) with
  ``Policy(slices=N)`` in one process with 2 intra-op threads, against the same policy with ``distributed=True``
  in 2 processes of 1 thread each (the same 2 cores), and the exported graph (``Policy()``, 2 threads); then the
  same at batch 2 with ``Policy(batch=2, slices=N)`` (the guidance batch split, spread itself on 2 ranks), and for
  SVD's temporal VAE decoder (2 frames of 16x16 latents) with ``Policy(halo=4)``. Median
  latency of ``--repeats`` calls after one untimed call (each rank's median; the slower rank counts), the
  activation peak measured by fxstream's tracker (per rank), the bytes each rank received per call as the plan
  counts them, and the largest difference from the one-process compiled output.
- *Planned on the meta device* (fp16, batch 2, no weights, no compute): SVD 14x576x1024, SVD-XT 25x576x1024 and
  AnimateDiff 16x512x512 (frames x pixels) under ``Policy(slices=8)`` on 2, 4 and 8 devices (``--ranks``) over
  NVLink and PCIe 4.0, and under ``Policy(batch=2, slices=8)`` (the guidance halves) on 2 and 4: the per-rank
  planned peak against the one-device plan's, bytes received and collectives per call, and the latency model's
  predicted speedup (fxstream.distributed.rank_plan; its link figures and compute rate are in NOTE [Link figures]);
  and the VAE decoders of SVD (14 frames at 576x1024) and SD 1.5 (16 at 512x512) under ``Policy(halo=8)``.

With ``--budget``, a third table alone (its own section): full-size SVD-XT under ``Policy(max_memory=weights +
A)`` (``--activations A`` GiB, default 0.85) on one device and on each of ``--ranks`` devices (NOTE [A budget per
rank]): whether one device can meet it, the slicing the ranks' search chose, the busiest rank's planned peak, the
predicted speedup and the search's wall time.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20
FULL = {"svd": ({}, "14x576x1024"), "svd-xt": ({"frames": 25}, "25x576x1024"), "animatediff": ({"frames": 16}, "16x512x512")}


def _calls(compiled, kw, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        compiled(**kw)
        times.append(time.perf_counter() - t)
    return times


# the decoder measured on the CPU: SVD's temporal decoder (released widths), 2 frames of 16x16 latents (128x128
# pixels), Policy(halo=4): about 11 s a call on 2 cores (the statistics passes recompute; 1.7 s exported). At
# bench_decoder's small widths the values between regions are too small for checkpoints at 8 bands: one region.
DECODER_CPU = (2, 16, 16)
DECODER_HALO = 4


def _subject(model: str, batch: int = 1):
    """The module and inputs measured: a UNet (``batch`` 2: a guided step's batch) or, for ``svd-decoder``, SVD's
    temporal VAE decoder (random weights) on ``DECODER_CPU`` latents."""
    if model == "svd-decoder":
        sys.path.insert(0, str(ROOT / "tools"))
        from bench_decoder import build_vae, decoder_inputs
        frames, h, w = DECODER_CPU
        return build_vae("svd").decoder, decoder_inputs("svd", frames, h, w)
    from fxstream.models import build_unet, example_inputs
    unet = build_unet(model)
    return unet, example_inputs(model, unet, batch=batch)


def _policy(model: str, slices: int, batch: int = 1, distributed=None):
    """``Policy(halo=slices)`` for the decoder, else ``Policy(slices=slices)`` (``batch`` 2: split in 2)."""
    import fxstream
    if model == "svd-decoder":
        return fxstream.Policy(halo=slices, distributed=distributed)
    return fxstream.Policy(batch=batch if batch > 1 else None, slices=slices, distributed=distributed)


def child(model: str, slices: int, repeats: int, out: str, batch: int = 1) -> None:
    """One rank of the distributed row (RANK, WORLD_SIZE, MASTER_* set by the parent); ``batch`` 2: the guidance
    batch split in 2 (``Policy(batch=2)``)."""
    import torch.distributed as dist

    import fxstream
    from fxstream.memory import measure_peak
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    unet, kw = _subject(model, batch)
    with torch.no_grad():
        compiled = fxstream.compile(unet, _policy(model, slices, batch, fxstream.Distributed(timeout=3600)))
        compiled(**kw)
        times = _calls(compiled, kw, repeats)
        got, peak = measure_peak(compiled, **kw)
        got = got[0] if isinstance(got, (tuple, list)) else getattr(got, "sample", got)
    plan = compiled.explain().ranks[0]
    torch.save({"times": times, "peak": peak, "out": got, "received": plan.bytes_received,
                "collectives": plan.collectives, "planned": plan.peak_bytes}, f"{out}/rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


def cpu_rows(model: str, slices: int, repeats: int, batch: int = 1) -> list:
    """The CPU rows at ``batch`` (2: a guided step's batch, split in 2 by ``Policy(batch=2)``)."""
    import fxstream
    from fxstream.memory import measure_peak
    torch.set_num_threads(2)
    unet, kw = _subject(model, batch)
    policy = _policy(model, slices, batch)
    what = policy.describe().removeprefix("Policy(").removesuffix(")")
    label = f"{model}" if model == "svd-decoder" else f"batch {batch}"
    rows = []
    with torch.no_grad():
        for name, p in ((f"{label}: exported graph, 1 process x 2 threads", fxstream.Policy()),
                        (f"{label}: Policy({what}), 1 process x 2 threads", policy)):
            compiled = fxstream.compile(unet, p)
            compiled(**kw)
            times = _calls(compiled, kw, repeats)
            got, peak = measure_peak(compiled, **kw)
            got = got[0] if isinstance(got, (tuple, list)) else getattr(got, "sample", got)
            rows.append({"variant": name, "seconds": statistics.median(times), "peak MiB": peak / MiB,
                         "planned MiB": compiled.explain().peak_bytes / MiB,
                         "received MiB": 0.0, "collectives": 0, "diff": 0.0})
            if p is policy:
                ref = got
            print(rows[-1], flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "--child", model, str(slices), str(repeats), out,
                                   str(batch)], env=dict(env, RANK=str(r))) for r in range(2)]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a rank exited with {p.returncode}")
        ranks = [torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(2)]
    rows.append({"variant": f"{label}: Policy({what}, distributed=True), 2 processes x 1 thread",
                 "seconds": max(statistics.median(r["times"]) for r in ranks),
                 "peak MiB": max(r["peak"] for r in ranks) / MiB, "planned MiB": max(r["planned"] for r in ranks) / MiB,
                 "received MiB": ranks[0]["received"] / MiB,
                 "collectives": ranks[0]["collectives"],
                 "diff": max((r["out"] - ref).abs().max().item() for r in ranks)})
    print(rows[-1], flush=True)
    return rows


def full_rows(ranks: list) -> list:
    """Each model under ``Policy(slices=8)`` on ``ranks`` (the compile a process group of that size runs:
    fxstream.entry.rank_compile), under ``Policy(batch=2, slices=8)`` on 2 and 4 (the guidance halves on 2
    ranks, or on 2 groups of 2), and under ``Policy(slices=16)`` on 4 and 8 (frames cut again within: NOTE [Slices within one element]), each against the
    one-device ``Policy(slices=8)`` plan."""
    import fxstream
    from fxstream.distributed import compile_policy, planned_flops, rank_plan
    from fxstream.entry import Entry, rank_compile
    from fxstream.memory import plan_memory
    from fxstream.models import build_unet, example_inputs
    rows = []
    for name, (extra, size) in FULL.items():
        unet = build_unet(name, device="meta", dtype=torch.float16)
        kw = example_inputs(name, unet, **extra)
        base = fxstream.Policy(slices=8)
        one_entry = Entry(unet, kw, compile_policy(base))
        one = plan_memory(one_entry.compiled.graph_module).peak_bytes  # the one-device sliced plan
        # and Policy(slices=16) on 4 and 8: each frame cut again where a region is asked for more slices than it has
        # frames (NOTE [Slices per rank], NOTE [Slices within one element])
        for policy, counts in ((base, ranks), (fxstream.Policy(batch=2, slices=8), [2, 4]),
                               (fxstream.Policy(slices=16), [n for n in ranks if n >= 4])):
            entry = one_entry if policy == base else Entry(unet, kw, compile_policy(policy), program=one_entry.program)
            for n in counts:
                t = time.perf_counter()
                compiled = rank_compile(entry, policy, n)
                seconds = time.perf_counter() - t
                for link in ("nvlink", "pcie4"):
                    p = rank_plan(compiled, n, link, one_device=one, one_flops=planned_flops(one_entry.compiled))
                    rows.append({"model": name, "size": size, "policy": policy.describe(), "ranks": p.ranks,
                                 "link": p.link, "batch split": p.batch_split,
                                 "one device GiB": p.one_device_peak_bytes / 2 ** 30,
                                 "per rank GiB": p.peak_bytes / 2 ** 30,
                                 "received GiB": p.bytes_received / 2 ** 30, "collectives": p.collectives,
                                 "spread": p.spread_share, "planned ms": p.seconds * 1e3, "speedup": p.speedup,
                                 "compile s": seconds})
                    print(rows[-1], flush=True)
    return rows


DECODERS = {"svd": ((14, 72, 128), "14x576x1024"), "sd15": ((16, 64, 64), "16x512x512")}


def decoder_rows(ranks: list) -> list:
    """The VAE decoders (SVD's temporal decoder, SD 1.5's) under ``Policy(halo=8)`` on ``ranks``: their halo regions
    spread, each rank holding its rows of the values between them (NOTE [Rows held in parts]); 8 bands per rank."""
    import fxstream
    from fxstream.distributed import compile_policy, planned_flops, rank_plan
    from fxstream.entry import Entry
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_decoder import build_vae, decoder_inputs
    rows = []
    for kind, ((frames, h, w), size) in DECODERS.items():
        vae = build_vae(kind, "meta", torch.float16)
        kw = decoder_inputs(kind, frames, h, w, "meta", torch.float16)
        policy = fxstream.Policy(halo=8)
        one_entry = Entry(vae.decoder, kw, compile_policy(policy))
        one = one_entry.report.peak_bytes
        for n in ranks:
            t = time.perf_counter()
            compiled = Entry(vae.decoder, kw, compile_policy(policy, n), program=one_entry.program).compiled
            seconds = time.perf_counter() - t
            for link in ("nvlink", "pcie4"):
                p = rank_plan(compiled, n, link, one_device=one, one_flops=planned_flops(one_entry.compiled))
                rows.append({"model": f"{kind} VAE decoder", "size": size, "policy": policy.describe(), "ranks": n,
                             "link": p.link, "batch split": 1, "one device GiB": one / 2 ** 30,
                             "per rank GiB": p.peak_bytes / 2 ** 30, "received GiB": p.bytes_received / 2 ** 30,
                             "collectives": p.collectives, "spread": p.spread_share, "planned ms": p.seconds * 1e3,
                             "speedup": p.speedup, "compile s": seconds})
                print(rows[-1], flush=True)
    return rows


def budget_rows(ranks: list, activations_gib: float) -> list:
    """Full-size SVD-XT (fp16, meta) under ``Policy(max_memory=weights + activations_gib GiB)``: one device's search
    and each rank count's (NOTE [A budget per rank], fxstream.entry.compile_ranks)."""
    import fxstream
    from fxstream.distributed import rank_plan
    from fxstream.entry import Entry, compile_ranks
    from fxstream.models import build_unet, example_inputs
    extra, size = FULL["svd-xt"]
    unet = build_unet("svd-xt", device="meta", dtype=torch.float16)
    kw = example_inputs("svd-xt", unet, **extra)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    policy = fxstream.Policy(max_memory=weights + int(activations_gib * 2 ** 30))
    t = time.perf_counter()
    try:
        peak = fxstream.explain(unet, kw, policy).peak_bytes
        one = f"fits: {peak / 2 ** 30:.3f} GiB"
    except fxstream.MemoryBudgetError as e:
        one = f"cannot: lower bound {e.lower_bound_bytes / 2 ** 30:.3f} GiB"
    rows = [{"model": "svd-xt", "size": size, "ranks": 1, "budget": policy.max_memory, "weights": weights,
             "chosen": one, "per rank GiB": None, "speedup": None, "batch split": 1,
             "plan s": time.perf_counter() - t}]
    print(rows[-1], flush=True)
    gm = Entry(unet, kw, fxstream.Policy()).compiled.original  # one capture for the ranks' searches
    for n in ranks:
        t = time.perf_counter()
        try:
            chosen, compiled, _ = compile_ranks(gm, policy, weights, n)
        except fxstream.MemoryBudgetError as e:
            rows.append(dict(rows[0], ranks=n, chosen=f"cannot: {e.lower_bound_bytes / 2 ** 30:.3f} GiB least",
                             **{"plan s": time.perf_counter() - t}))
            continue
        seconds = time.perf_counter() - t
        p = rank_plan(compiled, n, "nvlink")
        what = "the one-device search" if chosen.max_memory is not None else \
            f"slices={chosen.slices * p.batch_split // n} per rank"  # compile_policy's count over the ranks
        rows.append(dict(rows[0], ranks=n, chosen=what, **{"per rank GiB": p.peak_bytes / 2 ** 30,
                    "speedup": p.speedup, "batch split": p.batch_split, "plan s": seconds}))
        print(rows[-1], flush=True)
    return rows


def budget_doc(rows: list, argv) -> str:
    from fxstream.bench import provenance
    r0 = rows[0]
    doc = "## A budget per rank (Policy(max_memory=..., distributed=...))\n\n" + provenance(
        "python tools/bench_distributed.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    doc += (f"Planned on the meta device (fp16, batch 2): full-size SVD-XT {r0['size']} (frames x pixels) under "
            f"`Policy(max_memory={r0['budget'] / 2 ** 30:.2f} GiB)`, its weights {r0['weights'] / 2 ** 30:.2f} GiB "
            "(every rank holds them) plus "
            f"{(r0['budget'] - r0['weights']) / 2 ** 30:.2f} GiB of activations. One device: its budget search "
            "(`fxstream.explain`). N ranks: the search of NOTE [A budget per rank] (`fxstream.entry.compile_ranks`: "
            "the fewest slices per rank, the guidance split first where it plans faster, whose busiest rank fits); "
            "'per rank': the busiest rank's planned activation peak (a gathered output's copy counted at the region gathering it); 'speedup': "
            "the latency model's over one device on NVLink (NOTE [Link figures]); 'plan s': the search's wall time "
            "on 2 cores. Predictions, not measurements: no multi-GPU machine was at hand.\n\n```\n")
    doc += tabulate([(r["model"], r["size"], r["ranks"], r["chosen"], _split(r) if r["ranks"] > 1 else "-",
                      "-" if r["per rank GiB"] is None else f"{r['per rank GiB']:.3f}",
                      "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", f"{r['plan s']:.0f}") for r in rows],
                    headers=["model", "frames x pixels", "ranks", "chosen", "batch split", "per rank GiB", "speedup",
                             "plan s"])
    return doc + "\n```\n"


def _split(r) -> str:
    parts = r["batch split"]
    if parts <= 1:
        return "-"
    return f"{parts} parts" + (f", groups of {r['ranks'] // parts}" if r["ranks"] > parts else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="svd-mid", help="the UNet measured on the CPU (default svd-mid)")
    ap.add_argument("--slices", type=int, default=8, help="Policy(slices=N) on the CPU (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median; default 3)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="device counts planned (default 2 4 8)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement")
    ap.add_argument("--no-full", action="store_true", help="skip the full-size plans on meta")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    ap.add_argument("--not-quiet", metavar="WHAT", help="what else ran meanwhile (timings are then indicative)")
    ap.add_argument("--budget", action="store_true", help="only the budget per rank (NOTE [A budget per rank])")
    ap.add_argument("--activations", type=float, default=0.85,
                    help="with --budget: GiB of activations beside the weights (default 0.85)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        model, slices, repeats, out, batch = args.child
        child(model, int(slices), int(repeats), out, int(batch))
        return
    from fxstream.bench import provenance, write_section
    if args.budget:
        rows = budget_rows(args.ranks, args.activations)
        doc = budget_doc(rows, argv)
        print(doc)
        if not args.no_write:
            write_section(ROOT / "docs", "distributed-budget", doc, {"rows": rows, "args": vars(args)})
        return
    cpu = [] if args.no_cpu else cpu_rows(args.model, args.slices, args.repeats) + \
        cpu_rows(args.model, args.slices, args.repeats, batch=2) + cpu_rows("svd-decoder", DECODER_HALO, args.repeats)
    full = [] if args.no_full else full_rows(args.ranks) + decoder_rows(args.ranks)
    doc = "## Across devices (Policy(distributed=...))\n\n" + provenance(
        "python tools/bench_distributed.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    doc += ("Each spread region runs a contiguous run of its slices on each rank, cut `k * N` ways for "
            "`Policy(slices=k)` on N ranks (NOTE [Slices per rank]); a region output that only spread regions read "
            "stays in parts, each rank keeping its own, and a reader cutting another dim gets its part by one "
            "all-to-all (NOTE [Values held in parts]); other outputs are gathered by one all-gather; partial sums "
            "are gathered and added in slice order; a halo region's output that only halo regions read stays in "
            "rows, each rank holding the rows it made and its readers' halo rows, sent by its neighbours (NOTE "
            "[Rows held in parts]); ops outside regions run on every rank (fxstream/distributed.py). ")
    doc += (f"Timings: {args.not_quiet}.\n\n" if args.not_quiet else "Timings on a quiet machine.\n\n")
    if cpu:
        frames, h, w = DECODER_CPU
        doc += (f"Measured on the CPU: {args.model}, fp32, random weights, batch 1, and batch 2 (a guided step) with "
                f"its batch split in 2 (`Policy(batch=2)`: on 2 ranks the split itself is spread, NOTE [Batch "
                f"splits across ranks]); and SVD's temporal VAE decoder (random weights) on {frames} frames of "
                f"{h}x{w} latents ({8 * h}x{8 * w} pixels) with `Policy(halo={DECODER_HALO})` (on 2 ranks "
                f"{2 * DECODER_HALO} bands, the values between its halo regions held in rows: NOTE [Rows held in "
                f"parts]); the "
                f"same 2 cores either as one "
                f"process of 2 threads or as 2 gloo processes of 1 thread. Latency: median of {args.repeats} calls "
                f"(the slower rank); peak: the tracker's activation peak (the larger rank's), planned: the "
                f"plan's (per rank for the distributed rows); received: per rank per call, as planned; diff: "
                f"largest difference from the one-process `Policy(slices={args.slices})` output (the decoder's: "
                f"`Policy(halo={DECODER_HALO})`; the 2-rank rows cut each region in twice as many slices: float rounding)."
                f"\n\n```\n")
        doc += tabulate([(r["variant"], f"{r['seconds']:.2f}", f"{r['peak MiB']:.1f}", f"{r['planned MiB']:.1f}",
                          f"{r['received MiB']:.1f}", r["collectives"], f"{r['diff']:.1e}") for r in cpu],
                        headers=["variant", "latency s", "peak MiB", "planned MiB", "received MiB", "collectives",
                                 "max |diff|"])
        doc += "\n```\n\n"
    if full:
        doc += ("Planned on the meta device (fp16, batch 2: classifier-free guidance in one call): `Policy(slices=8)` "
                "with no region floor (NOTE [No region floor across devices]) as a process group of N runs it (the "
                "guidance batch split where that plans faster: 'batch split', each rank running whole parts, or "
                "groups of ranks each spreading one part's regions: NOTE [Batch splits across ranks]), and "
                "`Policy(batch=2, slices=8)` asked for on 2 and 4, and `Policy(slices=16)` on 4 and 8 (where a "
                "region is asked for more slices than its frames, each frame is cut again along its tokens or "
                "height: NOTE [Slices within one element]); the VAE decoders (random weights from the "
                "released configs, the latents of those videos) under `Policy(halo=8)`, cut in 8N bands on N ranks "
                "with the one device's checkpoints (NOTE [Checkpoints across ranks]). "
                "'one device': the one-device `Policy(slices=8)` plan with no region floor (the UNets' every row; the "
                "decoders' `Policy(halo=8)`); 'per rank': the busiest rank's planned activation peak (the region "
                "phases as `_run_sharded` runs them: exchanges before a region's outputs, their sources freed where "
                "it reads them last, a gather's copy after its slices: `RankParts`) and its ratio to "
                "one device's (issue 22's target: <= 1.1/N); what a rank receives per call; the predicted speedup "
                "over one device (the FLOPs each plan computes, a halo region's weighted by its planned compute: halo rows "
                "and statistics passes computed again, 13.3x its ops' for SVD's decoder on one device; compute at the rate measured on one H200 for full-size SVD, 2.4e14 FLOP/s; links "
                "at 80% of their nominal one-direction bandwidth, 20/30 us per collective: NOTE [Link figures]); "
                "'plan s': the wall time of that rank count's compiles. Predictions, not measurements: no multi-GPU "
                "machine was at hand.\n\n```\n")
        doc += tabulate([(r["model"], r["size"], r["policy"], r["ranks"], r["link"], _split(r),
                          f"{r['one device GiB']:.3f}", f"{r['per rank GiB']:.3f}",
                          f"{r['per rank GiB'] / r['one device GiB']:.3f} ({1.1 / r['ranks']:.3f})",
                          f"{r['received GiB']:.2f}", r["collectives"], f"{r['spread']:.1%}", f"{r['planned ms']:.0f}",
                          f"{r['speedup']:.2f}x", f"{r['compile s']:.0f}") for r in full],
                        headers=["model", "frames x pixels", "policy", "ranks", "link", "batch split",
                                 "one device GiB", "per rank GiB", "ratio (target)", "received GiB/call",
                                 "collectives", "FLOPs spread", "planned ms", "speedup", "plan s"])
        doc += "\n```\n"
    print(doc)
    if not args.no_write:
        write_section(ROOT / "docs", "distributed", doc, {"cpu": cpu, "full": full, "args": vars(args)})


if __name__ == "__main__":
    main()
