"""The dashboard in headless Chromium: create a job through the API, watch it reach 'succeeded',
open its evaluation report."""

import shutil
import threading
from pathlib import Path

import openai
import pytest

from tunesmith.serve.worker import work

from .test_serve_jobs import chat_jsonl, live  # noqa: F401  (the live-server fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")


def test_dashboard_shows_a_job_reaching_succeeded(live, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    c = openai.OpenAI(base_url=live["url"], api_key="k2", max_retries=0)
    f = c.files.create(file=("dash.jsonl", chat_jsonl(16)), purpose="fine-tune")
    v = c.files.create(file=("dash-valid.jsonl", b"".join(chat_jsonl(28).splitlines(keepends=True)[16:])), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=f.id, validation_file=v.id, suffix="dash", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}})
    root = live["url"].removesuffix("/v1") + "/"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 700})
        page.goto(root)
        page.fill("#key", "k2")
        page.dispatch_event("#key", "change")
        page.wait_for_selector(f'tr[data-job="{job.id}"] [data-status="queued"]', timeout=30_000)
        worker = threading.Thread(target=work, args=(live["data_dir"],), kwargs={"once": True}, daemon=True)
        worker.start()
        page.wait_for_selector(f'tr[data-job="{job.id}"] [data-status="succeeded"]', timeout=180_000)
        page.wait_for_function("document.querySelectorAll('svg.loss polyline').length > 0", timeout=30_000)
        page.wait_for_selector(f'a[data-report="{job.id}"]', timeout=30_000)
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        models = page.inner_text("#models")
        with page.context.expect_page() as opened:
            page.click(f'a[data-report="{job.id}"]')
        report = opened.value
        report.wait_for_selector("table", timeout=30_000)
        report_text = report.inner_text("body")
        charts = report.eval_on_selector_all("img", "imgs => imgs.filter(i => i.naturalWidth > 100).length")
        browser.close()
    worker.join(60)
    assert shot.stat().st_size > 10_000
    assert f"ft:{live['base']}:dash:{job.id}" in models
    assert "base" in report_text and "finetuned" in report_text and "chrf" in report_text.lower()
    assert charts >= 1  # the embedded charts render
