"""Uploads in parts through the official client: ``uploads.upload_file_chunked`` makes a file that trains a job;
parts are joined in the order ``complete`` names, checked against the declared bytes and the md5, and checked
as a file of their purpose; an upload belongs to its key; a cancelled one keeps nothing."""

from __future__ import annotations

import hashlib

import openai
import pytest

from tunesmith.serve.jobs.worker import work

from .conftest import banking_rows, chat_lines, tiny_server

LABELS = ("card_arrival", "pin_blocked", "age_limit")


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("uploads")
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset({"k1", "k2"}), max_upload_mb=1) as url:
        yield {"url": url, "base": str(tiny_model_dir), "data_dir": data_dir}


def client(live, key="k1"):
    return openai.OpenAI(base_url=live["url"], api_key=key, max_retries=0)


def test_a_file_uploaded_in_parts_trains_a_job(live):
    content = chat_lines(banking_rows(LABELS, 12)[:30])
    c = client(live)
    upload = c.uploads.upload_file_chunked(file=content, filename="train.jsonl", bytes=len(content),
                                           mime_type="text/jsonl", purpose="fine-tune", part_size=1000,
                                           md5=hashlib.md5(content).hexdigest())
    assert upload.status == "completed" and upload.file.purpose == "fine-tune" and upload.file.bytes == len(content)
    assert c.files.content(upload.file.id).read() == content
    assert len(content) > 5 * 1000  # it went in several parts
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=upload.file.id, seed=1, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}})
    work(live["data_dir"], once=True)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error


def test_parts_join_in_the_order_complete_names_and_are_checked(live):
    lines = chat_lines(banking_rows(LABELS, 12)[:4]).splitlines(keepends=True)
    c = client(live)
    content = b"".join(lines)
    up = c.uploads.create(bytes=len(content), filename="t.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    assert up.status == "pending" and up.file is None and up.expires_at - up.created_at == 3600
    parts = [c.uploads.parts.create(upload_id=up.id, data=line) for line in lines]
    assert all(p.object == "upload.part" and p.upload_id == up.id for p in parts)
    with pytest.raises(openai.BadRequestError) as exc:  # the declared bytes are all there: one more is refused
        c.uploads.parts.create(upload_id=up.id, data=b"x")
    assert "more than the" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        c.uploads.complete(upload_id=up.id, part_ids=[p.id for p in parts], md5="0" * 32)
    assert exc.value.body["param"] == "md5"
    with pytest.raises(openai.BadRequestError) as exc:
        c.uploads.complete(upload_id=up.id, part_ids=[p.id for p in parts[:-1]])
    assert "declared" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client(live, "k2").uploads.complete(upload_id=up.id, part_ids=[p.id for p in parts])
    order = [parts[2], parts[0], parts[3], parts[1]]
    done = c.uploads.complete(upload_id=up.id, part_ids=[p.id for p in order])
    assert c.files.content(done.file.id).read() == lines[2] + lines[0] + lines[3] + lines[1]
    with pytest.raises(openai.BadRequestError) as exc:  # a completed upload takes no more parts
        c.uploads.parts.create(upload_id=up.id, data=b"x")
    assert exc.value.body["code"] == "invalid_upload_status"


def test_a_bad_file_in_parts_is_refused_like_a_file_and_an_upload_can_be_cancelled(live):
    c = client(live)
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n'
    up = c.uploads.create(bytes=len(bad), filename="bad.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    part = c.uploads.parts.create(upload_id=up.id, data=bad)
    with pytest.raises(openai.BadRequestError) as exc:
        c.uploads.complete(upload_id=up.id, part_ids=[part.id])
    assert "line" in exc.value.body["message"] and exc.value.body["code"] == "invalid_file_format"
    assert c.uploads.cancel(upload_id=up.id).status == "cancelled"
    assert not list((live["data_dir"] / "files").glob("part-*.bin"))  # its bytes are gone
    with pytest.raises(openai.BadRequestError) as exc:
        c.uploads.create(bytes=2 * 1024 * 1024, filename="big.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    assert exc.value.body["param"] == "bytes" and "upload limit" in exc.value.body["message"]
