"""All 77 BANKING77 intents: classifier head vs generative LoRA SFT vs TF-IDF + logistic regression.

Same seeded, stratified train/test split for all three, in one process. Reported: accuracy,
macro-F1 and training time. The generative model is scored by free greedy generation with a
strict parser (an answer that is not exactly one label is wrong); the classifier head predicts
the most probable label in one forward pass.

    python benchmarks/banking77_heads.py --per-class 4 --test-per-class 2
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import tempfile
import time
from pathlib import Path

from rich.console import Console

SHARED = Path(
    os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
MODEL = "smollm2-135m-instruct"


def split(per_class: int, test_per_class: int, seed: int):
    from tunesmith.records import Example

    by_label: dict[str, list[str]] = {}
    with open(SHARED / "banking77" / "banking77_train.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_label.setdefault(row["category"], []).append(row["text"])
    rng = random.Random(seed)
    train, test = [], []
    for label, texts in sorted(by_label.items()):
        rng.shuffle(texts)
        take = texts[: per_class + test_per_class]
        train += [Example(f"{label}-{i}", {"text": t}, label) for i, t in enumerate(take[:per_class])]
        test += [Example(f"{label}-t{i}", {"text": t}, label) for i, t in enumerate(take[per_class:])]
    rng.shuffle(train)
    return train, test, sorted(by_label)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--test-per-class", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED} (set TUNESMITH_SHARED_DATA)")
    from transformers.utils import logging as hf_logging

    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import validate_recipe
    from tunesmith.data.formats.messages import chat_messages, prompt_text
    from tunesmith.eval.runner import LocalContender, evaluate_local
    from tunesmith.generation import generate_greedy
    from tunesmith.kinds import make_task
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.progress import task_bar
    from tunesmith.scoring import baselines
    from tunesmith.scoring.metrics import classification_metrics, parse_label
    from tunesmith.train.jobs import TrainData
    from tunesmith.train.jobs import train as train_recipe
    from tunesmith.train.result import Artefact

    hf_logging.set_verbosity_error()
    console = Console()
    train, test, labels = split(args.per_class, args.test_per_class, args.seed)
    gold = [e.target for e in test]
    print(f"BANKING77: {len(labels)} intents, {len(train)} train / {len(test)} test messages")
    results = {}

    start = time.perf_counter()
    pred = baselines.tfidf_logreg(
        [e.inputs["text"] for e in train],
        [e.target for e in train],
        [e.inputs["text"] for e in test],
        args.seed,
    )
    results["tfidf_logreg"] = classification_metrics(gold, pred, labels) | {
        "seconds": time.perf_counter() - start
    }

    with tempfile.TemporaryDirectory() as tmp:
        recipe = validate_recipe(
            {
                "name": "b77",
                "output_dir": tmp,
                "seed": args.seed,
                "model": {"name": MODEL},
                "data": {
                    "path": "unused",
                    "input_fields": ["text"],
                    "target_field": "category",
                    "system_prompt": "Classify the banking customer message by intent.",
                },
                "train": {
                    "epochs": args.epochs,
                    "batch_size": 8,
                    "learning_rate": 3e-4,
                    "max_seq_length": 128,
                    "logging_steps": 10,
                    "save_steps": 100000,
                },
            }
        )
        tokenizer = load_tokenizer(MODEL)

        def bar(desc, total):
            return task_bar(console, desc, total)

        cls_recipe = recipe.model_copy(
            update={"train": recipe.train.model_copy(update={"head": "classifier"})}
        )
        res = train_recipe(cls_recipe, TrainData(train, [], labels), console, bar)
        task = make_task("classification", recipe.eval, labels)
        head = LocalContender("classifier_head", "", res.output_dir, recipe.data,
                              loads=Artefact.CLASSIFIER)
        scored = evaluate_local(cls_recipe, task, head, test, bar)
        results["classifier_head"] = {k: scored.metrics[k] for k in ("accuracy", "macro_f1", "n")} | {
            "seconds": res.seconds
        }

        trained = train_recipe(recipe, TrainData(train, [], labels), console, bar)
        prompts = [prompt_text(tokenizer, chat_messages(e, recipe.data)) for e in test]
        outputs = generate_greedy(trained.model, tokenizer, prompts, max_new_tokens=16)
        pred = [parse_label(o, labels) for o in outputs]
        results["generative_sft"] = classification_metrics(gold, pred, labels) | {"seconds": trained.seconds}

    for name, m in results.items():
        print(
            f"{name:>16}: accuracy {m['accuracy']:.1%}  macro-F1 {m['macro_f1']:.3f}  "
            f"training {m['seconds']:.1f} s"
        )
    head, gen = results["classifier_head"], results["generative_sft"]
    print(
        f"classifier head vs generative SFT: accuracy {head['accuracy']:.1%} vs {gen['accuracy']:.1%}, "
        f"training time ratio {gen['seconds'] / head['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
