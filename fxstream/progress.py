"""Step messages with a running clock for the command line, shown only when stderr is a terminal.

    >>> progress = Progress(enabled=sys.stderr.isatty())
    >>> with progress.step("capturing and planning"):
    ...     entry = plan()
    capturing and planning... 7.1 s
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["Progress"]


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
        if not self.enabled:
            yield
            return
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
