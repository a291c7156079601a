"""The experiments API behind the dashboard: recorded run folders → summaries, headline tables, reports."""

import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from tunesmith.runs.folders import list_runs
from tunesmith.serve.app import ServeSettings, create_app

RUNS = Path(__file__).parent / "data" / "dashboard_runs"


def test_summaries_name_the_best_arm_the_best_baseline_and_the_verdict(tmp_path):
    runs = {r["id"]: r for r in list_runs(RUNS)}
    cls = runs["intents-system-prompt"]
    assert (cls["task"], cls["headline_metric"]) == ("classification", "accuracy")
    assert cls["best_baseline"] == {"name": "tfidf_svm", "display": "91.7%"}
    assert cls["best"]["name"] in ("system", "no-system") and cls["verdict"] == "worse"
    assert cls["difference"] == "-58.3% [-83.3%, -33.3%]"
    gen = runs["intents-generation"]
    assert gen["headline_metric"] == "chrf" and gen["best_baseline"] is None and gen["verdict"] is None
    # a run with a broken config or no evaluation yet is still listed, and hides no other run
    shutil.copytree(RUNS, tmp_path / "runs")
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "config.resolved.yaml").write_text("name: [unclosed")
    (tmp_path / "runs" / "not-a-run").mkdir()
    listed = {r["id"]: r for r in list_runs(tmp_path / "runs")}
    assert set(listed) == {"intents-system-prompt", "intents-generation", "broken"}
    assert listed["broken"]["evaluated"] is False and listed["broken"]["has_report"] is False


def test_runs_routes_need_a_key_and_never_take_a_name_as_a_path(tmp_path):
    settings = ServeSettings(api_keys=frozenset({"k"}), data_dir=tmp_path / "data", runs_dir=RUNS)
    client = TestClient(create_app(settings, engine=object()))
    auth = {"Authorization": "Bearer k"}
    assert client.get("/v1/runs").status_code == 401
    assert [r["id"] for r in client.get("/v1/runs", headers=auth).json()["data"]]
    run = client.get("/v1/runs/intents-system-prompt", headers=auth).json()
    assert [row["contender"] for row in run["table"]] == ["base", "system", "no-system", "majority", "tfidf_svm"]
    assert {row["kind"] for row in run["table"]} == {"base", "fine-tuned", "baseline"}
    report = client.get("/v1/runs/intents-system-prompt/report", headers=auth)
    assert report.status_code == 200 and "fine-tuning report" in report.text
    for name in ("..", "%2e%2e", "..%2Fintents-system-prompt", "README.md"):
        assert client.get(f"/v1/runs/{name}", headers=auth).status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("dashboard.js", "dashboard.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in client.get("/static/dashboard.js").text.replace("http://www.w3.org/2000/svg", "")
