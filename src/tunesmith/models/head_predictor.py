"""A trained head folder as a predictor: evaluation, the server and export all answer through it."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import DataError
from tunesmith.models.heads import HEAD_FILE, encode, head_kind, predict_proba, read_head_meta
from tunesmith.models.spans import best_span, model_inputs, windows
from tunesmith.records import Example


class HeadPredictor:
    """A trained head folder, loaded once: predicts labels, numbers or spans for texts or examples.
    Evaluation and the server both answer through it."""

    def __init__(self, folder: Path, placement=None, base_model: str | None = None):
        from transformers import AutoTokenizer

        from tunesmith.machine.placement import pick_placement

        self.folder = Path(folder)
        self.meta = read_head_meta(self.folder, base_model)
        if self.meta is None:
            raise DataError(f"{folder}: not a trained head (no {HEAD_FILE})")
        self.head = self.meta["head"]
        self.kind = head_kind(self.head)
        self.placement = placement or pick_placement()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder)) if (
            self.folder / "tokenizer_config.json").is_file() else _base_tokenizer(self.meta["base_model"])
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = self._load()
        self.max_length = int(self.meta.get("max_length") or 512)

    def _load(self):
        labels, pooling = self.meta.get("labels"), self.meta.get("pooling") or "native"
        if not (self.folder / "adapter_config.json").is_file():
            return self.kind.load(str(self.folder), self.placement, self.tokenizer, labels, pooling).eval()
        from peft import PeftModel

        base = self.kind.load(self.meta["base_model"], self.placement, self.tokenizer, labels, pooling)
        return PeftModel.from_pretrained(base, str(self.folder)).eval()

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def predict_texts(self, texts: list[str], batch_size: int = 32) -> list:
        """A label (classifier) or a number in the target's units (regression) per rendered prompt."""
        return self.kind.predict_texts(self, texts, batch_size)

    def probabilities(self, texts: list[str], batch_size: int = 32) -> list[list[float]]:
        return predict_proba(self.model, self.tokenizer, encode(self.tokenizer, texts), batch_size, self.max_length)

    def ranked_labels(self, text: str) -> list[tuple[str, float]]:
        """A classifier head's labels with their probabilities for one rendered prompt, most probable first
        (ties keep the labels' order, so the first is the label :meth:`predict_texts` answers)."""
        if not self.kind.label_probabilities:
            raise DataError(f"{self.folder}: a {self.head} head has no label probabilities")
        [probs] = self.probabilities([text])
        return sorted(zip(self.meta["labels"], probs, strict=True), key=lambda lp: -lp[1])

    def predict_spans(self, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[str]:
        """The best answer span of each (question, context), over all of the context's windows."""
        import torch

        m = self.meta
        rows = [(k, r) for k, (q, c) in enumerate(pairs) for r in self._windows(q, c)]
        best: dict[int, tuple[float, tuple[int, int] | None]] = {}
        with torch.inference_mode():
            for lo in range(0, len(rows), batch_size):
                chunk = rows[lo : lo + batch_size]
                batch = self.tokenizer.pad([model_inputs(self.tokenizer, r) for _, r in chunk],
                                           return_tensors="pt").to(self.model.device)
                out = self.model(**batch)
                for b, (k, r) in enumerate(chunk):
                    score, span = best_span(out.start_logits[b].float().cpu(), out.end_logits[b].float().cpu(),
                                            r["offsets"], int(m.get("max_answer_tokens", 32)))
                    if k not in best or score > best[k][0]:
                        best[k] = (score, span)
        return [pairs[k][1][best[k][1][0] : best[k][1][1]].strip() if best.get(k, (0, None))[1] else ""
                for k in range(len(pairs))]

    def _windows(self, question: str, context: str) -> list[dict]:
        """The context's windows; none (so no answer) when the question alone leaves no room for context."""
        try:
            return windows(self.tokenizer, question, context, self.max_length, int(self.meta.get("stride", 128)))
        except Exception:  # noqa: BLE001 - the tokenizer refuses a question longer than the window
            return []

    def predict_examples(self, examples: list[Example], prompt: str) -> list:
        return self.kind.predict_examples(self, examples, prompt)

    def answer(self, text: str) -> str:
        """The reply to one user message (the rendered prompt the head was trained on): the label, the number
        or the span, as text."""
        return self.kind.answer(self, text)



def _base_tokenizer(name: str):
    from tunesmith.models.loading import load_tokenizer

    return load_tokenizer(name)
