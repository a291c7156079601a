"""`tunesmith data prepare`: steps from the recipe, rejected.jsonl, summary, bad inputs, cache."""

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from tunesmith.config import load_recipe
from tunesmith.data.prepare import cache_key, prepare

from .conftest import banking_recipe, banking_rows, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def recipe_doc(tmp_path, data_path, model_dir, **data) -> dict:
    return banking_recipe(tmp_path, model_dir, data_path, name="prep", seed=3,
                          split={"train": 0.6, "val": 0.2, "test": 0.2}, data={"profile": {"enabled": False}, **data})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def rows():
    return banking_rows(LABELS, 20)


def test_prepare_with_steps_accounts_for_every_row(tmp_path, tiny_model_dir, cli, home, rows):
    rows = rows + [
        dict(rows[0]),
        {"text": "[x]", "category": "card_arrival"},
    ]  # an exact duplicate, pure noise
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(data, "a", encoding="utf-8") as fh:
        fh.write('["not", "an", "object"]\n{"text": "broken\n')
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_doc(
            tmp_path,
            data,
            tiny_model_dir,
            on_error="skip",
            steps=[
                {"step": "scrub", "fields": ["text"]},
                {"step": "char_length", "min": 5},
                {"step": "exact_dedup"},
                {"step": "token_length", "max": 12},
                {"step": "near_dedup", "threshold": 0.8},
            ],
        ),
    )
    code, out = cli(["data", "prepare", str(recipe)])
    assert code == 0, out
    d = tmp_path / "runs" / "prep" / "data"
    rejected = read_jsonl(d / "rejected.jsonl")
    kept = sum(len(read_jsonl(d / f"{s}.jsonl")) for s in ("train", "val", "test"))
    assert kept + len(rejected) == len(rows) + 2  # every input line is either kept or rejected with a reason
    stages = {r["stage"] for r in rejected}
    assert {"read", "1:scrub", "3:exact_dedup", "4:token_length"} <= stages
    assert all(r["reason"] for r in rejected)
    steps_md = (d / "steps.md").read_text()
    assert "| 1:scrub | 62 | 61 | 1 |" in steps_md and "| 3:exact_dedup |" in steps_md
    assert "records/s" in out and "rejected (see data/rejected.jsonl): " in out


@pytest.mark.parametrize(
    "case, content, match",
    [
        (
            "undecodable",
            b'{"text": "ok", "category": "a"}\n{"text": "caf\xe9", "category": "a"}\n',
            r"d\.jsonl:2: bytes",
        ),
        ("not_object", b'{"text": "ok", "category": "a"}\n[1, 2]\n', r"d\.jsonl:2: not a JSON object"),
        ("empty", b"\n", r"d\.jsonl: the file is empty"),
    ],
)
def test_bad_jsonl_exits_3_naming_file_and_line(tmp_path, tiny_model_dir, cli, home, case, content, match):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_doc(tmp_path, data, tiny_model_dir))
    code, out = cli(["data", "prepare", str(recipe)])
    assert code == 3, out
    import re

    assert re.search(match, out.replace("\n", "")), out


def test_ragged_csv_fails_or_lands_in_rejected(tmp_path, tiny_model_dir, cli, home, rows):
    data = tmp_path / "d.csv"
    lines = (
        ["text,category"] + [f'"{r["text"]}",{r["category"]}' for r in rows] + ["ragged row without comma"]
    )
    data.write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_doc(tmp_path, data, tiny_model_dir))
    code, out = cli(["data", "prepare", str(recipe)])
    assert code == 3 and f"d.csv:{len(rows) + 2}: has 1 fields but the header has 2" in out.replace("\n", "")
    code, out = cli(["data", "prepare", str(recipe), "--set", "data.on_error=skip"])
    assert code == 0, out
    rejected = read_jsonl(tmp_path / "runs" / "prep" / "data" / "rejected.jsonl")
    assert len(rejected) == 1 and rejected[0]["stage"] == "read" and "has 1 fields" in rejected[0]["reason"]


def test_field_named_in_recipe_that_no_record_has(tmp_path, tiny_model_dir, cli, home, rows):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    for extra in (
        {"split": {"group_field": "movie"}},
        {"steps": [{"step": "exact_dedup", "fields": ["body"]}]},
        {"input_fields": ["body"], "prompt": "{body}"},
    ):
        recipe = write_recipe(tmp_path / "r.yaml", recipe_doc(tmp_path, data, tiny_model_dir, **extra))
        code, out = cli(["data", "prepare", str(recipe), "--no-cache"])
        assert code == 3, (extra, out)
        assert "no record has the field" in out or "No record read so far has the field(s) ['body']" in out, out
        assert "'movie'" in out or "'body'" in out


def test_numeric_text_fails_with_line_or_is_rejected(tmp_path, tiny_model_dir, cli, home, rows):
    rows = [dict(r, price=str(10 + i)) for i, r in enumerate(rows)]
    rows[4]["price"] = "call us"
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    step = [{"step": "numeric_range", "fields": ["price"], "min": 0}]
    recipe = write_recipe(tmp_path / "r.yaml", recipe_doc(tmp_path, data, tiny_model_dir, steps=step))
    code, out = cli(["data", "prepare", str(recipe)])
    assert code == 3 and "d.jsonl:5: price: 'call us' is not a number" in out.replace("\n", "")
    code, out = cli(["data", "prepare", str(recipe), "--set", "data.on_error=skip"])
    rejected = read_jsonl(tmp_path / "runs" / "prep" / "data" / "rejected.jsonl")
    assert code == 0 and [r["source"].rsplit(":", 1)[1] for r in rejected] == ["5"]


def test_pdf_without_text_in_a_documents_recipe(tmp_path, tiny_model_dir, cli, home):
    from .test_data_sources import _minimal_pdf

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "scan.pdf").write_bytes(_minimal_pdf([""]))
    (docs / "ok.pdf").write_bytes(_minimal_pdf(["Cards arrive in a week", "Pins unblock at an ATM"]))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_doc(
            tmp_path,
            docs,
            tiny_model_dir,
            input_fields=["text"],
            target_field="source_file",
            split={"train": 0.5, "val": 0, "test": 0.5},
        ),
    )
    code, out = cli(["data", "prepare", str(recipe)])
    assert code == 3 and "scan.pdf: no extractable text" in out.replace("\n", "")
    code, out = cli(["data", "prepare", str(recipe), "--set", "data.on_error=skip"])
    assert code == 0, out
    rejected = read_jsonl(tmp_path / "runs" / "prep" / "data" / "rejected.jsonl")
    assert rejected[0]["source"].endswith("scan.pdf") and "no extractable text" in rejected[0]["reason"]


def test_cache_reuses_and_rebuilds_on_each_kind_of_change(tmp_path, tiny_model_dir, home, rows, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    path = write_recipe(
        tmp_path / "r.yaml", recipe_doc(tmp_path, data, model, steps=[{"step": "exact_dedup"}])
    )
    out_dir = tmp_path / "out"
    console = Console(quiet=True)

    def once(overrides=()):
        return prepare(load_recipe(path, list(overrides)), out_dir, console)

    first = once()
    assert not first.cached
    second = once()
    assert second.cached and [e.id for e in second.splits["test"]] == [e.id for e in first.splits["test"]]
    assert (out_dir / "test.jsonl").read_text() == (out_dir / "test.jsonl").read_text()
    assert not once(["data.split.train=0.5"]).cached  # data section changed
    assert not once(["seed=4"]).cached
    write_jsonl(data, rows[:-1])  # input changed
    assert not once().cached
    assert once().cached
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))  # tokenizer changed
    assert not once().cached
    key = cache_key(load_recipe(path))
    import tunesmith

    monkeypatch.setattr(tunesmith, "__version__", tunesmith.__version__ + ".dev-test")  # code changed
    assert cache_key(load_recipe(path)) != key
    assert not once().cached
    assert not prepare(load_recipe(path), out_dir, console, use_cache=False).cached


def test_run_profiles_and_exports_from_the_recipe(tmp_path, tiny_model_dir, home, rows):
    rows = [dict(r, chosen="good answer", rejected="bad answer") for r in rows]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    path = write_recipe(
        tmp_path / "r.yaml",
        recipe_doc(
            tmp_path,
            data,
            tiny_model_dir,
            profile={"enabled": True},
            steps=[{"step": "token_length", "max": 40}],
            export=[
                {"format": f}
                for f in ("openai-chat", "openai-completion", "openai-dpo", "alpaca", "hf", "parquet")
            ],
        ),
    )
    out = tmp_path / "out"
    prepared = prepare(load_recipe(path), out, Console(quiet=True))
    report = (out / "profile" / "report.md").read_text()
    assert f"records: **{len(rows)}**" in report and "![Token lengths](token_lengths.png)" in report
    assert (out / "profile" / "token_lengths.png").stat().st_size > 5000
    n_test = len(prepared.splits["test"])
    chat = read_jsonl(out / "export" / "test.openai-chat.jsonl")
    assert len(chat) == n_test and chat[0]["messages"][-1]["role"] == "assistant"
    comp = read_jsonl(out / "export" / "train.openai-completion.jsonl")
    assert comp[0]["prompt"].endswith("\n\n###\n\n") and comp[0]["completion"].startswith(" ")
    assert comp[0]["completion"].endswith("\n")
    dpo = read_jsonl(out / "export" / "val.openai-dpo.jsonl")
    assert dpo[0]["preferred_output"] == [{"role": "assistant", "content": "good answer"}]
    assert dpo[0]["non_preferred_output"][0]["content"] == "bad answer"
    assert dpo[0]["input"]["messages"][-1]["role"] == "user"
    assert read_jsonl(out / "export" / "test.alpaca.jsonl")[0]["text"].startswith("Below is an instruction")
    import datasets
    import pyarrow.parquet as pq

    hf = datasets.load_from_disk(str(out / "export" / "hf"))
    assert len(hf["test"]) == n_test and {"id", "text", "target", "prompt"} <= set(hf["test"].column_names)
    assert pq.read_table(out / "export" / "train.parquet").num_rows == len(prepared.splits["train"])


def test_undecodable_rows_are_rejected_under_skip(tmp_path, tiny_model_dir, cli, home, rows):
    data = tmp_path / "d.jsonl"
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(3, b'{"text": "caf\xe9 card", "category": "card_arrival"}')
    data.write_bytes(b"\n".join(lines) + b"\n")
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(
        b"text,category\nok,card_arrival\nbad \xff\xfe,pin_blocked\n"
        + b"".join(f'"{r["text"]}",{r["category"]}\n'.encode() for r in rows)
    )
    for path, line, n_good in ((data, 4, len(rows)), (csv_path, 3, len(rows) + 1)):
        recipe = write_recipe(
            tmp_path / "r.yaml", recipe_doc(tmp_path, path, tiny_model_dir, on_error="skip")
        )
        code, out = cli(["data", "prepare", str(recipe), "--no-cache"])
        assert code == 0, out
        d = tmp_path / "runs" / "prep" / "data"
        rejected = read_jsonl(d / "rejected.jsonl")
        assert [r["source"] for r in rejected] == [f"{path}:{line}"]
        assert "not UTF-8" in rejected[0]["reason"] and "\ufffd" in json.dumps(
            rejected[0]["record"], ensure_ascii=False
        )
        assert sum(len(read_jsonl(d / f"{s}.jsonl")) for s in ("train", "val", "test")) == n_good


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "korquad").is_dir(), reason="../shared/data/korquad is not present")
def test_korquad_qa_grouped_by_article(tmp_path, tiny_model_dir, home):
    path = write_recipe(
        tmp_path / "r.yaml",
        recipe_doc(
            tmp_path,
            SHARED / "korquad" / "korquad_v1_dev_shared.json",
            tiny_model_dir,
            input_fields=["context", "question"],
            target_field="answer",
            prompt="{context}\n\nQuestion: {question}",
            limit=600,
            steps=[{"step": "char_length", "fields": ["context"], "max": 1500, "truncate": False}],
            split={"train": 0.7, "val": 0.1, "test": 0.2, "group_field": "title", "stratify": False},
        ),
    )
    out = tmp_path / "out"
    data = prepare(load_recipe(path), out, Console(quiet=True))
    titles = {name: {e.meta["title"] for e in data.splits[name]} for name in ("train", "val", "test")}
    assert titles["train"] and titles["test"]
    assert not (titles["train"] & titles["test"]) and not (titles["train"] & titles["val"])
    rejected = read_jsonl(out / "rejected.jsonl")
    assert data.summary["rows read"] == 600 == data.summary["examples"] + len(rejected)
    assert all("characters > max 1500" in r["reason"] for r in rejected)
    row = read_jsonl(out / "test.jsonl")[0]
    assert "Question: " in row["messages"][-2]["content"] and row["messages"][-1]["content"]
