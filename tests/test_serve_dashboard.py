"""The dashboard in headless Chromium against a live server with API keys: a job created from the page
reaching 'succeeded' with its loss chart, the playground streaming into both panes, a recorded run's
report with two runs' headline tables side by side, one key never seeing another key's jobs, and a classifier
head's label probabilities drawn as bars in the playground.

Every request the page makes must go to the server itself. (The screenshots in docs/serve.md come from
scripts/dashboard_screenshots.py.)
"""

import json
import math
import shutil
import threading
from pathlib import Path

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.jobs.worker import work

from .conftest import running_server
from .test_serve_head_logprobs import train_intent_head
from .test_serve_jobs import chat_jsonl

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")
RUNS = Path(__file__).parent / "data" / "dashboard_runs"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def dash(tiny_model_dir, tmp_path_factory):
    """The server, with a trained classifier head served beside the base model (as `--adapter intents=...`)."""
    data_dir = tmp_path_factory.mktemp("dash-data")
    head = train_intent_head(tmp_path_factory.mktemp("dash-head"), tiny_model_dir)
    engine = Engine(str(tiny_model_dir), {"intents": str(head)}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1", "k2"}), data_dir=data_dir, runs_dir=RUNS)
    with running_server(create_app(settings, engine)) as url:
        yield {"url": url, "root": url.removesuffix("/v1") + "/", "base": str(tiny_model_dir), "data_dir": data_dir,
               "head": "intents"}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def open_page(browser, dash):
    """A fresh browser context; every request it makes is recorded and must stay on the server."""
    contexts, seen = [], []

    def _open(key: str | None = "k1", width: int = 1280, height: int = 800):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.on("request", lambda r: seen.append(r.url))
        page.goto(dash["root"])
        if key:
            page.fill("#key", key)
            page.click("#key-form button[type=submit]")
            page.wait_for_selector("#key-gate", state="hidden")
        return page

    yield _open
    for context in contexts:
        context.close()
    origin = dash["root"].rstrip("/")
    assert seen and all(u.startswith((origin + "/", "data:", "blob:", "about:")) for u in seen), seen


def api(dash, key="k1"):
    return openai.OpenAI(base_url=dash["url"], api_key=key, max_retries=0)


def test_job_created_from_the_page_reaches_succeeded_with_a_loss_chart(dash, open_page):
    page = open_page()
    page.goto(dash["root"] + "#/jobs")
    page.wait_for_selector("#new-job")
    before = len(api(dash).fine_tuning.jobs.list().data)
    valid = b"".join(chat_jsonl(28).splitlines(keepends=True)[16:20])
    page.set_input_files('input[name="training_file_upload"]', files=[
        {"name": "train.jsonl", "mimeType": "application/jsonl", "buffer": chat_jsonl(16)}])
    page.set_input_files('input[name="validation_file_upload"]', files=[
        {"name": "valid.jsonl", "mimeType": "application/jsonl", "buffer": valid}])
    page.fill('input[name="n_epochs"]', "0")  # out of range: the API's own message, next to the field
    page.fill('input[name="batch_size"]', "4")
    page.fill('input[name="suffix"]', "dash")
    page.click("#new-job button[type=submit]")
    error = page.wait_for_selector('[data-error-for="n_epochs"]:not([hidden])')
    assert "n_epochs must be at least 1" in error.inner_text()
    assert page.get_attribute('[data-field="n_epochs"]', "class").endswith("invalid")
    assert len(api(dash).fine_tuning.jobs.list().data) == before  # refused before any job existed

    page.fill('input[name="n_epochs"]', "2")
    page.click("#new-job button[type=submit]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("[data-queue]")  # queued: its place in the queue is shown
    files = {f.filename for f in api(dash).files.list().data}
    assert {"train.jsonl", "valid.jsonl"} <= files  # uploaded once each, although the form was sent twice
    assert sorted(f.filename for f in api(dash).files.list().data).count("train.jsonl") == 1

    worker = threading.Thread(target=work, args=(dash["data_dir"],), kwargs={"once": True}, daemon=True)
    worker.start()
    page.wait_for_selector('h1 + div [data-status="succeeded"]', timeout=240_000)
    page.wait_for_selector("svg.loss polyline.train")
    points = page.get_attribute("svg.loss polyline.train", "points").split()
    assert len(points) == 8  # 16 rows / batch 4 x 2 epochs: one point per step
    assert page.inner_text("#ft-model") == f"ft:{dash['base']}:dash:{job_id}"
    with page.expect_download() as download:
        page.click("[data-results]")
    csv_lines = Path(download.value.path()).read_text().splitlines()  # decoded from OpenAI's base64
    assert csv_lines[0].startswith("step,train_loss") and len(csv_lines) == 9
    assert "The job has successfully completed" in page.inner_text("#events")
    report = page.frame_locator("iframe.report")
    report.locator("table").first.wait_for(timeout=30_000)
    assert "finetuned" in report.locator("body").inner_text()
    worker.join(60)


def test_playground_streams_into_both_panes(dash, open_page):
    page = open_page()
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(dash["root"] + "#/playground")
    page.wait_for_selector("#prompt")
    page.fill("#prompt", "my card has not arrived yet")
    for pane, temperature, tokens in (("A", "0", "6"), ("B", "0.8", "10")):
        page.select_option(f'[data-pane="{pane}"] select[name="model"]', dash["base"])
        page.fill(f'[data-pane="{pane}"] input[name="temperature_text"]', temperature)
        page.dispatch_event(f'[data-pane="{pane}"] input[name="temperature_text"]', "change")
        page.fill(f'[data-pane="{pane}"] input[name="max_tokens"]', tokens)
    page.fill('[data-pane="B"] textarea[name="system"]', "Classify the message.")
    page.fill('[data-pane="B"] input[name="seed"]', "7")  # the sampled side, made repeatable
    page.click("#send")
    for pane in ("A", "B"):
        page.wait_for_selector(f'[data-out="{pane}"][data-done]', state="attached", timeout=60_000)
    chunks = {p: int(page.get_attribute(f'[data-out="{p}"]', "data-chunks")) for p in ("A", "B")}
    assert chunks["A"] >= 2 and chunks["B"] >= 2, chunks  # text arrived piece by piece in both panes
    assert "tokens in" in page.inner_text('[data-stats="A"]') and "tokens in" in page.inner_text('[data-stats="B"]')
    a, b = sorted(bodies, key=lambda x: len(x["messages"]))
    assert a["stream"] and b["stream"]
    assert (a["temperature"], a["max_tokens"], [m["role"] for m in a["messages"]]) == (0, 6, ["user"])
    assert (b["temperature"], b["max_tokens"], [m["role"] for m in b["messages"]]) == (0.8, 10, ["system", "user"])
    assert "seed" not in a and b["seed"] == 7


def test_playground_shows_a_classifier_heads_label_probabilities_as_bars(dash, open_page):
    page = open_page()
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(dash["root"] + "#/playground?model=" + dash["head"])
    page.wait_for_selector("#prompt")
    assert page.input_value('[data-pane="B"] select[name="model"]') == dash["head"]
    assert "classifier head" in page.inner_text(f'[data-pane="B"] option[value="{dash["head"]}"]')
    page.fill('[data-pane="A"] input[name="max_tokens"]', "4")
    text = "I still have not received my new card, when will it arrive?"
    page.fill("#prompt", text)
    page.click("#send")
    for pane in ("A", "B"):
        page.wait_for_selector(f'[data-out="{pane}"][data-done]', state="attached", timeout=60_000)
    rows = page.eval_on_selector_all('[data-probs="B"] li', """lis => lis.map(li => ({
        label: li.dataset.label || null, pct: li.querySelector('.pct').textContent,
        width: li.querySelector('.bar i').getBoundingClientRect().width,
        track: li.querySelector('.bar').getBoundingClientRect().width}))""")
    answer = page.inner_text('[data-out="B"]')
    truth = api(dash).chat.completions.create(model=dash["head"], messages=[{"role": "user", "content": text}],
                                              logprobs=True, top_logprobs=20).choices[0].logprobs.content[0]
    assert answer == truth.token and rows[0]["label"] == answer  # the answer is the longest bar, on top
    assert [r["label"] for r in rows] == [t.token for t in truth.top_logprobs]  # 3 labels: all shown, no "other"
    for row, t in zip(rows, truth.top_logprobs, strict=True):
        assert row["pct"] == f"{100 * math.exp(t.logprob):.1f}%"
        assert row["width"] == pytest.approx(row["track"] * math.exp(t.logprob), abs=1.5)  # the bar is to scale
    assert page.is_hidden('[data-probs="A"]') and not page.query_selector('[data-probs="A"] li')  # a generating model
    head_body = next(b for b in bodies if b["model"] == dash["head"])
    assert head_body["logprobs"] is True and head_body["top_logprobs"] == 5 and head_body["stream"]
    assert not any("logprobs" in b for b in bodies if b["model"] != dash["head"])
    narrow = open_page(width=390, height=844)
    narrow.goto(dash["root"] + "#/playground?model=" + dash["head"])
    narrow.fill("#prompt", text)
    narrow.click("#send")
    narrow.wait_for_selector('[data-probs="B"] li .bar i')
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 390


def test_run_page_shows_the_report_and_two_headline_tables_side_by_side(dash, open_page):
    page = open_page()
    response = page.goto(dash["root"])
    assert "default-src 'self'" in response.headers["content-security-policy"]
    row = page.wait_for_selector('#runs tr[data-run="intents-system-prompt"]')
    assert row.query_selector('[data-verdict="worse"]') and "tfidf_svm" in row.inner_text()
    assert page.query_selector('#runs tr[data-run="intents-generation"]')
    row.click()
    page.wait_for_selector('table.headline[data-run="intents-system-prompt"]')
    report = page.frame_locator("iframe.report")
    assert "fine-tuning report" in report.locator("h1").inner_text()
    report.locator("img").first.wait_for()
    widths = report.locator("img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) >= 4 and min(widths) > 100  # the report's embedded charts render
    page.select_option("#compare", "intents-generation")
    other = page.wait_for_selector('#compare-table table.headline[data-run="intents-generation"]')
    assert "chrf" in other.inner_text().lower()
    left = page.query_selector('table.headline[data-run="intents-system-prompt"]').bounding_box()
    right = other.bounding_box()
    assert right["x"] > left["x"] + left["width"] - 1 and abs(right["y"] - left["y"]) < 80  # side by side at 1280
    assert page.url.endswith("#/runs/intents-system-prompt?compare=intents-generation")
    narrow = open_page(width=390, height=844)
    narrow.goto(dash["root"] + "#/runs/intents-system-prompt?compare=intents-generation")
    narrow.wait_for_selector('#compare-table table.headline[data-run="intents-generation"]')
    narrow.frame_locator("iframe.report").locator("table").first.wait_for()
    boxes = [narrow.query_selector(f'table.headline[data-run="{r}"]').bounding_box()
             for r in ("intents-system-prompt", "intents-generation")]
    assert boxes[1]["y"] > boxes[0]["y"] + boxes[0]["height"]  # stacked at 390
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone


def test_a_second_key_sees_none_of_the_first_keys_jobs(dash, open_page):
    c1 = api(dash, "k1")
    f = c1.files.create(file=("k1-only.jsonl", chat_jsonl(12)), purpose="fine-tune")
    job = c1.fine_tuning.jobs.create(model=dash["base"], training_file=f.id, suffix="mine")
    k1_models = {m.id for m in c1.models.list().data} - {m.id for m in api(dash, "k2").models.list().data}

    page = open_page(key=None)
    page.wait_for_selector("#key-gate:not([hidden])")  # the page asks for a key before showing anything
    page.fill("#key", "not-a-key")
    page.click("#key-form button[type=submit]")
    assert "did not accept" in page.wait_for_selector("#key-error:not([hidden])").inner_text()
    page.fill("#key", "k2")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-gate", state="hidden")
    page.goto(dash["root"] + "#/jobs")
    page.wait_for_selector("#files tbody tr")  # the first poll has answered
    assert page.query_selector("tr[data-job]") is None and page.is_visible("#nojobs")
    assert page.query_selector(f'tr[data-file="{f.id}"]') is None
    assert f.id not in page.inner_html('select[name="training_file"]')
    page.goto(dash["root"] + f"#/jobs/{job.id}")
    assert "No such fine-tuning job" in page.wait_for_selector("#job-missing").inner_text()
    page.goto(dash["root"] + "#/playground")
    page.wait_for_selector('[data-pane="A"] select[name="model"]')
    options = page.eval_on_selector_all('[data-pane="A"] select[name="model"] option', "os => os.map(o => o.value)")
    assert options and not set(options) & k1_models

    # the same page with the first key sees the job, and pauses, resumes and cancels it
    page.click("#key-change")
    page.fill("#key", "k1")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-gate", state="hidden")
    page.goto(dash["root"] + f"#/jobs/{job.id}")
    page.wait_for_selector('h1 + div [data-status="queued"]')
    page.click('[data-action="pause"]')
    page.wait_for_selector('h1 + div [data-status="paused"]')
    page.click('[data-action="resume"]')
    page.wait_for_selector('h1 + div [data-status="queued"]')
    page.click('[data-action="cancel"]')
    assert page.inner_text('[data-action="cancel"]') == "Confirm cancel"  # cancelling asks once more
    page.click('[data-action="cancel"]')
    page.wait_for_selector('h1 + div [data-status="cancelled"]')
    assert c1.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
