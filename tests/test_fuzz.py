"""Fuzzing the public entry points: ``fxstream.compile``, the compiled module's forward, ``fxstream.explain`` and
``fxstream.Policy`` with random (often wrong) arguments.

The property, for every drawn call: it either succeeds and equals the original module on the same inputs (bitwise
with ``Policy()``, 1e-5 sliced, in fp32), or fails with a clear exception: an :class:`fxstream.FxstreamError`, or
a ``TypeError``/``ValueError`` raised by fxstream itself whose message names the argument. Anything else (a raw
``RuntimeError`` from deep inside torch, an ``AttributeError``, a result that differs) is a finding. Examples are
a few KB (a generated program from ``tests/programs.py``) or the tiny SVD, so no call can run long.
"""
import pathlib
import traceback

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import fxstream

from programs import Spec, build, policies

N = settings.default.max_examples
SOME = settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=max(2, N // 6), deadline=None, suppress_health_check=[HealthCheck.too_slow])

_PACKAGE = pathlib.Path(fxstream.__file__).resolve().parent
_POLICY_FIELDS = ["slices", "spatial", "temporal", "batch", "max_memory", "pipeline", "cpu_workers",
                  "min_region_fraction"]




def _raised_by_fxstream(e: BaseException) -> bool:
    """Whether the innermost frame that raised ``e`` is fxstream's own code (not torch's or diffusers')."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and pathlib.Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE.parent) and \
        "/fxstream/" in frames[-1].filename.replace("\\", "/")


def clear_failure(e: BaseException, names) -> None:
    """Assert ``e`` is an error a user can act on: ours, or a TypeError/ValueError of ours naming an argument."""
    if isinstance(e, fxstream.FxstreamError):
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return
    if isinstance(e, (TypeError, ValueError)) and _raised_by_fxstream(e):
        assert any(n in str(e) for n in names), f"{type(e).__name__} names no argument: {e}"
        return
    if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):  # Python's own, naming it
        return
    raise AssertionError(f"an unclear error leaked: {type(e).__name__}: {e}") from e


def outcome(call, names):
    """(True, result) or (False, exception) after checking the exception is clear."""
    try:
        result = call()
    except Exception as e:  # noqa: BLE001  every failure is judged by clear_failure
        clear_failure(e, names)
        event(f"fails: {type(e).__name__}: {str(e)[:50]}")
        return False, e
    event("succeeds")
    return True, result


# ---------------------------------------------------------------------------------------------------------------
# Policy

_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.floats(allow_nan=True, width=32),
                    st.sampled_from(["8", "6GiB", "lots", "", "0MiB", "1.5GB"]), st.just([2]))


@SOME
@given(fields=st.dictionaries(st.sampled_from(_POLICY_FIELDS + ["slice", "memory"]), _values, max_size=3))
@example(fields={"cpu_workers": 1})
@example(fields={"max_memory": float("nan")})
@example(fields={"slices": 2.0})
def test_policy_accepts_or_names_the_field(fields):
    ok, result = outcome(lambda: fxstream.Policy(**fields), [f"Policy.{f}" for f in _POLICY_FIELDS] + ["slice"])
    if ok:  # what was accepted is what it says
        for k, v in fields.items():
            got = getattr(result, k)
            assert got == v or (k == "max_memory" and isinstance(got, int) and got > 0), (k, v, got)
            if k in ("slices", "spatial", "temporal", "batch", "pipeline") and v is not None:
                assert type(v) is int and v >= 1
            if k == "cpu_workers":
                assert v is None or type(v) is bool, f"cpu_workers accepted {v!r}"
        result.describe()


# ---------------------------------------------------------------------------------------------------------------
# compile / forward / explain on a generated program


SPEC = Spec("BCFHW", 2, 3, 4, 4, 3, ("spatial_attn", "temporal_attn", "group_norm_5d", "conv1x1"), 7)
MODULE = build(SPEC)
_ARG_NAMES = ["sample", "encoder_hidden_states", "module", "policy", "example_kwargs", "arguments"]


@st.composite
def tensors(draw, rank=None):
    shape = draw(st.lists(st.integers(0, 4), min_size=rank or 0, max_size=rank or 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.int64,
                                  torch.bool]))
    return torch.randn(*shape).to(dtype) if shape else torch.tensor(1.5).to(dtype)


@st.composite
def fitting_inputs(draw):
    """Inputs the program accepts: any batch, frames, height, width; its channel count; fp32."""
    b, f, h, w = (draw(st.integers(1, 4)) for _ in range(4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    return {"sample": torch.randn(b, SPEC.channels, f, h, w, generator=g),
            "encoder_hidden_states": torch.randn(b, draw(st.integers(1, 3)), SPEC.channels, generator=g)}


_junk = st.one_of(st.none(), st.integers(-2, 5), st.floats(-1, 1), st.text(max_size=3), st.just([1.0, 2.0]),
                  tensors())


@st.composite
def mutated_inputs(draw):
    """Fitting inputs with some arguments dropped, replaced by junk or wrong tensors, or extra ones added."""
    kw = draw(fitting_inputs())
    for name in list(kw):
        action = draw(st.sampled_from(["keep", "keep", "drop", "junk", "rank5"]))
        if action == "drop":
            del kw[name]
        elif action == "junk":
            kw[name] = draw(_junk)
        elif action == "rank5":
            kw[name] = draw(tensors(rank=5 if name == "sample" else 3))
    if draw(st.booleans()):
        kw[draw(st.sampled_from(["extra", "return_dict", "timestep"]))] = draw(_junk)
    return kw


def _policies():
    return st.one_of(st.just(fxstream.Policy()), policies(pipeline=False),
                     st.builds(fxstream.Policy, max_memory=st.sampled_from([1, 2**12, 2**16, 2**30])))


def _equal_to_original(module, kwargs, out, policy):
    with torch.no_grad():
        try:
            ref = module(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"the compiled module succeeded where the original fails: {e}") from e
    assert type(out) is type(ref)
    if not isinstance(out, torch.Tensor):  # a tuple or a diffusers output dataclass
        out, ref = (out.to_tuple(), ref.to_tuple()) if hasattr(out, "to_tuple") else (out, ref)
        assert len(out) == len(ref)
        out, ref = out[0], ref[0]
    if not policy.slices_anything and policy.max_memory is None:
        assert torch.equal(out, ref), "Policy() is not bitwise the original"
    else:
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max().item()


_COMPILED: dict = {}


def _compiled(policy):
    """One compiled module per policy, shared by the examples: its signature cache is exercised too."""
    if policy not in _COMPILED:
        _COMPILED[policy] = fxstream.compile(MODULE, policy=policy)
    return _COMPILED[policy]


@SOME
@given(policy=_policies(), kwargs=st.one_of(fitting_inputs(), mutated_inputs()), positional=st.booleans())
def test_forward_is_right_or_fails_clearly(policy, kwargs, positional):
    compiled = _compiled(policy)
    args = ()
    if positional and "sample" in kwargs:
        kwargs = dict(kwargs)
        args = (kwargs.pop("sample"),)
    with torch.no_grad():
        ok, out = outcome(lambda: compiled(*args, **kwargs), _ARG_NAMES)
    if ok:
        full = dict(kwargs, **({"sample": args[0]} if args else {}))
        _equal_to_original(MODULE, full, out, policy)
        report = compiled.explain()
        assert report.peak_bytes >= 0 and all(u.reason for u in report.unsliced)


@SOME
@given(policy=st.one_of(st.none(), _policies(), _policies(), _policies(), _junk, st.just({"slices": 2})),
       kwargs=st.one_of(fitting_inputs(), fitting_inputs(), mutated_inputs(), _junk),
       module=st.sampled_from(["program"] * 4 + ["junk"]))
def test_explain_reports_or_fails_clearly(policy, kwargs, module):
    target = MODULE if module == "program" else "not a module"
    ok, report = outcome(lambda: fxstream.explain(target, kwargs, policy=policy), _ARG_NAMES)
    if ok:
        assert isinstance(report, fxstream.Report)
        assert report.weight_bytes > 0 and report.original_peak_bytes > 0
        ops = len(report.unsliced) + report.sliced_ops
        assert ops > 0 and all(u.reason for u in report.unsliced)
        if isinstance(policy, fxstream.Policy) and policy.max_memory is not None:
            assert report.peak_bytes + report.weight_bytes <= policy.max_memory or not report.regions


@SOME
@given(module=st.sampled_from([MODULE] * 4 + [torch.nn.Identity, "module"]),
       policy=st.one_of(st.none(), _policies(), _policies(), _junk))
def test_compile_accepts_or_names_the_argument(module, policy):
    ok, compiled = outcome(lambda: fxstream.compile(module, policy=policy), _ARG_NAMES)
    if ok:
        assert isinstance(compiled, fxstream.CompiledModule) and compiled.module is module
    ok2, _ = outcome(lambda: fxstream.compile(compiled), _ARG_NAMES) if ok else (False, None)
    assert not ok2, "compiling a compiled module must be refused"


# ---------------------------------------------------------------------------------------------------------------
# the tiny SVD: the kwargs the pipeline passes, mutated


@pytest.fixture(scope="module")
def svd(svd_tiny):
    unet, kw = svd_tiny
    return unet, kw, fxstream.compile(unet, policy=fxstream.Policy(slices=2))


_SVD_NAMES = _ARG_NAMES + ["added_time_ids", "timestep", "return_dict"]


@st.composite
def svd_mutations(draw):
    name = draw(st.sampled_from(["sample", "encoder_hidden_states", "added_time_ids", "timestep", "return_dict",
                                 "extra"]))
    change = draw(st.sampled_from(["drop", "none", "float", "frames", "channels", "dtype"]))
    return name, change


def _mutate(kw: dict, name: str, change: str) -> dict:
    kw = dict(kw)
    v = kw.get(name)
    if change == "drop":
        kw.pop(name, None)
    elif change == "none":
        kw[name] = None
    elif change == "float":
        kw[name] = 0.5
    elif torch.is_tensor(v) and change == "frames" and v.dim() >= 2:
        kw[name] = torch.cat([v, v[:, :1]], dim=1)  # one more frame (or token / id)
    elif torch.is_tensor(v) and change == "channels" and v.dim() >= 3:
        kw[name] = torch.cat([v, v[:, :, :1]], dim=2)
    elif torch.is_tensor(v) and change == "dtype":
        kw[name] = v.double()
    else:
        kw[name] = torch.zeros(1)
    return kw


@FEW
@given(mutation=svd_mutations())
@example(mutation=("sample", "frames"))  # 5 frames, which the 4-frame config does not fix: a new signature
@example(mutation=("sample", "dtype"))
def test_svd_forward_is_right_or_fails_clearly(svd, mutation):
    unet, kw, compiled = svd
    kw = _mutate(kw, *mutation)
    with torch.no_grad():
        ok, out = outcome(lambda: compiled(**kw), _SVD_NAMES)
    if ok:
        _equal_to_original(unet, kw, out, compiled.policy)


def test_empty_video_is_not_sliced():
    """Found by fuzzing: a latent with a zero-size dim under a slicing policy divided by zero in the view algebra
    (ZeroDivisionError from map_view_cut). An empty video has nothing to slice; it runs as exported."""
    kw = {"sample": torch.randn(0, 4, 0, 1, 2), "encoder_hidden_states": torch.randn(0, 2, 4)}
    compiled = fxstream.compile(MODULE, policy=fxstream.Policy(slices=2))
    with torch.no_grad():
        out = compiled(**kw)
        assert out.shape == MODULE(**kw).shape
    assert not compiled.explain().regions


def test_inputs_the_weights_do_not_fit_fail_clearly():
    """Found by fuzzing: a bf16 latent into fp32 weights passes torch.export (its fake linear does not compare
    dtypes) and failed inside the graph with torch's bare RuntimeError. Now an ExecutionError (still a
    RuntimeError, as the module's own error is) quoting torch's reason and listing the inputs."""
    kw = {"sample": torch.randn(2, 4, 3, 1, 2).bfloat16(), "encoder_hidden_states": torch.randn(2, 2, 4)}
    with pytest.raises(RuntimeError):
        MODULE(**kw)
    with pytest.raises(fxstream.ExecutionError, match=r"same dtype(.|\n)*sample: bfloat16 \(2, 4, 3, 1, 2\)"):
        fxstream.compile(MODULE, policy=fxstream.Policy())(**kw)


def test_cpu_workers_must_be_a_bool():
    """Found by fuzzing: ``Policy(cpu_workers=1)`` was accepted (1 == True) and described as ``cpu_workers=1``."""
    with pytest.raises(ValueError, match="Policy.cpu_workers"):
        fxstream.Policy(cpu_workers=1)
    assert fxstream.Policy(pipeline=2, cpu_workers=True).cpu_workers is True
