"""QA exact match / F1, written from the SQuAD v1.1 and KorQuAD v1.0 scoring rules step by step."""

import json
import os
from pathlib import Path

import pytest

from tunesmith.data.read.readers import read_records
from tunesmith.errors import DataError
from tunesmith.scoring import qa

SHARED = Path(
    os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
KORQUAD = SHARED / "korquad" / "korquad_v1_dev_shared.json"


def test_squad_normalisation_order_lower_punct_articles_space():
    assert qa.normalize_en("The  Cat!") == "cat"
    assert qa.normalize_en("an apple, a pear") == "apple pear"
    assert qa.normalize_en("Theatre") == "theatre"  # articles only as whole words
    assert qa.normalize_en("the-end") == "theend"  # punctuation goes first, so no article is left
    assert qa.normalize_en("« Paris »") == "« paris »"  # only ASCII punctuation is removed


def test_korquad_normalisation_preclean_no_articles_cjk_punct_kept():
    assert qa.normalize_ko("《반지의 제왕》") == "반지의 제왕"
    assert qa.normalize_ko("(1990년)") == "1990년"
    assert qa.normalize_ko("‘서울’") == "서울"
    assert qa.normalize_ko("The Beatles") == "the beatles"  # no article removal
    assert qa.normalize_ko("「서울」。") == "「서울」。"  # CJK punctuation stays, as in the official script
    # the apostrophe becomes a space before punctuation removal (SQuAD would just drop it)
    assert qa.normalize_ko("it's") == "it s" and qa.normalize_en("it's") == "its"


def test_word_f1_vs_character_f1():
    assert qa.f1_en("the big cat", "cat") == pytest.approx(2 / 3)  # tokens [big, cat] vs [cat]
    assert qa.f1_en("dog", "cat") == 0
    assert qa.f1_ko("서울특별시", "서울") == pytest.approx(2 * 0.4 * 1 / 1.4)  # 2 of 5 chars, all of 2
    assert qa.f1_ko("서울 시", "서울시") == 1.0  # spaces are dropped before counting characters
    assert qa.exact_match("서울 시", "서울시", "ko") is False
    assert qa.f1_ko("aab", "ab") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # bag (multiset) overlap
    assert qa.exact_match("it's", "its", "en") and not qa.exact_match("it's", "its", "ko")


def test_best_over_gold_answers_and_missing_and_extra_ids():
    gold = {"q1": ["Paris", "the city of Paris"], "q2": ["1990"], "q3": ["blue"]}
    preds = {"q1": "city of Paris", "q2": "in 1990", "zz": "stray"}
    s = qa.score_qa(gold, preds, "en")
    # q1: EM against the 2nd answer; q2: F1 = 2*(1/2*1)/(1.5) = 2/3; q3 missing → 0
    assert s.exact_match == pytest.approx(100 / 3)
    assert s.f1 == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert s.missing == ["q3"] and s.extra == ["zz"] and s.total == 3
    assert s.per_example["q3"] == (False, 0.0)


def test_unknown_language_is_refused():
    with pytest.raises(DataError):
        qa.score_qa({"a": ["x"]}, {"a": "x"}, "fr")


def _squad_file(tmp_path):
    doc = {
        "version": "t",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "c",
                        "qas": [
                            {
                                "id": "a",
                                "question": "?",
                                "answers": [{"text": "《반지의 제왕》", "answer_start": 0}],
                            },
                            {
                                "id": "b",
                                "question": "?",
                                "answers": [
                                    {"text": "서울", "answer_start": 0},
                                    {"text": "서울특별시", "answer_start": 0},
                                ],
                            },
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "gold.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def test_cli_prints_official_json_and_lists_bad_ids(cli, tmp_path):
    gold = _squad_file(tmp_path)
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps({"a": "반지의 제왕", "x9": "?"}, ensure_ascii=False), encoding="utf-8")
    code, out = cli(["eval", "qa", "--gold", str(gold), "--predictions", str(preds), "--lang", "ko"])
    assert code == 0, out
    assert '{"exact_match": 50.0, "f1": 50.0}' in out
    assert "1 prediction id(s) missing (scored 0): b" in out
    assert "1 prediction id(s) not in the gold file (ignored): x9" in out


def test_cli_bad_files_exit_3(cli, tmp_path):
    gold = _squad_file(tmp_path)
    bad = tmp_path / "p.json"
    bad.write_text('["not", "a mapping"]', encoding="utf-8")
    code, out = cli(["eval", "qa", "--gold", str(gold), "--predictions", str(bad)])
    assert code == 3 and "expected a JSON object" in out
    code, out = cli(["eval", "qa", "--gold", str(tmp_path / "nope.json"), "--predictions", str(bad)])
    assert code == 3 and "nope.json" in out
    code, out = cli(["eval", "qa", "--gold", str(gold)])
    assert code == 2 and "--predictions" in out


@pytest.mark.skipif(not KORQUAD.is_file(), reason=f"shared KorQuAD data not found at {KORQUAD}")
def test_real_korquad_gold_answers_score_100_and_missing_half_scores_half():
    gold = qa.read_gold(KORQUAD)
    assert len(gold) == 4741
    first = {k: v[0] for k, v in gold.items()}
    s = qa.score_qa(gold, first, "ko")
    assert (s.exact_match, s.f1) == (100.0, 100.0)
    ids = list(gold)
    half = {k: first[k] for k in ids[::2]}
    s = qa.score_qa(gold, half, "ko")
    assert s.exact_match == pytest.approx(100 * len(half) / len(gold)) and len(s.missing) == len(ids) // 2
    records, _ = read_records(KORQUAD, limit=3)  # the data stage's reader sees the same questions and answers
    assert len(records) == 3 and all(gold[r.data["id"]] == r.data["answers"] and r.data["question"] for r in records)


def test_a_gold_file_reads_like_the_data_reader_and_names_a_bad_question_by_its_place(tmp_path):
    qas = [{"id": "a", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 0}]},
           {"id": "b", "question": "Who?", "answers": []}]
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": qas[:1]}]},
                    {"title": "U", "paragraphs": [{"context": "x", "qas": []}, {"context": "y", "qas": qas[1:]}]}]}
    path = tmp_path / "gold.json"
    path.write_text(json.dumps(doc))
    records, _ = read_records(path)
    with pytest.raises(DataError, match=r"gold.json:data\[1\].paragraphs\[1\].qas\[0\]: a question needs an 'id'"):
        qa.read_gold(path)
    assert records[1].source.endswith("gold.json:data[1].paragraphs[1].qas[0]")
    path.write_text(json.dumps({"data": doc["data"][:1]}))
    assert qa.read_gold(path) == {"a": ["Paris"]}
