"""A key's quotas hold over replicas under concurrency: two servers on one PostgreSQL, 20 creations of one key at once
(half through each), and exactly the quota's number are kept for files, evals, batches and fine-tuning jobs; every
other one is a 429 ``quota_exceeded`` and leaves nothing behind (no file's bytes on the shared folder)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.store.quotas import Quotas

from .conftest import Q_CHECK, Q_SCHEMA, banking_rows, chat_lines, running_server

pytestmark = pytest.mark.replicas  # several servers on one PostgreSQL: make test-replicas runs them

KEY, TRIES, QUOTA = "k1", 20, 5


class NoBatchRunner:
    """Batches left validating: one that finished during the test would free its place for another."""

    def start(self): ...
    def stop(self): ...
    def wake(self): ...
    def cancel(self, batch_id): ...


def at_once(clients: list[openai.OpenAI], create) -> tuple[int, int]:
    """``create(client, i)`` for TRIES ``i`` at once over the replicas in turn: (kept, refused by a quota)."""
    def one(i: int) -> str:
        try:
            create(clients[i % len(clients)], i)
            return "kept"
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "quota_exceeded", exc.body
            return "refused"

    with ThreadPoolExecutor(TRIES) as pool:
        outcomes = list(pool.map(one, range(TRIES)))
    return outcomes.count("kept"), outcomes.count("refused")


def test_quotas_hold_over_two_replicas_under_concurrent_creations(tiny_model_dir, tmp_path, postgres):
    model, shared, url = str(tiny_model_dir), tmp_path / "shared", postgres()
    quotas = Quotas(files=QUOTA + 2, evals=QUOTA, batches=QUOTA, jobs=QUOTA)  # files: the two below, then five more
    with ExitStack() as stack:
        urls = []
        for _ in range(2):
            app = create_app(ServeSettings(model=model, api_keys=frozenset({KEY}), data_dir=shared, database=url,
                                           quotas=quotas), Engine(model, {}, max_batch=4, wait_ms=1))
            app.state.batch_runner = NoBatchRunner()
            urls.append(stack.enter_context(running_server(app)))
        clients = [openai.OpenAI(base_url=u, api_key=KEY, max_retries=0, timeout=120) for u in urls]
        one = clients[0]
        training = one.files.create(file=("t.jsonl", chat_lines(banking_rows(("card_arrival",), 12))),
                                    purpose="fine-tune").id
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
        requests = one.files.create(file=("b.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch").id
        before = {p.name for p in (shared / "files").iterdir()}

        content = b"".join(json.dumps({"item": {"q": f"q{i}"}}).encode() + b"\n" for i in range(2000))  # ~50 KB
        assert at_once(clients, lambda c, i: c.files.create(file=(f"f{i}.jsonl", content), purpose="evals")) == \
            (QUOTA, TRIES - QUOTA)
        assert len(one.files.list().data) == QUOTA + 2
        assert len({p.name for p in (shared / "files").iterdir()} - before) == QUOTA  # the refused left no bytes

        config = {"type": "custom", "item_schema": Q_SCHEMA}
        assert at_once(clients, lambda c, i: c.evals.create(name=f"e{i}", data_source_config=config,
                                                            testing_criteria=[Q_CHECK])) == (QUOTA, TRIES - QUOTA)
        assert len(one.evals.list(limit=100).data) == QUOTA

        assert at_once(clients, lambda c, i: c.batches.create(input_file_id=requests, endpoint="/v1/chat/completions",
                                                              completion_window="24h")) == (QUOTA, TRIES - QUOTA)
        assert len(one.batches.list(limit=100).data) == QUOTA

        assert at_once(clients, lambda c, i: c.fine_tuning.jobs.create(model=model, training_file=training)) == \
            (QUOTA, TRIES - QUOTA)
        assert len(one.fine_tuning.jobs.list(limit=100).data) == QUOTA
