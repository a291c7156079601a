"""Screenshots of the dashboard for docs/serve.md, taken in headless Chromium against a live server.

The server runs the embedded model with one API key and the recorded runs of the dashboard tests;
a job is created from the page on BANKING77 rows from examples/data and trained by the jobs worker,
then the fine-tuned model is compared with the base model in the playground. Minutes on two CPU
cores (training and the evaluation's generation are the slow part).

    python scripts/dashboard_screenshots.py [--out docs/images] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SYSTEM = "Classify the customer message into one banking intent."
KEY = "demo-key"


def chat_files(folder: Path, per_label_train: int, per_label_valid: int) -> tuple[Path, Path]:
    """Chat JSONL train and validation files from the example BANKING77 CSV (first rows of each intent)."""
    by_label: dict[str, list[str]] = {}
    with open(REPO / "examples" / "data" / "banking77_10intents.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_label.setdefault(row["category"], []).append(row["text"])

    def line(text: str, label: str) -> str:
        return json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                                        {"role": "assistant", "content": label}]}) + "\n"

    train, valid = folder / "banking-train.jsonl", folder / "banking-valid.jsonl"
    train.write_text("".join(line(t, lab) for lab, ts in by_label.items() for t in ts[:per_label_train]))
    valid.write_text("".join(line(t, lab) for lab, ts in by_label.items()
                             for t in ts[per_label_train:per_label_train + per_label_valid]))
    return train, valid


def train_from_page(page, settings, work, out: Path) -> str:
    """Send the job form, train the job with the worker, screenshot the finished job; its model's name."""
    page.fill('input[name="n_epochs"]', "2")
    page.click("#new-job button[type=submit]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    worker = threading.Thread(target=work, args=(settings.data_dir,), kwargs={"once": True}, daemon=True)
    worker.start()
    page.wait_for_selector('h1 + div [data-status="succeeded"]', timeout=1_800_000)
    page.frame_locator("iframe.report").locator("table").first.wait_for()
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / "dashboard-job.png"), full_page=True)
    worker.join(60)
    return page.inner_text("#ft-model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=Path, default=REPO / "tests" / "data" / "dashboard_runs")
    ap.add_argument("--skip-job", action="store_true", help="no job: the playground compares the base model "
                    "without and with the system prompt (a minute instead of many)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from tunesmith.models.names import resolve
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.jobs.worker import work
    from tunesmith.serve.launch import serve_in_thread

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-shots-"))
    train, valid = chat_files(tmp, 2, 1)  # 20 and 10 rows: ten training steps, quick on a busy CPU
    resolve(args.model)  # fails early when the model is not installed
    settings = ServeSettings(model=args.model, api_keys=frozenset({KEY}), data_dir=tmp / "data", runs_dir=args.runs)
    server, root = serve_in_thread(create_app(settings))
    root += "/"  # the engine loads the model as the server starts
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(root)
            page.fill("#key", KEY)
            page.click("#key-form button[type=submit]")
            page.wait_for_selector("#runs tr[data-run]")
            page.screenshot(path=str(args.out / "dashboard-experiments.png"))
            page.goto(root + "#/runs/intents-system-prompt?compare=intents-generation")
            page.frame_locator("iframe.report").locator("table").first.wait_for()
            page.wait_for_selector("#compare-table table")
            page.screenshot(path=str(args.out / "dashboard-run.png"))

            page.goto(root + "#/jobs")
            page.set_input_files('input[name="training_file_upload"]', str(train))
            page.set_input_files('input[name="validation_file_upload"]', str(valid))
            page.fill('input[name="n_epochs"]', "0")
            page.fill('input[name="batch_size"]', "4")
            page.fill('input[name="suffix"]', "banking")
            page.click("#new-job button[type=submit]")
            page.wait_for_selector('[data-error-for="n_epochs"]:not([hidden])')
            page.wait_for_timeout(2500)  # the files list has caught up
            page.screenshot(path=str(args.out / "dashboard-new-job.png"))
            tuned = settings.model if args.skip_job else train_from_page(page, settings, work, args.out)

            page.goto(root + "#/playground?model=" + tuned)
            page.wait_for_selector("#prompt")
            page.fill("#prompt", "I ordered a card two weeks ago and it still has not arrived. What should I do?")
            page.fill('[data-pane="B"] textarea[name="system"]', SYSTEM)
            page.fill('[data-pane="A"] input[name="max_tokens"]', "40")
            page.fill('[data-pane="B"] input[name="max_tokens"]', "40")
            page.fill('[data-pane="B"] input[name="seed"]', "1")
            page.click("#send")
            for pane in ("A", "B"):
                page.wait_for_selector(f'[data-out="{pane}"][data-done]', state="attached", timeout=300_000)
            page.screenshot(path=str(args.out / "dashboard-playground.png"))

            if not args.skip_job:
                page.set_viewport_size({"width": 390, "height": 844})
                page.goto(root + "#/jobs")
                page.wait_for_selector("#jobs tr[data-job]")
                page.screenshot(path=str(args.out / "dashboard-jobs-390.png"))
            browser.close()
    finally:
        server.should_exit = True
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots in {args.out}")


if __name__ == "__main__":
    main()
