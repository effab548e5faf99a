"""SIGTERM / SIGINT during training: a flag the loop acts on after its step (checkpoint, then stop)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from flowbp.training.run import Run


@contextlib.contextmanager
def stop_on_signals(run: Run) -> Iterator[None]:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and stops (see :func:`train`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if run.stop_signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        run.stop_signal = signum
        if run.is_main:
            print(
                f"\nflowbp train: {signal.Signals(signum).name} received; finishing the current step "
                "and writing a checkpoint …",
                file=sys.stderr,
                flush=True,
            )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
