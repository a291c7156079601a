"""Linear layers that multiply a few rows weight-first: the serving engine's decoding steps on a CPU.

A decoding step multiplies every weight matrix by a handful of rows (one a row of the batch). On the x86 CPUs these
machines have, PyTorch's float32 ``linear`` takes a matrix-vector path for one row, but a general matrix product for
two to eight, which reads the weights at about half the speed: a step of two rows cost 1.7-1.9x a step of one, so a
quiet key's row beside another key's row waited almost twice as long as alone. The same product written weight-first
(``W @ x.T``) reads them faster for two to four rows: a step of two or four rows 1.2-1.5x faster
(``benchmarks/engine_step_rows.py``, docs/benchmarks.md). For one row, past :data:`MAX_ROWS` rows, and in any other
dtype or device, ``linear`` is as fast or faster, and is kept.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_ROWS, MAX_ROWS = 2, 4  # measured: weight-first faster for 2 and 4 rows, slower for 1 and 8 (docs/benchmarks.md)


class FewRowsLinear(nn.Linear):
    """``nn.Linear`` whose product over :data:`MIN_ROWS` to :data:`MAX_ROWS` rows is computed weight-first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if not MIN_ROWS <= rows <= MAX_ROWS:
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        out = (self.weight @ flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def weight_first_for_few_rows(model: nn.Module) -> int:
    """Turn ``model``'s float32 CPU linear layers into :class:`FewRowsLinear` (same weights, same module); the number
    turned. Layers on another device or in another dtype are left as they are: there the plain product is as fast."""
    turned = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = FewRowsLinear
            turned += 1
    return turned
