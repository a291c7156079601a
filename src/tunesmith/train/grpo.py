"""Group relative policy optimisation (reinforcement from verifiable rewards) on TRL's GRPOTrainer (tunesmith's
subclass in :mod:`tunesmith.train.grpo_shared`, which runs each prompt once per group; TRL's own class on
``train.path: reference``).

The model answers each train prompt ``train.grpo.num_generations`` times; every answer is rewarded by the
recipe's rewards (``task``: the task kind's own metric against the example's answer; or OpenAI-style graders
from :mod:`tunesmith.graders`, whose ``item`` is the example's input fields plus ``target``), and each answer's
advantage over its group's mean weights its log-probability in the loss. With LoRA the KL reference (``beta``
above 0) is a frozen copy of the starting adapter inside the same model (TRL's own), never a second model.

Rows are ``{"prompt": chat messages, "item": JSON object text, "example": index}``: from a recipe's train split,
or as the jobs API reads them from a reinforcement file. ``train/metrics.csv`` carries the mean reward and its
spread over each logged step's completions (``train_reward_mean``, ``train_reward_std``).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from tunesmith.config import Recipe
from tunesmith.errors import ConfigError, DataError
from tunesmith.machine.launch import is_main
from tunesmith.machine.methods import MethodSpec, register_method
from tunesmith.records import Example
from tunesmith.train.jobs import TrainData, TrainJob, generative_model, ordered, trainer
from tunesmith.train.result import TrainResult, make_result, trainable_snapshot

register_method(MethodSpec(
    "grpo", packs=False,
    unpacked_reason="GRPO samples and scores each completion in its own row: never packed",
    loss=("logits", "TRL's GRPO loss takes the completions' token log-probabilities from their logits"),
    generates=True))

ITEM, EXAMPLE = "item", "example"  # the dataset's columns beside "prompt"


def example_item(example: Example, recipe: Recipe) -> dict:
    """What a grader reads as ``item`` for a recipe's example: its input fields, and its answer as ``target``
    (and under the data's own target column name)."""
    item = dict(example.inputs) | {"target": example.target}
    if recipe.data is not None and recipe.data.target_field:
        item.setdefault(recipe.data.target_field, example.target)
    return item


def recipe_rows(recipe: Recipe, examples: list[Example], start: int = 0) -> list[dict]:
    """GRPO rows: the prompt the fine-tune is asked with, the example as the grader's item, and its index
    (from ``start``) in the examples the task reward reads."""
    from tunesmith.data.formats.messages import chat_messages

    return [{"prompt": chat_messages(e, recipe.data), ITEM: json.dumps(example_item(e, recipe), ensure_ascii=False),
             EXAMPLE: start + i} for i, e in enumerate(examples)]


def task_reward(recipe: Recipe, examples: list[Example], labels: list[str]) -> Callable:
    """The task kind's per-example score of a completion as a reward (negated where lower is better: the
    absolute error of regression); an unparseable answer scores as the kind scores it (0, or counted as 0)."""
    from tunesmith.graders.rewards import completion_text
    from tunesmith.kinds import make_task

    if recipe.data is None or not examples:
        raise ConfigError("train.grpo.reward: task needs the recipe's data (the examples' answers); with rows alone "
                          "(a reinforcement job) give graders")
    kind = make_task(recipe.task_kind, recipe.eval, labels, recipe.data.task_options)
    sign = 1.0 if kind.higher_is_better else -1.0

    def reward(prompts=None, completions=(), example=(), **_) -> list[float]:
        scores = [kind.score(kind.parse(completion_text(c)), examples[i]) for c, i in zip(completions, example,
                                                                                          strict=True)]
        return [0.0 if s is None else sign * float(s) for s in scores]

    reward.__name__ = f"task_{kind.headline}"
    return reward


def reward_functions(recipe: Recipe, examples: list[Example], labels: list[str]) -> list[Callable]:
    """One TRL reward function per ``train.grpo.reward`` entry; graders are checked first (ConfigError naming
    the entry and field)."""
    from tunesmith.graders import Context, check, model_backends, reward_function

    context = Context(backends=model_backends(recipe.eval.endpoints))
    out = []
    for i, entry in enumerate(recipe.train.grpo.reward):
        if entry == "task":
            out.append(task_reward(recipe, examples, labels))
        else:
            grader = check(entry, f"train.grpo.reward.{i}")
            out.append(reward_function(grader, context, item_column=ITEM))
    names = [f.__name__ for f in out]
    if len(set(names)) < len(names):  # TRL logs each reward under its name
        for i, f in enumerate(out):
            f.__name__ = f"{f.__name__}_{i}"
    return out


def grpo_config(recipe: Recipe, placement, out_dir, has_val: bool = False, on_vllm: bool = False):
    """TRL's GRPOConfig from the recipe: the arguments every trainer takes (precision from the device, no
    gradient checkpointing unless asked), the ``train.grpo`` section, and with validation rows a rewarded
    validation pass every ``train.eval_steps`` (else once per epoch)."""
    from trl import GRPOConfig

    from tunesmith.train.sft import base_args

    t, g = recipe.train, recipe.train.grpo
    base = base_args(recipe, placement, out_dir)
    groups = max(1, base["per_device_train_batch_size"] // g.num_generations)
    evaluation = dict(eval_strategy=("steps" if t.eval_steps else "epoch") if has_val else "no",
                      eval_steps=t.eval_steps, num_generations_eval=g.eval_generations,
                      per_device_eval_batch_size=groups * (g.eval_generations or g.num_generations))
    return GRPOConfig(**base, **evaluation, **vllm_colocate(recipe, placement.device, on_vllm),
                      gradient_checkpointing=bool(base["activation_checkpointing"]),
                      num_generations=g.num_generations, beta=g.beta, max_completion_length=g.max_completion_length,
                      temperature=g.temperature, top_p=g.top_p, shuffle_dataset=recipe.data is None
                      or recipe.data.order is None, remove_unused_columns=False)


COLOCATE_SHARE = 0.3  # of the training's GPU memory, for vLLM's weights and KV cache in colocate mode


def rollouts_on_vllm(recipe: Recipe, device: str, say: Callable[[str], None] | None = None) -> bool:
    """Whether rollouts sample on vLLM: ``train.grpo.rollouts`` vllm; auto with an engine in use (a job told to
    generate on the server's vLLM), or where a reinforcement job's measurement on this device found vLLM faster
    (:mod:`tunesmith.machine.engines`) and one can run (offered by the server, or vllm importable on CUDA)."""
    import importlib.util

    from tunesmith.generation import remote
    from tunesmith.machine import engines

    rollouts = recipe.train.grpo.rollouts
    if rollouts != "auto" or remote.active() is not None:
        return rollouts != "engine"
    available = remote.offered() is not None or (device == "cuda" and importlib.util.find_spec("vllm") is not None)
    choice = engines.choose("rollouts", engines.device_kind(device), available)
    if say is not None:
        say(f"rollouts sample on {'vLLM' if choice.engine == 'vllm' else 'the generation engine'}: {choice.reason}")
    return choice.engine == "vllm"


def vllm_colocate(recipe: Recipe, device: str, on_vllm: bool) -> dict:
    """TRL's vLLM colocate mode on a CUDA GPU when rollouts go to vLLM (``on_vllm``, :func:`rollouts_on_vllm`)
    and no completions server takes them: vLLM in the training process, its share of the GPU a part of what the
    training may use."""
    import importlib.util

    if not on_vllm or (device != "cuda" and rollout_server(recipe, on_vllm) is not None):
        return {}
    if device != "cuda" or importlib.util.find_spec("vllm") is None:
        if recipe.train.grpo.rollouts == "vllm":
            raise ConfigError("train.grpo.rollouts: vllm samples with TRL's vLLM colocate mode, which needs a CUDA GPU "
                              "and vllm installed in this environment (or a job on `tunesmith serve --engine vllm`); "
                              "use engine or auto here")
        return {}
    share = COLOCATE_SHARE
    if recipe.train.memory_limit_gb is not None:  # a job on a GPU shared with the server's vLLM: within its share
        import torch

        share *= min(1.0, recipe.train.memory_limit_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": round(share, 4)}


def train_grpo(recipe: Recipe, model, tokenizer, rows: list[dict], rewards: list[Callable], placement, bar,
               resume: bool = False, callbacks: list | None = None, val_rows: list[dict] = (),
               say: Callable[[str], None] | None = None) -> TrainResult:
    """Wrap ``model`` with the recipe's adapter (or keep the one it continues from) and run GRPOTrainer; the
    ``val_rows`` prompts are sampled and rewarded at each validation pass; where rollouts sample is said by ``say``."""
    from datasets import Dataset

    from tunesmith.train.sft import fit, prepare_model, save_final

    out_dir = recipe.run_dir / "train"
    tokenizer.padding_side = "left"  # generation pads on the left
    on_vllm = rollouts_on_vllm(recipe, placement.device, say)
    grpo = grpo_trainer_class(recipe)(model=prepare_model(recipe, model), reward_funcs=rewards,
                       args=grpo_config(recipe, placement, out_dir, bool(val_rows), on_vllm),
                       train_dataset=Dataset.from_list(rows),
                       eval_dataset=Dataset.from_list(list(val_rows)) if val_rows else None, processing_class=tokenizer)
    before = trainable_snapshot(grpo.model)
    grpo.rollout_server = rollout_server(recipe, on_vllm)
    try:
        seconds = fit(grpo, out_dir, resume, lambda _: bar("grpo", planned_steps(grpo)), callbacks)
    finally:
        getattr(grpo, "release_rollouts", lambda: None)()
    full = recipe.train.adapter == "full"
    final_dir = out_dir / ("model" if full else "adapter")
    drop_reference_adapter(grpo.model)
    save_final(grpo, final_dir)
    history = grpo.state.log_history
    if is_main():
        tokenizer.save_pretrained(str(final_dir))
        (out_dir / "grpo_log.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    return make_result(grpo, "model" if full else "adapter", final_dir, before, seconds, grpo_rows(history),
                       len(rows), resume)


def rollout_server(recipe: Recipe, on_vllm: bool):
    """The completions server rollouts are sampled on when they go to vLLM: the engine in use, or the one
    offered (a job on `tunesmith serve --engine vllm`), for a LoRA policy."""
    from tunesmith.generation import remote

    if not on_vllm or recipe.train.adapter == "full":
        return None
    return remote.active() or remote.offered()


def grpo_trainer_class(recipe: Recipe):
    """tunesmith's GRPO (each prompt prefilled and scored once per group, on the generation engine) on the auto
    path; TRL's GRPOTrainer as shipped on ``train.path: reference``."""
    if recipe.train.path == "reference":
        from trl import GRPOTrainer

        return GRPOTrainer
    from tunesmith.train.grpo_shared import SharedPromptGRPO

    return SharedPromptGRPO


def planned_steps(grpo) -> int:
    """Optimizer steps GRPO will run: max_steps, else epochs x (each prompt sampled num_generations times) / the
    completions a step takes."""
    import math

    args = grpo.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    return max(1, math.ceil(math.ceil(len(grpo.train_dataset) * args.num_generations / per_step)
                            * args.num_train_epochs))


def drop_reference_adapter(model) -> None:
    """TRL keeps the KL reference as a frozen adapter named 'ref' beside the trained one; only the trained one
    is saved."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def grpo_rows(history: list[dict]) -> list[dict]:
    """GRPO's log in the metrics columns, one row per logged step: the loss, and the mean reward of the step's
    completions with its spread (standard deviation); a validation pass fills valid_loss and valid_reward_*."""
    from tunesmith.train.metrics import COLUMNS, EXTRA, REWARD

    rows: dict[int, dict] = {}
    for h in history:
        if "reward" not in h and "eval_reward" not in h:
            continue
        row = rows.setdefault(h["step"], {c: None for c in COLUMNS + EXTRA + REWARD} | {"step": h["step"]})
        if "reward" in h:
            row |= {"train_loss": h.get("loss"), "train_reward_mean": h["reward"],
                    "train_reward_std": h.get("reward_std"), "num_tokens": h.get("num_tokens"),
                    "peak_memory_mb": h.get("peak_memory_mb")}
        if "eval_reward" in h:
            row |= {"valid_loss": h.get("eval_loss"), "valid_reward_mean": h["eval_reward"],
                    "valid_reward_std": h.get("eval_reward_std")}
    return [rows[s] for s in sorted(rows)]


def job_rows(recipe: Recipe, data: TrainData) -> tuple[list[dict], list[dict], list[Example]]:
    """The rows to train on, the validation rows, and the examples behind them (none for rows handed over as
    they are: a reinforcement job's)."""
    if data.rows is not None:
        return data.rows, list(data.val_rows or []), []
    train = ordered(recipe, data.train)
    return recipe_rows(recipe, train), recipe_rows(recipe, data.val, len(train)), train + list(data.val)


@trainer("grpo", "generative")
@trainer("grpo", "generative", path="reference")
def grpo_job(job: TrainJob) -> TrainResult:
    rows, val_rows, examples = job_rows(job.recipe, job.data)
    if not rows:
        raise DataError("train.method grpo: no prompts to train on (the train split is empty)")
    rewards = reward_functions(job.recipe, examples, job.data.labels)  # checked before the model loads
    job.console.print(f"GRPO on {len(rows)} prompts x {job.recipe.train.grpo.num_generations} completions, rewards: "
                      + ", ".join(f.__name__ for f in rewards))
    return train_grpo(job.recipe, generative_model(job), job.tokenizer, rows, rewards, job.placement, job.bar,
                      resume=job.resume, callbacks=job.callbacks, val_rows=val_rows, say=job.console.print)
