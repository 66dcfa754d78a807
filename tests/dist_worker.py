"""One rank of tests/test_distributed.py: ``python tests/dist_worker.py SCENARIO OUT_DIR`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (gloo on 127.0.0.1). Writes ``OUT_DIR/rank{r}.pt``: a dict of what it computed and
what it raised, for the test to check.

Scenarios:
- ``equal``: the tiny SVD UNet compiled with ``Policy(slices=4, distributed=True)`` and SVD's temporal decoder
  (tests/test_halo.py's) with ``Policy(halo=2, distributed=True)`` (halo regions, their outputs held in rows):
  their outputs, the measured activation peaks and the compiled reports' planned peaks;
- ``equal-more`` (the test marks it slow): tiny SVD with ``Policy(batch=2, slices=2)`` (its guidance batch split
  spread over 2 ranks, the inner regions whole on each; threads stand in for the ranks in the default tests),
  the tiny AnimateDiff and UNet3D UNets and SVD's temporal decoder with
  ``Policy(slices=4, distributed=True)`` (cut regions), an SD-style VAE decoder with ``Policy(halo=2, ...)``, the
  temporal decoder with ``halo=3`` and ``host_memory`` (parked values gathered on every rank), the
  tiny SVD pipeline under ``compile_pipeline`` (3 steps) and tiny SVD under Step Rehash over 4 steps (the guidance
  batch across the ranks, and ``batch=1``: the regions spread; either way the cached feature kept in parts);
- ``equal-small``: the tiny SVD UNet and the temporal decoder's halo regions only (for 3 ranks);
- ``groups`` (for 4 ranks): tiny SVD with ``Policy(batch=2, slices=2)``: its guidance halves on two groups of 2
  ranks, each group spreading its half's regions (NOTE [Batch splits across ranks]);
- ``mismatch-raise`` (the temporal decoder's cut regions; the group given as a DeviceMesh): rank 1 is called
  with other noise (every rank must raise naming it), then rank 1's region raises mid-call (rank 0 must raise
  quoting it);
- ``die``: rank 1 exits inside a region mid-call (rank 0 must raise, not hang).
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxstream  # noqa: E402
from fxstream.memory import measure_peak  # noqa: E402
from fxstream.models import build_unet, example_inputs  # noqa: E402
from fxstream.runtime import LoopRegion  # noqa: E402

TIMEOUT = 20.0  # seconds a rank waits for another in the failure scenarios
SLICES = {"unet3d-tiny": 3}  # an odd count: on 2 ranks, runs of unequal length (gathered through chunks)


def _models(names):
    for name in names:
        if name == "temporal-decoder":
            from test_halo import tiny_svd_attention
            m, kw = tiny_svd_attention()
        elif name in ("temporal-decoder-halo", "temporal-decoder-park"):  # Policy(halo=...): halo regions with
            from test_halo import tiny_svd  # GroupNorm statistics passes (-park: their inputs parked in host memory)
            m, kw = tiny_svd(frames=2, h=8, w=8)
        elif name == "sd-vae-decoder-halo":
            from test_halo import tiny_kl
            m, kw = tiny_kl()
            kw = dict(sample=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
        else:
            m = build_unet(name.removesuffix("-cfg"))
            kw = example_inputs(name.removesuffix("-cfg"), m)
        yield name, m, kw


def policy_of(name: str, distributed=None):
    """The policy each scenario's model is compiled with (``-cfg``: the guidance batch split in 2 parts, spread
    over the ranks themselves: NOTE [Batch splits across ranks]; the others ``batch=1``: no split, so that their
    cut regions are the ones spread)."""
    if name.endswith("-halo"):  # on 2 ranks 4 bands: regions cut at the blocks, whose outputs are held in rows
        return fxstream.Policy(halo=2, distributed=distributed)
    if name.endswith("-park"):
        return fxstream.Policy(halo=3, distributed=distributed, host_memory="1GiB")
    if name.endswith("-cfg"):
        return fxstream.Policy(batch=2, slices=2, distributed=distributed)
    return fxstream.Policy(slices=SLICES.get(name, 4), batch=1, distributed=distributed)


def equal(out: dict, names) -> None:
    for name, m, kw in _models([n for n in names if n not in ("pipeline", "rehash", "rehash-parts")]):
        start = time.monotonic()
        policy = policy_of(name, fxstream.Distributed(timeout=600))
        with torch.no_grad():
            compiled = fxstream.compile(m, policy)
            compiled(**kw)  # compiles
            got, peak = measure_peak(compiled, **kw)
        got = got[0] if isinstance(got, (tuple, list)) else getattr(got, "sample", got)
        rep = compiled.explain()
        loops = [x for x in compiled._last.compiled.graph_module.modules() if isinstance(x, LoopRegion)]
        held = [x.sharding for x in loops if x.sharding is not None]
        from fxstream.halo_runtime import HaloLoop
        halos = [x.rows for x in compiled._last.compiled.graph_module.modules()
                 if isinstance(x, HaloLoop) and x.rows is not None]
        out[name] = dict(out=got, peak=peak, planned=rep.peak_bytes, regions=len(rep.regions),
                         rank_planned=rep.ranks[0].peak_bytes if rep.ranks else None,
                         parts=sum(o is not None for h in held for o in h.outs),
                         reshards=sum(not isinstance(i, str) and i is not None for h in held for i in h.ins),
                         rows=sum(o is not None for h in halos for o in h.outs),  # NOTE [Rows held in parts]
                         spread=[(x.nested, x.shards is not None) for x in loops], seconds=time.monotonic() - start)
    if "pipeline" in names:  # compile_pipeline: the UNet's cut regions and the decoder's halo regions spread
        out["pipeline"] = dict(out=run_pipeline(fxstream.Distributed(timeout=600)))
    for key, batch in (("rehash", None), ("rehash-parts", 1)):  # Step Rehash: both steps' graphs spread alike
        if key not in names:
            continue
        start = time.monotonic()
        m = build_unet("svd-tiny")
        kw = example_inputs("svd-tiny", m)
        compiled = fxstream.compile(m, fxstream.Policy(slices=4, distributed=True, batch=batch,
                                                       rehash=fxstream.StepRehash(full_every=2, steps=4)))
        outs = []
        with torch.no_grad():
            for t in (900.0, 600.0, 300.0, 100.0):
                outs.append(compiled(**dict(kw, timestep=torch.tensor([t])))[0])
        # no batch split asked for: the guidance batch goes across the 2 ranks (planned faster; NOTE [Batch
        # splits across ranks]), in the full and the rehash steps' graphs alike; batch=1: the regions spread,
        # the cached feature kept in parts (NOTE [A cached feature held in parts])
        out[key] = dict(outs=outs, log=list(compiled.step_log), batch=compiled._last.report.policy.batch,
                        parts=compiled._last.cache_parts is not None, seconds=time.monotonic() - start)


def run_pipeline(distributed=None) -> torch.Tensor:
    """The tiny SVD pipeline (3 steps) compiled with ``Policy(slices=2, halo=2, batch=1)``: its frames (batch=1:
    the UNet's cut regions spread, not the guidance batch; the rehash scenario takes that)."""
    from fxstream.pipelines import pipeline_inputs, tiny_pipeline
    pipe = tiny_pipeline("svd")
    fxstream.compile_pipeline(pipe, fxstream.Policy(slices=2, halo=2, batch=1, distributed=distributed))
    with torch.no_grad():
        return pipe(**pipeline_inputs(pipe, steps=3)).frames


def mismatch_raise(out: dict, rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    _, m, kw = next(_models(["temporal-decoder"]))  # cut regions, compiled in a few seconds
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # the group given as a DeviceMesh
    compiled = fxstream.compile(m, fxstream.Policy(slices=4, distributed=fxstream.Distributed(mesh, TIMEOUT)))
    other = dict(kw, sample=kw["sample"] + (1.0 if rank == 1 else 0.0))
    with torch.no_grad():
        try:
            compiled(**other)
            out["mismatch"] = None
        except fxstream.DistributedError as e:
            out["mismatch"] = str(e)
        compiled(**kw)  # the group is still usable: a mismatch is found before any region runs
        if rank == 1:
            loop = next(m for m in compiled._last.compiled.graph_module.modules() if isinstance(m, LoopRegion))

            def broken(*args, **kwargs):
                raise ValueError("injected failure")
            loop._slice = broken
        t = time.monotonic()
        try:
            compiled(**kw)
            out["raise"] = None
        except Exception as e:  # rank 1: the ValueError; rank 0: a DistributedError quoting it
            out["raise"] = f"{type(e).__name__}: {e}"
        out["raise_s"] = time.monotonic() - t


def die(out: dict, rank: int) -> None:
    _, m, kw = next(_models(["temporal-decoder"]))
    compiled = fxstream.compile(m, fxstream.Policy(slices=4, distributed=fxstream.Distributed(timeout=TIMEOUT)))
    with torch.no_grad():
        compiled(**kw)
        if rank == 1:
            loop = next(m for m in compiled._last.compiled.graph_module.modules() if isinstance(m, LoopRegion))

            def dead(*args, **kwargs):
                os._exit(3)
            loop._slice = dead
        t = time.monotonic()
        try:
            compiled(**kw)
            out["die"] = None
        except fxstream.DistributedError as e:
            out["die"] = str(e)
        out["die_s"] = time.monotonic() - t


def main() -> int:
    scenario, folder = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {}
    try:
        if scenario == "equal":
            equal(out, ["svd-tiny", "temporal-decoder-halo"])
        elif scenario == "equal-more":
            equal(out, ["svd-tiny-cfg", "animatediff-tiny", "unet3d-tiny", "temporal-decoder",
                        "sd-vae-decoder-halo", "temporal-decoder-park", "pipeline", "rehash", "rehash-parts"])
        elif scenario == "groups":
            equal(out, ["svd-tiny-cfg"])
        elif scenario == "equal-small":  # svd-tiny-cfg: the 2 parts in turn, each spread over the 3 ranks
            equal(out, ["svd-tiny", "temporal-decoder-halo", "svd-tiny-cfg"])
        elif scenario == "mismatch-raise":
            mismatch_raise(out, rank)
        elif scenario == "die":
            die(out, rank)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    except BaseException:
        out["error"] = traceback.format_exc()
    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    # no destroy_process_group after a failure scenario: a collective was abandoned on purpose
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
