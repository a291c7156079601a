"""`tunesmith init` on a corpus of ordinary files made from the repository's data (BANKING77 messages, the chat
examples, the GitHub policy text) and transformations of it: 77 labels, Korean text with a date column, a price
table with URLs, ids, a price copy and empty cells, cp949, UTF-16, a broken JSON line, one label, a 200,000-character
cell, a folder, Parquet, SQuAD, chat JSONL. For each: the task, target, inputs and encoder init chooses, and every
recipe it writes passes `tunesmith data prepare` unedited; the files the run could not use are refused, saying why.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_CSV, REPO, chat_lines, write_jsonl
from tunesmith.config import load_recipe

MINILM, E5 = "all-minilm-l6-v2", "multilingual-e5-small"
KO_SUBJECTS = ("이 영화", "배우 연기", "줄거리", "음악", "결말", "감독의 연출", "화면", "대사")
KO_VERDICTS = {1: ("정말 최악이에요", "시간이 아까웠다"), 2: ("지루하고 별로였다", "기대보다 못했어요"),
               3: ("그냥 평범했어요", "나쁘지 않았다"), 4: ("꽤 재미있었어요", "다시 보고 싶다"),
               5: ("최고의 작품입니다", "완전 감동했어요")}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", str(tmp_path / "cache"))  # prepared here, not from another test's cache


def banking() -> list[dict]:
    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def korean_reviews(n: int) -> list[dict]:
    """Korean movie-review-like rows: a subject, a verdict that carries the star rating, and a running number."""
    rows = []
    for i in range(n):
        stars = i % 5 + 1
        verdict = KO_VERDICTS[stars][i // 5 % 2]
        rows.append({"date": f"03.{i % 12 + 1:02d}.{i % 28 + 1:02d}", "review_id": str(1000 + i),
                     "review": f"{KO_SUBJECTS[i // 10 % len(KO_SUBJECTS)]}은 {verdict} ({i}번째 관람)",
                     "stars_5": stars})
    return rows


def init_said(cli, data: Path, *extra: str, model: Path) -> tuple[int, str, Path]:
    out = Path.cwd() / f"{data.name.split('.')[0]}-{len(list(Path.cwd().glob('*-recipe.yaml')))}-recipe.yaml"
    code, text = cli(["init", str(data), "--out", str(out), "--model", str(model), *extra])
    return code, text, out


def chosen(cli, data: Path, model: Path, *extra: str):
    """Init on ``data``; the recipe must load and pass `tunesmith data prepare` with no edit."""
    code, said, recipe = init_said(cli, data, *extra, model=model)
    assert code == 0, said
    cfg = load_recipe(recipe)
    code, prepared = cli(["data", "prepare", str(recipe)])
    assert code == 0, f"{said}\n--- data prepare ---\n{prepared}"
    encoder = next((a.model["name"] for a in cfg.arms if a.name == "encoder-head"), None)
    return cfg, said, prepared, encoder


def refused(cli, data: Path, model: Path, *extra: str) -> str:
    code, said, recipe = init_said(cli, data, *extra, model=model)
    assert code != 0 and not recipe.exists(), said
    return said


def test_77_labels_are_classification_and_a_field_that_determines_the_label_is_left_out(cli, tmp_path,
                                                                                        tiny_model_dir):
    per: dict[str, int] = {}
    rows = []
    intents = sorted({r["category"] for r in banking()})
    for r in banking():
        k = per.get(r["category"], 0)
        per[r["category"]] = k + 1
        label = f"{r['category']}_{k % 8}"
        rows.append({"text": r["text"], "category": label, "code": f"C{intents.index(r['category'])}{k % 8}"})
    labels = sorted({r["category"] for r in rows})[:77]
    rows = [r for r in rows if r["category"] in labels]
    data = tmp_path / "intents77.csv"
    data.write_text(csv_text(rows), encoding="utf-8")
    cfg, said, _, encoder = chosen(cli, data, tiny_model_dir)
    assert len(labels) == 77 and "holds 77 distinct values that repeat" in said
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "category", ["text"], MINILM)
    assert "left out code: determines the target (each of its 77 values goes with one target value)" in said
    assert cfg.data.split.val == 0.17 and "validation: 205 of 1,208 rows" in said  # 200 examples to tell arms apart


def test_korean_reviews_with_a_date_column_read_the_review_with_e5(cli, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "reviews_ko.jsonl", korean_reviews(120))
    cfg, said, _, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "stars_5", ["review"], E5)
    assert "left out date: dates" in said and "left out review_id: an id" in said
    assert "mostly Hangul script" in said


def test_a_price_table_is_regression_on_the_text_without_urls_ids_or_the_price_copy(cli, tmp_path,
                                                                                     tiny_model_dir):
    rows = []
    for i, r in enumerate(banking()[:200]):
        price = 100 + 37 * (len(r["text"]) % 41) + i
        rows.append({"product_id": f"B0{7_000_000 + i * 7919:08X}", "product_name": " ".join(r["text"].split()[:4]),
                     "about_product": r["text"], "price": f"{price}.0", "price_text": f"₹{price:,}",
                     "img_link": f"https://m.media-example.com/images/I/{i:05d}.jpg",
                     "product_link": f"https://www.example.in/dp/{i:06d}",
                     "review_content": "" if i % 23 == 5 else f"Bought it for {r['category'].replace('_', ' ')}: {r['text']}"})
    data = tmp_path / "products.csv"
    data.write_text(csv_text(rows), encoding="utf-8")
    cfg, said, prepared, encoder = chosen(cli, data, tiny_model_dir, "--target", "price")
    assert (cfg.data.task, cfg.data.target_field, encoder) == ("regression", "price", MINILM)
    assert cfg.data.input_fields == ["product_name", "about_product", "review_content"]
    for name, why in (("product_id", "an id"), ("img_link", "URLs"), ("product_link", "URLs"),
                      ("price_text", "copies the target on 200 of 200 rows")):
        assert f"left out {name}: {why}" in said
    assert "rows the run sets aside" not in said  # 9 empty reviews: empty text, not a reason to drop the product
    assert cfg.data.on_error == "fail" and "200 kept" in prepared and "set aside" not in prepared


def test_a_korean_cp949_file_is_decoded_and_said(cli, tmp_path, tiny_model_dir):
    rows = [{"리뷰": r["review"], "label": "긍정" if r["stars_5"] >= 4 else "부정"} for r in korean_reviews(60)]
    data = tmp_path / "reviews_cp949.csv"
    data.write_bytes(csv_text(rows).encode("cp949"))
    cfg, said, prepared, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "label", ["리뷰"], E5)
    assert "60 rows" in said and "decoded as CP949" in said and "decoded as CP949" in prepared


def test_a_utf16_file_is_decoded_and_said(cli, tmp_path, tiny_model_dir):
    data = tmp_path / "tickets_utf16.csv"
    data.write_bytes(csv_text(banking()[::10]).encode("utf-16"))
    cfg, said, _, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "category", ["text"], MINILM)
    assert "decoded as UTF-16" in said


def test_a_broken_jsonl_line_is_named_and_set_aside(cli, tmp_path, tiny_model_dir):
    lines = [json.dumps({"text": r["text"], "category": r["category"]}) for r in banking()[::20]]
    lines[30] = lines[30][:-5]  # line 31 cut short
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg, said, prepared, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "category", ["text"], MINILM)
    assert "unreadable: 1 row(s) at line(s) 31, e.g. not valid JSON" in said
    assert cfg.data.on_error == "skip" and "1 record(s) set aside" in prepared


def test_one_label_is_refused(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "label": "card_arrival"} for r in banking()[:40]]
    data = tmp_path / "one_label.csv"
    data.write_text(csv_text(rows), encoding="utf-8")
    said = refused(cli, data, tiny_model_dir)
    assert "every row has the same 'label' ('card_arrival', 40 rows): nothing to learn" in said


def test_too_few_rows_per_label_are_refused(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "category": r["category"] + str(i // 2)} for i, r in enumerate(banking()[:60])]
    data = tmp_path / "pairs.csv"
    data.write_text(csv_text(rows), encoding="utf-8")
    said = refused(cli, data, tiny_model_dir, "--task", "classification")
    assert "labels with a median of 2 row(s) each: too few" in said


def test_a_200000_character_cell_is_read(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "category": r["category"]} for r in banking()[::25]]
    rows[3]["text"] = ("my card has still not arrived and I am waiting " * 4200)[:200_000]
    data = tmp_path / "long_cell.csv"
    data.write_text(csv_text(rows), encoding="utf-8")
    cfg, said, _, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "category", ["text"], MINILM)


def test_a_folder_and_an_unknown_format_are_refused_saying_what_init_reads(cli, tmp_path, tiny_model_dir):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "a.csv").write_text(csv_text(banking()[:20]), encoding="utf-8")
    said = refused(cli, folder, tiny_model_dir)
    assert "is a folder; init reads one data file: CSV/TSV (.csv, .tsv)" in said
    sheet = tmp_path / "tickets.xlsx"
    sheet.write_bytes(b"PK\x03\x04")
    said = refused(cli, sheet, tiny_model_dir)
    assert "init cannot read '.xlsx' files; it reads CSV/TSV" in said


def test_a_latin1_file_is_refused_with_the_fix(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"] + " café", "category": r["category"]} for r in banking()[::40]]
    data = tmp_path / "latin.csv"
    data.write_bytes(csv_text(rows).encode("latin-1"))
    said = refused(cli, data, tiny_model_dir)
    assert "bytes that are not UTF-8" in said and "iconv -f latin1 -t utf-8 latin.csv" in said


def test_parquet_is_read_like_csv(cli, tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "text": r["text"], "intent": r["category"]} for i, r in enumerate(banking()[::8])]
    data = tmp_path / "tickets.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    cfg, said, _, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "intent", ["text"], MINILM)
    assert "left out id: an id" in said


def test_squad_from_the_policy_text_is_qa(cli, tmp_path, tiny_model_dir):
    text = (REPO / "examples" / "data" / "docs" / "github_acceptable_use_policies.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if len(p) > 200 and not p.startswith(("---", "#"))][:12]
    articles = []
    for a, para in enumerate(paragraphs):
        words = re.findall(r"[A-Za-z]{5,}", para)
        qas = [{"id": f"{a}-{q}", "question": f"Which word follows '{w}' in section {a}?",
                "answers": [{"text": words[q + 1], "answer_start": para.index(words[q + 1])}]}
               for q, w in enumerate(words[:4])]
        articles.append({"title": f"section {a % 4}", "paragraphs": [{"context": para, "qas": qas}]})
    data = tmp_path / "policy_squad.json"
    data.write_text(json.dumps({"data": articles}), encoding="utf-8")
    cfg, said, _, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "qa", "answers", ["context", "question"], MINILM)


def test_chat_jsonl_is_generation(cli, tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_bytes((REPO / "examples" / "data" / "banking_chat_12.jsonl").read_bytes())
    cfg, said, _, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "generation", "completion", ["prompt"], None)
    assert cfg.data.system_prompt.startswith("Classify the customer message.")


def test_task_overrides_the_guess(cli, tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "category": r["category"]} for r in banking()[::10]]
    data = write_jsonl(tmp_path / "tickets.jsonl", rows)
    cfg, said, _, _ = chosen(cli, data, tiny_model_dir, "--task", "generation")
    assert cfg.data.task == "generation" and "task: generation (--task)" in said
    said = refused(cli, data.rename(tmp_path / "tickets2.jsonl"), tiny_model_dir, "--task", "regression")
    assert "--task regression: 'category' is not a number on every row" in said


def test_real_banking77_and_products_from_shared_data(cli, tmp_path, tiny_model_dir):
    """The issue's real files: BANKING77's 77 intents, and Amazon India products with a price target."""
    shared = REPO.parent / "shared" / "data"
    banking77 = shared / "banking77" / "banking77_train.csv"
    products = shared / "products_amazon_in" / "amazon_in_products_shared.csv"
    if not (banking77.is_file() and products.is_file()):
        pytest.skip(f"shared data not found under {shared}")
    sample = tmp_path / "banking77_3k.csv"
    with open(banking77, newline="", encoding="utf-8") as fh:
        sample.write_text(csv_text(list(csv.DictReader(fh))[::3]), encoding="utf-8")
    cfg, said, _, encoder = chosen(cli, sample, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "category", ["text"], MINILM)
    cfg, said, _, encoder = chosen(cli, products, tiny_model_dir, "--target", "discounted_price_inr")
    assert (cfg.data.task, encoder) == ("regression", MINILM)
    assert not {"product_id", "img_link", "product_link", "discounted_price", "actual_price"} & set(
        cfg.data.input_fields), said


def test_a_file_longer_than_the_sample_is_read_up_to_it_and_said(cli, tmp_path, tiny_model_dir, monkeypatch):
    """Init reads the first SAMPLE_ROWS rows through the data stage's reader and says so; the run reads every row,
    and one it cannot use further on (here a short CSV row after 999 rows) is set aside, not a stopped run."""
    from tunesmith.runs import starter

    monkeypatch.setattr(starter, "SAMPLE_ROWS", 300)
    rows = banking()
    text = csv_text(rows[:999]) + "only one field\n" + csv_text(rows[999:]).split("\n", 1)[1]
    data = tmp_path / "long.csv"
    data.write_text(text, encoding="utf-8")
    cfg, said, prepared, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "category", ["text"], MINILM)
    assert "long.csv: the first 300 rows (init reads no further; the run reads every row) (csv)" in said
    assert "validation: 60 of the first 300 rows read, more in the whole file" in said
    assert "init read the first 300 rows; a row further on that the run cannot use is set aside" in said
    assert cfg.data.on_error == "skip" and f"{len(rows):,} kept" in prepared and "1 record(s) set aside" in prepared


def test_a_chat_file_longer_than_the_sample_keeps_every_conversation(cli, tmp_path, tiny_model_dir, monkeypatch):
    """The conversations init turns into prompt/completion rows are every one of the file, not its first
    SAMPLE_ROWS; a broken line further on is said."""
    from tunesmith.runs import starter

    monkeypatch.setattr(starter, "SAMPLE_ROWS", 20)
    data = tmp_path / "chat.jsonl"
    data.write_bytes(chat_lines(banking()[::25], system="Classify the customer message.") + b'{"messages": [\n')
    cfg, said, _, _ = chosen(cli, data, tiny_model_dir)
    pairs = [json.loads(line) for line in cfg.data.path.read_text(encoding="utf-8").splitlines()]
    n = len(banking()[::25])
    assert n > 40 and len(pairs) == n and all(p["prompt"] and p["completion"] for p in pairs)
    assert cfg.data.system_prompt == "Classify the customer message." and not pairs[-1]["prompt"].startswith("system")
    assert f"conversations as prompt/completion rows ({n})" in said
    assert "unreadable: 1 conversation(s) in the whole file, left out of" in said and f"chat.jsonl:{n + 1}:" in said
