"""A stop request that long loops honour between batches (sampling, evaluation, grids).

Training's SIGTERM / SIGINT handler calls :func:`request`; the sampling and scoring loops of
:mod:`flowbp.evaluate` call :func:`check` between batches, which raises :class:`StopRequested`. So a
signal that arrives during a long evaluation stops it within one batch instead of after it, and the
trainer turns the exception into a checkpoint and a resumable exit. Nothing here installs a handler:
outside training no request is ever made and :func:`check` costs one comparison.

Under several processes :func:`check` never raises: the stop waits for the end of the step, where the
ranks agree on it (a collective). One rank leaving an evaluation early, while the others go on, would
desynchronise their collectives (FSDP gathers the weights in every forward; a signal need not reach every
rank, nor at the same batch).
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
    """Raise :class:`StopRequested` when a stop was requested (call it between batches); one process only."""
    if _requested is not None and not _several_processes():
        raise StopRequested(_requested)


def _several_processes() -> bool:
    import torch.distributed as dist  # imported by the trainer already: the only caller that requests a stop

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
