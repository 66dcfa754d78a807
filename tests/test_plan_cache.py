"""The plan cache (fxstream/plan_cache.py): a budget's decision stored on disk and replayed as one compile."""
import json
import multiprocessing
import threading
import warnings
from pathlib import Path

import pytest
import torch

import fxstream
from fxstream import budget, plan_cache
from fxstream.compiler import MadeWith, capture
from fxstream.plan_cache import ENV

from programs import Spec, build


SPEC = Spec("BFCHW", 2, 4, 16, 8, 8, ("conv1x1", "temporal_attn", "spatial_attn", "group_norm_5d", "conv3x3"), 3)


@pytest.fixture(autouse=True)
def no_env_folder(monkeypatch):
    """No test reads the folder of whoever runs the tests."""
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture(scope="module")
def program(request):
    m = build(SPEC)
    kw = SPEC.inputs()
    return m, kw, fxstream.explain(m, kw)


def _budget(base, frac: float = 0.7) -> int:
    return base.weight_bytes + int(frac * base.original_peak_bytes)


@pytest.fixture
def compiles(monkeypatch):
    """Counts of the top-level compile_graph calls: the budget's search, and the cache's replays."""
    counts = {"search": 0, "replay": 0}

    def counting(name, fn):
        def run(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(budget, "compile_graph", counting("search", budget.compile_graph))
    monkeypatch.setattr(plan_cache, "compile_graph", counting("replay", plan_cache.compile_graph))
    return counts


def _entries(folder: Path) -> list:
    return sorted(folder.glob("*.json"))


def test_a_second_compile_replays_the_stored_decision_once(program, tmp_path, compiles):
    m, kw, base = program
    policy = fxstream.Policy(max_memory=_budget(base), cache_dir=str(tmp_path))
    first = fxstream.compile(m, policy)
    with torch.no_grad():
        out1 = first(**kw)[0]
    assert compiles["search"] > 1 and compiles["replay"] == 0  # the search compiled several times
    (entry,) = _entries(tmp_path)
    stored = json.loads(entry.read_text())
    assert stored["format"] == plan_cache.FORMAT and stored["key"] == entry.stem and stored["error"] is None
    compiles.update(search=0, replay=0)
    second = fxstream.compile(m, policy)
    with torch.no_grad():
        out2 = second(**kw)[0]
    assert compiles == {"search": 0, "replay": 1}
    assert torch.equal(out1, out2)
    a, b = first.compiled_entry(kw), second.compiled_entry(kw)
    assert a.compiled.graph_module.code == b.compiled.graph_module.code
    assert a.report.peak_bytes == b.report.peak_bytes == stored["peak_bytes"]
    assert a.report.lower_bound_bytes == b.report.lower_bound_bytes
    assert a.compiled.made_with == b.compiled.made_with
    assert _entries(tmp_path) == [entry]


def test_explain_hits_what_compile_stored(program, tmp_path, compiles):
    m, kw, base = program
    policy = fxstream.Policy(max_memory=_budget(base), cache_dir=tmp_path)  # a Path is taken too
    rep1 = fxstream.explain(m, kw, policy)
    compiles.update(search=0, replay=0)
    rep2 = fxstream.explain(m, kw, policy)
    assert compiles == {"search": 0, "replay": 1}
    assert rep1.peak_bytes == rep2.peak_bytes and rep1.table() == rep2.table()


def test_a_different_policy_or_input_shape_misses(program, tmp_path, compiles):
    m, kw, base = program
    policy = fxstream.Policy(max_memory=_budget(base), cache_dir=str(tmp_path))
    fxstream.explain(m, kw, policy)
    assert len(_entries(tmp_path)) == 1
    fxstream.explain(m, kw, fxstream.Policy(max_memory=_budget(base, 0.8), cache_dir=str(tmp_path)))
    assert len(_entries(tmp_path)) == 2
    fxstream.explain(m, kw, fxstream.Policy(max_memory=_budget(base), pipeline=2, cache_dir=str(tmp_path)))
    assert len(_entries(tmp_path)) == 3
    other = dict(kw, sample=kw["sample"][:, :3].clone())  # 3 frames
    fxstream.explain(m, other, policy)
    assert len(_entries(tmp_path)) == 4
    compiles.update(search=0, replay=0)
    fxstream.explain(m, kw, fxstream.Policy(max_memory=_budget(base), verify=True, cache_size=2,
                                            cache_dir=str(tmp_path)))  # run-time options: the same key
    assert compiles == {"search": 0, "replay": 1} and len(_entries(tmp_path)) == 4


def test_the_folder_is_not_in_the_key(program, tmp_path):
    m, kw, base = program
    gm = capture(m, kw).graph_module
    keys = {plan_cache.plan_key(gm, fxstream.Policy(max_memory=_budget(base), cache_dir=d), 10)
            for d in (None, False, "", str(tmp_path), str(tmp_path / "other"))}
    assert len(keys) == 1
    assert plan_cache.plan_key(gm, fxstream.Policy(max_memory=_budget(base)), 11) not in keys


@pytest.mark.parametrize("text", [
    "{not json",
    "",
    json.dumps([1, 2]),
    json.dumps({"format": plan_cache.FORMAT + 1}),
    "WRONG_KEY",
    "BAD_COUNTS",
    "STALE_VERSIONS",
], ids=["bad-json", "empty", "not-an-object", "other-format", "another-key", "bad-counts", "stale-versions"])
def test_a_corrupt_entry_warns_once_and_is_recompiled(program, tmp_path, compiles, text):
    m, kw, base = program
    policy = fxstream.Policy(max_memory=_budget(base), cache_dir=str(tmp_path))
    fxstream.explain(m, kw, policy)
    (entry,) = _entries(tmp_path)
    good = json.loads(entry.read_text())
    if text == "WRONG_KEY":
        text = json.dumps(dict(good, key="0" * 64))
    elif text == "BAD_COUNTS":
        text = json.dumps(dict(good, made_with=dict(good["made_with"], inner_counts=[{"x": "two"}])))
    elif text == "STALE_VERSIONS":
        text = json.dumps(dict(good, versions=dict(good["versions"], torch="1.0")))
    entry.write_text(text)
    compiles.update(search=0, replay=0)
    with pytest.warns(RuntimeWarning, match="plan cache entry .*" + entry.name) as caught:
        rep = fxstream.explain(m, kw, policy)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert compiles["search"] > 1 and compiles["replay"] == 0
    assert json.loads(entry.read_text()) == good  # overwritten with the search's decision
    assert rep.peak_bytes == good["peak_bytes"]


def test_a_decision_that_no_longer_holds_warns_and_searches_again(program, tmp_path, compiles):
    m, kw, base = program
    policy = fxstream.Policy(max_memory=_budget(base), cache_dir=str(tmp_path))
    fxstream.explain(m, kw, policy)
    (entry,) = _entries(tmp_path)
    good = json.loads(entry.read_text())
    entry.write_text(json.dumps(dict(good, peak_bytes=good["peak_bytes"] + 1)))
    compiles.update(search=0, replay=0)
    with pytest.warns(RuntimeWarning, match="plans .* bytes"):
        fxstream.explain(m, kw, policy)
    assert compiles["replay"] == 1 and compiles["search"] > 1
    assert json.loads(entry.read_text()) == good


def test_an_unmet_budget_is_stored_and_raised_again(program, tmp_path, compiles):
    m, kw, base = program
    policy = fxstream.Policy(max_memory=base.weight_bytes + 1000, cache_dir=str(tmp_path))
    with pytest.raises(fxstream.MemoryBudgetError) as first:
        fxstream.explain(m, kw, policy)
    (entry,) = _entries(tmp_path)
    assert json.loads(entry.read_text())["error"]["lower_bound_bytes"] == first.value.lower_bound_bytes
    compiles.update(search=0, replay=0)
    with pytest.raises(fxstream.MemoryBudgetError) as second:
        fxstream.explain(m, kw, policy)
    assert compiles == {"search": 0, "replay": 0}
    assert str(second.value) == str(first.value)
    assert (second.value.max_memory, second.value.weight_bytes, second.value.lower_bound_bytes) == \
        (first.value.max_memory, first.value.weight_bytes, first.value.lower_bound_bytes)


def test_the_policy_field_overrides_the_environment_variable(program, tmp_path, monkeypatch, compiles):
    m, kw, base = program
    env, field = tmp_path / "env", tmp_path / "field"
    monkeypatch.setenv(ENV, str(env))
    fxstream.explain(m, kw, fxstream.Policy(max_memory=_budget(base)))
    assert len(_entries(env)) == 1
    fxstream.explain(m, kw, fxstream.Policy(max_memory=_budget(base), cache_dir=str(field)))
    assert len(_entries(field)) == 1 and len(_entries(env)) == 1
    for off in ("", False):  # off, whatever the environment says
        compiles.update(search=0, replay=0)
        fxstream.explain(m, kw, fxstream.Policy(max_memory=_budget(base, 0.8), cache_dir=off))
        assert compiles["replay"] == 0 and compiles["search"] > 1
    assert len(_entries(env)) == 1 and len(_entries(field)) == 1
    assert plan_cache.cache_folder(fxstream.Policy()) == env
    assert plan_cache.cache_folder(fxstream.Policy(cache_dir=str(field))) == field
    assert plan_cache.cache_folder(fxstream.Policy(cache_dir="")) is None


def test_no_folder_set_writes_nothing(program, tmp_path, monkeypatch, compiles):
    m, kw, base = program
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(ENV, "")  # set but empty: no cache either
    policy = fxstream.Policy(max_memory=_budget(base))
    assert plan_cache.cache_folder(policy) is None
    fxstream.explain(m, kw, policy)
    compiles.update(search=0, replay=0)
    fxstream.explain(m, kw, policy)
    assert compiles["search"] > 1 and compiles["replay"] == 0
    assert list(tmp_path.rglob("*")) == []


def test_counts_as_given_are_not_stored(program, tmp_path):
    m, kw, _ = program
    fxstream.explain(m, kw, fxstream.Policy(slices=2, cache_dir=str(tmp_path)))
    assert _entries(tmp_path) == []


def test_cache_dir_is_checked():
    assert fxstream.Policy(cache_dir=Path("/x")).cache_dir == "/x"
    for bad in (True, 3, b"x", ["x"]):
        with pytest.raises(ValueError, match="Policy.cache_dir: expected None"):
            fxstream.Policy(cache_dir=bad)


def test_a_policy_and_its_decision_survive_json():
    policy = fxstream.Policy(slices=4, halo=(2, 3), pipeline=2, cpu_workers=False, min_region_fraction=0.1,
                             rehash=fxstream.StepRehash(schedule=[0, 3, 5]), cache_dir="/somewhere",
                             host_memory="2GiB")
    made = MadeWith(policy, {"add_1": 2}, [None, {"mul": 3}], 4096, 2, line_buffers=12345,
                    norms=(("native_group_norm", "native_group_norm_3"), None, ()))
    back = plan_cache._made_from(json.loads(json.dumps(plan_cache._made_json(made))))
    assert back == MadeWith(fxstream.Policy(slices=4, halo=(2, 3), pipeline=2, cpu_workers=False,
                                            min_region_fraction=0.1, rehash=fxstream.StepRehash(schedule=[0, 3, 5]),
                                            host_memory=2 * 2**30),
                            {"add_1": 2}, [None, {"mul": 3}], 4096, 2, line_buffers=12345,
                            norms=(("native_group_norm", "native_group_norm_3"), None, ()))


def _record(i: int) -> dict:
    return {"format": plan_cache.FORMAT, "writer": i, "payload": "x" * (200_000 + i)}


def _write_many(path: str, i: int, n: int) -> None:
    for _ in range(n):
        plan_cache.store(Path(path), _record(i))


def test_concurrent_writers_leave_a_whole_file(tmp_path):
    path = tmp_path / "cache" / ("ab" * 32 + ".json")
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            if path.exists():
                seen.append(json.loads(path.read_text())["writer"])  # never a partial file

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=_write_many, args=(str(path), i, 20)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert json.loads(path.read_text()) in [_record(i) for i in range(4)]
    assert seen and set(seen) <= set(range(4))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_two_processes_writing_one_key_leave_a_whole_file(tmp_path):
    path = tmp_path / ("cd" * 32 + ".json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(path), i, 20)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads(path.read_text()) in [_record(0), _record(1)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_unwritable_folder_warns_once_and_compiles(program, tmp_path, monkeypatch):
    m, kw, base = program
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(plan_cache, "_unwritable", set())
    policy = fxstream.Policy(max_memory=_budget(base), cache_dir=str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="cannot write the plan cache"):
        rep = fxstream.explain(m, kw, policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fxstream.explain(m, kw, policy).peak_bytes == rep.peak_bytes


def test_a_halo_budget_is_replayed_and_its_lower_bound_kept(tmp_path, compiles):
    from diffusers import AutoencoderKLTemporalDecoder
    torch.manual_seed(0)  # a small SVD VAE decoder, as in test_halo_budget.py
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4).eval()
    dec, kw = vae.decoder, dict(sample=torch.randn(3, 4, 16, 12), image_only_indicator=torch.zeros(1, 3), num_frames=3)
    base = fxstream.explain(dec, kw)
    policy = fxstream.Policy(max_memory=base.weight_bytes + int(0.8 * base.original_peak_bytes),
                             cache_dir=str(tmp_path))
    rep1 = fxstream.explain(dec, kw, policy)
    assert compiles["search"] > 1
    (entry,) = _entries(tmp_path)
    assert json.loads(entry.read_text())["lower_bound_bytes"] is None  # not computed by the search
    bound = rep1.lower_bound_bytes
    assert json.loads(entry.read_text())["lower_bound_bytes"] == bound  # kept once computed
    compiles.update(search=0, replay=0)
    rep2 = fxstream.explain(dec, kw, policy)
    assert compiles == {"search": 0, "replay": 1}
    assert rep2.peak_bytes == rep1.peak_bytes and rep2.lower_bound_bytes == bound
    assert compiles == {"search": 0, "replay": 1}


def test_a_parked_halo_budget_is_replayed_with_its_line_buffers(tmp_path, compiles):
    """A decoder budget met by parking in host memory (tests/test_host_checkpoints.py's case): the replay makes
    the same plan (device peak, host bytes, compute) and sets the same line buffers."""
    from test_halo import tiny_svd
    dec, kw = tiny_svd(frames=2, h=8, w=8)
    base = fxstream.explain(dec, kw)
    policy = fxstream.Policy(max_memory=base.weight_bytes + int(0.4 * base.original_peak_bytes),
                             host_memory="1GiB", cache_dir=str(tmp_path))
    rep1 = fxstream.explain(dec, kw, policy)
    (entry,) = _entries(tmp_path)
    assert json.loads(entry.read_text())["made_with"]["line_buffers"] == policy.max_memory - base.weight_bytes
    compiles.update(search=0, replay=0)
    rep2 = fxstream.explain(dec, kw, policy)
    assert compiles == {"search": 0, "replay": 1}
    assert (rep2.peak_bytes, rep2.host_bytes, rep2.host_traffic, rep2.compute_factor) == \
        (rep1.peak_bytes, rep1.host_bytes, rep1.host_traffic, rep1.compute_factor)
    assert rep1.host_bytes > 0


def test_a_decision_whose_compile_raises_warns_and_searches_again(program, tmp_path, compiles, monkeypatch):
    m, kw, base = program
    policy = fxstream.Policy(max_memory=_budget(base), cache_dir=str(tmp_path))
    rep = fxstream.explain(m, kw, policy)

    def broken(gm, made):
        raise RuntimeError("no such region")

    monkeypatch.setattr(plan_cache, "replay", broken)
    compiles.update(search=0, replay=0)
    with pytest.warns(RuntimeWarning, match="RuntimeError: no such region"):
        assert fxstream.explain(m, kw, policy).peak_bytes == rep.peak_bytes
    assert compiles["search"] > 1
