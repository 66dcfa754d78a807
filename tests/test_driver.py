"""The compile driver (fxstream/compiler.py): a literal list of steps, each runnable alone, linted, dumped, named."""
import copy
import io
import logging
import sys

import pytest

import fxstream
from fxstream import compiler
from fxstream.compiler import STEPS, Job, Step, capture, compile_graph, run_steps
from fxstream.progress import Progress, library_progress
from fxstream.runtime import LoopRegion


@pytest.fixture(scope="module")
def captured(svd_tiny):
    unet, kwargs = svd_tiny
    return capture(unet, kwargs).graph_module


def _job(**counts):
    return Job(counts=counts, min_fraction=0.05)


def test_the_recipe_is_a_literal_list_of_named_steps():
    assert [s.name for s in STEPS] == ["strip_asserts", "split_group_norm", "plan_slicing", "group_regions",
                                       "compile_bodies", "reuse_buffers", "set_in_flight", "plan_halos",
                                       "group_halos"]
    assert all(isinstance(s, Step) and callable(s.run) for s in STEPS)


def test_each_step_runs_alone(captured):
    gm = captured
    job = _job(frames=2, height=2)
    stripped = compiler.step_strip_asserts(gm, job)
    assert stripped is not gm and not any("assert_tensor_metadata" in str(n.target) for n in stripped.graph.nodes)
    assert compiler.step_plan_slicing(stripped, job) is stripped  # an analysis returns its input
    assert job.plan.regions and job.prepared is stripped
    grouped = compiler.step_group_regions(stripped, job)
    loops = [m for m in grouped.children() if isinstance(m, LoopRegion)]
    assert len(loops) == len(job.plan.regions)
    job.in_flight = 3
    compiler.step_set_in_flight(grouped, job)
    assert {loop.pipeline for loop in loops} == {3}
    grouped.graph.lint()


def test_steps_give_what_compile_graph_gives(captured):
    gm = captured
    policy = fxstream.Policy(slices=2)
    whole = compile_graph(gm, policy)
    job = _job(frames=2, height=2, width=2)
    by_steps = run_steps(gm, job)
    assert str(by_steps.graph) == str(whole.graph_module.graph)
    assert [r.nodes[0].name for r in job.plan.regions] == [r.nodes[0].name for r in whole.plan.regions]


def test_dump_writes_each_steps_graph_numbered(captured, tmp_path, monkeypatch):
    gm = captured
    monkeypatch.setenv("FXSTREAM_DUMP", str(tmp_path))
    compile_graph(gm, fxstream.Policy(slices=2))
    (folder,) = tmp_path.iterdir()
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{i:02d}-{s.name}.txt" for i, s in enumerate(STEPS)]
    assert "region_" in (folder / "03-group_regions.txt").read_text()
    assert "region_" not in (folder / "02-plan_slicing.txt").read_text()


def test_a_failing_step_is_named(captured):
    gm = captured

    def broken(g, job):
        g = copy.deepcopy(g)
        node = next(n for n in g.graph.nodes if n.op == "call_function")
        node.args = (node,) + tuple(node.args[1:])  # uses itself: graph.lint() rejects it
        return g

    steps = STEPS[:1] + (Step("broken_pass", broken),) + STEPS[1:]
    with pytest.raises(Exception) as info:
        run_steps(gm, _job(frames=2), steps)
    assert any("compile step 1 'broken_pass'" in note for note in getattr(info.value, "__notes__", []))


def test_analyses_receive_counts_not_the_policy(captured):
    gm = captured
    from fxstream.analysis.slicer import plan_slicing

    stripped = compiler.step_strip_asserts(gm, _job())
    plan = plan_slicing(stripped, {"frames": 2}, 0.05)
    assert {r.axis.name for r in plan.regions} == {"frames"}
    assert not plan_slicing(stripped, {}, 0.05).regions


def test_each_step_is_timed_in_the_log(captured, caplog):
    gm = captured
    with caplog.at_level(logging.INFO, logger="fxstream.compiler"):
        compile_graph(gm, fxstream.Policy(slices=2))
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m.split()[2].rstrip(":") for m in steps] == [s.name for s in STEPS]
    assert all(m.endswith(" s") for m in steps)


def test_the_compile_clock_shows_on_a_terminal_once(monkeypatch):
    stream = io.StringIO()
    outer = Progress(enabled=True, stream=stream, interval=10)
    with outer.step("capturing and planning"):
        with Progress(enabled=True, stream=stream, interval=10).step("fxstream: compiling"):  # inside: not shown
            pass
    assert "compiling" not in stream.getvalue() and stream.getvalue().count("\n") == 1
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert library_progress().enabled
    monkeypatch.setenv("FXSTREAM_PROGRESS", "0")
    assert not library_progress().enabled


def test_compiles_of_one_capture_share_its_stripped_graph_and_leave_it_unchanged(captured):
    """NOTE [One stripped graph per capture]: the first step's graph is made once; no step changes it."""
    gm = captured
    job = _job(frames=2)
    first = compiler.step_strip_asserts(gm, job)
    before = str(first.graph)
    compile_graph(gm, fxstream.Policy(slices=2))
    compile_graph(gm, fxstream.Policy(slices=3, halo=2))
    assert compiler.step_strip_asserts(gm, job) is first
    assert str(first.graph) == before


def test_a_budgets_attempts_share_one_capture(svd_tiny, monkeypatch):
    """A module compiled under several policies on the same inputs (compile_pipeline's budget attempts) is
    captured once; so is a module planned on meta several times inside shared_captures (explain_pipeline)."""
    from fxstream import entry
    unet, kwargs = svd_tiny
    calls = []
    real = entry.capture
    monkeypatch.setattr(entry, "capture", lambda m, kw: calls.append(1) or real(m, kw))
    cm = fxstream.compile(copy.deepcopy(unet), fxstream.Policy())
    a = cm.compiled_entry(kwargs, fxstream.Policy(slices=2))
    b = cm.compiled_entry(kwargs, fxstream.Policy(slices=4))
    assert len(calls) == 1 and a.program is b.program and a is not b
    other = {k: v.clone() if hasattr(v, "clone") else v for k, v in kwargs.items()}
    other["sample"] = kwargs["sample"][:, :2].clone()  # fewer frames: another signature, captured anew
    cm.compiled_entry(other, fxstream.Policy(slices=2))
    assert len(calls) == 2

    from fxstream.stages.planning import plan_on_meta, shared_captures
    calls.clear()
    with shared_captures():
        p1 = plan_on_meta(unet, kwargs, fxstream.Policy(slices=2))
        p2 = plan_on_meta(unet, kwargs, fxstream.Policy(max_memory=10**12))
    plan_on_meta(unet, kwargs, fxstream.Policy(slices=2))  # outside the scope: captured again
    assert len(calls) == 2 and p1.program is p2.program
