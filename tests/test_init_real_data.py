"""`tunesmith init` on the real files issue 50 names, from ../shared/data (or $TUNESMITH_SHARED_DATA): BANKING77's
77 intents, Korean NSMC movie reviews with a date column, the Amazon India product table (its category, and its
price with URL, id, price-copy columns and empty review cells), and KorQuAD as a real SQuAD file. For each, the
task, target, inputs and encoder a person would choose, and a recipe that `tunesmith data prepare` takes unedited.
Skipped, saying which file, where a clone has no shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_init_corpus import E5, MINILM, chosen

SHARED = Path(os.environ.get("TUNESMITH_SHARED_DATA", REPO.parent / "shared" / "data"))
BANKING77 = "banking77/banking77_train.csv"
NSMC = "reviews_ko_nsmc/nsmc_reviews_shared.jsonl"
PRODUCTS = "products_amazon_in/amazon_in_products_shared.csv"
KORQUAD = "korquad/korquad_v1_dev_shared.json"
PRODUCT_TEXT = ["product_name", "about_product", "review_title", "review_content"]
NOT_PRODUCT_INPUTS = (("product_id", "an id"), ("img_link", "URLs"), ("product_link", "URLs"),
                      ("actual_price", "amounts of money (₹)"), ("rating_count", "numbers"))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", str(tmp_path / "cache"))  # prepared here, not from another test's cache


def shared_file(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path} (set TUNESMITH_SHARED_DATA to the shared data folder)")
    return path


def test_banking77_intents_are_a_label_set_read_with_minilm(cli, tiny_model_dir):
    cfg, said, prepared, encoder = chosen(cli, shared_file(BANKING77), tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "category", ["text"], MINILM)
    assert "10,003 rows (csv)" in said and "'category' holds 77 distinct values that repeat" in said
    assert "labels: 77, 35 to 187 rows each" in said
    assert cfg.data.on_error == "fail" and "10,003 kept" in prepared  # nothing to set aside, none set aside


def test_korean_nsmc_reviews_read_the_review_with_e5_not_the_date(cli, tiny_model_dir):
    cfg, said, prepared, encoder = chosen(cli, shared_file(NSMC), tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "rating", ["review"], E5)
    assert "15,999 rows (jsonl)" in said and "'rating' holds 10 distinct numbers: each one a label" in said
    for name, why in (("review_id", "an id"), ("movie_id", "an id"), ("date", "dates"), ("stars_5", "numbers")):
        assert f"left out {name}: {why}" in said
    assert "mostly Hangul script" in said and "15,999 kept" in prepared


def test_amazon_products_category_leaves_out_urls_ids_and_prices(cli, tiny_model_dir):
    """The category path (196 values for 1,081 products, half of them on 1 or 2 rows): written out by the LLM,
    read from the product's text, never from its links, id or prices; the empty review cells are set aside."""
    cfg, said, prepared, encoder = chosen(cli, shared_file(PRODUCTS), tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "generation", "category", PRODUCT_TEXT, None)
    for name, why in NOT_PRODUCT_INPUTS + (("discounted_price_inr", "numbers"),):
        assert f"left out {name}: {why}" in said
    assert "rows the run sets aside" not in said  # 18 empty reviews: an empty string in the prompt
    assert cfg.data.on_error == "fail" and "1,081 kept" in prepared


def test_amazon_products_price_is_regression_and_the_empty_reviews_are_empty_text(cli, tiny_model_dir):
    """An earlier `run` stopped at '…csv:63: field 'review_content' is missing or empty'; an empty review is now an
    empty string in the prompt, and every product is kept."""
    cfg, said, prepared, encoder = chosen(cli, shared_file(PRODUCTS), tiny_model_dir, "--target",
                                          "discounted_price_inr")
    assert (cfg.data.task, cfg.data.target_field, encoder) == ("regression", "discounted_price_inr", MINILM)
    assert cfg.data.input_fields == ["product_name", "category", *PRODUCT_TEXT[1:]]
    for name, why in NOT_PRODUCT_INPUTS + (("discounted_price", "copies the target on 1,081 of 1,081 rows"),):
        assert f"left out {name}: {why}" in said
    assert "review_content: text, 878 distinct" in said and "18 empty" in said  # shown, and kept
    assert "rows the run sets aside" not in said and cfg.data.on_error == "fail" and "1,081 kept" in prepared


def test_korquad_is_extractive_qa_read_with_e5(cli, tiny_model_dir):
    cfg, said, prepared, encoder = chosen(cli, shared_file(KORQUAD), tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "qa", "answers", ["context", "question"], E5)
    assert "4,741 rows (squad)" in said and cfg.data.split.group_field == "title"
    assert "4,741 kept" in prepared
