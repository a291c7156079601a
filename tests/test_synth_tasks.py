"""Synthetic-data tasks with a fake LLM client at the seam, review round trip, and the kill test."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tunesmith.clients.calls import ChatReply
from tunesmith.config import validate_recipe
from tunesmith.errors import ConfigError, DataError
from tunesmith.synth.command import run_synth
from tunesmith.synth.review import export_review, import_review

from .chat_server import DummyChatServer
from .conftest import write_jsonl, write_recipe


class FakeClient:
    """Canned replies chosen by a function of the prompt; counts the calls it made."""

    endpoint, model = "fake", "fake-model"

    def __init__(self, reply):
        self.reply, self.calls, self.retries_done = reply, 0, 0

    def run(self, requests, on_result):
        for i, r in enumerate(requests):
            self.calls += 1
            on_result(i, ChatReply([self.reply(r.messages[-1][1], r)], 10, 5))


def recipe(tmp_path, synth: dict):
    return validate_recipe({"name": "s", "output_dir": str(tmp_path / "runs"), "synth": synth})


@pytest.fixture()
def fake(monkeypatch):
    holder = {}

    def install(reply):
        client = FakeClient(reply)
        monkeypatch.setattr("tunesmith.synth.command.make_client", lambda cfg, engine: client)
        holder["client"] = client
        return client

    return install


def test_paraphrase_keeps_answer_and_drops_near_duplicates(tmp_path, fake):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "How do I reset my PIN?", "answer": "In the app."}])
    fake(lambda prompt, r: json.dumps({"paraphrases": [
        "How can I change my PIN code?", "How do I reset my PIN?", "how do i reset my PIN", "What is the way to get a new PIN?"]}))
    res = run_synth(recipe(tmp_path, {"task": "paraphrase", "input": str(data), "paraphrase": {"n": 4}}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [i["question"] for i in items] == ["How can I change my PIN code?", "What is the way to get a new PIN?"]
    assert all(i["answer"] == "In the app." for i in items)
    rejected = [json.loads(x) for x in (res.out_dir / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 2 and all(r["reason"] == "paraphrase equal to the original" for r in rejected)


def test_unparseable_reply_is_retried_then_rejected_with_raw(tmp_path, fake):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q1?", "answer": "A"}])
    client = fake(lambda prompt, r: "Sure, here you go!")
    res = run_synth(recipe(tmp_path, {"task": "paraphrase", "input": str(data), "max_parse_attempts": 3}))
    assert res.items == 0 and client.calls == 3
    (rej,) = [json.loads(x) for x in (res.out_dir / "rejected.jsonl").read_text().splitlines()]
    assert rej["raw"] == "Sure, here you go!" and "3 attempt(s)" in rej["reason"]


def test_reply_missing_required_field_is_rejected(tmp_path, fake):
    data = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Explain what a PIN is."}])
    fake(lambda prompt, r: json.dumps({"text": "no prompt key"}))
    res = run_synth(recipe(tmp_path, {"task": "evol_instruct", "input": str(data), "max_parse_attempts": 1}))
    (rej,) = [json.loads(x) for x in (res.out_dir / "rejected.jsonl").read_text().splitlines()]
    assert "prompt: Field required" in rej["reason"]


def test_evol_instruct_eliminates_failed_evolutions(tmp_path, fake):
    rows = [{"instruction": t} for t in ["Explain what a PIN is.", "List three fruits.", "Describe the water cycle.",
                                         "Name a planet."]]
    data = write_jsonl(tmp_path / "i.jsonl", rows)
    replies = {
        "Explain what a PIN is.": "Explain what a PIN is, why banks require one, and how to choose a safe one.",
        "List three fruits.": "List three fruits.",  # unchanged
        "Describe the water cycle.": "I'm sorry, but I cannot help with that.",  # refusal
        "Name a planet.": "Given prompt: Name a planet.",  # copied instructions
    }
    fake(lambda prompt, r: json.dumps({"prompt": next(v for k, v in replies.items() if k in prompt)}))
    res = run_synth(recipe(tmp_path, {"task": "evol_instruct", "input": str(data)}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [i["instruction"] for i in items] == [replies["Explain what a PIN is."]]
    reasons = sorted(json.loads(x)["reason"] for x in (res.out_dir / "rejected.jsonl").read_text().splitlines())
    assert reasons == ["failed evolution (copied the rewriting instructions)", "failed evolution (refusal)",
                       "failed evolution (unchanged)"]


def test_preference_pairs_from_model_and_distractors(tmp_path, fake):
    rows = [{"prompt": "Capital of France?", "chosen": "Paris", "distractors": ["Lyon", "paris"]},
            {"prompt": "2+2?", "chosen": "4", "distractors": ["4."]}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    fake(lambda prompt, r: "Paris." if "France" in prompt else "5")
    res = run_synth(recipe(tmp_path, {"task": "preference_pairs", "input": str(data)}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [(i["prompt"], i["rejected"]) for i in items] == [("2+2?", "5")]  # "Paris." == "Paris" dropped
    res = run_synth(recipe(tmp_path, {"task": "preference_pairs", "input": str(data),
                                      "preference_pairs": {"rejected_from": "distractor"}}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [(i["prompt"], i["rejected"]) for i in items] == [("Capital of France?", "Lyon")]
    assert "no rejected answer" in (res.out_dir / "rejected.jsonl").read_text()


def test_seed_questions_retrieve_contexts_and_answer(tmp_path, fake):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("# domain words\n전세\n\ncash withdrawal\n")
    passages = write_jsonl(tmp_path / "ctx.jsonl", [
        {"text": "전세 계약 갱신 청구권은 임차인이 2년 연장을 요구할 수 있는 권리입니다."},
        {"text": "A fee of 2% applies to cash withdrawals abroad."},
        {"text": "Cards arrive within five working days."}])

    def reply(prompt, r):
        if "JSON" in prompt:
            return json.dumps({"questions": ["전세 계약 갱신은 어떻게 하나요?"] if "전세" in prompt else
                               ["Is there a fee for cash withdrawal abroad?", "Is there a fee for cash withdrawal abroad?"]})
        return "Answer from context."

    fake(reply)
    res = run_synth(recipe(tmp_path, {"task": "seed_questions", "input": str(seeds), "seed_questions": {
        "contexts": str(passages), "top_k": 1, "retriever": "bm25"}}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [i["seed"] for i in items] == ["전세", "cash withdrawal"]
    assert "2년 연장" in items[0]["contexts"][0] and "2%" in items[1]["contexts"][0]
    assert items[0]["context_scores"][0] > 0 and items[0]["answer"] == "Answer from context."
    assert "question repeated" in (res.out_dir / "rejected.jsonl").read_text()


def test_empty_seed_file_and_bad_chunking_config(tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("# only a comment\n\n")
    with pytest.raises(DataError, match="no seed words"):
        run_synth(recipe(tmp_path, {"task": "seed_questions", "input": str(seeds)}))
    with pytest.raises(ConfigError, match="overlap_tokens .* must be smaller"):
        recipe(tmp_path, {"task": "qa_from_documents", "input": "docs",
                          "qa_from_documents": {"chunk_tokens": 32, "overlap_tokens": 64}})


def test_review_round_trip(tmp_path, fake, cli):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": f"Question number {i}?", "answer": str(i)} for i in range(3)])
    fake(lambda prompt, r: json.dumps({"paraphrases": ["Totally different wording here?"]}))
    res = run_synth(recipe(tmp_path, {"task": "paraphrase", "input": str(data), "review_required": True}))
    assert (res.out_dir / "accepted.jsonl").read_text() == ""
    out = tmp_path / "review.csv"
    assert export_review(res.out_dir, out) == 3
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert {r["decision"] for r in rows} == {""}
    rows[0]["decision"], rows[1]["decision"] = "accept", "edit"
    rows[1]["edited_text"] = "An edited question?"
    rows[2]["decision"] = "reject"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    code, text = cli(["synth", "review", "import", str(res.out_dir.parent), str(out)])
    assert code == 0 and "accepted: 1, edited: 1, rejected: 1" in text
    accepted = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [a["question"] for a in accepted] == ["Totally different wording here?", "An edited question?"]
    rows[0]["decision"] = "maybe"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match=r"review.csv:2: decision 'maybe'"):
        import_review(res.out_dir, out)


def paraphrase_reply(messages):
    q = messages[-1]["content"].split("Question: ")[1].split("\n")[0]
    return json.dumps({"paraphrases": [f"Put differently: {q[::-1]}"]})


def test_kill_midway_then_rerun_makes_each_call_once(tmp_path):
    """SIGKILL a running synth job; the rerun re-issues only the calls that never completed."""
    n = 24
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": f"What is item {i}?", "answer": str(i)} for i in range(n)])
    with DummyChatServer(paraphrase_reply, latency_s=0.3) as server:
        r = write_recipe(tmp_path / "r.yaml", {
            "name": "kill", "output_dir": str(tmp_path / "runs"),
            "synth": {"task": "paraphrase", "input": str(data), "paraphrase": {"n": 1},
                      "provider": {"kind": "openai", "base_url": server.base_url, "model": "dummy",
                                   "api_key_env": None, "concurrency": 2}}})
        cmd = [sys.executable, "-c", "import sys; from tunesmith.cli import main; sys.exit(main(sys.argv[1:]))",
               "synth", str(r)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        deadline = time.time() + 120
        while server.total_completed < 8 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.15)  # mid-flight: the next pair of calls is being answered
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first_run = server.total_completed
        assert 8 <= first_run < n, first_run
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        assert done.returncode == 0, done.stdout + done.stderr
        assert server.total_completed == n  # every distinct request completed exactly once overall
        assert max(server.completed.values()) == 1
        stats = json.loads((tmp_path / "runs/kill/synth/stats.json").read_text())
        assert stats["cache_hits"] == first_run and stats["calls_made"] == n - first_run
        again = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        assert again.returncode == 0 and server.total_completed == n  # a finished job makes zero calls


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def blank_pdf(path):
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(width=200, height=200)
    with open(path, "wb") as fh:
        w.write(fh)
    return path


def test_qa_from_documents_keeps_grounded_pairs_with_their_source(tmp_path, fake, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "policy.txt").write_text("Refunds are issued within 14 days. Accounts can be closed from the settings page.")
    blank_pdf(docs / "scan.pdf")
    fake(lambda prompt, r: json.dumps({"pairs": [
        {"question": "When are refunds issued?", "answer": "within 14 days"},
        {"question": "Who is the CEO?", "answer": "Jane Doe"}]}))
    res = run_synth(recipe(tmp_path, {"task": "qa_from_documents", "input": str(docs), "provider": {
        "model": str(tiny_model_dir)}, "qa_from_documents": {"chunk_tokens": 64, "overlap_tokens": 8}}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [(i["question"], i["answer"]) for i in items] == [("When are refunds issued?", "within 14 days")]
    assert items[0]["source_file"].endswith("policy.txt") and items[0]["chunk_id"] and items[0]["grounded"]
    rejected = (res.out_dir / "rejected.jsonl").read_text()
    assert "not a span of its chunk" in rejected and "scan.pdf" in rejected and "no extractable text" in rejected


def test_only_textless_pdfs_is_a_clear_error(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    blank_pdf(docs / "scan.pdf")
    with pytest.raises(DataError, match=r"no document text.*scan\.pdf"):
        run_synth(recipe(tmp_path, {"task": "qa_from_documents", "input": str(docs),
                                    "provider": {"model": str(tiny_model_dir)}}))


@pytest.mark.skipif(not (SHARED / "documents").is_dir(), reason="../shared/data is not present in this clone")
def test_korean_pdf_chunks_keep_their_page(tmp_path, fake, tiny_model_dir):
    pdf = SHARED / "documents" / "korquad_2.0_paper_ko.pdf"
    seen = []

    def reply(prompt, r):  # answer with a span of the chunk, as a grounded model would
        seen.append(prompt)
        chunk = prompt.split("글:\n", 1)[1].split("\n\n다음 형식", 1)[0]
        span = re.search(r"[가-힣]+(?: [가-힣]+)+", chunk).group()[:20]  # Korean words (the script gate)
        return json.dumps({"pairs": [{"question": "무엇에 관한 글인가요?", "answer": span}]})

    fake(reply)
    res = run_synth(recipe(tmp_path, {"task": "qa_from_documents", "input": str(pdf), "language": "ko", "limit": 3,
                                      "provider": {"model": str(tiny_model_dir)}}))
    assert len(seen) == 3 and all("다음 글을 읽고" in p for p in seen)
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert len(items) == 3 and all(i["source_file"].endswith(".pdf") and i["page"] >= 1 for i in items)
    assert all(i["answer"] in i["context"] for i in items)


def test_cloze_pairs_need_no_model_and_are_grounded(tmp_path, fake):
    """method: cloze blanks a span out of each sentence (a number first, then a name, else the closing
    words); no model is called, every answer is a span of its chunk, a sentence is asked about once."""
    from tunesmith.synth.cloze import cloze_pairs

    docs = tmp_path / "docs"
    docs.mkdir()
    text = ("Refunds are issued within 30 days of purchase by the billing team.\n"
            "Please read the [Community Guidelines](https://example.com/g) before you post anything here.\n"
            "You must not use the service to send unsolicited bulk messages to other users.\n"
            "Short.\n")
    (docs / "policy.md").write_text(text)
    client = fake(lambda prompt, r: pytest.fail("cloze must not call the model"))
    res = run_synth(recipe(tmp_path, {"task": "qa_from_documents", "input": str(docs),
                                      "qa_from_documents": {"method": "cloze", "pairs_per_chunk": 5}}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert client.calls == 0
    answers = {i["answer"]: i["question"] for i in items}
    assert set(answers) == {"30 days", "Community Guidelines", "other users"}
    assert answers["30 days"] == 'Which words fill the blank in "Refunds are issued within ___ of purchase by the billing team."?'
    assert all(i["grounded"] and "___" in i["question"] for i in items)
    seen: set[str] = set()
    assert len(cloze_pairs(text, 5, "en", 0, seen)) == 3 and cloze_pairs(text, 5, "en", 0, seen) == []
    ko = cloze_pairs("환불은 구매 후 30일 이내에 처리됩니다. 고객센터에 문의하면 담당자가 환불 절차를 안내합니다.", 5, "ko")
    assert {p["answer"] for p in ko} == {"30일", "고객센터"}  # the number with its unit; a particle stripped
    assert all(p["question"].endswith("?") for p in ko)


def test_every_synth_task_a_recipe_can_name_is_registered():
    from typing import get_args

    from tunesmith.config import SynthSection
    from tunesmith.synth import generators as tasks

    assert tasks.names() == sorted(get_args(SynthSection.model_fields["task"].annotation))
    assert tasks.reads_train_split() == ["paraphrase", "preference_pairs"]
    with pytest.raises(ConfigError, match="unknown task 'summaries'; known: evol_instruct, paraphrase"):
        tasks.synth_task("summaries")


def test_preference_pairs_in_a_run_read_the_train_split_and_become_dpo_pairs(tmp_path, fake):
    """Without a synth.input the task reads the arm's train split: its rendered prompt, its answer as chosen."""
    from rich.console import Console

    from tunesmith.records import Example
    from tunesmith.synth.stage import augment

    run = validate_recipe({"name": "p", "output_dir": str(tmp_path / "runs"),
                           "data": {"path": str(tmp_path / "d.jsonl"), "task": "generation", "input_fields": ["question"],
                                    "target_field": "answer", "prompt": "Q: {question}"},
                           "synth": {"task": "preference_pairs"}})
    train = [Example(f"e{i}", {"question": f"What is {i} + {i}?"}, str(2 * i), {}) for i in range(3)]
    fake(lambda prompt, r: "I do not know" if "1 + 1" not in prompt else "2")  # equal to the reference: dropped
    grown = augment(run, run, train, [], Console(quiet=True))
    pairs = [json.loads(x) for x in grown.dpo_pairs.read_text().splitlines()]
    assert grown.examples == [] and grown.summary["preference pairs made"] == 2
    assert [p["chosen"] for p in pairs] == ["0", "4"] and {p["rejected"] for p in pairs} == {"I do not know"}
    assert pairs[0]["prompt"][-1] == {"role": "user", "content": "Q: What is 0 + 0?"}
