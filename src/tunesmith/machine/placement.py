"""Where and in what precision a model runs: the device and dtype every loader and trainer is given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Placement:
    """Where and in what precision a model runs."""

    device: str  # "cpu" | "cuda" | "mps"
    dtype: str  # "float32" | "bfloat16" | "float16"
    path: Any = None  # the training path (tunesmith.machine.device.TrainPath) when training

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)



def pick_placement(precision: str = "auto", device: str = "auto") -> Placement:
    """Choose device and precision from the hardware.

    On CPU we always use fp32: bf16 matmuls on CPUs without AMX/AVX512-BF16 run ~500x slower
    than fp32 (measured 0.3 vs 165 GFLOP/s), which is why TRL's bf16 default is unusable there.
    On CUDA we use bf16 when the GPU supports it, else fp16 is left to the user to ask for.
    """
    import torch

    from tunesmith.machine.device import precision_dtype

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return Placement(device=device, dtype=precision_dtype(precision, device, bf16))
