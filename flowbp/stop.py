"""A stop request that long loops honour between batches (sampling, evaluation, grids).

Training's SIGTERM / SIGINT handler calls :func:`request`; the sampling and scoring loops of
:mod:`flowbp.evaluate` call :func:`check` between batches, which raises :class:`StopRequested`. So a
signal that arrives during a long evaluation stops it within one batch instead of after it, and the
trainer turns the exception into a checkpoint and a resumable exit. Nothing here installs a handler:
outside training no request is ever made and :func:`check` costs one comparison.
"""

from __future__ import annotations

import signal

_requested: int | None = None


class StopRequested(Exception):
    """Raised by :func:`check` once a stop was requested; ``signum`` is the signal that asked."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stop requested by {signal.Signals(signum).name}")
        self.signum = signum


def request(signum: int) -> None:
    global _requested
    _requested = int(signum)


def clear() -> None:
    global _requested
    _requested = None


def requested() -> int | None:
    return _requested


def check() -> None:
    """Raise :class:`StopRequested` when a stop was requested (call it between batches)."""
    if _requested is not None:
        raise StopRequested(_requested)
