"""Step messages with a running clock for the command line, shown only when stderr is a terminal.

    >>> progress = Progress(enabled=sys.stderr.isatty())
    >>> with progress.step("capturing and planning"):
    ...     entry = plan()
    capturing and planning... 7.1 s
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["Progress", "library_progress"]

_shown = threading.local()  # a step is on the screen in this thread: steps inside it are not shown (one clock)


class Progress:
    """Writes ``message... N s`` to ``stream`` while a step runs (refreshed twice a second), then its time."""

    def __init__(self, enabled: bool, stream=None, interval: float = 0.5):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def step(self, message: str):
        if not self.enabled or getattr(_shown, "active", False):
            yield
            return
        _shown.active = True
        start = time.perf_counter()
        stop = threading.Event()

        def show(end: str = "") -> None:
            self.stream.write(f"\r{message}... {time.perf_counter() - start:.1f} s{end}")
            self.stream.flush()

        def tick() -> None:
            while not stop.wait(self.interval):
                show()

        show()
        clock = threading.Thread(target=tick, daemon=True)
        clock.start()
        try:
            yield
        finally:
            stop.set()
            clock.join()
            show("\n")
            _shown.active = False


def library_progress() -> Progress:
    """The clock fxstream shows while it compiles a module on its first call: on when stderr is a terminal (as
    diffusers' progress bars), off otherwise or with the environment variable ``FXSTREAM_PROGRESS=0``."""
    return Progress(enabled=sys.stderr.isatty() and os.environ.get("FXSTREAM_PROGRESS", "1") != "0")
