"""Input the store cannot hold, against a live server on each backend (SQLite, and PostgreSQL whose TEXT refuses
NUL): a NUL byte in a file name, metadata, a suffix, an eval's name, a ``custom_id`` or a query or path parameter, a
lone surrogate in the same places, a seed past what its trainer or engine takes, names and criteria past their caps
are each a 400 naming the field, with nothing written to the data folder; a NUL inside a chat message is text, kept
as sent. The official client sends what it can encode; a lone surrogate (which it cannot) and a file's name are
written by hand, as an attacker would."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest

from tunesmith.serve.store.quotas import Quotas

from .conftest import Q_CHECK, Q_SCHEMA, banking_rows, chat_lines, tiny_server_on

KEY = "k1"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request, tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    with tiny_server_on(request, tiny_model_dir, data_dir, api_keys=frozenset({KEY}), quotas=Quotas(jobs=2)) as base:
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
        training = client.files.create(file=("t.jsonl", chat_lines(banking_rows(("card_arrival",), 12))),
                                       purpose="fine-tune")
        yield {"url": base, "client": client, "model": str(tiny_model_dir), "files": data_dir / "files",
               "training": training.id}


def on_disk(live) -> set[str]:
    return {p.name for p in live["files"].iterdir()}


def refused(exc, param: str, says: str) -> None:
    body = exc.value.body if hasattr(exc.value, "body") else exc.value
    assert exc.value.status_code == 400 and body["param"] == param and says in body["message"], body


def raw_post(live, route: str, text: str) -> httpx.Response:
    """A JSON body written by hand (json.dumps, and the official client, cannot send a lone surrogate)."""
    return httpx.post(f"{live['url']}/{route}", content=text.encode("utf-8", "surrogatepass"), headers=HEADERS,
                      timeout=60)


def multipart_file(live, filename: bytes, content: bytes = b'{"item": {"q": "a"}}\n') -> httpx.Response:
    """``POST /v1/files`` with the file's name as raw bytes in its part's header."""
    body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nevals\r\n--b\r\nContent-Disposition: '
            b'form-data; name="file"; filename="' + filename + b'"\r\n\r\n' + content + b"\r\n--b--\r\n")
    return httpx.post(f"{live['url']}/files", content=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=b"})


def test_nul_in_metadata_suffix_and_names_is_a_400_naming_the_field(live):
    c = live["client"]
    before = on_disk(live)
    for make in (lambda: c.evals.create(name="e", data_source_config={"type": "custom", "item_schema": Q_SCHEMA},
                                        testing_criteria=[Q_CHECK], metadata={"k": "a\x00b"}),
                 lambda: c.chat.completions.create(model=live["model"], messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2, store=True, metadata={"k": "\x00"})):
        with pytest.raises(openai.BadRequestError) as exc:
            make()
        refused(exc, "metadata.k", "NUL")
    with pytest.raises(openai.BadRequestError) as exc:
        c.evals.create(name="e", data_source_config={"type": "custom", "item_schema": Q_SCHEMA},
                       testing_criteria=[Q_CHECK], metadata={"k\x00": "v"})
    refused(exc, "metadata", "in the key 'k\\u0000'")
    with pytest.raises(openai.BadRequestError) as exc:
        c.evals.create(name="e\x00", data_source_config={"type": "custom", "item_schema": Q_SCHEMA},
                       testing_criteria=[Q_CHECK])
    refused(exc, "name", "NUL")
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["model"], training_file=live["training"], suffix="s\x00")
    refused(exc, "suffix", "NUL")
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["model"], training_file=live["training"] + "\x00")
    refused(exc, "training_file", "NUL")
    assert on_disk(live) == before
    assert not c.evals.list().data and not c.fine_tuning.jobs.list().data


def test_lone_surrogates_are_a_400_naming_the_field(live):
    before = on_disk(live)
    schema = json.dumps({"type": "custom", "item_schema": Q_SCHEMA})
    cases = {"metadata.k": ("evals", '{"name": "e", "data_source_config": ' + schema + ', "testing_criteria": '
                                     + json.dumps([Q_CHECK]) + ', "metadata": {"k": "a\\ud800"}}'),
             "name": ("evals", '{"name": "\\udc00", "data_source_config": ' + schema + ', "testing_criteria": '
                               + json.dumps([Q_CHECK]) + "}"),
             "filename": ("uploads", '{"filename": "x\\ud800.jsonl", "purpose": "evals", "bytes": 10, '
                                     '"mime_type": "text/jsonl"}'),
             "messages[0].content": ("chat/completions", '{"model": "' + live["model"] + '", "messages": '
                                                         '[{"role": "user", "content": "a\\ud800"}]}')}
    for param, (route, text) in cases.items():
        r = raw_post(live, route, text)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "lone UTF-16 surrogate" in r.json()["error"]["message"]
    assert on_disk(live) == before


def test_a_bad_file_name_is_refused_before_any_byte_is_written(live):
    before = on_disk(live)
    for name in (b"a\x00.jsonl", b"x" * 600 + b".jsonl"):
        r = multipart_file(live, name)
        assert r.status_code == 400 and r.json()["error"]["param"] == "file.filename", (name[:20], r.text)
    assert on_disk(live) == before
    assert multipart_file(live, "é.jsonl".encode()).json()["filename"] == "é.jsonl"


def test_a_custom_id_or_model_the_store_cannot_hold_is_a_400_on_file(live):
    before = on_disk(live)
    line = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"model": live["model"], "messages": [{"role": "user", "content": "hi"}]}}
    bad = {"custom_id": (json.dumps(line | {"custom_id": "a\x00"}) + "\n").encode(),
           "lone": (json.dumps(line | {"custom_id": "ok"})[:-1] + ', "x": 1}\n').replace(
               '"ok"', '"\\ud800"').encode(),
           "body.model": (json.dumps(line | {"custom_id": "m", "body": line["body"] | {"model": "m\x00"}}) + "\n").encode()}
    for what, content in bad.items():
        with pytest.raises(openai.BadRequestError) as exc:
            live["client"].files.create(file=("b.jsonl", content), purpose="batch")
        assert exc.value.body["param"] == "file", exc.value.body
        assert ("custom_id" if what == "lone" else what) in exc.value.body["message"], exc.value.body
    assert on_disk(live) == before


def test_nul_in_a_query_or_path_parameter_is_a_400_naming_it(live):
    for path, param in (("fine_tuning/jobs?metadata[k]=%00", "metadata[k]"), ("files/file-%00", "file_id"),
                        ("chat/completions?model=a%00", "model"), ("batches?after=b%00", "after")):
        r = httpx.get(f"{live['url']}/{path}", headers=HEADERS, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)


def test_a_nul_inside_a_chat_message_is_text_kept_as_sent(live):
    c = live["client"]
    reply = c.chat.completions.create(model=live["model"], messages=[{"role": "user", "content": "a\x00b"}],
                                      max_tokens=2, store=True)
    kept = c.chat.completions.messages.list(reply.id)
    assert kept.data[0].content == "a\x00b"


def test_seeds_past_what_the_trainer_or_engine_takes_are_a_400_on_seed(live):
    c = live["client"]
    for seed in (2**63, 2**32, -1):
        with pytest.raises(openai.BadRequestError) as exc:
            c.fine_tuning.jobs.create(model=live["model"], training_file=live["training"], seed=seed)
        refused(exc, "seed", "from 0 to 4294967295")
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=live["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  seed=2**63)
    refused(exc, "seed", "from 0 to")
    ev = c.evals.create(name="seeds", data_source_config={"type": "custom", "item_schema": Q_SCHEMA,
                                                          "include_sample_schema": True}, testing_criteria=[Q_CHECK])
    with pytest.raises(openai.BadRequestError) as exc:
        c.evals.runs.create(ev.id, data_source={
            "type": "completions", "model": live["model"], "sampling_params": {"seed": 2**64},
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
            "source": {"type": "file_content", "content": [{"item": {"q": "a"}}]}})
    refused(exc, "data_source.sampling_params.seed", "from 0 to")
    c.evals.delete(ev.id)


def test_names_and_criteria_past_their_caps_are_a_400(live):
    c = live["client"]
    config = {"type": "custom", "item_schema": Q_SCHEMA}
    with pytest.raises(openai.BadRequestError) as exc:
        c.evals.create(name="e" * 257, data_source_config=config, testing_criteria=[Q_CHECK])
    refused(exc, "name", "at most 256")
    with pytest.raises(openai.BadRequestError) as exc:
        c.evals.create(name="e", data_source_config=config, testing_criteria=[Q_CHECK | {"name": f"c{i}"}
                                                                              for i in range(65)])
    refused(exc, "testing_criteria", "at most 64")
    with pytest.raises(openai.BadRequestError) as exc:
        c.evals.create(name="e", data_source_config=config, testing_criteria=[Q_CHECK | {"reference": "x" * 100_001}])
    refused(exc, "testing_criteria.0", "at most 100,000")
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["model"], training_file=live["training"], suffix="s" * 65)
    refused(exc, "suffix", "64")
    assert not c.evals.list().data


def test_a_keys_unfinished_jobs_are_bounded_by_the_jobs_quota(live):
    c = live["client"]
    jobs = [c.fine_tuning.jobs.create(model=live["model"], training_file=live["training"]) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as exc:
        c.fine_tuning.jobs.create(model=live["model"], training_file=live["training"])
    assert exc.value.body["code"] == "quota_exceeded" and "Quota jobs reached" in exc.value.body["message"]
    assert "2 of 2" in exc.value.body["message"] and "fine_tuning.jobs.cancel" in exc.value.body["message"]
    c.fine_tuning.jobs.cancel(jobs[0].id)
    assert c.fine_tuning.jobs.create(model=live["model"], training_file=live["training"]).status == "queued"
