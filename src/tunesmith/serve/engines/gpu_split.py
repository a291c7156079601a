"""One GPU, two tenants: vLLM serving and the jobs worker training on the same CUDA device.

``tunesmith serve --engine vllm`` on CUDA splits the GPU's memory once, at start: vLLM gets
``--gpu-memory-utilization`` (``--vllm-gpu-share`` of the total), the jobs worker the rest less a margin (CUDA
contexts, the allocator's fragmentation). The worker holds every job to its share: the job's
``train.memory_limit_gb`` (the memory estimate plans against it; PyTorch's per-process fraction enforces it) and,
before training, the estimate at the smallest micro-batch must fit, else the job fails with the numbers. On a CPU
nothing is split (vLLM's KV cache has its own size, ``VLLM_CPU_KVCACHE_SPACE``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.errors import ConfigError, TrainingError

GIB = 2**30
DEFAULT_VLLM_SHARE = 0.5  # with a jobs worker beside it; vLLM alone takes its own default (0.9)
MARGIN = 0.05  # of the total, kept free for CUDA contexts and fragmentation


@dataclass(frozen=True)
class GpuSplit:
    total: int  # bytes of the device
    vllm_share: float  # vLLM's --gpu-memory-utilization

    @property
    def vllm_bytes(self) -> int:
        return int(self.total * self.vllm_share)

    @property
    def jobs_bytes(self) -> int:
        return max(0, self.total - self.vllm_bytes - int(self.total * MARGIN))

    @property
    def jobs_gb(self) -> float:
        return self.jobs_bytes / GIB

    def describe(self) -> str:
        return (f"GPU memory {self.total / GIB:.1f} GiB: vLLM {self.vllm_bytes / GIB:.1f} GiB "
                f"(--gpu-memory-utilization {self.vllm_share:.2f}), jobs {self.jobs_gb:.1f} GiB (training, heads, "
                f"evaluation), {MARGIN:.0%} kept free")


def plan_split(total: int | None, vllm_share: float = DEFAULT_VLLM_SHARE) -> GpuSplit | None:
    """The split of a device of ``total`` bytes (None: no CUDA device, nothing to split)."""
    if not 0.05 <= vllm_share <= 1 - MARGIN - 0.05:
        raise ConfigError(f"--vllm-gpu-share is vLLM's share of the GPU, between 0.05 and {1 - MARGIN - 0.05:.2f} "
                            f"(the jobs worker has the rest), got {vllm_share}")
    return None if total is None else GpuSplit(total, vllm_share)


def cuda_total() -> int | None:
    """Bytes of the CUDA device this process would use, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def hold_job_to(recipe, budget_gb: float):
    """The job's recipe planned and held to ``budget_gb`` of the GPU (a smaller ``train.memory_limit_gb`` stays)."""
    limit = recipe.train.memory_limit_gb
    return recipe.with_train(memory_limit_gb=budget_gb if limit is None else min(limit, budget_gb))


def check_job_fits(recipe, budget_gb: float, device: str, dtype: str) -> None:
    """Refuse a job whose memory estimate at a micro-batch of 1 exceeds the jobs' share of the GPU, with the
    numbers (the worker would otherwise take vLLM's memory, or fail out of memory midway)."""
    from pathlib import Path

    from tunesmith.machine.estimate import estimate, model_shape

    smallest = recipe.with_train(batch_size=1, grad_accum=recipe.train.batch_size * recipe.train.grad_accum)
    est = estimate(model_shape(Path(recipe.model.folder)), smallest, dtype, device, int(budget_gb * GIB))
    if est.fits is False:
        raise TrainingError(f"this job needs about {est.total / GIB:.1f} GiB of GPU memory even with micro-batches "
                            f"of 1, and the jobs' share of this GPU is {budget_gb:.1f} GiB (vLLM serves in the rest); "
                            "train a smaller model or shorter rows, or start the server with a smaller "
                            "--vllm-gpu-share")
