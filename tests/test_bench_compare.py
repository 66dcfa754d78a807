"""tools/bench_compare.py on the tiny models: rows, the naive baseline's error, writers, failures as rows, CLI."""
import importlib.util
import json
import pathlib
import sys
import time

import pytest
import torch


_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_compare.py"
_spec = importlib.util.spec_from_file_location("bench_compare", _PATH)
bench_compare = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_compare", bench_compare)  # dataclasses look their module up
_spec.loader.exec_module(bench_compare)

TINY = bench_compare.CASES["svd-tiny"]


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def svd_bench():
    """svd-tiny with its reference output, shared by the tests (each method compiles on its own)."""
    b = bench_compare.Bench(TINY, "cpu", repeats=1, steps=4, compile_timeout=60)
    b.ref()
    return b


@pytest.fixture(scope="module")
def svd_rows(svd_bench):
    with pytest.MonkeyPatch.context() as mp:  # fewer loop iterations and chunks: the same code, faster
        mp.setattr(bench_compare, "SLICES", 2)
        mp.setattr(bench_compare, "NAIVE_CHUNKS", 2)
        return [bench_compare.run_method(svd_bench, m, _quiet)
                for m in ("eager", "naive", "fxstream-slices", "freenoise")]


@pytest.mark.slow  # the svd_rows fixture runs every method: minutes on 2 cores
def test_quick_rows_have_the_fields(svd_rows):
    rows = {r.method: r for r in svd_rows}
    for key in ("eager", "naive", "fxstream-slices"):
        r = rows[key]
        assert r.status == "ok", r.note
        assert r.model == "svd-tiny" and r.device == "cpu" and r.peak_by == "tracker" and r.per == "call"
        assert r.peak_bytes > 0 and r.first_call_s > 0 and r.max_abs_diff is not None
        assert 0 < r.min_s <= r.median_s <= r.max_s
    assert rows["eager"].max_abs_diff == 0.0 and rows["eager"].planned_bytes is None
    assert rows["fxstream-slices"].planned_bytes == rows["fxstream-slices"].peak_bytes  # the planner is exact
    assert rows["freenoise"].status == "n/a" and "AnimateDiff" in rows["freenoise"].note


@pytest.mark.slow  # the svd_rows fixture runs every method: minutes on 2 cores
def test_naive_slicing_changes_svd_while_fxstream_matches(svd_rows):
    rows = {r.method: r for r in svd_rows}
    assert rows["naive"].max_abs_diff > 1e-2  # frames no longer see each other across chunks
    assert rows["fxstream-slices"].max_abs_diff <= 1e-5


@pytest.mark.slow  # the svd_rows fixture runs every method: minutes on 2 cores
def test_writers(svd_rows, tmp_path):
    text = bench_compare.measured_table(svd_rows)
    assert "naive: whole UNet on 2 chunks" in text and "Policy(slices=2)" in text and "n/a: AnimateDiff only" in text
    png = bench_compare.draw_chart(svd_rows, tmp_path / "img" / "bench-compare.png")
    assert png.exists() and png.stat().st_size > 1000
    md = bench_compare.section(svd_rows, "python tools/bench_compare.py --quick", ["a note"])
    bench_compare.write_section(tmp_path, "compare", md, {"rows": [vars(r) for r in svd_rows]})
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- section: compare -->" in doc and "Command: `python tools/bench_compare.py --quick`" in doc
    assert "- a note" in doc and "img/bench-compare.png" in doc
    assert "- svd-tiny (cpu): sample (2, 4, 8, 16, 16) float32" in doc
    data = json.loads((tmp_path / "benchmarks.json").read_text())["compare"]
    assert {r["method"] for r in data["rows"]} == {"eager", "naive", "fxstream-slices", "freenoise"}


def test_a_failing_method_is_an_error_row(svd_bench, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor is broken here\nsecond line")
    monkeypatch.setattr(torch, "compile", broken)
    row = bench_compare.run_method(svd_bench, "torch-compile", _quiet)
    assert row.status == "error" and row.note == "RuntimeError: inductor is broken here"
    assert row.median_s is None and "error: RuntimeError" in bench_compare.measured_table([row])


def test_time_limit_interrupts():
    t = time.perf_counter()
    with pytest.raises(bench_compare.CompileTimeout):
        with bench_compare.time_limit(0.2):
            time.sleep(5)
    assert time.perf_counter() - t < 2


def test_meta_case_is_planned_not_run():
    case = bench_compare.Case("svd-tiny", "svd-tiny", "svd", meta=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_compare, "SLICES", 2)
        rows = bench_compare.run_case(case, "cpu", ["eager", "exported", "fxstream-slices", "torch-compile"],
                                      log=_quiet)
    eager, exported, sliced, compiled = rows
    assert eager.status == compiled.status == "n/a"
    assert exported.device == "meta" and exported.planned_bytes > sliced.planned_bytes > 0
    assert exported.peak_bytes is None and exported.median_s is None and exported.plan_s >= 0
    assert "planned GiB" in bench_compare.planned_table(rows)


@pytest.mark.slow
def test_rehash_rows_time_a_whole_loop(svd_bench):
    rows = [bench_compare.run_method(svd_bench, m, _quiet) for m in ("step-rehash", "deepcache")]
    for r in rows:
        assert r.status == "ok", r.note
        assert r.per == "step (4-step loop)" and r.max_abs_diff > 0 and r.rerun_abs_diff == 0
        assert "steps run: 2 full, 2 rehash" in r.note
    assert "cache point up_blocks.0" in rows[1].note


@pytest.mark.parametrize("argv", [["--models", "nope"], ["--methods", "magic"], ["--repeats", "0"],
                                  ["--steps", "x"], ["--compile-timeout", "-1"]])
def test_bad_command_lines_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_compare.parse_args(argv)
    assert e.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_quick_defaults():
    args = bench_compare.parse_args(["--quick"])
    assert args.models == ["svd-tiny", "animatediff-tiny"] and args.repeats == 1
    assert "torch-compile" not in args.methods and "fxstream-slices" in args.methods
    assert bench_compare.parse_args([]).models == bench_compare.DEFAULT_MODELS


def test_partial_file_resumes_finished_cases(tmp_path, monkeypatch):
    """--partial: a finished case's rows are kept; run again, it is skipped; other settings start afresh."""
    calls = []

    def fake_run_case(case, device, methods, repeats, steps, timeout, log):
        calls.append((case.name, device))
        return [bench_compare.Row(model=case.name, device=device, method=m, label=m, status="n/a", note="not run here") for m in methods]

    monkeypatch.setattr(bench_compare, "run_case", fake_run_case)
    part = tmp_path / "partial.json"
    argv = ["--quick", "--no-write", "--methods", "eager", "exported", "--partial", str(part)]
    assert bench_compare.main(argv) == 0
    first = list(calls)
    assert first and part.exists()
    calls.clear()
    assert bench_compare.main(argv) == 0
    assert calls == []  # every case came from the file
    assert bench_compare.main(argv[:-2] + ["--repeats", "2", "--partial", str(part)]) == 0
    assert calls == first  # other settings: nothing reused


def test_partial_run_writes_its_json(tmp_path, monkeypatch):
    """A --partial run that writes: the settings (its Path included) go into benchmarks.json as text."""
    import json

    def fake_run_case(case, device, methods, repeats, steps, timeout, log):
        return [bench_compare.Row(model=case.name, device=device, method=m, label=m, status="n/a", note="not run")
                for m in methods]

    monkeypatch.setattr(bench_compare, "run_case", fake_run_case)
    part = tmp_path / "partial.json"
    assert bench_compare.main(["--quick", "--methods", "eager", "--partial", str(part), "--out", str(tmp_path)]) == 0
    blob = json.loads((tmp_path / "benchmarks.json").read_text())
    assert blob["compare"]["settings"]["partial"] == str(part)


def test_a_section_of_its_own_leaves_the_main_table():
    """``--section NAME``: one model measured apart is written under its own section and chart; the main
    'compare' section (and its JSON key) stay as they were."""
    args = bench_compare.parse_args(["--models", "cogvideox-mid", "--section", "compare-transformer"])
    assert args.section == "compare-transformer" and args.models == ["cogvideox-mid"]
    assert bench_compare.parse_args([]).section == "compare"
    md = bench_compare.section([], "python tools/bench_compare.py --section x", [], "img/bench-x.png", " (x)")
    assert md.startswith("## Side by side: what users would use instead (x)") and "img/bench-x.png" in md
