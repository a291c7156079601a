from tunesmith.config import DataSection
from tunesmith.data.formats.messages import chat_messages, end_of_turn, prompt_text
from tunesmith.records import Example
from tunesmith.scoring.baselines import majority, tfidf_logreg
from tunesmith.scoring.metrics import classification_metrics, confusion, parse_label

from .conftest import banking_rows


def test_chat_messages_system_prompt_and_label_list():
    ex = Example("1", {"text": "where is my card"}, "card_arrival")
    cfg = DataSection(path="x", input_fields=["text"], target_field="l", prompt="Message: {text}", system_prompt="S")
    assert chat_messages(ex, cfg) == [{"role": "system", "content": "S"}, {"role": "user", "content": "Message: where is my card"}]
    with_labels = chat_messages(ex, cfg, ["a", "b"])[1]["content"]
    assert with_labels.endswith("Answer with exactly one of these labels: a, b.")
    no_system = DataSection(path="x", input_fields=["text"], target_field="l", system_prompt=None)
    assert [m["role"] for m in chat_messages(ex, no_system)] == ["user"]


def test_end_of_turn_and_prompt_text(tiny_model):
    _, tok = tiny_model
    assert end_of_turn(tok) == "<|im_end|>"
    text = prompt_text(tok, [{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n")


def test_parse_label_is_strict():
    labels = ["card_arrival", "pin_blocked"]
    assert parse_label(" Card_Arrival.\n", labels) == "card_arrival"
    assert parse_label("card_arrival because...", labels) is None
    assert parse_label("", labels) is None


def test_classification_metrics_count_unparseable_as_wrong():
    m = classification_metrics(["a", "b", "a", "b"], ["a", None, "b", "b"], ["a", "b"])
    assert m["accuracy"] == 0.5 and m["unparseable"] == 1 and m["n"] == 4
    assert 0 < m["macro_f1"] < 1
    cm = confusion(["a", "b", "a", "b"], ["a", None, "b", "b"], ["a", "b"])
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1]]


def test_baselines_on_real_rows():
    rows = banking_rows(("card_arrival", "pin_blocked", "age_limit"), 40)
    train, test = rows[::2], rows[1::2]
    gold = [r["category"] for r in test]
    assert set(majority([r["category"] for r in train], 5)) <= {"card_arrival", "pin_blocked", "age_limit"}
    pred = tfidf_logreg([r["text"] for r in train], [r["category"] for r in train], [r["text"] for r in test], 0)
    acc = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
    assert acc > 0.8, acc
