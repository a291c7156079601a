"""The data section: sources, curation steps, profile, exports, split and train order."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.section import Section


class SplitSection(Section):
    """Fractions (summing to at most 1) or absolute counts for train/val/test. With data.splits, only the
    shares carved out of the train file count: a split given as its own file takes no share."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    stratify: bool = True
    stratify_field: str | None = Field(None, description="stratify by this field instead of the target")
    group_field: str | None = Field(None, description="records sharing this field's value stay in one split")
    folds: int | None = Field(
        None, ge=2, le=20, description="k-fold cross-validation for `tunesmith run`: the examples are cut into k "
        "folds (seeded; stratified or grouped as above) and every arm trains k times, each time on all folds but "
        "one (val: a share of those) and is tested on the fold left out, so every example is scored once by models "
        "that never saw it and the intervals cover all of them. train and test are then not used")

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
    task: str = Field("classification", description="task kind: classification, regression, qa, generation or "
                      "extraction")
    task_options: dict[str, Any] = Field({}, description="the task kind's own options, e.g. extraction's fields "
                                         "(docs/eval.md, Extraction)")
    input_fields: list[str] = Field(..., min_length=1)
    target_field: str | None = Field(None, description="the field holding the answer; required except for an "
                                     "extraction task whose fields name their own record fields")
    prompt: str = Field("{text}", description="template over the input fields, e.g. 'Review: {text}'")
    system_prompt: str | None = Field(
        "", description="system message; '' sends an empty one, null keeps the model's default"
    )
    labels: list[str] | None = Field(None, description="closed label set; default: the labels seen in the data")
    on_error: Literal["fail", "skip"] = "fail"
    limit: int | None = Field(None, ge=1, description="read at most this many records")
    batch_rows: int = Field(20_000, ge=100, description="rows read and curated at a time: memory grows with it, "
                            "not with the size of the data")
    engine: Literal["local", "ray"] = Field(
        "local", description="where the curation steps run: 'local' streams the batches through this process (and a "
        "second one for the row-wise steps of large inputs); 'ray' reads, curates and writes on a Ray cluster's "
        "workers (Ray Data map_batches, dedup as shuffles) while this process only coordinates, with byte for byte "
        "the same outputs (docs/data.md, Past one machine)")
    ray_address: str | None = Field(
        None, description="with engine ray: the cluster to attach to ('HOST:PORT', 'ray://HOST:PORT', 'auto'); "
        "default: a Ray already started in this process, RAY_ADDRESS, else a local Ray started for the run")
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
        from tunesmith.config.kinds import names

        if v not in names():
            raise ValueError(f"unknown task kind '{v}'; choose one of {', '.join(names())}")
        return v

    @model_validator(mode="after")
    def _task_options_fit(self) -> DataSection:
        """The options are the task kind's to check; a kind that builds its own target may go without a target field."""
        from tunesmith.config.kinds import kind_class

        kind = kind_class(self.task)
        kind.parse_options(self.task_options)
        if self.target_field is None and kind.options_model is None:
            raise ValueError(f"target_field: required for a {self.task} task (the field holding the answer)")
        return self

    @model_validator(mode="after")
    def _folds_cut_one_source(self) -> DataSection:
        if self.split.folds is None:
            return self
        if self.splits is not None:
            raise ValueError("data.split.folds cuts one source (data.path or data.hub) into folds; with data.splits "
                             "the test file is the test: remove folds or splits")
        if self.split.val >= 1:
            raise ValueError("with data.split.folds, data.split.val is a fraction of each fold's training part (< 1)")
        return self

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
