"""Short OpenMP waits under CPU load (fxstream.runtime.ShortWaits): held while the CPU pressure is high and a
region runs with several intra-op threads, never otherwise; they change no number and no thread count of the
caller. Speed is measured by tools/bench_load.py, not here."""
import threading
import time

import pytest
import torch

import fxstream
from fxstream import runtime
from fxstream.runtime import SHORT_WAITS, ShortWaits, cpu_pressure

PSI = """some avg10=16.39 avg60=50.87 avg300=79.34 total=17102408567
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""


@pytest.fixture
def threads():
    """Set the intra-op thread count for one test; restored after."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.fixture
def global_waits():
    """The runtime's own ShortWaits, its mode restored and its helper ended after the test."""
    mode = SHORT_WAITS.mode
    yield SHORT_WAITS
    SHORT_WAITS.mode = mode
    SHORT_WAITS.release()


def _until(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.05)
    return cond()


def test_cpu_pressure_reads_the_some_line():
    assert cpu_pressure(PSI) == 16.39
    assert cpu_pressure("full avg10=3.00 avg60=0.00 avg300=0.00 total=0\n") is None
    assert cpu_pressure("some avg10=x avg60=0.00\n") is None
    assert cpu_pressure("") is None


def test_the_environment_sets_the_mode(monkeypatch):
    monkeypatch.setenv("FXSTREAM_SHORT_WAITS", "0")
    assert ShortWaits().mode == "off"
    monkeypatch.setenv("FXSTREAM_SHORT_WAITS", "1")
    assert ShortWaits().mode == "on"
    monkeypatch.delenv("FXSTREAM_SHORT_WAITS")
    assert ShortWaits().mode == "auto" and ShortWaits(mode="off").mode == "off"


@pytest.mark.skipif(runtime.libgomp_path() is None, reason="PyTorch without libgomp: nothing to shorten")
def test_held_only_under_pressure_and_with_several_threads(monkeypatch):
    waits = ShortWaits(mode="auto", check_s=0.0, hold_s=0.2)
    loaded = {"now": False}
    monkeypatch.setattr(waits, "oversubscribed", lambda: loaded["now"])
    try:
        assert not waits.hold(2) and not waits.held  # quiet: nothing starts
        loaded["now"] = True
        assert not waits.hold(1) and not waits.held  # one thread: nothing spins at a fork
        assert waits.hold(2) and waits.held
        helper = waits.helper
        assert helper.name == "fxstream-short-waits"
        assert waits.hold(2) and waits.helper is helper  # held on: the same helper, not a new one
        loaded["now"] = False
        assert _until(lambda: not waits.held)  # nothing asks for it any more: it ends after hold_s
        helper.join(10)
        assert not helper.is_alive()
        waits.mode = "on"  # on: whatever the pressure
        assert waits.hold(2) and waits.held
        waits.mode = "off"
        assert not waits.hold(2)
    finally:
        waits.release()
    assert not waits.held


@pytest.mark.skipif(runtime.libgomp_path() is None, reason="PyTorch without libgomp: nothing to shorten")
def test_the_helper_sets_only_its_own_thread_count(threads):
    threads(2)
    waits = ShortWaits(mode="on", hold_s=30.0)
    try:
        assert waits.hold(2)
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # a new thread's count
        t.start()
        t.join()
        assert seen == [2]
    finally:
        waits.release()


@pytest.mark.skipif(runtime.libgomp_path() is None, reason="PyTorch without libgomp: nothing to shorten")
def test_short_waits_change_no_number(threads, global_waits, animatediff_tiny):
    threads(2)
    unet, kw = animatediff_tiny
    compiled = fxstream.compile(unet, policy=fxstream.Policy(slices=3))
    with torch.no_grad():
        global_waits.mode = "off"
        spinning = compiled(**kw)[0]
        assert not global_waits.held
        global_waits.mode = "on"
        short = compiled(**kw)[0]
        assert global_waits.held  # a region call started it
        again = compiled(**kw)[0]
        ref = unet(**kw)[0]
    assert torch.equal(short, spinning) and torch.equal(again, spinning)
    torch.testing.assert_close(short, ref, rtol=0, atol=1e-5)
    assert torch.get_num_threads() == 2
    threads(1)  # one intra-op thread: the regions do not ask for it
    global_waits.release()
    with torch.no_grad():
        compiled(**kw)
    assert not global_waits.held
