"""The ``fxstream`` command through ``main(argv)``: explain (table and JSON), viz, memory, --help, and the errors."""
import argparse
import io
import json
import re
import shutil

import pytest

from fxstream import MemoryBudgetError, Policy, cli
from fxstream.progress import Progress

TINY = ["--model", "svd-tiny", "--slices", "2"]
_SESSIONS: dict = {}


@pytest.fixture(autouse=True)
def plan_each_input_once(monkeypatch):
    """Commands given the same model, input and policy share one plan (the real load_session runs once)."""
    real = cli.load_session

    def cached(args, policy, progress):
        key = (str(args.model), policy, args.height, args.width, args.frames, args.batch, args.dtype)
        if key not in _SESSIONS:
            _SESSIONS[key] = real(args, policy, progress)
        return _SESSIONS[key]

    monkeypatch.setattr(cli, "load_session", cached)


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_explain_prints_the_table(capsys):
    code, out, err = run(["explain", *TINY, "--top", "3"], capsys)
    assert code == 0
    assert out.startswith("svd-tiny: 128x128 px (latent 16x16), 4 frames, batch 2, fp32 on meta")
    assert "Policy(slices=2): 61 regions" in out
    assert re.search(r"^down_blocks\.0\.attentions\.0 +height +16 +2 +1 +63 ", out, re.M)  # slices, in flight, ops
    assert "activations, compiled" in out and "not computed: add --lower-bound" in out
    assert "largest unsliced" in out and len(out.split("largest unsliced")[1].split("\n\n")[0].splitlines()) == 2 + 3
    assert err == ""  # not a terminal: no progress


def test_explain_table_is_the_reports(capsys):
    """One renderer: the command prints Report.table()'s columns (passes and planned compute included), and
    with --lower-bound the very same text."""
    code, out, _ = run(["explain", *TINY, "--lower-bound"], capsys)
    assert code == 0
    args = cli.build_parser().parse_args(["explain", *TINY])
    report = cli.load_session(args, Policy(slices=2), Progress(enabled=False)).report  # the plan the command used
    assert re.search(r"^module +dim +length +slices +in flight +ops +MiB never whole +MiB at its peak +MiB its slices "
                     r"+passes +compute$", out, re.M)
    assert out.split("\n", 1)[1].rstrip("\n") == report.table()


def test_explain_json(capsys):
    code, out, _ = run(["explain", "--model", "animatediff-tiny", "--temporal", "2", "--batch", "1", "--json"],
                       capsys)
    assert code == 0
    data = json.loads(out)
    assert data["input"] == {"model": "animatediff-tiny", "height": 128, "width": 128, "latent": [16, 16],
                             "frames": 4, "batch": 1, "dtype": "fp32", "device": "meta"}
    assert data["policy"]["temporal"] == 2 and data["policy"]["text"] == "Policy(temporal=2)"
    assert data["regions"] and {r["dim"] for r in data["regions"]} <= {"height", "width"}
    assert all(r["slices"] == 2 for r in data["regions"])
    assert data["unsliced"] and all(u["reason"] for u in data["unsliced"])
    assert 0 < data["peak_bytes"] < data["original_peak_bytes"] and data["weight_bytes"] > 0
    assert data["lower_bound_bytes"] is None and data["peak"]["node"]


def test_explain_with_step_rehash(capsys):
    code, out, _ = run(["explain", "--model", "svd-tiny", "--rehash-every", "3", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["policy"]["rehash"]["full_every"] == 3
    assert data["rehash"]["cache_point"] == "up_blocks.1.attentions.1" and 0.5 < data["rehash"]["skipped_share"] < 1
    code, out, _ = run(["explain", "--model", "svd-tiny", "--rehash-every", "3", "--cache-point", "up_blocks.0"],
                       capsys)
    assert code == 0 and "planned FLOPs skipped" in out and "up_blocks.0 (" in out
    code, _, err = run(["explain", "--model", "svd-tiny", "--cache-point", "up_blocks.0"], capsys)
    assert code == 2 and "--rehash-every" in err and err.startswith("fxstream explain: error: argument --cache-point")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot not installed (apt-get install graphviz)")
def test_viz_writes_svg_and_html(tmp_path, capsys):
    code, out, _ = run(["viz", *TINY, "-o", str(tmp_path / "new"), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    svg, html = tmp_path / "new" / "svd-tiny-viz.svg", tmp_path / "new" / "svd-tiny-viz.html"
    assert data["files"] == [str(svg), str(html)]
    assert "<svg" in svg.read_text() and "down_blocks.0.attentions.1" in svg.read_text()
    assert "<svg" in html.read_text() and "fx-data" in html.read_text()
    original, compiled = data["graphs"]
    assert original["title"].startswith("original") and compiled["title"].startswith("compiled")
    assert {n["dim"] for n in compiled["nodes"] if n["kind"] == "region"} == {"frames", "height"}


def test_viz_dot_only_needs_no_graphviz(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot anywhere
    code, out, _ = run(["viz", *TINY, "--graph", "compiled", "--format", "dot", "-o", str(tmp_path),
                        "--name", "x"], capsys)
    assert code == 0 and out.strip() == str(tmp_path / "x-viz.dot")
    dot = (tmp_path / "x-viz.dot").read_text()
    assert dot.startswith("digraph fxstream") and "slices along height" in dot and "original" not in dot


def test_memory_writes_a_png(tmp_path, capsys):
    code, out, _ = run(["memory", *TINY, "-o", str(tmp_path)], capsys)
    assert code == 0 and out.strip() == str(tmp_path / "svd-tiny-memory.png")
    assert (tmp_path / "svd-tiny-memory.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_dot_fails_fast_with_the_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cli, "load_session", lambda *a: pytest.fail("planned before checking for dot"))
    code, out, err = run(["viz", *TINY, "-o", str(tmp_path)], capsys)
    assert code == 1 and out == ""
    assert err.startswith("fxstream: error: Graphviz's `dot` program was not found") and err.count("\n") == 1
    assert "apt-get install graphviz" in err and "--format dot" in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_expand_module_is_a_usage_error(tmp_path, capsys):
    code, _, err = run(["viz", *TINY, "--format", "dot", "-o", str(tmp_path), "--expand", "down_blocks.0.resnet"],
                       capsys)
    assert code == 2
    assert "argument --expand: no module 'down_blocks.0.resnet' in svd-tiny; did you mean" in err
    assert "down_blocks.0.resnets.0" in err


@pytest.mark.parametrize("argv, message", [
    (["explain", "--model", "nope"], "argument --model: 'nope' is neither a known model name nor a folder; give "
                                     "one of animatediff,"),
    (["explain", "--height", "100"], "argument --height: expected a multiple of 8 pixels"),
    (["explain", "--slices", "0"], "argument --slices: expected a whole number >= 1, got '0'"),
    (["explain", "--max-memory", "lots"], "argument --max-memory: expected bytes or a size such as 6GiB"),
    (["explain", "--dtype", "fp8"], "argument --dtype: expected fp16, bf16 or fp32"),
    (["viz", "--format", "png"], "argument --format: expected a comma-separated list of svg, html, dot"),
    (["explain", "--min-region-fraction", "2"], "argument --min-region-fraction: expected a number between 0 and 1"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    assert message in usage_error(argv, capsys)


def test_folder_without_config_is_a_usage_error(tmp_path, capsys):
    err = usage_error(["explain", "--model", str(tmp_path)], capsys)
    assert f"'{tmp_path}' is a folder without config.json or unet/config.json" in err


def test_folder_with_another_model_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    code, _, err = run(["explain", "--model", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "describes a 'UNet2DConditionModel'" in err and "UNetSpatioTemporalConditionModel" in err


def test_local_folder_is_loaded_with_from_pretrained(tmp_path, capsys):
    from fxstream.models import build_unet
    build_unet("svd-tiny").save_pretrained(tmp_path / "tiny-svd" / "unet")  # a pipeline folder's layout
    code, out, _ = run(["explain", "--model", str(tmp_path / "tiny-svd"), "--dtype", "fp32", "--height", "128",
                        "--width", "128", "--frames", "4", "--slices", "2", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["input"]["device"] == "cpu" and data["input"]["latent"] == [16, 16]
    assert len(data["regions"]) == 61  # the same architecture as the named svd-tiny


def test_fxstream_errors_are_one_line(capsys, monkeypatch):
    def over_budget(*args):
        raise MemoryBudgetError("Policy.max_memory=1.0 MiB cannot be met:\nthe weights take 6.8 MiB",
                                max_memory=2**20, weight_bytes=7 * 2**20, lower_bound_bytes=2**20)

    monkeypatch.setattr(cli, "load_session", over_budget)
    code, out, err = run(["explain", "--model", "svd-tiny", "--max-memory", "1MiB"], capsys)
    assert (code, out) == (1, "")
    assert err == "fxstream: error: Policy.max_memory=1.0 MiB cannot be met: the weights take 6.8 MiB\n"


def test_help_explains_every_option_with_an_example(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"explain", "viz", "memory", "pipeline"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert "Example:" in action.help, (name, action.dest)
        assert f"fxstream {name} " in p.epilog  # a worked command line
    with pytest.raises(SystemExit) as e:
        cli.main(["viz", "--help"])
    assert e.value.code == 0
    assert "--expand MODULE" in capsys.readouterr().out


def test_progress_only_on_a_terminal():
    stream = io.StringIO()
    with Progress(enabled=True, stream=stream, interval=0.01).step("planning"):
        pass
    assert stream.getvalue().startswith("\rplanning... 0.0 s") and stream.getvalue().endswith(" s\n")
    quiet = io.StringIO()
    with Progress(enabled=False, stream=quiet).step("planning"):
        pass
    assert quiet.getvalue() == ""


def test_dtype_takes_torchs_names_and_help_is_plain_text(capsys):
    p = cli.build_parser()
    for text, short in (("float16", "fp16"), ("torch.bfloat16", "bf16"), ("half", "fp16"), ("float", "fp32"),
                        ("fp32", "fp32")):
        assert p.parse_args(["explain", "--model", "svd-tiny", "--dtype", text]).dtype == short
        assert p.parse_args(["pipeline", "--model", "svd-tiny", "--dtype", text]).dtype == short
    err = usage_error(["explain", "--model", "svd-tiny", "--dtype", "float8"], capsys)
    assert "--dtype: expected fp16, bf16 or fp32" in err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "on the meta device" in out


def test_pipeline_host_memory_reaches_the_policy(capsys, monkeypatch):
    """``--host-memory`` is parsed as a size and reaches the decoder's policy; a bad size is a usage error."""
    p = cli.build_parser()
    assert p.parse_args(["pipeline", "--model", "svd-tiny", "--host-memory", "32GiB"]).host_memory == 32 * 2**30
    err = usage_error(["pipeline", "--model", "svd-tiny", "--host-memory", "lots"], capsys)
    assert "--host-memory" in err and "6GiB" in err
    seen = {}

    def fake(args, policy, progress):
        seen["policy"] = policy
        return 0
    args = p.parse_args(["pipeline", "--model", "svd-tiny", "--host-memory", "1GiB", "--halo", "4"])
    args.func = fake
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, a: args,
                                                                    "prog": "fxstream"})())
    assert cli.main([]) == 0
    assert seen["policy"].host_memory == 2**30 and seen["policy"].halo == 4
