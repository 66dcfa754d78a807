"""The Step Rehash tools on tiny models: the similarity heat map and the denoising-loop benchmark."""
import importlib.util
import json
import pathlib

import pytest

_TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, _TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_similarity_heat_map(tmp_path, capsys):
    tool = _tool("rehash_similarity")
    assert tool.main(["--model", "svd-tiny", "--steps", "3", "-o", str(tmp_path)]) == 0
    png, data = tmp_path / "rehash-similarity-svd-tiny.png", tmp_path / "rehash-similarity-svd-tiny.json"
    assert png.stat().st_size > 10_000
    result = json.loads(data.read_text())
    assert result["default_cache_point"] in result["layers"] and len(result["layers"]) == 11
    assert all(len(s) == 2 and all(-1.0 <= v <= 1.0 + 1e-9 for v in s) for s in result["similarity"].values())
    shares = result["skipped_share"]
    # the deeper in the up path, the more a rehash step skips; the last temporal layer leaves only the head
    assert shares["up_blocks.1.attentions.0"] < shares["up_blocks.1.attentions.1"] < shares["up_blocks.1.attentions.2"]
    assert "FLOPs skipped if cached" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.main(["--model", "svd-tiny", "--steps", "1"])


@pytest.mark.slow
def test_bench_rehash_loop(capsys):
    tool = _tool("bench_rehash")
    assert tool.main(["--models", "svd-tiny", "--steps", "4", "--schedules", "every3", "key", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "uniform full_every=3" in out and "key steps (threshold 0.95)" in out
    # the loop itself: a rehash schedule runs fewer full steps and changes the latents, every step full does not
    import fxstream
    from fxstream.models import build_unet, example_inputs
    unet = build_unet("svd-tiny")
    kw = example_inputs("svd-tiny", unet)
    ref, _ = tool.denoise(unet, "svd", kw, 4)
    same, _ = tool.denoise(fxstream.compile(unet, fxstream.Policy(rehash=fxstream.StepRehash(full_every=1))),
                           "svd", kw, 4)
    assert (same - ref).abs().max() == 0


@pytest.mark.slow
def test_tools_load_trained_weights_from_a_local_folder(tmp_path, capsys):
    """The paths meant for trained weights, on folders saved here: a pipeline folder for the similarity map, a
    UNet folder for the fidelity benchmark (from_pretrained, local files only)."""
    from fxstream.pipelines import tiny_pipeline
    pipe = tiny_pipeline("svd")
    pipe.save_pretrained(tmp_path / "svd")
    sim = _tool("rehash_similarity")
    assert sim.main(["--pipeline", str(tmp_path / "svd"), "--steps", "2", "--frames", "3", "--latent", "16x16",
                     "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "rehash-similarity-svd.png").is_file()
    bench = _tool("bench_rehash")
    assert bench.main(["--unet", str(tmp_path / "svd" / "unet"), "--models", "svd-tiny", "--steps", "3",
                       "--schedules", "every3", "--no-write"]) == 0
    assert "svd-tiny (" in capsys.readouterr().out
