"""Stored chat completions: ``store: true`` keeps a request and its answer for the key that sent it, as OpenAI
does, so that an app's traffic to any served model becomes data: list (by ``metadata``, ``model``, ``after``,
``limit``, ``order``), retrieve, read the request's messages, update the metadata, delete. Evals read them as a
data source (:mod:`tunesmith.serve.evals.check`) and a fine-tuning file is made from a filtered set
(:func:`training_example`, ``POST /v1/files/from_stored_completions``): OpenAI's distillation loop, self-hosted.

Rows live in the server's store (migration 0017); another key neither lists nor reaches them (the same 404
as an id that does not exist). A selection is one SQL query (model, metadata through an index of its tags, time,
cursor, order and limit), so a page of one reads one row; a key keeps at most ``--quota stored_completions``. Every
read and write runs in the store lane (:mod:`tunesmith.serve.api.store_lane`), the one after an answer included.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.api.auth import Key
from tunesmith.serve.api.json_body import OffLoopJSON
from tunesmith.serve.api.objects import page
from tunesmith.serve.api.store_lane import in_store_lane
from tunesmith.serve.errors import APIError, found
from tunesmith.serve.store import Store
from tunesmith.serve.store.quotas import check_metadata, check_stored_completion

router = APIRouter(prefix="/v1", route_class=OffLoopJSON)
MAX_LIST = 100
PAGE = 1_000  # rows a walk over a large selection (a distilled file, an eval's source) reads at a time
MAX_COUNTED = 100_000  # tags counted for one metadata pair, at most, to choose the pair a selection walks
MAX_TIME = 2**63 - 1  # SQLite's largest integer: a Unix time filter past it is a 400, not an overflow


class CompletionStore:
    """The stored completions of the server's store (one row per chat completion id)."""

    def __init__(self, store: Store):
        self.db, self.lock = store.db, store.lock

    def add(self, owner: str | None, completion: dict, request: dict) -> None:
        metadata = completion.get("metadata") or {}
        with self.db.transaction():
            self.db.execute("INSERT INTO stored_completions VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                            "owner = excluded.owner, model = excluded.model, created_at = excluded.created_at, "
                            "metadata = excluded.metadata, request = excluded.request, completion = excluded.completion",
                            (completion["id"], owner, completion["model"], completion["created"],
                             json.dumps(metadata), json.dumps(request), json.dumps(completion)))
            self._tag(completion["id"], metadata)

    def _tag(self, cid: str, metadata: dict) -> None:
        """The completion's metadata as rows of ``stored_completion_tags`` (one a key), in its list order: a
        selection by metadata walks an index of them instead of every row of the key."""
        row = self.db.execute("SELECT owner, created_at, rowid FROM stored_completions WHERE id = ?", (cid,)).fetchone()
        self.db.execute("DELETE FROM stored_completion_tags WHERE completion_id = ?", (cid,))
        self.db.executemany("INSERT INTO stored_completion_tags VALUES (?, ?, ?, ?, ?, ?)", [
            (cid, row[0], k, v, row[1], row[2]) for k, v in metadata.items() if isinstance(v, str)])

    def get(self, cid: str, owner: str | None) -> dict | None:
        row = self.db.execute("SELECT * FROM stored_completions WHERE id = ? AND owner IS ?", (cid, owner)).fetchone()
        return _row(row)

    def select(self, owner: str | None, metadata: dict[str, str] | None = None, model: str | None = None,
               after: str | None = None, order: str = "asc", limit: int | None = None,
               created_after: int | None = None, created_before: int | None = None) -> list[dict]:
        """A key's stored completions in creation order (``asc`` or ``desc``), filtered, in one query that reads
        no row past ``limit``; ``after`` an id of the previous page (a 400 when it is not one of the key's). With
        metadata, the query walks the index of the rarest pair's tags in list order, each other pair a lookup."""
        place = None if after is None else self._cursor(owner, after)
        pairs = self._rarest_first(owner, metadata) if metadata else []
        return [row for row, _ in self._page(owner, pairs, model, place, order, limit, created_after, created_before)]

    def walk(self, owner: str | None, metadata: dict[str, str] | None = None, model: str | None = None,
             limit: int | None = None, created_after: int | None = None, created_before: int | None = None,
             page: int = PAGE) -> Iterator[dict]:
        """:meth:`select`'s rows in ascending order, read ``page`` at a time (each page one query resuming after
        the last row's place in the list), so that a selection of 100,000 holds one page in memory, not all."""
        pairs = self._rarest_first(owner, metadata) if metadata else []
        place, left = None, limit
        while left is None or left > 0:
            size = page if left is None else min(page, left)
            rows = self._page(owner, pairs, model, place, "asc", size, created_after, created_before)
            yield from (row for row, _ in rows)
            if len(rows) < size:
                return
            place = rows[-1][1]  # the last row's place: where the next page starts
            left = None if left is None else left - size

    def _page(self, owner: str | None, pairs: list[tuple[str, str]], model: str | None, place: tuple | None,
              order: str, limit: int | None, created_after: int | None,
              created_before: int | None) -> list[tuple[dict, tuple[int, int]]]:
        """Rows of the selection after ``place`` (their list order: created_at, then rowid), each with its place.

        With metadata the page's ids are chosen first, in a subquery over the first pair's tags with its own
        ``ORDER BY … LIMIT``: the index (owner, name, value, created_at, seq) yields them in list order and the walk
        stops at ``limit``, every other filter a lookup by the tag's completion; only the page's rows are then read.
        The owner is compared with ``=`` (``IS NULL`` without keys), never ``IS ?``: PostgreSQL's generic plan of a
        prepared statement (psycopg prepares a query run five times) cannot drop the NULL branch of ``IS ?`` and
        would sort every tag row of a common value before the ``LIMIT``."""
        way = "DESC" if order == "desc" else "ASC"
        if pairs:
            (name, value), *others = pairs
            at, seq = "t.created_at", "t.seq"
            where, args = [_owner_is("t", owner), "t.name = ?", "t.value = ?"], [*_owner_arg(owner), name, value]
            for k, v in others:
                where.append("EXISTS (SELECT 1 FROM stored_completion_tags u WHERE u.completion_id = t.completion_id "
                             "AND u.name = ? AND u.value = ?)")
                args += [k, v]
            if model:
                where.append("EXISTS (SELECT 1 FROM stored_completions m WHERE m.id = t.completion_id AND m.model = ?)")
                args.append(model)
        else:
            at, seq = "sc.created_at", "sc.rowid"
            where, args = [_owner_is("sc", owner)], _owner_arg(owner)
            if model:
                where, args = [*where, "sc.model = ?"], [*args, model]
        if created_after is not None:
            where, args = [*where, f"{at} >= ?"], [*args, created_after]
        if created_before is not None:
            where, args = [*where, f"{at} <= ?"], [*args, created_before]
        if place is not None:
            where, args = [*where, f"({at}, {seq}) {'<' if way == 'DESC' else '>'} (?, ?)"], [*args, *place]
        sql = f"WHERE {' AND '.join(where)} ORDER BY {at} {way}, {seq} {way}"
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        if pairs:
            sql = (f"SELECT sc.*, page.created_at AS list_at, page.seq AS list_seq FROM (SELECT t.completion_id, "
                   f"t.created_at, t.seq FROM stored_completion_tags t {sql}) page JOIN stored_completions sc ON "
                   f"sc.id = page.completion_id ORDER BY page.created_at {way}, page.seq {way}")
        else:
            sql = f"SELECT sc.*, sc.created_at AS list_at, sc.rowid AS list_seq FROM stored_completions sc {sql}"
        return [_placed(r) for r in self.db.execute(sql, args)]

    def _rarest_first(self, owner: str | None, metadata: dict[str, str]) -> list[tuple[str, str]]:
        """The pairs, the one fewest of the key's completions carry first, so that the selection walks the
        shortest list and looks the others up. Each pair's tags are counted in the index up to a cap, and never
        past one more than the fewest counted so far; when every pair reaches the cap the cap grows tenfold (up to
        :data:`MAX_COUNTED`), so that a pair carried 1,062 times is told from one carried 95,000 times (a cap
        alone would tie them) while no count reads much past the rarest pair's list."""
        if len(metadata) == 1:
            return list(metadata.items())

        def carried(pair: tuple[str, str], most: int) -> int:
            return self.db.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM stored_completion_tags t WHERE "
                                   f"{_owner_is('t', owner)} AND t.name = ? AND t.value = ? LIMIT ?) carried",
                                   (*_owner_arg(owner), *pair, most)).fetchone()[0]

        cap, counts = 1_000, {}
        while True:
            fewest = cap
            for pair in metadata.items():
                counts[pair] = carried(pair, min(cap, fewest + 1))
                fewest = min(fewest, counts[pair])
            if fewest < cap or cap >= MAX_COUNTED:
                return sorted(metadata.items(), key=counts.__getitem__)
            cap *= 10

    def _cursor(self, owner: str | None, after: str) -> tuple[int, int]:
        """(created_at, rowid) of the key's stored completion ``after``; a 400 on ``after`` when it is none."""
        row = self.db.execute("SELECT created_at, rowid FROM stored_completions WHERE id = ? AND owner IS ?",
                              (after, owner)).fetchone()
        if row is None:
            raise APIError(400, f"after: {after} is not one of this key's stored completions here; pass the last_id "
                           "of the page you have", param="after", code="invalid_cursor")
        return row[0], row[1]

    def set_metadata(self, cid: str, metadata: dict[str, str]) -> None:
        with self.db.transaction():
            self.db.execute("UPDATE stored_completions SET metadata = ? WHERE id = ?", (json.dumps(metadata), cid))
            self._tag(cid, metadata)

    def delete(self, cid: str) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM stored_completion_tags WHERE completion_id = ?", (cid,))
            self.db.execute("DELETE FROM stored_completions WHERE id = ?", (cid,))


def _owner_is(table: str, owner: str | None) -> str:
    """``<table>.owner`` equal to the key's owner id, spelled so that any plan uses the index (see ``_page``)."""
    return f"{table}.owner IS NULL" if owner is None else f"{table}.owner = ?"


def _owner_arg(owner: str | None) -> list:
    return [] if owner is None else [owner]


def _placed(row) -> tuple[dict, tuple[int, int]]:
    """A selected row and its place in the list (created_at, rowid), which the next page starts after."""
    d = _row(row)
    place = d.pop("list_at"), d.pop("list_seq")
    d.pop("rowid", None)  # PostgreSQL's rowid column, read when a query names it
    return d, place


def _row(row) -> dict | None:
    if row is None:
        return None
    d = dict(row)
    for key in ("metadata", "request", "completion"):
        d[key] = json.loads(d[key])
    return d


def completion_object(row: dict) -> dict:
    """The ChatCompletion as it was answered, with its metadata as it is now."""
    return row["completion"] | {"metadata": row["metadata"]}


def check_selection(source: dict, where: str) -> dict:
    """The filters of a ``stored_completions`` selection (an eval's source): ``model`` a string, ``metadata`` by
    OpenAI's rule, ``created_after``/``created_before`` Unix times, ``limit`` a positive integer; a 400 naming
    ``<where>.<field>`` otherwise. Returns them as :meth:`CompletionStore.select` takes them."""
    model = source.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"{where}.model must be a model name (a string)", param=f"{where}.model")
    picked = {"model": model, "metadata": check_metadata(source.get("metadata"), f"{where}.metadata")}
    for name in ("created_after", "created_before"):
        value = picked[name] = source.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIME):
            raise APIError(400, f"{where}.{name} must be a Unix time in seconds (an integer from 0 to {MAX_TIME})",
                           param=f"{where}.{name}")
    limit = picked["limit"] = source.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise APIError(400, f"{where}.limit must be a positive integer", param=f"{where}.limit")
    return picked


def before_storing(request: Request, key: str | None, body) -> None:
    """Before a ``store: true`` chat completion is generated: its metadata by OpenAI's rule and room under the key's
    ``stored_completions`` quota (a 4xx then, not after the answer was paid for)."""
    if body.store:
        check_metadata(body.metadata, "metadata")
        check_stored_completion(request, key)


def store_completion(request: Request, key: str | None, completion: dict, body, plan) -> None:
    """Keep an answered chat completion (``store: true``) with what was asked: the messages as sent, the tools,
    the output format and the sampling settings (its metadata and quota checked by :func:`before_storing`)."""
    asked = {"messages": [m.model_dump(exclude_none=True) for m in body.messages], "tools": body.tools,
             "tool_choice": body.tool_choice, "response_format": body.response_format,
             "temperature": body.temperature, "top_p": body.top_p, "max_tokens": body.max_completion_tokens or body.max_tokens,
             "seed": body.seed, "n": body.n}
    CompletionStore(request.app.state.store).add(key, completion | {"metadata": check_metadata(body.metadata)},
                                                 {k: v for k, v in asked.items() if v is not None})


def metadata_query(request: Request) -> dict[str, str]:
    """``metadata[k]=v`` query pairs, the client's form for a metadata filter."""
    return {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}


@router.get("/chat/completions")
@in_store_lane
def list_completions(request: Request, key: Key, model: str | None = None, after: str | None = None,
                     limit: int = Query(20, ge=1, le=MAX_LIST), order: str = Query("asc", pattern="^(asc|desc)$")):
    rows = CompletionStore(request.app.state.store).select(key, metadata_query(request), model, after, order, limit + 1)
    data = [completion_object(r) for r in rows[:limit]]
    return page(data, len(rows) > limit)


@router.get("/chat/completions/{completion_id}")
@in_store_lane
def retrieve_completion(completion_id: str, request: Request, key: Key):
    return completion_object(_stored(request, key, completion_id))


class MetadataBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: Any = Field(...)  # checked by check_metadata (OpenAI's rule)


@router.post("/chat/completions/{completion_id}")
@in_store_lane
def update_completion(completion_id: str, body: MetadataBody, request: Request, key: Key):
    _stored(request, key, completion_id)
    completions = CompletionStore(request.app.state.store)
    completions.set_metadata(completion_id, check_metadata(body.metadata))
    return completion_object(completions.get(completion_id, key))


@router.delete("/chat/completions/{completion_id}")
@in_store_lane
def delete_completion(completion_id: str, request: Request, key: Key):
    _stored(request, key, completion_id)
    CompletionStore(request.app.state.store).delete(completion_id)
    return {"id": completion_id, "object": "chat.completion.deleted", "deleted": True}


@router.get("/chat/completions/{completion_id}/messages")
@in_store_lane
def completion_messages(completion_id: str, request: Request, key: Key, after: str | None = None,
                        limit: int = Query(20, ge=1, le=MAX_LIST), order: str = Query("asc", pattern="^(asc|desc)$")):
    """The request's messages, each with an id (``<completion id>-<index>``), in order or reversed."""
    row = _stored(request, key, completion_id)
    messages = [m | {"id": f"{completion_id}-{i}", "content_parts": None} if not isinstance(m.get("content"), list)
                else m | {"id": f"{completion_id}-{i}", "content_parts": m["content"], "content": None}
                for i, m in enumerate(row["request"]["messages"])]
    if order == "desc":
        messages.reverse()
    ids = [m["id"] for m in messages]
    if after is not None:
        if after not in ids:
            raise APIError(400, f"after: {after} is not a message of {completion_id}", param="after")
        messages = messages[ids.index(after) + 1:]
    return page(messages[:limit], len(messages) > limit)


def _stored(request: Request, key, completion_id: str) -> dict:
    return found(CompletionStore(request.app.state.store).get(completion_id, key), "chat completion", completion_id,
                 "completion_id")


def left_out(row: dict) -> str | None:
    """Why a stored completion makes no fine-tuning example, or None: ``cut_by_max_tokens`` (a fine-tune must not learn
    to stop mid-sentence), ``empty`` (no text and no tool calls, say an answer cut at a stop string at its start: a
    fine-tuning file may not hold it)."""
    choice = row["completion"]["choices"][0]
    if choice["finish_reason"] == "length":
        return "cut_by_max_tokens"
    message = choice["message"]
    if not message.get("content") and not message.get("tool_calls"):
        return "empty"
    return None


def training_example(row: dict, drop_system: bool = False) -> dict | None:
    """A stored completion as an OpenAI chat fine-tuning example: the request's messages and the answer (its tool
    calls included), with the request's tools; ``drop_system`` leaves out system and developer messages (a prompt
    the fine-tune is to learn by heart). None when it is :func:`left_out`."""
    if left_out(row) is not None:
        return None
    choice = row["completion"]["choices"][0]
    answer = {k: v for k, v in choice["message"].items() if k in ("role", "content", "tool_calls") and v is not None}
    messages = [m for m in row["request"]["messages"] if not (drop_system and m.get("role") in ("system", "developer"))]
    example = {"messages": [*messages, answer]}
    if row["request"].get("tools"):
        example["tools"] = row["request"]["tools"]
    return example
