"""API keys at rest: the server's SQLite store keeps owner ids (HMAC-SHA256 of the key under the data folder's
secret), never a key. Against a real ``tunesmith serve`` process with two keys, objects of every kind made with the
official client leave no key in any byte of the data folder (the database, its write-ahead log, every other file);
a store written by an older version (raw keys as owners) is migrated when the server opens it, and each key still
reaches exactly its own objects through the API. Below, the pieces: the secret (one per folder, even when
processes start at once), owner ids, and the migration of every table with an ``owner`` column."""

from __future__ import annotations

import hmac
import json
import multiprocessing
import os
import secrets
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from tunesmith.errors import ConfigError
from tunesmith.serve.store import Store
from tunesmith.serve.store.keys import is_owner_id, owner_id, server_secret
from tunesmith.serve.store.migrations import MIGRATIONS

from .conftest import finished_eval_run, http_get
from .test_serve_jobs import chat_jsonl
from .test_serve_server_kill import _free_port

MIGRATION = "0021_owners_as_keyed_hashes"
STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "eq"}


def new_keys() -> tuple[str, str]:
    """Two keys no other byte of a test can contain by chance."""
    return f"sk-at-rest-a-{secrets.token_hex(16)}", f"sk-at-rest-b-{secrets.token_hex(16)}"


@contextmanager
def serving(model: Path, data_dir: Path, keys: tuple[str, ...], log: Path):
    """``tunesmith serve`` in its own process with ``keys``; yields its /v1 URL and stops it with SIGTERM."""
    port = _free_port()
    exe = Path(sys.executable).with_name("tunesmith")
    with open(log, "a") as out:
        proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--data-dir", str(data_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TUNESMITH_API_KEYS": ",".join(keys)})
    try:
        deadline = time.time() + 120
        while http_get_or_none(f"http://127.0.0.1:{port}/v1/models", keys[0]) != 200:
            assert proc.poll() is None and time.time() < deadline, "the server did not come up:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_get_or_none(url: str, key: str) -> int | None:
    try:
        return http_get(url, key, timeout=5)[0]
    except OSError:  # not listening yet
        return None


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def make_objects(url: str, key: str, model: str) -> dict[str, str]:
    """One object of every kind a key keeps, made with the official client: a file, an upload, a fine-tuning job
    (cancelled at once), a stored chat completion, a stored response, an eval with a finished run, a batch."""
    c = client(url, key)
    made = {"file": c.files.create(file=("train.jsonl", chat_jsonl(8)), purpose="fine-tune").id}
    up = c.uploads.create(bytes=len(chat_jsonl(2)), filename="up.jsonl", mime_type="text/jsonl", purpose="fine-tune")
    part = c.uploads.parts.create(upload_id=up.id, data=chat_jsonl(2))
    made["upload"] = c.uploads.complete(upload_id=up.id, part_ids=[part.id]).id
    job = c.fine_tuning.jobs.create(model=model, training_file=made["file"], seed=1, suffix="at-rest")
    made["job"] = c.fine_tuning.jobs.cancel(job.id).id
    made["completion"] = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2, store=True, metadata={"app": "at-rest"}).id
    made["response"] = c.responses.create(model=model, input="hi", max_output_tokens=2).id
    ev = c.evals.create(name="at rest", testing_criteria=[STRING_CHECK], data_source_config={
        "type": "custom", "item_schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
        "include_sample_schema": True})
    run = c.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [
        {"item": {"answer": "Paris"}, "sample": {"output_text": "Paris"}}]}})
    assert finished_eval_run(c, ev.id, run.id, timeout=60).status == "completed"
    made["eval"], made["run"] = ev.id, run.id
    lines = "".join(json.dumps({"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}) + "\n" for i in range(2))
    batch_input = c.files.create(file=("b.jsonl", lines.encode()), purpose="batch").id
    made["batch"] = c.batches.create(input_file_id=batch_input, endpoint="/v1/chat/completions",
                                     completion_window="24h").id
    return made


def reach(c: openai.OpenAI, made: dict[str, str]) -> dict[str, bool]:
    """Which of ``made`` this client reaches (False: the same 404 as for an id that does not exist)."""
    reads = {"file": lambda: c.files.retrieve(made["file"]), "job": lambda: c.fine_tuning.jobs.retrieve(made["job"]),
             "completion": lambda: c.chat.completions.retrieve(made["completion"]),
             "response": lambda: c.responses.retrieve(made["response"]), "eval": lambda: c.evals.retrieve(made["eval"]),
             "run": lambda: c.evals.runs.retrieve(made["run"], eval_id=made["eval"]),
             "batch": lambda: c.batches.retrieve(made["batch"])}
    out = {}
    for kind, read in reads.items():
        try:
            out[kind] = read().id == made[kind]
        except openai.NotFoundError:
            out[kind] = False
    return out


def found_in_folder(data_dir: Path, needles: tuple[str, ...]) -> list[str]:
    """Every file under ``data_dir`` (the database, its -wal and -shm, uploaded files, runs, logs) that holds one of
    ``needles`` in its bytes."""
    hits = []
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path.relative_to(data_dir)}: {n[:16]}…" for n in needles if n.encode() in data]
    return hits


def owners(data_dir: Path) -> dict[str, set]:
    """Each table with an ``owner`` column → the owners it stores (read beside the running server)."""
    db = sqlite3.connect(data_dir / "tunesmith.sqlite", timeout=30)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: {r[0] for r in db.execute(f'SELECT DISTINCT owner FROM "{t}"')} for t in tables
                if any(c[1] == "owner" for c in db.execute(f'PRAGMA table_info("{t}")'))}
    finally:
        db.close()


@pytest.mark.slow
def test_no_key_is_kept_in_any_byte_of_a_live_servers_data_folder(tiny_model_dir, tmp_path):
    data_dir, keys = tmp_path / "data", new_keys()
    with serving(tiny_model_dir, data_dir, keys, tmp_path / "serve.log") as url:
        made = make_objects(url, keys[0], str(tiny_model_dir))
        other = client(url, keys[1]).files.create(file=("mine.jsonl", chat_jsonl(2)), purpose="fine-tune").id
        assert (data_dir / "tunesmith.sqlite-wal").stat().st_size > 0  # the log holds the new rows: it is read too
        assert found_in_folder(data_dir, keys) == []
        secret = server_secret(data_dir)
        ids = {owner_id(secret, k) for k in keys}
        stored = owners(data_dir)
        assert {"files", "uploads", "jobs", "stored_completions", "responses", "evals", "eval_runs",
                "batches"} <= set(stored)
        for table in ("files", "uploads", "jobs", "stored_completions", "responses", "evals", "eval_runs", "batches"):
            assert stored[table] and stored[table] <= ids, (table, stored[table])
        assert all(reach(client(url, keys[0]), made).values())
        assert not any(reach(client(url, keys[1]), made).values())
        with pytest.raises(openai.NotFoundError):
            client(url, keys[0]).files.retrieve(other)
    assert stat.S_IMODE((data_dir / "server.secret").stat().st_mode) == 0o600


def to_raw_keys(data_dir: Path, keys: tuple[str, ...]) -> None:
    """The store as an older version left it: every owner the raw key, the migration not yet applied."""
    secret = server_secret(data_dir)
    db = sqlite3.connect(data_dir / "tunesmith.sqlite", isolation_level=None)
    try:
        for table in owners(data_dir):
            for key in keys:
                db.execute(f'UPDATE "{table}" SET owner = ? WHERE owner = ?', (key, owner_id(secret, key)))
        db.execute("DELETE FROM schema_migrations WHERE name = ?", (MIGRATION,))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


@pytest.mark.slow
def test_a_store_with_raw_keys_is_migrated_and_each_key_keeps_its_objects(tiny_model_dir, tmp_path):
    data_dir, keys = tmp_path / "data", new_keys()
    log = tmp_path / "serve.log"
    with serving(tiny_model_dir, data_dir, keys, log) as url:
        made = make_objects(url, keys[0], str(tiny_model_dir))
        theirs = client(url, keys[1]).files.create(file=("theirs.jsonl", chat_jsonl(2)), purpose="fine-tune").id
    to_raw_keys(data_dir, keys[:1])  # the second key's rows stay owner ids: the migration leaves those alone
    assert found_in_folder(data_dir, keys[:1]), "the older store should hold the raw key before the migration"

    with serving(tiny_model_dir, data_dir, keys, log) as url:
        assert found_in_folder(data_dir, keys) == []
        mine, other = client(url, keys[0]), client(url, keys[1])
        assert all(reach(mine, made).values())
        assert mine.files.content(made["file"]).read() == chat_jsonl(8)
        assert made["file"] in [f.id for f in mine.files.list().data]
        assert [c.id for c in mine.chat.completions.list(metadata={"app": "at-rest"}).data] == [made["completion"]]
        assert not any(reach(other, made).values())
        assert other.files.retrieve(theirs).id == theirs and theirs not in [f.id for f in mine.files.list().data]
        with pytest.raises(openai.NotFoundError):
            other.uploads.cancel(made["upload"])
    db = sqlite3.connect(data_dir / "tunesmith.sqlite")
    assert db.execute("SELECT COUNT(*) FROM schema_migrations WHERE name = ?", (MIGRATION,)).fetchone()[0] == 1


# --- the pieces ---------------------------------------------------------------------------------------------------


def _secret_at(folder: str, start_at: float) -> bytes:
    time.sleep(max(0.0, start_at - time.time()))
    return server_secret(Path(folder))


def test_processes_starting_at_once_on_one_folder_share_one_secret(tmp_path):
    """Eight processes released at the same instant on a new folder, five rounds: all read the same 32 bytes, kept
    with mode 0600, and no draft file is left behind."""
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        for round_ in range(5):
            folder = tmp_path / f"round{round_}"
            start_at = time.time() + (3.0 if round_ == 0 else 0.5)
            secrets_read = pool.starmap(_secret_at, [(str(folder), start_at)] * 8)
            assert len(set(secrets_read)) == 1 and len(secrets_read[0]) == 32
            assert [p.name for p in folder.iterdir()] == ["server.secret"]
            assert stat.S_IMODE((folder / "server.secret").stat().st_mode) == 0o600
            assert server_secret(folder) == secrets_read[0]  # created once, then only read


def test_an_owner_id_is_a_keyed_hash_of_the_key(tmp_path):
    secret, other = server_secret(tmp_path / "a"), server_secret(tmp_path / "b")
    assert secret != other
    key = "sk-some-key"
    oid = owner_id(secret, key)
    assert is_owner_id(oid) and oid == "key_" + hmac.new(secret, key.encode(), "sha256").hexdigest()
    assert owner_id(other, key) != oid and owner_id(secret, key + "x") != oid and key not in oid
    assert owner_id(secret, None) is None and not is_owner_id(key) and not is_owner_id(None)


def test_a_secret_that_is_not_one_is_refused_naming_the_file(tmp_path):
    (tmp_path / "server.secret").write_bytes(b"short")
    with pytest.raises(ConfigError, match="server.secret holds 5 bytes, not 32"):
        server_secret(tmp_path)


def older_store(root: Path) -> sqlite3.Connection:
    """A database as the last version before the migration made it (every migration before it, applied)."""
    root.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root / "tunesmith.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    for name, step in MIGRATIONS[: [n for n, _ in MIGRATIONS].index(MIGRATION)]:
        db.execute(step)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, time.time()))
    return db


def row_with_owner(db: sqlite3.Connection, table: str, rid: str, owner: str | None) -> None:
    """A row of ``table`` with ``owner`` (the other NOT NULL columns filled with placeholders)."""
    cols = [(c[1], c[2], c[3]) for c in db.execute(f'PRAGMA table_info("{table}")')]
    values = {name: (0 if "INT" in kind.upper() else f"{table}-{rid}") for name, kind, notnull in cols if notnull}
    values |= {"owner": owner, **({"id": rid} if any(c[0] == "id" for c in cols) else {})}
    db.execute(f'INSERT INTO "{table}" ({", ".join(values)}) VALUES ({", ".join("?" * len(values))})',
               list(values.values()))


def test_the_migration_rewrites_every_owner_column_once_and_leaves_owner_ids_and_null_alone(tmp_path):
    raw, kept_id = new_keys()[0], owner_id(b"\x01" * 32, "already migrated")
    db = older_store(tmp_path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
              if any(c[1] == "owner" for c in db.execute(f'PRAGMA table_info("{r[0]}")'))]
    assert {"files", "jobs", "evals", "eval_runs", "responses", "uploads", "stored_completions", "batches"} <= set(tables)
    for table in tables:
        for i, owner in enumerate((raw, kept_id, None)):
            row_with_owner(db, table, f"row{i}", owner)
    db.close()

    store = Store(tmp_path)  # opening it migrates
    expected = owner_id(server_secret(tmp_path), raw)
    for table in tables:
        stored = sorted((r[0], r[1]) for r in store.db.execute(f'SELECT id, owner FROM "{table}"'))
        assert stored == sorted([("row0", expected), ("row1", kept_id), ("row2", None)]), table
    assert found_in_folder(tmp_path, (raw,)) == []  # zeroed in the database file, gone from the log
    assert Store(tmp_path).migrate() == []  # applied once


def test_a_replica_whose_folder_lacks_the_databases_secret_refuses_to_start(tmp_path, postgres, tiny_model_dir):
    """The database keeps the fingerprint of the first data folder's server.secret: a replica started on another
    folder (the shared mount missing: no secret, or another one) refuses, naming its folder, instead of minting one
    and keying every owner apart."""
    from tunesmith.serve.app import ServeSettings, create_app

    url, shared = postgres(), tmp_path / "shared"
    settings = lambda folder: ServeSettings(model=str(tiny_model_dir), data_dir=folder, database=url)  # noqa: E731
    create_app(settings(shared), engine=object()).state.store.close()  # the first replica records its secret
    create_app(settings(shared), engine=object()).state.store.close()  # the same folder: starts
    empty = tmp_path / "not-mounted"
    with pytest.raises(ConfigError, match=f"--data-dir {empty}.* has no server.secret"):
        create_app(settings(empty), engine=object())
    assert not (empty / "server.secret").exists()  # none minted
    other = tmp_path / "another"
    server_secret(other)
    with pytest.raises(ConfigError, match="is not the one --database was first used with"):
        create_app(settings(other), engine=object())
