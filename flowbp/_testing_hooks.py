"""Fault-injection points for flowbp's own tests; every one is a no-op in normal use.

Training calls these functions at fixed places. Each does nothing unless its ``FLOWBP_TEST_*``
environment variable is set, and this module is the only place that reads those variables. They are
environment variables (not Python state) because the tests that use them mostly drive real
``python -m flowbp train`` subprocesses, some launched by ``torchrun``; in-process tests set them
with pytest's ``monkeypatch.setenv`` fixture.

================================  ===========================================================================
variable                          effect
================================  ===========================================================================
``FLOWBP_TEST_KILL=name[@step]``  :func:`kill_point` SIGKILLs the process at the named point (crash-safety
                                  tests: ``mid-step``, ``checkpoint-write``, ``final-eval``, ``end-files``)
``FLOWBP_TEST_SIGTERM_AT=step``   :func:`after_step`: rank 0 sends itself SIGTERM after that step
                                  (``step:SIGINT`` sends SIGINT, as Ctrl-C does)
``FLOWBP_TEST_NAN_STEPS=2,3``     :func:`poison_rewards` makes the reward NaN on those steps (non-finite guard)
``FLOWBP_TEST_FSDP2_ON_CPU=Cls``  :func:`fsdp2_on_cpu` runs accelerate's FSDP2 path on CPU processes,
                                  wrapping blocks of class ``Cls``
================================  ===========================================================================
"""

from __future__ import annotations

import os
import signal
from typing import Any


def kill_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process when it reaches point ``name`` (at ``step``, if the variable names one).

    Lets the crash-safety tests kill a real run at a precise moment (mid-step, mid-checkpoint-write,
    between the final files, …) without timing races.
    """
    spec = os.environ.get("FLOWBP_TEST_KILL")
    if not spec:
        return
    point, _, at = spec.partition("@")
    if point == name and (not at or step is None or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def after_step(run: Any) -> None:
    """Rank 0 sends itself SIGTERM (or ``step:SIGINT``) after the step named by ``FLOWBP_TEST_SIGTERM_AT``."""
    at = os.environ.get("FLOWBP_TEST_SIGTERM_AT")
    if not at or not run.is_main:
        return
    step, _, name = at.partition(":")
    if int(step) == run.step:
        os.kill(os.getpid(), signal.Signals[name or "SIGTERM"])


def poison_rewards(scores: list[Any], step: int) -> list[Any]:
    """The rewards, NaN on the steps listed in ``FLOWBP_TEST_NAN_STEPS`` (tests of the non-finite guard)."""
    spec = os.environ.get("FLOWBP_TEST_NAN_STEPS")
    if spec and str(step) in spec.split(","):
        return [s * float("nan") for s in scores]
    return scores


def fsdp2_on_cpu(accelerator: Any) -> None:
    """Switch a ``MULTI_CPU`` accelerate state to FSDP2 when ``FLOWBP_TEST_FSDP2_ON_CPU`` names the block class.

    accelerate (1.15) only enables FSDP for GPU-family distributed types and silently prepares DDP on
    CPU, although torch's ``fully_shard`` runs on CPU/gloo. The hook sets FSDP with the shipped fsdp2
    preset's settings, so that the FSDP2 code path (sharded DTensor parameters, gathered checkpoints,
    re-sharding on resume) runs in tests here.
    """
    wrap = os.environ.get("FLOWBP_TEST_FSDP2_ON_CPU")
    if not wrap or accelerator.distributed_type.value != "MULTI_CPU":
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[wrap],
        state_dict_type="SHARDED_STATE_DICT",  # as the preset: accelerate 1.6 refuses another with FSDP2
    )
    accelerator.state.distributed_type = DistributedType.FSDP
