"""Whole pipelines: fxstream.compile_pipeline / explain_pipeline on the real diffusers pipelines (tiny components,
random weights; the full-size targets are planned on the meta device in the slow tests)."""
import json
import time

import pytest
import torch

import fxstream
from fxstream import cli
from fxstream.pipelines import build_pipeline, pipeline_inputs, tiny_pipeline
from fxstream.stages import PipelineBudgetError, planned_moves
from fxstream.stages.fitting import fit_step

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

STEPS = 2  # two denoising steps: the second reuses the UNet's compiled signature


def _frames(pipe, **kw):
    with torch.no_grad():
        return pipe(**dict(pipeline_inputs(pipe, steps=STEPS), **kw)).frames


@pytest.fixture(scope="module")
def svd_reference():
    """Frames of the uncompiled tiny SVD pipeline (decode_chunk_size=num_frames, as pipeline_inputs asks)."""
    return _frames(tiny_pipeline("svd"))


def _halo_regions(compiled):
    return [r for r in compiled.explain().regions if r.kind == "halo" and r.slices > 1]


BUDGET = 9 * 2**20  # the tiny SVD pipeline at 32x32 px, 3 frames, float32: its weights take 9.5 MiB together


@pytest.fixture(scope="module")
def svd_budget_plan():
    """explain_pipeline of the tiny SVD pipeline (on the meta device) under BUDGET, as compile_pipeline runs it."""
    return fxstream.explain_pipeline(build_pipeline("svd-tiny", dtype=torch.float32), height=32, width=32,
                                     num_frames=3, policy=fxstream.Policy(max_memory=BUDGET))


@pytest.mark.parametrize("kind", ["svd", "animatediff"])
def test_compiled_pipeline_frames_equal(kind, svd_reference):
    """Policy(halo=2): the UNet runs its exported graph unsliced (bitwise), the VAE decoder is halo-sliced into
    two bands of rows (exact up to float rounding): frames within 1e-5 of the uncompiled pipeline's. The
    pipeline is the same object, and it keeps working (a second call gives the same frames).

    SVD: its temporal decoder mixes frames, so decoding in chunks changes the video; the compiled pipeline's
    decode_latents decodes all num_frames frames at once whatever decode_chunk_size it is given."""
    pipe = tiny_pipeline(kind)
    ref = svd_reference if kind == "svd" else _frames(pipe)
    out = fxstream.compile_pipeline(pipe, fxstream.Policy(halo=2))
    assert out is pipe
    assert isinstance(pipe.unet, fxstream.CompiledModule) and isinstance(pipe.vae.decoder, fxstream.CompiledModule)
    got = _frames(pipe)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5
    assert _halo_regions(pipe.vae.decoder), "the decoder was not halo-sliced"
    assert not pipe.unet.explain().regions  # halo is the decoder's: the UNet is not sliced by it
    assert pipe.fxstream.offload == {"encode": None, "denoise": None, "decode": None}  # no budget: nothing decided
    assert torch.equal(_frames(pipe), got)
    with pytest.raises(TypeError, match="already compiled"):
        fxstream.compile_pipeline(pipe)
    if kind == "svd":
        frames, plain = 3, tiny_pipeline("svd")
        latents = torch.randn(1, frames, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            whole = plain.decode_latents(latents, frames, frames)
            chunked = plain.decode_latents(latents, frames, 1)
            decoded = pipe.decode_latents(latents, frames, 1)
        assert (chunked - whole).abs().max().item() > 1e-3  # chunks do change SVD's video
        assert (decoded - whole).abs().max().item() <= 1e-5


def test_budget_compiles_and_offloads(svd_reference, svd_budget_plan):
    """Under BUDGET every stage must offload the modules it does not use, and the UNet must be sliced. Frames
    within 1e-4 (the sliced UNet's rounding compounds over the denoising steps, see test_pipelines.py); on the
    CPU nothing is moved. The decisions and the UNet's budget and plan match explain_pipeline's plan of the same
    run on the meta device."""
    pipe = tiny_pipeline("svd")
    fxstream.compile_pipeline(pipe, fxstream.Policy(max_memory=BUDGET))
    got = _frames(pipe)
    assert (got - svd_reference).abs().max().item() <= 1e-4
    state = pipe.fxstream
    assert state.offload == {"encode": True, "denoise": True, "decode": True}
    assert state.moves == [] and state.device is None  # a CPU pipeline: decisions recorded, nothing moved
    unet = pipe.unet.explain()
    assert unet.regions
    for name, m in (("unet", pipe.unet), ("vae.decoder", pipe.vae.decoder)):
        r = m.explain()
        assert m.policy.max_memory == state.max_memory[name]
        assert r.weight_bytes + r.peak_bytes <= state.max_memory[name]
    plan = svd_budget_plan
    assert {s.name: s.offload for s in plan.stages} == state.offload
    step = plan.stage("denoise").steps[0]
    assert step.max_memory == state.max_memory["unet"] and step.activation_bytes == unet.peak_bytes


def test_budget_that_cannot_be_met_names_the_stage():
    """Planning: 2 MiB is below the encode stage's own weights (VAE + image encoder, 2.6 MiB). Compiling: 5 MiB
    lets the encode stage run but not the UNet's 6.8 MiB of weights; the error comes at the pipeline's first
    call, before the denoising loop runs."""
    meta = build_pipeline("svd-tiny", dtype=torch.float32)
    with pytest.raises(PipelineBudgetError, match=r"^encode stage \(image_encoder\)") as e:
        fxstream.explain_pipeline(meta, height=32, width=32, num_frames=3, policy=fxstream.Policy(max_memory="2MiB"))
    assert e.value.stage == "encode" and e.value.max_memory == 2 * 2**20
    assert e.value.weight_bytes > e.value.max_memory
    assert "weights resident" in str(e.value) and "activations lower bound" in str(e.value)
    pipe = tiny_pipeline("svd")
    fxstream.compile_pipeline(pipe, fxstream.Policy(max_memory="5MiB"))
    with pytest.raises(fxstream.MemoryBudgetError, match=r"^denoise stage \(unet\)") as e:
        _frames(pipe)
    assert e.value.stage == "denoise" and e.value.lower_bound_bytes > 0
    assert e.value.weight_bytes == sum(p.numel() * 4 for p in pipe.unet.parameters())
    assert pipe.fxstream.offload["encode"] is True  # encode ran, with the UNet offloaded


def test_explain_pipeline_figures(svd_budget_plan, tmp_path):
    """Every stage planned below the budget and at most its original peak, lower bounds below the plans, the
    UNet sliced (the decoder fits unsliced once the UNet and image encoder are offloaded), and a timeline that
    covers the three stages in order."""
    r = svd_budget_plan
    assert [s.name for s in r.stages] == ["encode", "denoise", "decode"]
    assert [s.name for s in r.stage("encode").steps] == ["image_encoder", "vae.encoder"]
    assert [s.name for s in r.stage("decode").steps] == ["vae.decoder", "decode_latents"]
    for s in r.stages:
        assert s.lower_bound_bytes <= s.peak_bytes <= min(BUDGET, s.original_peak_bytes)
        assert s.peak_bytes == max(st.weight_bytes + st.held_bytes + st.activation_bytes for st in s.steps)
    assert r.peak_bytes <= BUDGET < r.original_peak_bytes
    unet, dec = r.stage("denoise").steps[0], r.stage("decode").steps[0]
    assert unet.report.regions and unet.activation_bytes < unet.original_activation_bytes
    assert unet.resident == {"unet": unet.weight_bytes}  # the VAE and the image encoder offloaded
    assert dec.resident == {"vae": dec.weight_bytes} and not dec.report.regions
    assert dec.max_memory == BUDGET - dec.held_bytes - (dec.weight_bytes - dec.report.weight_bytes)
    for which, peak in (("original", r.original_peak_bytes), ("compiled", r.peak_bytes)):
        points = r.timeline[which]
        assert [p.stage for p in points] == sorted((p.stage for p in points), key=["encode", "denoise", "decode"].index)
        assert 0 <= points[0].x < 1 and 2 <= points[-1].x < 3
        assert all(a.x <= b.x for a, b in zip(points, points[1:]))
        assert max(p.peak_bytes for p in points) == peak
    text = r.table()
    assert "denoise" in text and "decode_latents" in text and "9.0 MiB" in text
    data = json.loads(json.dumps(r.to_json()))
    assert data["peak_bytes"] == r.peak_bytes and len(data["stages"]) == 3
    r.plot(tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_unsupported_pipeline_and_bad_arguments():
    class StableDiffusionPipeline:  # any other pipeline
        pass

    for fn in (fxstream.compile_pipeline, lambda p: fxstream.explain_pipeline(p)):
        with pytest.raises(ValueError, match="StableDiffusionPipeline.*StableVideoDiffusionPipeline and AnimateDiffPipeline"):
            fn(StableDiffusionPipeline())
    pipe = build_pipeline("svd-tiny", dtype=torch.float32)
    with pytest.raises(ValueError, match="height: expected a multiple of 2"):
        fxstream.explain_pipeline(pipe, height=33, width=32)
    with pytest.raises(ValueError, match="num_frames: expected an int >= 1"):
        fxstream.explain_pipeline(pipe, height=32, width=32, num_frames=0)
    with pytest.raises(ValueError, match="offload: expected 'auto'"):
        fxstream.compile_pipeline(pipe, fxstream.Policy(max_memory="1GiB"), offload=True)
    with pytest.raises(ValueError, match="offload='always': only used with a budget"):
        fxstream.explain_pipeline(pipe, height=32, width=32, offload="always")
    with pytest.raises(ValueError, match="device: expected an accelerator"):
        fxstream.compile_pipeline(pipe, fxstream.Policy(max_memory="1GiB"), device="cpu")
    with pytest.raises(ValueError, match="device: only used with a budget"):
        fxstream.compile_pipeline(pipe, device="cuda")
    with pytest.raises(TypeError, match="policy: expected fxstream.Policy"):
        fxstream.compile_pipeline(pipe, policy={"max_memory": "6GiB"})
    with pytest.raises(ValueError, match="name: unknown pipeline 'sd15'"):
        build_pipeline("sd15")


def test_fit_offloads_only_when_needed():
    """A step is planned with every module resident first, and with the modules its stage does not use offloaded
    only if that fails; offload='always' / 'never' try one; the error names the stage and gives its figures."""
    keep, least = {"unet": 60, "vae": 30, "image_encoder": 10}, {"vae": 30}
    tried = []

    def attempt(room):  # the module's weights (30) and activations (at least 40) must fit its room
        tried.append(room)
        if room < 70:
            raise fxstream.MemoryBudgetError("no", max_memory=room, weight_bytes=30, lower_bound_bytes=40)
        return room

    fit = fit_step(200, "decode", "vae.decoder", 30, 5, keep, least, attempt, False, True)
    assert (fit.offload, fit.max_memory, tried) == (False, 125, [125])  # 200 - (100 - 30) - 5: everything stays
    tried.clear()
    fit = fit_step(120, "decode", "vae.decoder", 30, 5, keep, least, attempt, False, True)
    assert (fit.offload, fit.max_memory, tried) == (True, 115, [45, 115])
    tried.clear()
    fit = fit_step(200, "decode", "vae.decoder", 30, 5, keep, least, attempt, False, True, mode="always")
    assert (fit.offload, tried) == (True, [195])
    with pytest.raises(PipelineBudgetError, match=r"^decode stage \(vae.decoder\).*weights resident"
                       r".*offload='never'.*held by the pipeline.*activations lower bound") as e:
        fit_step(120, "decode", "vae.decoder", 30, 5, keep, least, attempt, False, True, mode="never")
    assert (e.value.stage, e.value.weight_bytes, e.value.held_bytes, e.value.lower_bound_bytes) == ("decode", 100, 5, 40)


def test_planned_moves():
    """Placing a stage: with offloading, the other modules on the accelerator to the CPU first, then its own onto
    the accelerator (a module without weights, or already in place, is not moved). Devices written either way
    (``cuda`` and ``cuda:0``, as weights report it) are the same device (issue 19: nothing was ever offloaded)."""
    cuda, cuda0, cpu = torch.device("cuda"), torch.device("cuda", 0), torch.device("cpu")
    for there in (cuda, cuda0):
        where = {"unet": cpu, "vae": there, "image_encoder": there, "empty": None}
        for target in ("cuda", "cuda:0", cuda0):
            assert planned_moves(where, ["unet"], False, target) == [("unet", cuda0)]
            assert planned_moves(where, ["unet"], True, target) == [("vae", cpu), ("image_encoder", cpu),
                                                                    ("unet", cuda0)]
            assert planned_moves(where, ["vae"], True, target) == [("image_encoder", cpu)]
    assert planned_moves({"unet": torch.device("cuda", 1)}, ["unet"], False, "cuda:0") == [("unet", cuda0)]


def test_cli_pipeline(capsys, tmp_path):
    """`fxstream pipeline` on the tiny AnimateDiff pipeline (no text encoder: nothing runs in encode): JSON with
    the three stages, and the timeline PNG; a missing --plot folder is a usage error."""
    png = tmp_path / "ad.png"
    code = cli.main(["pipeline", "--model", "animatediff-tiny", "--height", "32", "--width", "32", "--frames", "2",
                     "--halo", "2", "--json", "--plot", str(png)])
    out, _ = capsys.readouterr()
    assert code == 0
    data = json.loads(out)
    assert [s["name"] for s in data["stages"]] == ["encode", "denoise", "decode"]
    assert data["stages"][0]["steps"] == []
    dec = data["stages"][2]["steps"][0]
    assert dec["module"] == "vae.decoder" and dec["regions"] >= 1
    assert data["files"] == [str(png)] and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        cli.main(["pipeline", "--model", "sd15"])
    assert cli.main(["pipeline", "--model", "svd-tiny", "--plot", str(tmp_path / "no" / "x.png")]) == 2
    assert "--plot: folder" in capsys.readouterr().err


# -- the whole-pipeline targets, full size, planned on the meta device (fp16, weights included) ---------------
@pytest.mark.slow
@pytest.mark.parametrize("model,height,width,frames,budget", [
    ("svd-xt", 576, 1024, 25, 6 * 2**30),
    ("svd", 576, 1024, 14, 5 * 2**30),
    ("animatediff", 512, 512, 16, 4 * 2**30),
])
def test_full_size_targets(model, height, width, frames, budget):
    start = time.perf_counter()
    pipe = build_pipeline(model, device="meta", dtype=torch.float16)
    r = fxstream.explain_pipeline(pipe, height=height, width=width, num_frames=frames,
                                  policy=fxstream.Policy(max_memory=budget))
    print(f"\n{r.table()}\nplanned in {time.perf_counter() - start:.0f} s")
    assert r.peak_bytes <= budget < r.original_peak_bytes
    assert any(x.kind == "halo" for x in r.stage("decode").steps[0].report.regions)


def test_cli_halo_takes_bands_or_a_grid():
    import argparse
    from fxstream.cli import _halo
    assert _halo("8") == 8 and _halo("4x8") == (4, 8) and _halo("2X3") == (2, 3)
    for bad in ("0", "x", "2x", "2x0", "a"):
        with pytest.raises(argparse.ArgumentTypeError, match="RxC"):
            _halo(bad)


@pytest.mark.slow  # a minute on 2 cores: two explain_pipeline fits and a compiled pipeline run
def test_compile_and_explain_take_the_same_offload_decision(monkeypatch):
    """Issue 19's bug: stage fitting compiles the decoder under two budgets (resident, then offloaded, when the
    resident fit recomputes: here any recompute, AUTO_OFFLOAD_COMPUTE=1); the compiled signatures did not key on
    the policy, so the second attempt was served the first one's plan and compile_pipeline kept the decoder's
    neighbours resident where explain_pipeline offloads them."""
    from fxstream.stages import fitting
    monkeypatch.setattr(fitting, "AUTO_OFFLOAD_COMPUTE", 1.0)
    policy = fxstream.Policy(max_memory=11 * 2**20)
    plan = fxstream.explain_pipeline(build_pipeline("svd-tiny", dtype=torch.float32), height=32, width=32,
                                     num_frames=3, policy=policy)
    pipe = tiny_pipeline("svd")
    fxstream.compile_pipeline(pipe, policy)
    _frames(pipe)
    assert pipe.fxstream.offload == {s.name: s.offload for s in plan.stages}
    assert plan.stage("decode").offload  # the case under test: the decoder's second attempt decided
    decoder = pipe.vae.decoder
    assert len(decoder._entries) == 1 and decoder.policy.max_memory == pipe.fxstream.max_memory["vae.decoder"]
