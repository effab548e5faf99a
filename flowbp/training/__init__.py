"""The components of the training recipe in :mod:`flowbp.train` (which reads as one page and imports these).

- :mod:`~flowbp.training.run`: the :class:`Run` state and :class:`TrainingStopped`.
- :mod:`~flowbp.training.components`: prompts, backbone, reward, LoRA, optimizer, schedule, random streams.
- :mod:`~flowbp.training.accelerator`: the accelerate set-up and the collectives every rank must call.
- :mod:`~flowbp.training.step`: one optimizer step over the global batch.
- :mod:`~flowbp.training.checkpoints`: writing a checkpoint, reopening a run, restoring its state.
- :mod:`~flowbp.training.evaluation`: the fixed-seed before/after evaluation and the sample grids.
- :mod:`~flowbp.training.weights`: EMA weights for evaluation, and the shipped weights.
- :mod:`~flowbp.training.signals`: SIGTERM / SIGINT turned into a checkpointed stop.

This package imports nothing at import time, so ``import flowbp.training.weights`` stays light.
"""
