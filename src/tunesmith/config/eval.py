"""The eval section: what is compared (adapters, endpoints, baselines, a judge) and how it is scored."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tunesmith.config.section import ENGINE_HELP, Section, check_engine


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
    metric: str | None = Field(
        None, description="the headline metric that leads the report and decides its verdict, one the task kind "
        "reports (classification: accuracy or macro_f1; regression: mae; qa: f1 or exact_match; ...); null: the "
        "kind's own, except that a classification test set where one label holds more than half the examples "
        "leads with macro_f1")
    max_examples: int | None = Field(
        None, ge=1, description="evaluate a seeded sample of this many test examples (stratified by label for "
        "classification, random otherwise; the recipe's seed), never the first rows")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    engine: str = Field("auto", description="what generates the local contenders' answers: " + ENGINE_HELP +
                        ". Label scores and answer losses are computed in this process either way")
    label_scoring: bool = Field(True, description="score closed labels by log-likelihood (fair to the base model)")
    free_generation: bool = Field(
        True, description="with label_scoring, also let each local model write its answer (the free-generation "
        "column; on a CPU it costs more than the scoring itself); run --quick turns it off")
    recommend: bool = Field(
        True, description="with two or more arms, score them on the validation split to recommend one (as costly "
        "as the test scoring); run --quick turns it off")
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
    graders: list[dict] = Field([], description="OpenAI grader objects (string_check, text_similarity, python, "
                                "score_model, label_model, multi) scored on every contender's answers, each a report "
                                "column with its 95% interval; {{item.*}} are the example's fields and target")
    perplexity: bool = Field(True, description="mean loss / perplexity of the gold answers per local model")
    stop: list[str] = Field([], description="stop strings for free generation, e.g. ['\\n'] for short answers")
    allow_random_model: bool = Field(
        False, description="evaluate a random:<arch> model (random weights; its scores mean nothing)")

    _engine = field_validator("engine")(check_engine)

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, v: list[str]) -> list[str]:
        from tunesmith.config.kinds import all_baselines

        known = all_baselines()
        unknown = [b for b in v if b != "auto" and b not in known]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; known: auto, {', '.join(sorted(known))}")
        return v
