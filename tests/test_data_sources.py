"""Readers beyond CSV/JSONL: Parquet, SQuAD/KorQuAD, saved HF datasets, the hub (offline), documents."""

import json
from pathlib import Path

import pytest

from tunesmith.config import DataSection, DocumentsSection
from tunesmith.data.read.readers import read_records
from tunesmith.data.read.sources import chunk_by_tokens, derive_fields, read_documents, read_source
from tunesmith.errors import DataError
from tunesmith.records import Record

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture()
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def data_cfg(**kw) -> DataSection:
    base = {"input_fields": ["text"], "target_field": "label"}
    return DataSection(**{**base, **kw})


def test_parquet_rows_and_bad_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]), p)
    records, _ = read_records(p)
    assert [r.data["text"] for r in records] == ["a", "b"] and records[1].source == f"{p}:row 2"
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match="empty"):
        read_records(empty)
    broken = tmp_path / "b.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_records(broken)


def test_squad_json_is_flattened_to_one_record_per_question(tmp_path):
    doc = {
        "version": "1.1",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where is Paris?",
                                "answers": [{"text": "France", "answer_start": 12}],
                            },
                            {
                                "id": "q2",
                                "question": "What is in France?",
                                "answers": [{"text": "Paris", "answer_start": 0}],
                            },
                        ],
                    },
                    {"context": "Seoul.", "qas": [{"id": "q3", "question": "Capital?", "answers": []}]},
                ],
            }
        ],
    }
    p = tmp_path / "squad.json"
    p.write_text(json.dumps(doc))
    records, _ = read_records(p)
    assert [r.data["id"] for r in records] == ["q1", "q2", "q3"]
    assert records[1].data["context"] == "Paris is in France." and records[1].data["answers"] == ["Paris"]
    assert records[1].data["answer"] == "Paris" and records[2].data["answer"] == ""
    assert records[0].data["answer_starts"] == [12] and records[2].data["title"] == "T"
    assert records[2].source.endswith("paragraphs[1].qas[0]")


@pytest.mark.skipif(not (SHARED / "korquad").is_dir(), reason="../shared/data/korquad is not present")
def test_real_korquad_dev_subset():
    path = SHARED / "korquad" / "korquad_v1_dev_shared.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    n_questions = sum(len(p["qas"]) for a in doc["data"] for p in a["paragraphs"])
    records, rejected = read_records(path)
    assert len(records) == n_questions and not rejected
    r = records[0]
    assert r.data["answers"][0] in r.data["context"]  # KorQuAD answers are spans of the context


def test_saved_hf_dataset_folder_and_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    ds.save_to_disk(str(tmp_path / "one"))
    records, _ = read_records(tmp_path / "one")
    assert [r.data["label"] for r in records] == ["x", "y"]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    recs, _ = read_source(data_cfg(path=tmp_path / "dd", hub={"name": "unused", "split": "test"}))
    assert [r.data["text"] for r in recs] == ["b"]
    with pytest.raises(DataError, match="no split 'dev'"):
        read_source(data_cfg(path=tmp_path / "dd", hub={"name": "unused", "split": "dev"}))
    (tmp_path / "not_ds").mkdir()
    (tmp_path / "not_ds" / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="not a saved Hugging Face dataset"):
        read_records(tmp_path / "not_ds")


def test_hub_dataset_offline_gives_a_clear_data_error(monkeypatch, cli, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # env vars are read once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"could not load hub dataset 'tunesmith-missing/none'.*save_to_disk"):
        read_source(data_cfg(hub={"name": "tunesmith-missing/none", "split": "train"}))
    from .conftest import write_recipe

    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "name": "hub",
            "output_dir": str(tmp_path / "runs"),
            "data": {
                "hub": {"name": "tunesmith-missing/none"},
                "input_fields": ["text"],
                "target_field": "label",
            },
        },
    )
    code, out = cli(["data", "prepare", str(recipe), "--no-cache"])
    assert code == 3, out
    assert "could not load hub dataset" in out and "Traceback" not in out


def test_chunks_overlap_by_tokens_and_cover_the_text(tok):
    words = [f"word{i}" for i in range(300)]
    text = " ".join(words)
    chunks = chunk_by_tokens(text, tok, size=40, overlap=10)
    assert len(chunks) > 3
    lens = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert max(lens) <= 41  # a cut can re-tokenize one boundary differently
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b[:8] in a[-60:], (a[-60:], b[:8])  # the overlap repeats the end of the previous chunk
    assert chunks[0].startswith("word0") and chunks[-1].endswith("word299")


def _minimal_pdf(pages: list[str]) -> bytes:
    """A small valid PDF with one Helvetica text line per page (an empty string gives a blank page)."""
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        None,
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET" if text else ""
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        content = len(objs)
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>"
        )
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_documents_keep_file_and_page(tmp_path, tok):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.pdf").write_bytes(_minimal_pdf(["First page about cards", "", "Third page about pins"]))
    (folder / "b.md").write_text("# Title\n\nSome markdown text about exchange rates.\n")
    (folder / "c.txt").write_text("plain text file\n")
    records, rejected = read_documents(folder, DocumentsSection(chunk_tokens=64, overlap_tokens=8), tok)
    assert not rejected
    by = {(Path(r.data["source_file"]).name, r.data["page"]): r.data["text"] for r in records}
    assert by[("a.pdf", 1)] == "First page about cards" and by[("a.pdf", 3)] == "Third page about pins"
    assert ("a.pdf", 2) not in by  # the blank page has no chunk
    assert "exchange rates" in by[("b.md", None)] and by[("c.txt", None)] == "plain text file"
    assert records[0].source.endswith("a.pdf:page 1:chunk 1")


def test_pdf_without_text_fails_or_is_set_aside(tmp_path, tok):
    scan = tmp_path / "scan.pdf"
    scan.write_bytes(_minimal_pdf(["", ""]))
    with pytest.raises(DataError, match=r"scan\.pdf: no extractable text on any of its 2 page"):
        read_documents(scan, DocumentsSection(), tok)
    records, rejected = read_documents(scan, DocumentsSection(), tok, on_error="skip")
    assert records == [] and rejected[0].source == str(scan) and "no extractable text" in rejected[0].reason


def test_undecodable_text_document_names_the_line(tmp_path, tok):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"line one\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt:2: bytes that are not UTF-8"):
        read_documents(bad, DocumentsSection(), tok)


@pytest.mark.skipif(not (SHARED / "documents").is_dir(), reason="../shared/data/documents is not present")
def test_real_korean_pdf_is_chunked_with_pages(tok):
    pdf = SHARED / "documents" / "korquad_2.0_paper_ko.pdf"
    records, _ = read_documents(pdf, DocumentsSection(chunk_tokens=256, overlap_tokens=32), tok)
    pages = {r.data["page"] for r in records}
    assert len(pages) >= 3 and min(pages) == 1
    assert any("KorQuAD" in r.data["text"] for r in records)
    assert all(r.data["source_file"] == str(pdf) for r in records)


def test_derived_fields_template_and_concatenation():
    recs = [Record({"title": "T", "body": "B", "n": 3}, "f:1"), Record({"title": "U", "body": None}, "f:2")]
    derive_fields(recs, {"full": "{title}: {body}", "joined": ["title", "body"], "count": "n={n}"})
    assert (
        recs[0].data["full"] == "T: B" and recs[0].data["joined"] == "T\nB" and recs[0].data["count"] == "n=3"
    )
    assert recs[1].data["full"] == "U:" and recs[1].data["count"] == "n="
    with pytest.raises(DataError, match=r"data.derive.x: no record has the field\(s\) \['nope'\]"):
        derive_fields(recs, {"x": "{nope}"})
