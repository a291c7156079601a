"""The example evaluation recipes run on the real shared data (KorQuAD, NSMC, Amazon India) with the tiny
model standing in for SmolLM2; skipped when ../shared/data is not there."""

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TUNESMITH_SHARED_DATA", REPO.parent / "shared" / "data"))
CASES = {
    "eval_korquad_qa.yaml": (
        "korquad/korquad_v1_dev_shared.json",
        "f1",
        ["data.split.train=20", "data.split.test=20"],
    ),
    "eval_nsmc_stars.yaml": (
        "reviews_ko_nsmc/nsmc_reviews_shared.jsonl",
        "accuracy",
        ["data.limit=400", "data.split.train=100"],
    ),
    "eval_amazon_price.yaml": ("products_amazon_in/amazon_in_products_shared.csv", "mae", []),
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_example_recipe_on_real_data(cli, tmp_path, tiny_model_dir, recipe):
    rel, headline, extra = CASES[recipe]
    if not (SHARED / rel).is_file():
        pytest.skip(f"shared data not found: {SHARED / rel}")
    sets = [
        f"model.name={tiny_model_dir}",
        f"output_dir={tmp_path}",
        "eval.max_examples=6",
        "eval.bootstrap=100",
        f"data.path={SHARED / rel}",
        "eval.max_new_tokens=4",
        *extra,
    ]
    args = ["eval", str(REPO / "examples" / recipe)]
    for s in sets:
        args += ["--set", s]
    code, out = cli(args)
    assert code == 0, out
    run = next(p for p in tmp_path.iterdir() if (p / "eval").is_dir())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert "base" in metrics and all(m["n"] == 6 for m in metrics.values())
    assert all(headline in m for m in metrics.values())
    assert (run / "eval" / "report.html").stat().st_size > 5000
