"""head: regression and head: span, on the tiny Llama and on a tiny BERT encoder, as arms of one run."""

import json

import pytest

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")
HEAD_TRAIN = {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 2, "max_seq_length": 48,
              "lr_scheduler": "constant"}


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _cli(args):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from rich.console import Console

    import tunesmith.cli as cli_mod

    buf = io.StringIO()
    cli_mod.common.console = cli_mod.common.err_console = Console(file=buf, width=200, force_terminal=False)
    with redirect_stdout(buf), redirect_stderr(buf):
        code = cli_mod.main(args)
    return code, buf.getvalue()


def test_target_transform_round_trips_and_refuses_negative_prices_for_log1p():
    from tunesmith.errors import DataError
    from tunesmith.models.heads import Target

    t = Target("log1p").fit([100.0, 1000.0, 10000.0])
    assert t.mean == pytest.approx(sum(__import__("math").log1p(v) for v in (100, 1000, 10000)) / 3)
    for v in (0.0, 99.0, 12345.0):
        assert t.decode(t.encode(v)) == pytest.approx(v)
    assert abs(t.encode(1000.0)) < 0.1  # standardised: the middle of the range sits near 0
    with pytest.raises(DataError, match="target_transform: none"):
        Target("log1p").fit([5.0, -1.0])
    assert Target("none").fit([-3.0, 3.0]).decode(1.0) == pytest.approx(3.0)


def test_parse_prompt_recovers_the_fields_of_a_rendered_template():
    from tunesmith.models.heads import parse_prompt

    assert parse_prompt("{context}\n\nQ: {question}", "A long\n\ntext.\n\nQ: who?") == {
        "context": "A long\n\ntext.", "question": "who?"}
    assert parse_prompt("{context}\n\nQ: {question}", "no question here") is None


def test_span_windows_overlap_cover_the_whole_context_and_label_the_answer(tiny_bert_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    from tunesmith.models.spans import answer_span, label_window, windows
    from tunesmith.records import Example

    context = " ".join(r["text"] for r in banking_rows(LABELS, 5))
    answer = context.split()[-4] + " " + context.split()[-3]
    ex = Example("x", {"context": context, "question": "what?"}, answer, {"answers": [answer]})
    for folder in (tiny_bert_dir, tiny_model_dir):
        tok = AutoTokenizer.from_pretrained(folder)
        rows = windows(tok, "what?", context, 40, 12)
        assert len(rows) > 2 and all(r["length"] <= 40 for r in rows)
        covered = sorted({o for r in rows for o in r["offsets"] if o is not None})
        assert covered[0][0] <= len(context) - len(context.lstrip()) + 1 and covered[-1][1] >= len(context.rstrip())
        for a, b in zip(rows, rows[1:], strict=False):  # neighbours share tokens: no context falls between two windows
            assert {o for o in a["offsets"] if o} & {o for o in b["offsets"] if o}
        span = answer_span(ex, context)
        labelled = [(r, label_window(r, span)) for r in rows]
        hits = [(r, s, e) for r, (s, e) in labelled if (s, e) != (0, 0)]
        assert hits
        for r, s, e in hits:
            assert context[r["offsets"][s][0] : r["offsets"][e][1]].strip() == answer


def _price_rows():
    rows = []
    for r in banking_rows(LABELS, 12):
        words = len(r["text"].split())
        rows.append({"text": r["text"], "price": str(40 * words + (500 if r["category"] == "card_arrival" else 0))})
    return rows


@pytest.fixture(scope="module")
def price_run(tmp_path_factory, tiny_model_dir, tiny_bert_dir):
    """A regression run with a decoder head arm and an encoder head arm (trained once for this module)."""
    tmp_path = tmp_path_factory.mktemp("price")
    data = write_jsonl(tmp_path / "d.jsonl", _price_rows())
    doc = banking_recipe(tmp_path, tiny_model_dir, data, name="price", seed=3, split={"train": 26, "val": 0, "test": 10},
                         data={"task": "regression", "target_field": "price", "prompt": "{text}"},
                         train=HEAD_TRAIN, eval={"max_new_tokens": 4, "bootstrap": 200, "baselines": ["mean"]})
    doc["arms"] = [{"name": "llm-head", "train": {"head": "regression"}},
                   {"name": "encoder-head", "model": {"name": str(tiny_bert_dir)},
                    "train": {"head": "regression", "adapter": "full", "freeze_embeddings": True}}]
    code, out = _cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    return tmp_path / "runs" / "price"


def test_regression_head_arms_on_a_decoder_and_an_encoder_report_units_time_params_and_latency(
        price_run, tiny_bert_dir):
    run = price_run
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"base", "llm-head", "encoder-head", "mean"}
    preds = _lines(run / "eval" / "predictions.jsonl")
    gold = [p["gold"] for p in preds if p["model"] == "mean"]
    for arm in ("llm-head", "encoder-head"):
        m = metrics[arm]
        assert m["scoring"] == "regression head" and m["unparseable"] == 0 and m["mae_ci95"]
        assert m["latency_ms"] > 0 and m["parameters"] > 0
        mine = [p["parsed"] for p in preds if p["model"] == arm]
        # answers are prices in the target's units (rupees here), not standardised log values
        assert min(mine) > 50 and max(mine) < 100 * max(gold)
        assert m["mae"] == pytest.approx(sum(abs(a - b) for a, b in zip(mine, gold, strict=True)) / len(gold))
    head = json.loads((run / "arms" / "encoder-head" / "train" / "head" / "head.json").read_text())
    assert head["head"] == "regression" and head["target"]["transform"] == "log1p"
    assert head["base_model"] == str(tiny_bert_dir)
    assert metrics["encoder-head"]["parameters"] < metrics["llm-head"]["parameters"]
    report = (run / "report.md").read_text()
    assert "ms / example" in report and "train time" in report and "parameters" in report
    row = next(line for line in report.splitlines() if line.startswith("| encoder-head"))
    assert " s |" in row  # its training time is in the comparison table


def test_freeze_embeddings_keeps_the_encoder_input_embeddings_and_trains_the_rest(price_run, tiny_bert_dir):
    import torch
    from pydantic import ValidationError
    from safetensors.torch import load_file

    from tunesmith.config import TrainSection

    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    tuned = load_file(str(price_run / "arms" / "encoder-head" / "train" / "head" / "model.safetensors"))
    name = next(k for k in base if k.endswith("word_embeddings.weight"))
    tuned_name = next(k for k in tuned if k.endswith("word_embeddings.weight"))
    assert torch.equal(base[name], tuned[tuned_name])
    layer = next(k for k in base if "layer.0" in k and k.endswith("query.weight"))
    assert not torch.equal(base[layer], tuned[next(k for k in tuned if k.endswith(layer.split("bert.")[-1]))])
    with pytest.raises(ValidationError, match="freeze_embeddings applies to adapter: full"):
        TrainSection(adapter="lora", freeze_embeddings=True)


def test_heads_train_without_attention_dropout_unless_asked_and_hidden_dropout_stays(price_run, tiny_bert_dir):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from tunesmith.models.loading import set_attention_dropout

    saved = json.loads((price_run / "arms" / "encoder-head" / "train" / "head" / "config.json").read_text())
    assert saved["attention_probs_dropout_prob"] == 0.0  # the default the head trained with, recorded
    assert json.loads((tiny_bert_dir / "config.json").read_text())["attention_probs_dropout_prob"] == 0.1

    def dropouts(model):
        return sorted((type(m).__name__, d.p) for m in model.modules() for d in [getattr(m, "dropout", None)]
                      if d is not None and hasattr(d, "p"))

    model = AutoModel.from_pretrained(tiny_bert_dir)
    assert set_attention_dropout(model, None) == 0 and ("BertSelfAttention", 0.1) in dropouts(model)
    assert set_attention_dropout(model, 0.0) == 2  # one per layer
    assert ("BertSelfAttention", 0.1) not in dropouts(model) and ("BertSelfAttention", 0.0) in dropouts(model)
    assert ("BertSelfOutput", 0.1) in dropouts(model) and ("BertOutput", 0.1) in dropouts(model)
    assert model.config.attention_probs_dropout_prob == 0.0
    assert set_attention_dropout(model, 0.0) == 0  # already there: nothing changes
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert set_attention_dropout(classifier, 0.2) == 2 and classifier.config.attention_probs_dropout_prob == 0.2


def _squad(tmp_path, n=12):
    paragraphs = []
    for i in range(n):
        rows = banking_rows(LABELS, 12)[i : i + 4]
        context = " ".join(r["text"] for r in rows)
        answer = " ".join(rows[-1]["text"].split()[:3])  # in the last message: beyond the first window
        start = context.index(answer, len(context) - len(rows[-1]["text"]) - 1)
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "What does the last one say?",
                                                        "answers": [{"text": answer, "answer_start": start}]}]})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": f"t{k}", "paragraphs": [p]}
                                                         for k, p in enumerate(paragraphs)]}))
    return path


@pytest.fixture(scope="module")
def span_run(tmp_path_factory, tiny_model_dir, tiny_bert_dir):
    """An extractive QA run with a decoder span arm and an encoder span arm."""
    tmp_path = tmp_path_factory.mktemp("span")
    doc = {"name": "span", "output_dir": str(tmp_path / "runs"), "seed": 1, "model": {"name": str(tiny_model_dir)},
           "data": {"path": str(_squad(tmp_path)), "task": "qa", "input_fields": ["context", "question"],
                    "target_field": "answers", "prompt": "{context}\n\nQ: {question}",
                    "split": {"train": 8, "val": 0, "test": 4, "group_field": "title"}},
           "train": {**HEAD_TRAIN, "max_seq_length": 40, "span_stride": 12},
           "eval": {"max_new_tokens": 6, "stop": ["\n"], "bootstrap": 100},
           "arms": [{"name": "llm-span", "train": {"head": "span"}},
                    {"name": "encoder-span", "model": {"name": str(tiny_bert_dir)}, "train": {"head": "span"}}]}
    code, out = _cli(["run", str(write_recipe(tmp_path / "r.yaml", doc))])
    assert code == 0, out
    return tmp_path / "runs" / "span"


def test_span_head_arms_answer_with_spans_of_the_context_scored_by_the_squad_rules(span_run):
    run = span_run
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"llm-span", "encoder-span"} <= set(metrics)
    for arm in ("llm-span", "encoder-span"):
        assert metrics[arm]["scoring"] == "span head" and "exact_match" in metrics[arm]
        for p in (p for p in _lines(run / "eval" / "predictions.jsonl") if p["model"] == arm):
            context = p["prompt"].split("\n\nQ: ")[0]
            assert p["output"] and p["output"] in context  # a span of the context, never generated text
    summary = json.loads((run / "arms" / "encoder-span" / "train" / "summary.json").read_text())
    assert summary["kind"] == "head" and summary["examples"] > 8  # several windows per context
    assert summary["trainable_tensors_changed"] > 0


def test_a_head_that_does_not_fit_the_task_and_an_encoder_without_a_head_are_refused(tmp_path, tiny_bert_dir):
    from tunesmith.config import validate_recipe
    from tunesmith.errors import ConfigError

    doc = banking_recipe(tmp_path, tiny_bert_dir, tmp_path / "d.jsonl", name="x", seed=1, split={"train": 4, "val": 0, "test": 2})
    with pytest.raises(ConfigError, match="is an encoder"):
        validate_recipe(doc)
    with pytest.raises(ConfigError, match="head span needs data.task qa"):
        validate_recipe({**doc, "train": {"head": "span"}})
    validate_recipe({**doc, "train": {"head": "classifier"}})


def _served(run, arm, head):
    return run / "arms" / arm / "train" / head


def test_head_arms_answer_through_the_served_endpoint_as_in_evaluation_and_export_merged(
        price_run, span_run, tiny_model_dir, tiny_bert_dir, tmp_path):
    """An OpenAI-client user asks a head like any chat model and gets the number or the span the evaluation
    scored; the merged export answers the same without its base model."""
    import openai

    from tunesmith.export.merged import export_merged
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine
    from tunesmith.serve.launch import parse_adapters

    merged = export_merged(price_run / "arms" / "llm-head", tmp_path / "merged")
    labelled = _classifier_folder(tmp_path / "cls", tiny_bert_dir)
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    adapters = parse_adapters([f"price-llm={_served(price_run, 'llm-head', 'head')}",
                               f"price-encoder={_served(price_run, 'encoder-head', 'head')}",
                               f"price-merged={merged}",
                               f"span-encoder={_served(span_run, 'encoder-span', 'head')}",
                               f"labels={labelled}"])
    engine = Engine(str(tiny_model_dir), adapters, max_batch=4, wait_ms=10)
    settings = ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path / "serve")
    from .conftest import running_server

    with running_server(create_app(settings, engine)) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert {m.id for m in client.models.list()} >= set(adapters)
        cases = [("price-llm", price_run, "llm-head"), ("price-encoder", price_run, "encoder-head"),
                 ("price-merged", price_run, "llm-head"), ("span-encoder", span_run, "encoder-span")]
        for model, run, arm in cases:
            preds = [p for p in _lines(run / "eval" / "predictions.jsonl") if p["model"] == arm]
            for p in preds[:4]:
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "system", "content": "Answer."}, {"role": "user", "content": p["prompt"]}])
                text = reply.choices[0].message.content
                assert reply.choices[0].finish_reason == "stop" and reply.usage.prompt_tokens > 0
                if "price" in model:
                    assert float(text) == pytest.approx(p["parsed"], rel=1e-3, abs=0.01), (model, p["id"])
                else:
                    assert text == p["output"], (model, p["id"])
        from tunesmith.models.head_predictor import HeadPredictor

        local = HeadPredictor(labelled)
        texts = [r["text"] for r in banking_rows(LABELS, 3)]
        for text, probs in zip(texts, local.probabilities(texts), strict=True):
            reply = client.chat.completions.create(model="labels", messages=[{"role": "user", "content": text}])
            assert reply.choices[0].message.content == LABELS[max(range(3), key=probs.__getitem__)]
        stream = client.chat.completions.create(model="price-encoder", stream=True,
                                                messages=[{"role": "user", "content": preds[0]["prompt"]}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with pytest.raises(openai.BadRequestError, match="prompt template"):
            client.chat.completions.create(model="span-encoder", messages=[{"role": "user", "content": "no template"}])


def _classifier_folder(folder, encoder):
    """A full classifier head on the tiny encoder's mean-pooled embedding, saved as training saves one (untrained:
    any fixed weights do)."""
    from transformers import AutoTokenizer

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.heads import load_sequence_head, write_head_meta

    tok = AutoTokenizer.from_pretrained(encoder)
    load_sequence_head(str(encoder), pick_placement(), tok, list(LABELS), "mean").save_pretrained(folder)
    tok.save_pretrained(folder)
    write_head_meta(folder, {"head": "classifier", "base_model": str(encoder), "labels": list(LABELS),
                             "prompt": "{text}", "input_fields": ["text"], "max_length": 64, "pooling": "mean"})
    return folder


def test_serve_options_name_what_a_head_folder_can_and_cannot_do(tmp_path, tiny_bert_dir):
    from tunesmith.errors import ConfigError
    from tunesmith.serve.launch import parse_adapters

    head = _classifier_folder(tmp_path / "cls", tiny_bert_dir)
    assert parse_adapters([f"h={head}"]) == {"h": str(head)}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="nor a trained head"):
        parse_adapters([f"x={tmp_path / 'empty'}"])


def test_every_method_and_head_a_recipe_can_name_has_a_trainer():
    from typing import get_args

    from tunesmith.config import TrainSection
    from tunesmith.config.train import HEAD_TASKS
    from tunesmith.errors import ConfigError, DataError
    from tunesmith.models.heads import HEADS, head_kind
    from tunesmith.train.jobs import trainer_for

    heads = get_args(TrainSection.model_fields["head"].annotation)
    assert set(HEADS) == set(HEAD_TASKS) == set(heads) - {"generative"}
    assert trainer_for("sft", "generative") is not trainer_for("dpo", "generative")
    assert {trainer_for("sft", h) for h in HEADS} == {trainer_for("sft", "span")}
    with pytest.raises(ConfigError, match="dpo with train.head span: nothing trains that; known: dpo with head generative"):
        trainer_for("dpo", "span")
    with pytest.raises(DataError, match="unknown head kind 'ranking'; known: classifier, regression, span"):
        head_kind("ranking")
    assert [h.label_probabilities for h in HEADS.values()] == [True, False, False]


def test_regression_loss_l1_and_huber_reach_the_trainer_and_scale_by_the_accumulated_batch(monkeypatch):
    import types

    import torch
    from pydantic import ValidationError

    from tunesmith.config import TrainSection
    from tunesmith.models.heads import RegressionHead
    from tunesmith.train import heads

    out = types.SimpleNamespace(logits=torch.tensor([[0.0], [3.0], [-1.0]]))
    gold = torch.tensor([1.0, 0.0, -1.0])
    l1 = heads.TRAINING["regression"].loss_func(TrainSection(head="regression", regression_loss="l1"))
    assert l1(out, gold).item() == pytest.approx(4 / 3)
    assert l1(out, gold, num_items_in_batch=6).item() == pytest.approx(4 / 6)  # half of a 2-step accumulated batch
    huber = heads.TRAINING["regression"].loss_func(TrainSection(head="regression", regression_loss="huber"))
    assert huber(out, gold).item() == pytest.approx((0.5 + 2.5 + 0) / 3)  # quadratic below 1, linear above
    assert heads.TRAINING["regression"].loss_func(TrainSection(head="regression")) is None  # mse: the model's own
    assert heads.TRAINING["span"].loss_func(TrainSection(head="span")) is None
    with pytest.raises(ValidationError, match="regression_loss applies to head: regression"):
        TrainSection(head="classifier", regression_loss="l1")

    seen = {}
    monkeypatch.setattr(heads, "fit_head", lambda *a, **k: seen.update(k) or types.SimpleNamespace(rows=[]))
    monkeypatch.setattr(heads.RegressionTraining, "training_rows", lambda self, *a: ([], {}, 0))
    model = torch.nn.Linear(1, 1)
    model.config = types.SimpleNamespace(model_type="bert")  # an encoder: batches keep the 2D mask
    monkeypatch.setattr(RegressionHead, "load", lambda self, *a: model)
    recipe = types.SimpleNamespace(train=TrainSection(head="regression", regression_loss="l1", adapter="full"),
                                   model=types.SimpleNamespace(name="m"), seed=0,
                                   data=types.SimpleNamespace(prompt="{x}", input_fields=["x"]))
    heads.train_head(heads.TRAINING["regression"], recipe, [], types.SimpleNamespace(), None, None, None)
    assert seen["loss_func"](out, gold).item() == pytest.approx(4 / 3)


def test_the_probe_reads_a_seeded_sample_when_asked():
    """`train.probe_examples` (run --quick sets it): the linear probe is fitted on a seeded sample of the rows."""
    from tunesmith.train.heads import probe_rows

    rows = [{"labels": i % 2, "length": 4} for i in range(100)]
    assert probe_rows(rows, None, 1) is rows and probe_rows(rows, 500, 1) is rows
    sample = probe_rows(rows, 10, 1)
    assert len(sample) == 10 and sample == probe_rows(rows, 10, 1) and sample != rows[:10]
