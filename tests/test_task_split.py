from collections import Counter

import pytest

from tunesmith.config import DataSection, SplitSection
from tunesmith.data.steps.examples import label_set, to_examples
from tunesmith.data.steps.split import split_examples, split_sizes
from tunesmith.errors import DataError
from tunesmith.records import Example, Record


def cfg(**kw) -> DataSection:
    return DataSection(path="x.jsonl", input_fields=["text"], target_field="label", **kw)


def test_mapping_and_rejects_rows_missing_fields():
    recs = [Record({"text": "a", "label": "x"}, "f:1"), Record({"text": " ", "label": "y"}, "f:2"),
            Record({"text": "c"}, "f:3")]
    with pytest.raises(DataError, match=r"f:2: no input text \(field 'text' is missing or empty\)"):
        to_examples(recs, cfg())
    examples, rejected = to_examples(recs, cfg(on_error="skip"))
    assert [e.inputs["text"] for e in examples] == ["a"]
    assert [(r.source, r.stage) for r in rejected] == [("f:2", "map"), ("f:3", "target")]
    assert "field 'label' is missing or empty (the target)" in rejected[1].reason


def test_an_empty_input_field_is_empty_text_and_a_row_without_any_is_set_aside():
    """An email without a subject is still an email: only a row with no input text at all cannot be used."""
    two = DataSection(path="x.jsonl", input_fields=["subject", "body"], target_field="label", on_error="skip",
                      prompt="{subject}\n{body}")
    recs = [Record({"subject": "", "body": "win a prize", "label": "spam"}, "f:1"),
            Record({"body": "lunch?", "label": "ham"}, "f:2"),
            Record({"subject": float("nan"), "body": "  ", "label": "ham"}, "f:3")]
    examples, rejected = to_examples(recs, two)
    assert [e.inputs for e in examples] == [{"subject": "", "body": "win a prize"}, {"subject": "", "body": "lunch?"}]
    assert [(r.source, r.reason) for r in rejected] == [
        ("f:3", "no input text (fields 'subject', 'body' are all missing or empty)")]


def test_field_no_record_has_is_named():
    recs = [Record({"txt": "a", "label": "x"}, "f.jsonl:1")]
    with pytest.raises(DataError, match=r"no record has the field 'text'.*'txt'"):
        to_examples(recs, cfg())


def test_closed_label_set_rejects_unknown_labels():
    recs = [Record({"text": "a", "label": "x"}, "f:1"), Record({"text": "b", "label": "z"}, "f:2")]
    examples, rejected = to_examples(recs, cfg(labels=["x", "y"], on_error="skip"))
    assert len(examples) == 1 and "not in data.labels" in rejected[0].reason
    assert label_set(examples, cfg(labels=["x", "y"])) == ["x", "y"]
    assert label_set(examples, cfg()) == ["x"]


def examples(n_per: dict[str, int]) -> list[Example]:
    return [Example(f"{lab}{i}", {"text": f"{lab} {i}"}, lab) for lab, n in n_per.items() for i in range(n)]


def test_split_is_seeded_disjoint_and_complete():
    exs = examples({"a": 50, "b": 30, "c": 20})
    s1 = split_examples(exs, SplitSection(train=0.7, val=0.1, test=0.2), seed=1)
    s2 = split_examples(exs, SplitSection(train=0.7, val=0.1, test=0.2), seed=1)
    s3 = split_examples(exs, SplitSection(train=0.7, val=0.1, test=0.2), seed=2)
    ids = lambda s: {k: [e.id for e in v] for k, v in s.items()}  # noqa: E731
    assert ids(s1) == ids(s2) and ids(s1) != ids(s3)
    all_ids = [i for v in ids(s1).values() for i in v]
    assert sorted(all_ids) == sorted(e.id for e in exs)
    assert (len(s1["train"]), len(s1["val"]), len(s1["test"])) == (70, 10, 20)


def test_stratified_split_keeps_proportions():
    exs = examples({"a": 60, "b": 30, "c": 10})
    s = split_examples(exs, SplitSection(train=50, val=0, test=20), seed=3)
    assert Counter(e.target for e in s["test"]) == {"a": 12, "b": 6, "c": 2}
    assert len(s["unused"]) == 30


def test_split_asking_for_too_much():
    with pytest.raises(DataError, match="only 10"):
        split_sizes(10, SplitSection(train=8, val=2, test=2))
