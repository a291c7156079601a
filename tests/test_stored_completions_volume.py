"""Stored completions at volume, on SQLite and PostgreSQL: a walk reads a selection page by page with the rows and
order of one query; the metadata pair walked is the rarest even past the first count's cap; on PostgreSQL a page of
a common value walks the tags' index in list order and stops at the page, whichever plan the server picks; a
distilled file is written page by page, its lines those of the selection, its problems those of an upload."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tunesmith.serve.api.stored_completions import CompletionStore, training_example
from tunesmith.serve.jobs.distill import written_file
from tunesmith.serve.store import Store


def fill(store, n: int, owner: str = "o1", meta=lambda i: {"team": "a" if i % 2 else "b"}, cut=lambda i: False,
         model=lambda i: "m", start: int = 0) -> None:
    """``n`` stored completions written straight into the tables (as ``CompletionStore.add`` writes them), four to
    a second of ``created``, so that the list order leans on the insertion order too."""
    completions, tags = [], []
    for i in range(start, start + n):
        cid, created = f"c{i:06d}", 1_000 + i // 4
        answer = {"role": "assistant", "content": f"answer {i}"}
        completion = {"id": cid, "model": model(i), "created": created, "choices": [
            {"index": 0, "message": answer, "finish_reason": "length" if cut(i) else "stop"}]}
        request = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q {i}"}]}
        completions.append((cid, owner, model(i), created, json.dumps(meta(i)), json.dumps(request),
                            json.dumps(completion)))
        tags += [(cid, owner, k, v, created, i + 1) for k, v in meta(i).items()]
    with store.db.transaction():
        store.db.executemany("INSERT INTO stored_completions VALUES (?, ?, ?, ?, ?, ?, ?)", completions)
        store.db.executemany("INSERT INTO stored_completion_tags VALUES (?, ?, ?, ?, ?, ?)", tags)
    store.db.execute("ANALYZE")


def ids(rows) -> list[str]:
    return [r["id"] for r in rows]


def test_a_walk_reads_page_by_page_the_rows_of_one_selection(store):
    fill(store, 23, meta=lambda i: {"team": "a" if i % 3 else "b", "n": str(i % 2)}, model=lambda i: f"m{i % 2}")
    fill(store, 3, owner="o2", start=23)  # another key's: never walked
    completions = CompletionStore(store)
    for filters in ({}, {"metadata": {"team": "a"}}, {"metadata": {"team": "a", "n": "1"}}, {"model": "m0"},
                    {"metadata": {"team": "a"}, "model": "m1", "created_after": 1_001, "created_before": 1_004}):
        everything = ids(completions.select("o1", **filters))
        assert everything, filters
        for page in (1, 2, 5, 100):
            assert ids(completions.walk("o1", **filters, page=page)) == everything, (filters, page)
            assert ids(completions.walk("o1", **filters, limit=7, page=page)) == everything[:7], (filters, page)
    assert list(completions.walk("o3")) == []


def test_the_pair_walked_is_the_rarest_even_when_both_pass_the_first_count(store):
    """1,100 rows carry the rare pair and 2,500 the common one: counted up to 1,000 alone they would tie."""
    fill(store, 2_500, meta=lambda i: {"team": "a", **({"case": "c"} if i < 1_100 else {})})
    completions = CompletionStore(store)
    assert completions._rarest_first("o1", {"team": "a", "case": "c"})[0] == ("case", "c")
    assert completions._rarest_first("o1", {"case": "c", "team": "a"})[0] == ("case", "c")
    assert ids(completions.select("o1", {"team": "a", "case": "c"}, limit=3)) == ["c000000", "c000001", "c000002"]


@pytest.mark.parametrize("plan_mode", ["force_generic_plan", "force_custom_plan"])
def test_a_page_of_a_common_value_on_postgresql_stops_at_the_page(postgres, tmp_path, plan_mode):
    """10,000 of 20,000 completions carry the value; the page of 21 reads at most 21 of their tags and sorts none
    of the others, with the plan made for the values (custom) and with the plan PostgreSQL keeps for a statement
    psycopg prepared (generic, which cannot tell the key's owner from NULL). Every plan the server ran is read
    back through auto_explain, as it ran."""
    s = Store(tmp_path / "data", postgres())
    fill(s, 20_000)
    completions, plans = CompletionStore(s), []
    with s.db.transaction():  # one connection: the settings, the prepared statement and its plans
        conn = s.db.local.conn
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary))
        for setting in ("client_min_messages = log", "auto_explain.log_min_duration = 0",
                        "auto_explain.log_analyze = on", "auto_explain.log_format = json", f"plan_cache_mode = {plan_mode}"):
            s.db.execute(f"SET LOCAL {setting}")
        s.db.execute("LOAD 'auto_explain'")
        for _ in range(8):  # past psycopg's prepare threshold (5)
            assert len(completions.select("o1", {"team": "a"}, limit=21)) == 21
    s.db.close()
    walked = [json.loads(p.split("\n", 1)[1])["Plan"] for p in plans if "stored_completion_tags" in p]
    assert len(walked) == 8, plans

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    for plan in walked:
        tags_read = [n["Actual Rows"] for n in nodes(plan) if n.get("Relation Name") == "stored_completion_tags"]
        sorted_in = [c["Actual Rows"] for n in nodes(plan) if n["Node Type"] == "Sort" for c in n["Plans"]]
        assert tags_read and max(tags_read) <= 21 and all(rows <= 21 for rows in sorted_in), json.dumps(plan)


def test_a_distilled_file_is_written_page_by_page_as_the_selection_reads(store):
    """2,500 completions (three pages of the walk), every seventh cut by max_tokens: the file holds the others'
    examples in list order, as one query and the examples made of it would, with the system messages dropped."""
    fill(store, 2_500, cut=lambda i: i % 7 == 0, model=lambda i: "teacher" if i % 5 else "other")
    body = SimpleNamespace(model=None, limit=None, created_after=None, created_before=None, drop_system_messages=True)
    made = written_file(store, "o1", body, {})
    rows = CompletionStore(store).select("o1")
    expected = [e for e in (training_example(r, drop_system=True) for r in rows) if e is not None]
    lines = made.path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == expected and len(expected) == 2_500 - 358
    assert (made.selected, made.examples, made.bytes, made.problems) == (2_500, 2_142, made.path.stat().st_size, [])
    assert made.models == {"teacher": 2_000, "other": 500}
    assert all(json.loads(line)["messages"][0]["role"] == "user" for line in lines)
    limited = written_file(store, "o1", SimpleNamespace(**{**vars(body), "limit": 1_001}), {"team": "a"})
    assert limited.selected == 1_001 and limited.path != made.path


def test_a_distilled_example_that_would_not_train_is_an_upload_problem(store):
    fill(store, 3)
    store.db.execute("UPDATE stored_completions SET request = ? WHERE id = ?", (json.dumps({
        "messages": [{"role": "user", "content": None}]}), "c000001"))
    body = SimpleNamespace(model=None, limit=None, created_after=None, created_before=None, drop_system_messages=False)
    made = written_file(store, "o1", body, {})
    assert made.examples == 3 and len(made.problems) == 1 and "(lines 2)" in made.problems[0], made.problems


def test_an_empty_answer_is_left_out_of_a_distilled_file_and_counted(store):
    """An answer with no text and no tool calls (cut at a stop string at its start) is no example a fine-tuning file
    may hold: it is left out and counted, as an answer cut by max_tokens is, and the others make the file."""
    fill(store, 4, cut=lambda i: i == 3)
    for cid, content in (("c000001", None), ("c000002", "")):
        store.db.execute("UPDATE stored_completions SET completion = ? WHERE id = ?", (json.dumps({
            "id": cid, "model": "m", "choices": [{"message": {"role": "assistant", "content": content},
                                                  "finish_reason": "stop"}]}), cid))
    body = SimpleNamespace(model=None, limit=None, created_after=None, created_before=None, drop_system_messages=False)
    made = written_file(store, "o1", body, {})
    assert (made.selected, made.examples, made.problems) == (4, 1, [])
    assert made.left_out == {"empty": 2, "cut_by_max_tokens": 1}
