"""The training sections: method, adapter and head, optimisation, DPO, and a hosted fine-tuning service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.section import Section


class LoraSection(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DpoSection(Section):
    """Direct preference optimisation (TRL's DPOTrainer) on prompt/chosen/rejected pairs."""

    path: Path | None = Field(None, description="preference JSONL (prompt/chosen/rejected or OpenAI DPO)")
    beta: float = Field(0.1, gt=0)
    precompute_ref_log_probs: bool = Field(False, description="score the reference once, before training")


class GrpoSection(Section):
    """Group relative policy optimisation (TRL's GRPOTrainer): the model answers each train prompt
    ``num_generations`` times, every answer is rewarded, and training moves the model toward the answers that
    beat their group's mean. ``train.batch_size`` counts completions (a multiple of ``num_generations``)."""

    reward: list[dict | Literal["task"]] = Field(
        ["task"], description="the rewards, summed: 'task' (the task kind's own metric per example: accuracy 0/1, "
        "F1, chrF, minus the absolute error for regression) and/or graders in OpenAI's form ({type: string_check, "
        "...}); a grader's item holds the example's input fields and its answer as item.target")
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt (one group)")
    beta: float = Field(0.0, ge=0, description="KL coefficient against the starting model (0: no reference pass; "
                        "with LoRA the reference is the adapter's starting copy, no second model)")
    max_completion_length: int = Field(64, ge=1, description="the longest completion sampled, in tokens")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    eval_generations: int | None = Field(None, ge=1, description="completions per validation prompt when the val "
                                         "split is rewarded (every train.eval_steps, else once per epoch); null: "
                                         "num_generations")
    rollouts: Literal["auto", "engine", "vllm"] = Field(
        "auto", description="what samples the completions: engine (tunesmith's continuous batching on a CPU, TRL's "
        "generate on a GPU), vllm (on a CUDA GPU TRL's vLLM colocate mode, vllm installed in this environment; in a "
        "job on `tunesmith serve --engine vllm`, the server's vLLM with the policy's adapter loaded there each "
        "step), auto: vllm where a reinforcement job's measurement on this device found it faster and it is available "
        "(machine/engine_measured.json), else engine")

    @field_validator("reward", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        """One reward (``task`` or a grader object) is a list of one."""
        return [v] if isinstance(v, str | dict) else v

    @field_validator("reward")
    @classmethod
    def _some(cls, v: list) -> list:
        if not v:
            raise ValueError("at least one reward: 'task' or a grader")
        return v


class TrainSection(Section):
    method: Literal["sft", "dpo", "grpo"] = "sft"
    path: Literal["auto", "fast", "reference"] = Field(
        "auto", description="fast: tunesmith's training path (its packing collator, loss forms and trainers, chosen "
        "for the machine); reference: plain TRL SFTTrainer / DPOTrainer / GRPOTrainer and transformers' own Trainer and "
        "heads with "
        "their documented settings (bf16 on a GPU, TRL's padding-free packing where FlashAttention runs it, Liger "
        "kernels where installed) and none of tunesmith's trainers, collators or loss forms; auto: fast on CPUs and on "
        "GPU kinds whose record the check wrote (scripts/gpu_run.sh verify: packed rows equal one at a time, faster "
        "than padded rows), else "
        "reference (fast where only it trains the data: conversation rows, mean pooling, a probe start). Use reference "
        "when the fast path fails or its loss differs from the reference on your GPU"
    )
    adapter: Literal["lora", "dora", "qlora", "full"] = "lora"
    head: Literal["generative", "classifier", "regression", "span"] = Field(
        "generative", description="classifier: a linear head over the labels (classification); regression: a "
        "scalar head trained with MSE (regression); span: start/end logits over the context (extractive qa). "
        "On a decoder the head reads the last token, on an encoder its pooled or per-token output"
    )
    target_transform: Literal["log1p", "none"] = Field(
        "log1p", description="head: regression trains on this transform of the target (standardised); log1p "
        "suits prices and counts (errors relative to the value); predictions are turned back into the target's units"
    )
    regression_loss: Literal["mse", "l1", "huber"] = Field(
        "mse", description="head: regression: the loss on the standardised, transformed target. mse learns the "
        "mean, l1 the median (what a mean absolute error rewards, and robust to a few extreme targets); huber is "
        "l1 with a quadratic bottom within one standard deviation"
    )
    pooling: Literal["auto", "mean", "native"] = Field(
        "auto", description="head: classifier or regression: the vector the head reads. mean: the mean of the token "
        "states, L2-normalised — the sentence embedding that encoders such as all-MiniLM-L6-v2 and multilingual-e5 "
        "are trained to produce; native: transformers' own *ForSequenceClassification (the last token on a decoder, "
        "the [CLS] pooler on an encoder). auto: mean for a classifier on an encoder, native otherwise (measured: "
        "docs/train.md)"
    )
    head_init: Literal["auto", "probe", "random"] = Field(
        "auto", description="head: classifier or regression: how the head layer starts. probe: from a linear model "
        "(logistic or ridge regression) fitted on the frozen sentence embeddings of the training texts, so that "
        "fine-tuning starts where the embedding baseline ends (needs pooling: mean); random: a fresh layer. "
        "auto: probe where the head reads the mean-pooled embedding"
    )
    probe_examples: int | None = Field(
        None, ge=1, description="head_init: probe: fit the probe on a seeded sample of this many training rows; null: "
        "all of them (run --quick samples)")
    context_field: str = Field("context", description="head: span: the input field the answer is cut from; "
                               "the other input fields form the question")
    span_stride: int = Field(128, ge=0, description="head: span: tokens two consecutive context windows share, "
                             "so that no answer is cut at a window edge and no context is dropped")
    max_answer_tokens: int = Field(32, ge=1, description="head: span: the longest answer predicted, in tokens")
    freeze_embeddings: bool = Field(
        False, description="adapter: full: keep the input-embedding matrix fixed while every other weight trains. "
        "Multilingual encoders keep most of their weights there (multilingual-e5-small: 96M of 118M, one row per "
        "token of 250k), rows a narrow task mostly never sees; fixing them saves their gradient and optimizer state "
        "(memory and time per step). On a decoder with tied embeddings the output layer is the same matrix and stays "
        "fixed too"
    )
    attention_dropout: float | None = Field(
        0.0, ge=0, lt=1, description="dropout on the attention probabilities while a head trains; null keeps the "
        "model's own. At 0 PyTorch's fused attention kernel runs; an encoder's usual 0.1 takes the unfused path, "
        "which builds every [batch, heads, length, length] probability tensor (2.1x slower per step for "
        "multilingual-e5-small at 384 tokens on a CPU, benchmarks/attention_dropout.py). Decoders ship with 0"
    )
    lora: LoraSection = LoraSection()
    examples: int | None = Field(
        None, ge=1, description="train on a seeded sample of this many of the train split's examples (stratified by "
        "label where the task has labels); null: all. The test split stays the same for every arm, so in one "
        "report a slow arm (generative SFT on the LLM) can train on fewer rows than a fast one (an encoder head)"
    )
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal[
        "auto", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit"
    ] = Field("auto", description="auto: adamw_torch on a CPU, adamw_torch_fused on a CUDA GPU, "
              "paged_adamw_8bit for qlora")
    max_seq_length: Annotated[int, Field(ge=8)] | Literal["auto"] = Field(
        "auto", description="tokens per training example; auto: the 99th percentile of the training examples' token "
        "lengths (rounded up to a multiple of 8, capped by the model), decided when training starts and written "
        "to the arm's config.resolved.yaml; 512 where there are no examples to measure (a DPO file, a job's rows)")
    long_inputs: Literal["cut", "set_aside"] = Field(
        "cut", description="a training example longer than max_seq_length: cut (its longest input field is cut "
        "until it fits; nothing is dropped) or set_aside (left out, listed in data/rejected.jsonl). A span head "
        "reads long contexts in windows and cuts nothing")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="auto: off on a CPU; on a CUDA GPU only when the memory estimate says the batch "
        "would not fit without it")
    memory_limit_gb: float | None = Field(
        None, gt=0, description="plan for at most this much GPU memory (GiB): the memory estimate that decides "
        "gradient checkpointing counts this instead of what is free, and on a CUDA GPU the process is held to it "
        "(PyTorch's per-process memory fraction), so a run sized for a smaller or shared GPU proves it fits. "
        "null: what is free on the device")
    attention: Literal["auto", "flash_attention_2", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="auto: transformers' default on a CPU; on a CUDA GPU flash_attention_2 where "
        "flash-attn is installed, else flex_attention for models that soft-cap attention logits (eager where flex "
        "is unavailable), else sdpa (packed rows too: flex attention trained Llama-3.2-1B 4x slower than SDPA on an "
        "H200). flex_attention trains only on a GPU")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="fused Liger kernels (RMSNorm, RoPE, SwiGLU); auto: on where CUDA and "
        "liger-kernel are present")
    loss: Literal["auto", "chunked", "logits"] = Field(
        "auto", description="how generative SFT scores its target positions: chunked (picked by integer index and "
        "projected in vocabulary tiles: no logits held, no host read per step on a GPU) or logits (the targets' "
        "logits at once, then cross-entropy, as transformers computes them); auto: chunked")
    group_by_length: Literal["auto"] | bool = Field(
        "auto", description="batch examples of similar length; auto: only where batches are not packed "
        "(without packing, or with a head, which never packs)"
    )
    packing: bool = Field(True, description="pack a batch's examples into rows, isolated by a block mask")
    train_on_inputs: bool = Field(False, description="also compute the loss on prompt tokens")
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="validation loss every N steps; default once per epoch")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N evals, no improvement")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps; default once per epoch")
    save_total_limit: int = Field(2, ge=1, description="keep only the newest N checkpoints")
    report_to: list[Literal["tensorboard", "trackio", "mlflow", "wandb"]] = Field(
        [], description="experiment trackers (optional extras: pip install 'tunesmith[tensorboard]'); "
        "their local files go under the run's train/ folder")
    dpo: DpoSection = DpoSection()
    grpo: GrpoSection = GrpoSection()
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes (--nproc, torchrun): ddp keeps a whole copy of the model on "
        "each; fsdp (FSDP2, adapter: full) shards weights, gradients and optimizer state across them and saves "
        "sharded checkpoints")

    @model_validator(mode="before")
    @classmethod
    def _legacy_method(cls, raw: Any) -> Any:
        """``method: lora`` / ``method: full`` (older recipes) mean SFT with that adapter."""
        if isinstance(raw, dict) and raw.get("method") in ("lora", "full"):
            raw = {**raw, "adapter": raw.get("adapter", raw["method"]), "method": "sft"}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> TrainSection:
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("early_stopping_patience needs eval_steps (stopping is decided at evaluations)")
        if self.head != "generative" and self.method != "sft":
            raise ValueError(f"head: {self.head} trains with method sft")
        if self.method == "grpo" and (self.batch_size * self.grad_accum) % self.grpo.num_generations:
            raise ValueError(f"method grpo: batch_size x grad_accum ({self.batch_size * self.grad_accum} completions) "
                             f"must be a multiple of grpo.num_generations ({self.grpo.num_generations}): whole groups")
        if self.distributed == "fsdp" and self.adapter != "full":
            raise ValueError("distributed: fsdp shards full fine-tuning (adapter: full); LoRA adapters are small "
                             "enough for ddp")
        if self.freeze_embeddings and self.adapter != "full":
            raise ValueError(f"freeze_embeddings applies to adapter: full (adapter: {self.adapter} already keeps every "
                             "base weight fixed)")
        if self.regression_loss != "mse" and self.head != "regression":
            raise ValueError(f"regression_loss applies to head: regression (head: {self.head})")
        if self.path == "reference" and (self.pooling == "mean" or self.head_init == "probe"):
            raise ValueError("path: reference trains transformers' own heads (pooling: native, head_init: random); "
                             "pooling: mean and head_init: probe are tunesmith's and need path: auto or fast")
        for key in ("pooling", "head_init"):
            if getattr(self, key) != "auto" and self.head not in ("classifier", "regression"):
                raise ValueError(f"{key} applies to head: classifier or regression (head: {self.head})")
        return self

    @property
    def grouped(self) -> bool:
        """Whether batches are length-grouped. Measured: grouping adds nothing once batches are packed
        but changes the data order (and so the loss curve) and raises peak memory; the classifier head
        never packs, and its random batches of short messages are mostly padding (BANKING77: 2.7x the
        real tokens at batch 16), so it groups."""
        if self.group_by_length != "auto":
            return self.group_by_length
        return not self.packing or self.head != "generative"

    @property
    def spec(self):
        """The training method's shape (:class:`tunesmith.machine.methods.MethodSpec`, registered by its module)."""
        from tunesmith.machine.methods import method_spec

        return method_spec(self.method)

    def describe(self) -> str:
        """What this section trains, as the report and the training summary name it: 'SFT LoRA r=16', 'DPO full
        fine-tune' or 'LoRA r=16 + classifier head' (a head trains on its own loss, so no method is named)."""
        how = ADAPTER_NAMES[self.adapter] + ("" if self.adapter == "full" else f" r={self.lora.r}")
        return f"{self.method.upper()} {how}" if self.head == "generative" else f"{how} + {self.head} head"


UNMEASURED_LENGTH = 512  # train.max_seq_length where auto has no examples to measure (a DPO file, a job's rows)
ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA", "full": "full fine-tune"}


class HostedSection(Section):
    """``tunesmith train --backend openai``: an OpenAI-compatible fine-tuning API does the training."""

    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    model: str | None = Field(None, description="the hosted base model; default: model.name")
    suffix: str | None = Field(None, max_length=64)
    n_epochs: int | None = Field(None, ge=1, description="null: the service's auto")
    batch_size: int | None = Field(None, ge=1)
    learning_rate_multiplier: float | None = Field(None, gt=0)
    poll_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(120.0, gt=0)


HEAD_TASKS = {"classifier": "classification", "regression": "regression", "span": "qa"}  # head -> the task it answers
