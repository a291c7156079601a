"""Where a training step waits for the device: reads of tensor values on the host, counted per step.

On a GPU each such read (``.item()``, ``bool(t)``, ``.tolist()``, a value-dependent shape) waits until the
device has finished everything queued before it, so the host cannot queue the next kernels while the GPU
computes; a launch-bound model (a small one, or a head on short texts) then leaves the GPU idle between
them. :class:`StepReads` counts them between a step's begin and end (logging, which reads the loss once
per ``logging_steps``, happens after the end): on CUDA with PyTorch's own check of synchronising
operations (C++ ones included), elsewhere by counting the Python-level reads of tensor values and the
operations whose result is sized by the values (a boolean mask index, ``nonzero``, ``masked_select``,
``unique``) that a GPU would wait on. The tests run it on a CPU; ``benchmarks/gpu_train.py`` reports it
per side.
"""

from __future__ import annotations

import traceback
import warnings

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")
SIZED_BY_VALUES = ("nonzero", "masked_select", "unique")  # their output's size depends on the values


def _bool_index(tensor, index, *args) -> bool:
    """Whether ``tensor[index]`` selects with a boolean mask (a result sized by the mask's values)."""
    import torch

    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in parts)


class StepReads:
    """Context manager: counts host reads inside training steps; add :meth:`callback` to the Trainer.

    ``sites`` lists ``file:line`` of each read (the line that asked), ``steps`` the steps seen."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.active = False
        self.sites: list[str] = []
        self.steps = 0
        self._saved: dict = {}
        self._saved_functions: dict = {}
        self._warnings = None

    def callback(self):
        """A TrainerCallback marking where each step begins and ends."""
        from transformers import TrainerCallback

        reads = self

        class _Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                reads.active = True

            def on_step_end(self, args, state, control, **kwargs):
                reads.active, reads.steps = False, reads.steps + 1

        return _Steps()

    @property
    def per_step(self) -> float | None:
        return len(self.sites) / self.steps if self.steps else None

    def __enter__(self) -> StepReads:
        import torch

        if self.device == "cuda":
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" in str(message):
                    if self.active:
                        self.sites.append(f"{filename}:{lineno}")
                    return
                shown(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            return self
        for name in READS + SIZED_BY_VALUES:
            self._saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(original))
        self._saved["__getitem__"] = original = torch.Tensor.__getitem__
        torch.Tensor.__getitem__ = self._counted(original, _bool_index)
        for name in SIZED_BY_VALUES:
            self._saved_functions[name] = original = getattr(torch, name)
            setattr(torch, name, self._counted(original))
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            return
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        for name, original in self._saved_functions.items():
            setattr(torch, name, original)
        self._saved, self._saved_functions = {}, {}

    def _counted(self, original, when=None):
        def read(tensor, *args, **kwargs):
            if self.active and (when is None or when(tensor, *args)):
                frame = traceback.extract_stack(limit=2)[0]
                self.sites.append(f"{frame.filename}:{frame.lineno}")
            return original(tensor, *args, **kwargs)

        return read
