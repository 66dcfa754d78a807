"""The CPU executor under load: slices in flight where the plan has room for them (single-threaded workers, no
OpenMP barrier inside a slice), the pool never larger than the intra-op thread count, the executor chosen
without timing where each worker has one thread, and a free worker taking the next slice. Outputs and planned
memory only: speed is measured by tools/bench_load.py, not here."""
import threading

import pytest
import torch
import torch.utils._pytree as pytree

import fxstream
from fxstream.analysis.cuts import Cut
from fxstream.compiler import capture, compile_graph, layout_of
from fxstream.memory import measure_peak, plan_memory
from fxstream.models import build_unet, example_inputs
from fxstream.runtime import LoopRegion, set_in_flight, spare_in_flight

_CAPTURED = {}


@pytest.fixture
def threads():
    """Set the intra-op thread count for one test (the decisions depend on it); restored after."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _captured(name):
    if name not in _CAPTURED:
        unet = build_unet(name)
        kw = example_inputs(name, unet)
        ep = capture(unet, kw)
        flat, _ = pytree.tree_flatten(((), kw))
        state = [unet.get_parameter(s.target) if s.kind.name == "PARAMETER" else unet.get_buffer(s.target)
                 for s in ep.graph_signature.input_specs if s.kind.name in ("PARAMETER", "BUFFER")]
        with torch.no_grad():
            ref = unet(**kw)[0]
        _CAPTURED[name] = (unet, ep, state + flat, ref)
    return _CAPTURED[name]


def _leaves(gm):
    return [m for m in gm.modules() if isinstance(m, LoopRegion) and not m.nested]


def _compile(name, **policy):
    unet, ep, _, _ = _captured(name)
    return compile_graph(ep.graph_module, fxstream.Policy(**policy), layout_of(unet)).graph_module


@pytest.mark.parametrize("model,policy", [("svd-tiny", {"slices": 4}), ("animatediff-tiny", {"slices": 3}),
                                          ("svd-tiny", {"slices": 3, "batch": 2})], ids=str)
def test_spare_slices_in_flight_keep_the_planned_peak_and_the_output(threads, model, policy):
    threads(2)
    _, _, args, ref = _captured(model)
    spare = _compile(model, **policy)
    serial = _compile(model, cpu_workers=False, **policy)
    raised = [m for m in _leaves(spare) if m.in_flight > 1]
    assert raised and len(raised) < len(_leaves(spare))  # the region at the peak has no room for a second slice
    assert all(m.in_flight == 2 and m.cpu_mode == "workers" and not m.partial for m in raised)
    assert all(m.in_flight == 1 for m in spare.modules() if isinstance(m, LoopRegion) and m.nested)
    assert all(m.in_flight == 1 for m in _leaves(serial))
    planned, planned_serial = plan_memory(spare), plan_memory(serial)
    assert planned.peak_bytes == planned_serial.peak_bytes and planned.peak_node == planned_serial.peak_node
    (out, *_), measured = measure_peak(spare, *args)
    assert measured <= planned.peak_bytes
    with torch.no_grad():
        again = spare(*args)[0]
        one_by_one = serial(*args)[0]
    assert torch.equal(again, out)  # the same numbers from the first call on
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, one_by_one, rtol=0, atol=1e-5)


def test_no_spare_slices_with_one_thread_with_cpu_workers_false_or_off_the_cpu(threads):
    threads(1)
    assert all(m.in_flight == 1 for m in _leaves(_compile("animatediff-tiny", slices=3)))
    threads(2)
    gm = _compile("animatediff-tiny", slices=3)
    assert any(m.in_flight > 1 for m in _leaves(gm))
    set_in_flight(gm, 1, False)
    assert all(m.in_flight == 1 and m.cpu_mode == "serial" for m in _leaves(gm))
    assert spare_in_flight(gm, 1) == 0 and all(m.in_flight == 1 for m in _leaves(gm))
    # planned on the meta device (full-size plans for any device): the plan stays one slice at a time
    unet = build_unet("animatediff-tiny", device="meta")
    report = fxstream.explain(unet, example_inputs("animatediff-tiny", unet), fxstream.Policy(slices=3))
    assert report.regions and {r.in_flight for r in report.regions} == {1}


def test_the_report_counts_the_spare_slices(threads, animatediff_tiny):
    threads(2)
    unet, kw = animatediff_tiny
    spare = fxstream.compile(unet, policy=fxstream.Policy(slices=3))
    serial = fxstream.compile(unet, policy=fxstream.Policy(slices=3, cpu_workers=False))
    with torch.no_grad():
        torch.testing.assert_close(spare(**kw)[0], serial(**kw)[0], rtol=0, atol=1e-5)
    a, b = spare.explain(), serial.explain()
    assert a.peak_bytes == b.peak_bytes
    assert {r.in_flight for r in a.regions} == {1, 2} and {r.in_flight for r in b.regions} == {1}


class _Body(torch.nn.Module):
    """Doubles its slice and records which thread ran it. Slice 0 waits (at most 30 s) until slice 2 has started."""

    def __init__(self):
        super().__init__()
        self.ran, self.started = [], {}
        self.third = threading.Event()

    def forward(self, x):
        i = int(x[0, 0])
        self.started[i] = True
        if i == 2:
            self.third.set()
        if i == 0 and threading.current_thread() is not threading.main_thread():
            self.ran.append(("waited", self.third.wait(30)))
        self.ran.append((i, threading.current_thread().name))
        return (x * 2,)


def _region(n=6, k=2, mode=None):
    body = _Body()
    loop = LoopRegion({1: body}, n, [(i, 1) for i in range(n)], [Cut(0)], [Cut(0)],
                      [((n, 5), (5, 1), torch.float32)], pipeline=k)
    loop.cpu_mode = mode
    x = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 5).contiguous()
    return loop, body, x


def test_one_thread_per_worker_is_chosen_without_timing(threads):
    threads(2)
    loop, body, x = _region(k=2)
    (out,) = loop(x)
    assert torch.equal(out, x * 2)
    assert loop.cpu_mode == "workers" and loop.cpu_timing is None
    threads(4)  # two workers of two threads each: still measured on the first call
    loop, body, x = _region(k=2)
    body.third.set()
    (out,) = loop(x)
    assert torch.equal(out, x * 2)
    assert loop.cpu_mode in ("serial", "workers") and loop.cpu_timing is not None


def test_workers_never_outnumber_the_intra_op_threads(threads):
    threads(1)
    loop, body, x = _region(k=4, mode="workers")
    (out,) = loop(x)
    assert torch.equal(out, x * 2)
    assert {name for i, name in body.ran if i != "waited"} == {threading.main_thread().name}
    threads(2)
    loop, body, x = _region(k=4, mode="workers")
    body.third.set()
    (out,) = loop(x)
    assert torch.equal(out, x * 2)
    names = {name for i, name in body.ran if i != "waited"}
    assert len(names) <= 2 and all(name.startswith("fxstream-2x1") for name in names)


def test_a_free_worker_takes_the_next_slice(threads):
    """Slice 0 holds its worker until slice 2 has started: the other worker has to take slices 1 and 2 (the
    oldest-first loop waited for slice 0 before starting slice 2, and slice 0 waited out its 30 s)."""
    threads(2)
    loop, body, x = _region(n=6, k=2, mode="workers")
    (out,) = loop(x)
    assert torch.equal(out, x * 2)
    assert ("waited", True) in body.ran
    assert sorted(body.started) == list(range(6))
