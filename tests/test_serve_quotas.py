"""Per-key quotas and OpenAI's metadata rule, through the official client against a live server.

Each quota reached is a 429 ``quota_exceeded`` (type ``insufficient_quota``, ``x-should-retry: false``) naming the
quota, the key's use and how to make room, while another key goes on unaffected and the key itself goes on once it
has made room; the sweep deletes an expired upload's parts from disk without the upload being touched, and an
expired file; metadata with 17 pairs, a 65-character key or a 513-character value is a 400 naming the field on every
object that takes metadata.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from tunesmith.serve.errors import APIError
from tunesmith.serve.store import Store
from tunesmith.serve.store.quotas import Quotas, check_batch_create

from .conftest import tiny_server

KEYS = ("files", "bytes", "uploads", "batch", "stored", "responses", "evals", "meta", "other")
QUOTAS = Quotas(files=3, file_bytes=4096, pending_uploads=2, stored_completions=2, responses=2, evals=2, eval_runs=2,
                batch_requests=3, batch_file_bytes=2048, sweep_s=0.2)
SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}}}
EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}
ROWS = {"type": "jsonl", "source": {"type": "file_content", "content": [
    {"item": {"question": "q", "answer": "a"}, "sample": {"output_text": "a"}}]}}


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("quotas")
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset(KEYS), quotas=QUOTAS) as url:
        yield {"url": url, "base": str(tiny_model_dir), "data_dir": data_dir}


def client(live, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live["url"], api_key=key, max_retries=2)


def refused(exc, name: str, used: str) -> None:
    """``exc`` is the quota refusal of ``name`` with the key's use: a 429 the client does not retry."""
    err = exc.value
    assert err.status_code == 429 and err.body["code"] == "quota_exceeded" and err.body["type"] == "insufficient_quota"
    assert f"Quota {name} reached" in err.body["message"] and used in err.body["message"], err.body
    assert f"--quota {name}=" in err.body["message"] and err.response.headers["x-should-retry"] == "false"


def evals_file(n: int = 1) -> bytes:
    return b"".join(json.dumps({"item": {"question": f"q{i}", "answer": "a"}}).encode() + b"\n" for i in range(n))


def test_files_quota_counts_files_and_frees_on_delete(live):
    c = client(live, "files")
    made = [c.files.create(file=(f"f{i}.jsonl", evals_file()), purpose="evals") for i in range(3)]
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as exc:
        c.files.create(file=("f3.jsonl", evals_file()), purpose="evals")
    refused(exc, "files", "3 of 3")
    assert time.monotonic() - started < 5  # not retried: waiting frees nothing
    assert "files.delete" in exc.value.body["message"]
    assert client(live, "other").files.create(file=("o.jsonl", evals_file()), purpose="evals").id  # another key
    with pytest.raises(openai.RateLimitError):  # a pending upload is a file to come
        c.uploads.create(bytes=10, filename="u.jsonl", mime_type="text/jsonl", purpose="evals")
    c.files.delete(made[0].id)
    assert c.files.create(file=("f4.jsonl", evals_file()), purpose="evals").id


def test_file_bytes_quota_counts_files_and_pending_uploads(live):
    c = client(live, "bytes")
    big = evals_file(60)  # about 2.2 KB
    assert 2048 < len(big) < 4096
    c.files.create(file=("a.jsonl", big), purpose="evals")
    with pytest.raises(openai.RateLimitError) as exc:
        c.files.create(file=("b.jsonl", big), purpose="evals")
    refused(exc, "file_bytes", "of 4.0 KB")
    with pytest.raises(openai.RateLimitError) as exc:  # an upload reserves its declared bytes at its creation
        c.uploads.create(bytes=len(big), filename="b.jsonl", mime_type="text/jsonl", purpose="evals")
    refused(exc, "file_bytes", "of 4.0 KB")
    assert client(live, "other").files.create(file=("b.jsonl", big), purpose="evals").bytes == len(big)


def test_pending_uploads_quota_frees_when_one_is_cancelled(live):
    c = client(live, "uploads")
    ups = [c.uploads.create(bytes=10, filename=f"u{i}.jsonl", mime_type="text/jsonl", purpose="evals") for i in range(2)]
    with pytest.raises(openai.RateLimitError) as exc:
        c.uploads.create(bytes=10, filename="u2.jsonl", mime_type="text/jsonl", purpose="evals")
    refused(exc, "pending_uploads", "2 of 2")
    assert c.uploads.cancel(ups[0].id).status == "cancelled"
    assert c.uploads.create(bytes=10, filename="u3.jsonl", mime_type="text/jsonl", purpose="evals").status == "pending"


def test_a_batch_file_past_its_requests_or_bytes_is_a_400_naming_file(live):
    c = client(live, "batch")
    line = {"method": "POST", "url": "/v1/chat/completions", "body": {"model": live["base"], "messages": [
        {"role": "user", "content": "hi"}]}}
    four = "".join(json.dumps(line | {"custom_id": str(i)}) + "\n" for i in range(4)).encode()
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.create(file=("b.jsonl", four), purpose="batch")
    assert exc.value.body["param"] == "file" and "at most 3" in exc.value.body["message"]
    padded = json.dumps(line | {"custom_id": "x" * 2100}).encode() + b"\n"
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.create(file=("b.jsonl", padded), purpose="batch")
    assert exc.value.body["param"] == "file" and exc.value.body["code"] == "file_too_large"
    three = c.files.create(file=("b.jsonl", four.splitlines(keepends=True)[0]), purpose="batch")
    assert three.expires_at == three.created_at + 30 * 24 * 3600  # a batch file's default life, as at OpenAI


def test_stored_completions_quota_refuses_before_answering(live):
    c, base = client(live, "stored"), live["base"]
    ask = dict(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    kept = [c.chat.completions.create(**ask, store=True) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(**ask, store=True)
    refused(exc, "stored_completions", "2 of 2")
    assert c.chat.completions.create(**ask, store=False).choices  # not kept: no quota
    assert len(c.chat.completions.list().data) == 2
    assert client(live, "other").chat.completions.create(**ask, store=True).id
    c.chat.completions.delete(kept[0].id)
    assert c.chat.completions.create(**ask, store=True).id


def test_responses_quota_refuses_before_answering(live):
    c, base = client(live, "responses"), live["base"]
    kept = [c.responses.create(model=base, input="hi", max_output_tokens=2) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as exc:
        c.responses.create(model=base, input="hi", max_output_tokens=2)
    refused(exc, "responses", "2 of 2")
    assert c.responses.create(model=base, input="hi", max_output_tokens=2, store=False).id
    assert client(live, "other").responses.create(model=base, input="hi", max_output_tokens=2).id
    c.responses.delete(kept[0].id)
    assert c.responses.create(model=base, input="hi", max_output_tokens=2).id


def test_evals_and_eval_runs_quotas(live):
    c = client(live, "evals")
    config = {"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True}
    first, _ = [c.evals.create(data_source_config=config, testing_criteria=[EXACT]) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as exc:
        c.evals.create(data_source_config=config, testing_criteria=[EXACT])
    refused(exc, "evals", "2 of 2")
    runs = [c.evals.runs.create(first.id, data_source=ROWS) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as exc:
        c.evals.runs.create(first.id, data_source=ROWS)
    refused(exc, "eval_runs", "2 of 2")
    other = client(live, "other")
    assert other.evals.runs.create(other.evals.create(data_source_config=config, testing_criteria=[EXACT]).id,
                                   data_source=ROWS).id
    c.evals.runs.delete(runs[0].id, eval_id=first.id)
    assert c.evals.runs.create(first.id, data_source=ROWS).id


def test_a_batch_is_refused_past_the_unfinished_batches_quota(tmp_path):
    """``check_batch_create`` (the batches route calls it) counts the key's unfinished batches in SQL."""
    store = Store(tmp_path)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
        store=store, settings=SimpleNamespace(quotas=Quotas(batches=1, batch_requests=3)))))
    check_batch_create(request, "owner-a", {"k": "v"}, requests=3)
    with store.lock:
        store.db.execute("INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, "
                         "created_at) VALUES ('b1', 'owner-a', '/v1/chat/completions', 'f', '24h', 'in_progress', 0)")
    with pytest.raises(APIError) as exc:
        check_batch_create(request, "owner-a", None)
    assert exc.value.status == 429 and exc.value.body["code"] == "quota_exceeded" and "batches" in str(exc.value)
    check_batch_create(request, "owner-b", None)  # another owner
    with pytest.raises(APIError) as exc:
        check_batch_create(request, "owner-b", None, requests=4)
    assert exc.value.status == 400 and exc.value.body["param"] == "input_file_id"
    with pytest.raises(APIError) as exc:
        check_batch_create(request, "owner-b", {str(i): "v" for i in range(17)})
    assert exc.value.status == 400 and exc.value.body["param"] == "metadata"
    with store.lock:
        store.db.execute("UPDATE batches SET status = 'completed'")
    check_batch_create(request, "owner-a", None)


# --- the sweep ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expiring(tiny_model_dir, tmp_path_factory):
    """A server whose uploads expire after 2 seconds, swept every 0.2 s."""
    data_dir = tmp_path_factory.mktemp("sweep")
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset({"k1"}),
                     quotas=Quotas(upload_expiry_s=2, sweep_s=0.2)) as url:
        yield {"url": url, "data_dir": data_dir, "c": openai.OpenAI(base_url=url, api_key="k1", max_retries=0)}


def gone(check, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_an_expired_uploads_parts_are_deleted_by_the_sweep(expiring):
    c, files = expiring["c"], expiring["data_dir"] / "files"
    content = evals_file(3)
    up = c.uploads.create(bytes=len(content), filename="e.jsonl", mime_type="text/jsonl", purpose="evals")
    assert up.expires_at - up.created_at == 2
    c.uploads.parts.create(upload_id=up.id, data=content[:10])
    assert len(list(files.glob("part-*.bin"))) == 1
    assert gone(lambda: not list(files.glob("part-*.bin")))  # without the upload being touched again
    with pytest.raises(openai.BadRequestError) as exc:
        c.uploads.parts.create(upload_id=up.id, data=content[10:])
    assert exc.value.body["code"] == "invalid_upload_status" and "expired" in exc.value.body["message"]


def test_a_file_expires_after_its_expires_after_and_the_sweep_deletes_it(expiring):
    c = expiring["c"]
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.create(file=("x.jsonl", evals_file()), purpose="evals", expires_after={"anchor": "created_at",
                                                                                      "seconds": 60})
    assert exc.value.body["param"] == "expires_after.seconds"
    f = c.files.create(file=("x.jsonl", evals_file()), purpose="evals",
                       expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600
    kept = c.files.create(file=("y.jsonl", evals_file()), purpose="evals")
    assert kept.expires_at is None
    db = sqlite3.connect(expiring["data_dir"] / "tunesmith.sqlite")
    storage = db.execute("SELECT storage FROM files WHERE id = ?", (f.id,)).fetchone()[0]
    with db:  # its hour has passed
        db.execute("UPDATE files SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, f.id))
    assert gone(lambda: db.execute("SELECT 1 FROM files WHERE id = ?", (f.id,)).fetchone() is None)
    assert not Path(storage).exists()
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    assert c.files.retrieve(kept.id).id == kept.id


def test_an_uploads_expires_after_is_its_files(expiring):
    c = expiring["c"]
    content = evals_file(2)
    up = c.uploads.create(bytes=len(content), filename="e.jsonl", mime_type="text/jsonl", purpose="evals",
                          expires_after={"anchor": "created_at", "seconds": 7200})
    assert up.expires_at - up.created_at == 2  # the upload itself expires as the server says
    part = c.uploads.parts.create(upload_id=up.id, data=content)
    done = c.uploads.complete(upload_id=up.id, part_ids=[part.id])
    assert done.file.expires_at == done.file.created_at + 7200


# --- metadata on every object ---------------------------------------------------------------------------------

BAD_METADATA = {"17 pairs": {str(i): "v" for i in range(17)}, "65-character key": {"k" * 65: "v"},
                "513-character value": {"k": "v" * 513}}


def _create_eval(c):
    return c.evals.create(data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
                          testing_criteria=[EXACT])


def _metadata_calls(live):
    """(what, the call with this metadata, the field the 400 must name) for every object that takes metadata."""
    c, base = client(live, "meta"), live["base"]
    ev = _create_eval(c)
    kept = c.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=2, store=True)
    stored = {"type": "jsonl", "source": {"type": "stored_completions"}}
    return [
        ("job", lambda m: c.fine_tuning.jobs.create(model=base, training_file="file-x", metadata=m), "metadata"),
        ("eval", lambda m: c.evals.create(data_source_config={"type": "custom", "item_schema": SCHEMA},
                                          testing_criteria=[EXACT], metadata=m), "metadata"),
        ("eval update", lambda m: c.evals.update(ev.id, metadata=m), "metadata"),
        ("eval of stored completions", lambda m: c.evals.create(
            data_source_config={"type": "stored_completions", "metadata": m}, testing_criteria=[EXACT]),
         "data_source_config.metadata"),
        ("eval run", lambda m: c.evals.runs.create(ev.id, data_source=ROWS, metadata=m), "metadata"),
        ("eval run's stored completions", lambda m: c.evals.runs.create(
            ev.id, data_source={**stored, "source": {"type": "stored_completions", "metadata": m}}),
         "data_source.source.metadata"),
        ("response", lambda m: c.responses.create(model=base, input="hi", max_output_tokens=2, metadata=m), "metadata"),
        ("stored completion", lambda m: c.chat.completions.create(
            model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=2, store=True, metadata=m), "metadata"),
        ("stored completion update", lambda m: c.chat.completions.update(kept.id, metadata=m), "metadata"),
        ("distillation", lambda m: c.post("/files/from_stored_completions", body={"metadata": m}, cast_to=object),
         "metadata"),
    ]


def test_metadata_breaking_openais_rule_is_a_400_naming_the_field_on_every_object(live):
    failures = []
    for what, call, param in _metadata_calls(live):
        for case, metadata in BAD_METADATA.items():
            try:
                call(metadata)
                failures.append(f"{what}, {case}: accepted")
            except openai.BadRequestError as exc:
                if exc.body["param"] != param:
                    failures.append(f"{what}, {case}: param {exc.body['param']!r}, not {param!r}")
            except openai.APIStatusError as exc:
                failures.append(f"{what}, {case}: {exc.status_code} {exc.body}")
    assert not failures, failures
    c = client(live, "meta")  # 16 pairs, 64-character keys and 512-character values are taken
    fine = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    assert c.evals.update(_create_eval(c).id, metadata=fine).metadata == fine
