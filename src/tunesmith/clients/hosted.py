"""The client of an OpenAI-compatible fine-tuning API (OpenAI itself, or ``tunesmith serve`` on another machine):
the official ``openai`` client made from the recipe's ``hosted`` section, chat JSONL uploads, a job followed
through its events with a progress bar, and the result file decoded (raw CSV or base64, as the cookbook
decodes it)."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import time
from pathlib import Path

from rich.console import Console

from tunesmith.clients.keys import api_key
from tunesmith.config import Recipe
from tunesmith.errors import ConfigError, ProviderError

TERMINAL = {"succeeded", "failed", "cancelled"}


def write_chat_jsonl(path: Path, conversations: list[list[dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for messages in conversations:
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def decode_result_file(raw: bytes) -> list[dict]:
    """The results CSV, whether the server sent it raw or base64-encoded."""
    text = raw.decode("utf-8", errors="replace")
    if not text.lstrip().startswith("step"):
        try:
            text = base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise ProviderError("the result file is neither a CSV nor base64-encoded CSV") from exc
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        rows.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()})
        rows[-1]["step"] = int(rows[-1]["step"])
    return rows


def make_client(recipe: Recipe):
    import openai

    h = recipe.hosted
    if h is None:
        raise ConfigError("--backend openai needs a `hosted` section (base_url, api_key_env, model)")
    key = api_key(h.api_key_env, "hosted.api_key_env")
    return openai.OpenAI(base_url=h.base_url, api_key=key, max_retries=3, timeout=h.timeout_s)


def upload(client, path: Path) -> str:
    with open(path, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune").id


def follow(client, job_id: str, poll_s: float, console: Console, bar):
    """Poll the job and print its new events until it ends; a bar tracks steps once known."""
    seen: set[str] = set()
    total, done = None, 0
    ctx = None
    advance = None
    try:
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            events = list(client.fine_tuning.jobs.list_events(job_id, limit=100).data)
            for ev in reversed(events):  # oldest first
                if ev.id in seen:
                    continue
                seen.add(ev.id)
                data = ev.data or {}
                if ev.type == "metrics" and data.get("total_steps"):
                    if advance is None:
                        total = int(data["total_steps"])
                        ctx = bar("hosted training", total)
                        advance = ctx.__enter__()
                    step = int(data.get("step", done))
                    if step > done:
                        advance(step - done, f"loss {data.get('train_loss', 0) or 0:.3f}")
                        done = step
                elif ev.type != "metrics":
                    console.print(f"  {ev.message}")
            if job.status in TERMINAL:
                return job
            time.sleep(poll_s)
    finally:
        if ctx is not None:
            if total and done < total and job.status == "succeeded":
                advance(total - done)
            ctx.__exit__(None, None, None)


