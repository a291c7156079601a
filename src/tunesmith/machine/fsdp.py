"""``train.distributed: fsdp``: FSDP2 (PyTorch's ``fully_shard``) on GPUs and on CPUs, under the Trainer.

Every parameter is a :class:`~torch.distributed.tensor.DTensor` sharded on its first dimension, each rank
holding one slice; a decoder layer gathers its full weights for its forward and backward and frees them after, and
gradients are reduce-scattered, so weights, gradients and optimizer state are split between the ranks.

How it is wired, and why:

- **GPUs**: the Trainer's own FSDP2 settings (:func:`fsdp_args`), which it passes to accelerate's FSDP plugin;
  accelerate shards every decoder layer, the embedding/head group and the root.
- **CPUs (gloo)**: accelerate 1.15 turns its FSDP plugin on only for GPU-like process types (its
  ``AcceleratorState`` lists them); for CPU processes it drops the plugin without a word and wraps the model in
  DDP. FSDP2 itself runs on a CPU device mesh over gloo. So :func:`shard_on_cpu` shards the model itself
  (each decoder layer, then the root, on an explicit CPU mesh: accelerate's default mesh follows the build's
  accelerator and would be a CUDA mesh on a CUDA build) and then switches the Trainer's accelerator to FSDP
  with the same plugin the GPU path gets. From there the code is the GPU path's: accelerate sees a model that
  is already an ``FSDPModule`` and keeps it as it is (no DDP), and the Trainer saves and resumes checkpoints
  and gathers the final model through accelerate's FSDP2 functions. SFT, DPO and the heads all train through
  ``tunesmith.train.sft.fit``, which calls :func:`shard_on_cpu` (DPO's frozen reference model, prepared by TRL before, stays
  whole on every rank on CPUs).
- Rejected: sharding before the Trainer alone (accelerate refuses DTensor parameters with CPU processes, as
  DDP cannot wrap them); transformers' load-time sharding (``from_pretrained(distributed_config=...)``),
  whose Trainer mode refuses optimizer checkpoints, hence resuming; a training loop of our own (it would
  repeat the Trainer: accumulation, checkpoints with RNG and data position, callbacks, evaluation).

What is saved: checkpoints sharded with ``torch.distributed.checkpoint`` (``pytorch_model_fsdp_0/`` and
``optimizer_0/``, one file per rank, plus each rank's RNG state); they resume under ``fsdp`` with any number of
processes above one (the checkpoint is resharded on load), not in a single process. The final model is
gathered into a full state dict and written by rank 0 as a normal Hugging Face folder (``train/model/``).
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import ConfigError, TrainingError


def fsdp_args(recipe) -> dict:
    """``train.distributed: fsdp`` as the Trainer's FSDP2 settings (accelerate's plugin): every decoder layer
    sharded and freed after its forward, checkpoints saved sharded (one file per rank). Nothing with a single
    process: there is nobody to share with, and the Trainer refuses FSDP settings outside distributed training."""
    from tunesmith.machine.launch import world_size

    if recipe.train.distributed != "fsdp" or world_size() <= 1:
        return {}
    return dict(fsdp=True, fsdp_config={"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                        "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})


def shard_on_cpu(trainer) -> bool:
    """Shard ``trainer.model`` with FSDP2 on a CPU mesh and turn the Trainer's FSDP mode on, when the recipe
    asked for fsdp (the Trainer has FSDP settings) and accelerate kept the CPU processes on DDP; returns
    whether it did. Call it before ``trainer.train()``, once."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if (trainer.args.fsdp_plugin_args is None or trainer.is_fsdp_enabled
            or state.distributed_type != DistributedType.MULTI_CPU):
        return False
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    plugin.set_auto_wrap_policy(trainer.model)  # while the layer classes have their names (FSDP renames them)
    shard_model(trainer.model, cpu_mesh(), reshard_after_forward=plugin.reshard_after_forward,
                mp_policy=plugin.mixed_precision_policy)
    # what AcceleratorState.__init__ sets for GPU processes given the plugin; the process-wide copy as well,
    # since every later AcceleratorState() copies the distributed type back from it
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return True


def check_resumable(checkpoint: Path, trainer) -> None:
    """A sharded checkpoint resumes only under FSDP (two processes or more) and a whole one only without it;
    say so before the Trainer fails deep inside its loading."""
    sharded = any(p.is_dir() and p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir())
    if sharded and not trainer.is_fsdp_enabled:
        raise ConfigError(f"--resume: {checkpoint} is sharded (saved under train.distributed: fsdp); resume it "
                          "with train.distributed: fsdp and --nproc 2 or more")
    if trainer.is_fsdp_enabled and not sharded:
        raise ConfigError(f"--resume: {checkpoint} holds the whole model (saved without train.distributed: fsdp); "
                          "resume it with train.distributed: ddp")


def cpu_mesh():
    """A one-dimensional CPU device mesh over all ranks of the (gloo) process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def shard_model(model, mesh, reshard_after_forward: bool = True, mp_policy=None) -> None:
    """FSDP2 on ``model`` in place: each decoder layer its own group (gathered for its forward and backward
    only), then the root, which takes the rest (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise TrainingError(f"train.distributed: fsdp: no decoder layers found in {type(model).__name__} to shard "
                            "(the model names none in _no_split_modules)")
    policy = mp_policy or MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def decoder_layers(model) -> list:
    """The model's repeated blocks: modules whose class a transformers model lists in ``_no_split_modules``
    (the decoder layers; accelerate's TRANSFORMER_BASED_WRAP picks the same)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def full_value(tensor):
    """The whole tensor of a (possibly sharded) parameter; every rank must call it for a DTensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharding_summary(model) -> dict | None:
    """How the parameters are split between the ranks (None when none is a DTensor): parameters in all,
    and the elements each rank holds, gathered from every rank (a collective: every rank calls it)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    if not any(isinstance(p, DTensor) for p in params):
        return None
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)
    return {"strategy": "fsdp2", "ranks": len(per_rank), "parameters": sum(p.numel() for p in params),
            "sharded_tensors": sum(isinstance(p, DTensor) for p in params), "tensors": len(params),
            "parameters_per_rank": per_rank}
