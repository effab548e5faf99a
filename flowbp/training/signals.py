"""SIGTERM / SIGINT during training: a flag the loop acts on after its step (checkpoint, then stop).

The handler also files a stop request (:mod:`flowbp.stop`) that the sampling loops of evaluations and
sample grids honour between batches, so a signal during a long evaluation stops it within one batch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from flowbp import stop
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
        stop.request(signum)
        if run.is_main:
            print(
                f"\nflowbp train: {signal.Signals(signum).name} received; finishing the current step or "
                "sampling batch and writing a checkpoint … (Ctrl-C again: stop at once)",
                file=sys.stderr,
                flush=True,
            )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    stop.clear()
    try:
        yield
    finally:
        stop.clear()
        for s, h in previous.items():
            signal.signal(s, h)
