"""Training: the methods (SFT, DPO, the task heads), each a module that registers its trainer
(:func:`tunesmith.train.jobs.trainer`) and its shape (:func:`tunesmith.machine.methods.register_method`);
importing this package registers them all (and the reference path's trainers, :mod:`tunesmith.train.reference`).
:func:`tunesmith.train.jobs.train` is the one entry point."""

from tunesmith.train import dpo, grpo, heads, reference, sft  # noqa: F401 - each registers its method and trainer
