"""Benchmark: the sliced graph's latency against the unsliced one when other processes load the CPU.

    python tools/bench_load.py                       # svd-mid (batch 1), 3 background processes; writes docs/benchmarks.md
    python tools/bench_load.py --load 4 --load-kind matmul --repeats 5 --no-write
    python tools/bench_load.py --batch 2 --threads 2 --no-write   # the issue's size, intra-op threads only

The tool starts its own bounded background load: ``--load`` processes (default 3), each running a CPU-bound loop,
``--load-kind python`` (default: pure-Python float arithmetic, no memory traffic) or ``matmul`` (256x256 float32
matmuls through torch with one thread). They start before the loaded measurements, run while they are taken,
and are killed in a ``finally``; each also ends on its own when this process dies or after ``--load-max-s``.

Variants, all compiled (and called once) before anything is timed: the exported graph (``fxstream.compile`` with
``Policy()``: nothing sliced, the baseline of tools/bench_compare.py), run as in a process of its own (no short
OpenMP waits held: fxstream.runtime.SHORT_WAITS is released before each of its calls); ``Policy(slices=N)`` as it
runs by default (its regions hold short OpenMP waits while the CPU is oversubscribed); the same compiled module
with ``FXSTREAM_SHORT_WAITS=0`` behaviour (every thread spins as libgomp's default has it: the runtime before
this tool); and, with several threads, the exported graph with the short waits held through its call (what it
gains from the same change). Conditions: no load and ``--load`` processes, each with the intra-op thread count at
start (``--threads``) and with ``torch.set_num_threads(1)``. Within a condition the variants are timed
interleaved, one call each per round (A, B, C, A, B, C, ...), so that they see the same load; latency is the
median of ``--repeats`` rounds after one untimed call of each variant per thread count. 'vs exported' is the
median over rounds of each round's ratio to the exported graph's call in that round. 'short waits': whether the
sliced module's calls held them (at the end of its last call). 'load avg' is the machine's 1-minute load
average (os.getloadavg) when the condition ends: it counts this tool's own processes and whatever else ran.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxstream
from fxstream.bench import provenance, write_section
from fxstream.models import build_unet, example_inputs
from fxstream.runtime import SHORT_WAITS, LoopRegion

ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20

# One background process: a CPU-bound loop until the deadline, or until its parent (this tool) is gone.
_LOAD = {
    "python": ("import os, time\n"
               "end = time.time() + {max_s}\n"
               "x = 1.0\n"
               "while time.time() < end and os.getppid() == {parent}:\n"
               "    for _ in range(100000):\n"
               "        x = (x * 1.0000001 + 1.0) % 1e6\n"),
    "matmul": ("import os, time, torch\n"
               "torch.set_num_threads(1)\n"
               "a = torch.randn(256, 256)\n"
               "end = time.time() + {max_s}\n"
               "while time.time() < end and os.getppid() == {parent}:\n"
               "    for _ in range(50):\n"
               "        a @ a\n"),
}


class BackgroundLoad:
    """``n`` processes running a CPU-bound loop while the ``with`` block runs; killed when it ends."""

    def __init__(self, n: int, kind: str = "python", max_s: float = 3600.0):
        self.n, self.code = n, _LOAD[kind].format(max_s=float(max_s), parent=os.getpid())
        self.procs: list = []

    def __enter__(self):
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen([sys.executable, "-c", self.code]))
            time.sleep(2.0 if self.n else 0.0)  # let them start (a torch import takes a second)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []

    def __exit__(self, *exc):
        self.stop()
        return False


def _loops(compiled) -> list:
    return [m for m in compiled._last.compiled.graph_module.modules() if isinstance(m, LoopRegion)]


# How each variant runs: the short OpenMP waits' mode during its calls ("hold": held through the whole call).
EXPORTED, SLICED, SPINNING, EXPORTED_HELD = "off", "auto", "spin", "hold"


def prepare(model: str, batch: int, frames: int | None, slices: int, log=print):
    """The UNet's inputs and the variants: [(label, compiled module, note, how it runs)]."""
    unet = build_unet(model)
    kw = example_inputs(model, unet, batch=batch, frames=frames)
    exported = fxstream.compile(unet, policy=fxstream.Policy())
    sliced = fxstream.compile(unet, policy=fxstream.Policy(slices=slices))
    with torch.no_grad():
        log("exported graph: first call")
        ref = exported(**kw)[0]
        log(f"Policy(slices={slices}): first call (compile)")
        y = sliced(**kw)[0]
    base, report = exported.explain(), sliced.explain()
    loops = [m for m in _loops(sliced) if not m.nested]
    exported_note = f"planned {base.original_peak_bytes / MiB:.1f} MiB"
    sliced_note = (f"planned {report.peak_bytes / MiB:.1f} MiB; {len(loops)} regions; max |diff| "
                   f"{(y - ref).abs().max().item():.1e}")
    return kw, [("exported graph", exported, exported_note, EXPORTED),
                (f"Policy(slices={slices})", sliced, sliced_note, SLICED),
                (f"Policy(slices={slices}), FXSTREAM_SHORT_WAITS=0", sliced, "the runtime before: threads spin", SPINNING),
                ("exported graph, short waits held", exported, exported_note, EXPORTED_HELD)]


def _call(compiled, kw, how: str, threads: int) -> float:
    """Seconds of one call run as ``how`` says (setting up the short waits is not timed)."""
    SHORT_WAITS.mode = {EXPORTED: "auto", SLICED: "auto", SPINNING: "off", EXPORTED_HELD: "on"}[how]
    if how in (EXPORTED, SPINNING):
        SHORT_WAITS.release()
    elif how == EXPORTED_HELD:
        SHORT_WAITS.hold(threads, seconds=3600.0)
    t = time.perf_counter()
    compiled(**kw)
    seconds = time.perf_counter() - t
    if how == EXPORTED_HELD:
        SHORT_WAITS.release()
    SHORT_WAITS.mode = "auto"
    return seconds


def measure(variants, kw, repeats: int, threads: int) -> tuple:
    """{label: [seconds per round]}, timed interleaved, and whether the sliced calls held short waits."""
    times, held = {label: [] for label, *_ in variants}, False
    with torch.no_grad():
        for _ in range(repeats):
            for label, compiled, _, how in variants:
                times[label].append(_call(compiled, kw, how, threads))
                held = SHORT_WAITS.held if how == SLICED else held
    SHORT_WAITS.release()
    return times, held


def run(args, log=print) -> tuple:
    kw, variants = prepare(args.model, args.batch, args.frames, args.slices, log)
    rows, data = [], []
    for threads in dict.fromkeys([args.threads, 1]):
        torch.set_num_threads(threads)
        # with one thread nothing spins: the short waits change nothing, so those variants are left out
        now = [v for v in variants if threads > 1 or v[3] in (EXPORTED, SLICED)]
        with torch.no_grad():  # one untimed call each: kernels pick their algorithms per thread count
            for _, compiled, _, how in now[:2]:
                _call(compiled, kw, how, threads)
        for load in dict.fromkeys([0, args.load]):
            log(f"threads={threads}, background processes={load}: {args.repeats} rounds")
            with BackgroundLoad(load, args.load_kind, args.load_max_s):
                times, held = measure(now, kw, args.repeats, threads)
                loadavg = os.getloadavg()[0]
            base = times[now[0][0]]
            for label, _, note, how in now:
                ts = times[label]
                ratio = statistics.median(t / b for t, b in zip(ts, base))
                waits = {SLICED: "yes" if held else "no", SPINNING: "no", EXPORTED: "no", EXPORTED_HELD: "yes"}[how]
                rows.append([load, threads, label, f"{statistics.median(ts):.1f}", f"{min(ts):.1f}-{max(ts):.1f}",
                             f"{ratio:.2f}x", waits, f"{loadavg:.1f}", note])
                data.append({"load": load, "threads": threads, "variant": label, "seconds": ts, "ratio": ratio,
                             "short_waits": waits, "loadavg": loadavg, "note": note})
            log(tabulate(rows[-len(now):], disable_numparse=True))
    torch.set_num_threads(args.threads)
    return rows, data


HEADERS = ["background", "threads", "variant", "median s", "min-max s", "vs exported", "short waits", "load avg",
           "note"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="svd-mid")
    ap.add_argument("--batch", type=int, default=1, help="videos per call (default 1: one svd-mid forward under "
                    "load takes about a minute at batch 2)")
    ap.add_argument("--frames", type=int, default=None, help="default: the model's own")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--load", type=int, default=3, help="background processes for the loaded conditions")
    ap.add_argument("--load-kind", choices=sorted(_LOAD), default="python")
    ap.add_argument("--load-max-s", type=float, default=3600.0, help="a background process ends after this long")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="intra-op threads (default: torch's, the machine's cores)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per condition")
    ap.add_argument("--note", default="", help="what else was running, for the written section")
    ap.add_argument("--no-write", action="store_true", help="print only; do not rewrite docs/benchmarks.md")
    args = ap.parse_args(argv)
    before = os.getloadavg()
    rows, data = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    text = tabulate(rows, headers=HEADERS, disable_numparse=True)
    print(text)
    if args.no_write:
        return 0
    cmd = shlex.join(["python", "tools/bench_load.py", *(argv if argv is not None else sys.argv[1:])])
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins, then sleeps)")
    doc = ("## Under load\n\n" + provenance(cmd) +
           f"{args.model}, batch {args.batch}, fp32, random weights. Background: {args.load} processes of "
           f"{'pure-Python float arithmetic' if args.load_kind == 'python' else 'one-thread torch matmuls'} "
           "started by the tool (see tools/bench_load.py). The exported graph runs as in a process of its own; "
           f"Policy(slices={args.slices}) as it runs by default (short OpenMP waits held while the CPU pressure is "
           "high: fxstream.runtime.ShortWaits); 'FXSTREAM_SHORT_WAITS=0': the same module with libgomp's threads "
           "spinning as before; 'exported graph, short waits held': what the exported graph gains from the same "
           "waits. 'short waits': whether the calls held them. Variants timed interleaved, one call each per round; "
           f"median of {args.repeats} rounds; 'vs exported': the median of the rounds' ratios to the exported "
           "graph. 'load avg': the 1-minute load average when the condition ended, this tool's processes "
           f"included (before the tool started: {before[0]:.1f}, 5-minute {before[1]:.1f}). OMP_WAIT_POLICY: "
           f"{wait_policy}." + (f" {args.note}" if args.note else "") + "\n\n"
           f"```\n{text}\n```\n")
    write_section(ROOT / "docs", "load", doc, {"rows": data, "args": vars(args)})
    print("wrote docs/benchmarks.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
