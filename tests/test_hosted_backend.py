"""`tunesmith train RECIPE --backend openai` end to end against `tunesmith serve` on 127.0.0.1:
the same code path a user runs against OpenAI's hosted fine-tuning."""

import csv
import json
import threading

from tunesmith.serve.jobs.worker import work

from .conftest import banking_rows, write_jsonl, write_recipe
from .test_serve_jobs import live  # noqa: F401  (the live-server fixture)


def test_hosted_backend_trains_through_the_jobs_api(cli, tmp_path, live, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HOSTED_TEST_KEY", "k1")
    threading.Thread(target=work, args=(live["data_dir"],), daemon=True).start()  # the server's worker
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked", "age_limit"), 12))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "hosted", "output_dir": str(tmp_path / "runs"), "model": {"name": live["base"]},
        "data": {"path": str(data), "input_fields": ["text"], "target_field": "category", "system_prompt": "Classify.",
                 "split": {"train": 24, "val": 4, "test": 8}},
        "hosted": {"base_url": live["url"], "api_key_env": "HOSTED_TEST_KEY", "n_epochs": 1, "batch_size": 4,
                   "suffix": "hosted", "poll_s": 0.2},
    })
    code, out = cli(["train", str(recipe), "--backend", "openai"])
    assert code == 0, out
    run = tmp_path / "runs" / "hosted" / "train"
    job = json.loads((run / "hosted" / "job.json").read_text())
    assert job["fine_tuned_model"].startswith(f"ft:{live['base']}:hosted:ftjob-")
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["train_loss"]  # 24 examples / batch 4, one epoch
    assert (run / "loss.png").stat().st_size > 1000
    assert sum(1 for _ in open(run / "hosted" / "train.jsonl")) == 24
