import pytest

from tunesmith.data.read.readers import read_records
from tunesmith.errors import DataError


def test_jsonl_records_remember_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    records, rejected = read_records(p)
    assert [r.data["text"] for r in records] == ["a", "b"]
    assert records[1].source == f"{p}:3"
    assert rejected == []


def test_malformed_jsonl_line_fails_with_file_line_and_start(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "broken\n')
    with pytest.raises(DataError) as exc:
        read_records(p)
    assert f"{p}:2" in str(exc.value)
    assert '{"text": "broken' in str(exc.value)


def test_skip_policy_collects_bad_lines_with_reasons(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\nnot json\n[1, 2]\n{"text": "b"}\n')
    records, rejected = read_records(p, on_error="skip")
    assert len(records) == 2
    assert [r.source for r in rejected] == [f"{p}:2", f"{p}:3"]
    assert "not valid JSON" in rejected[0].reason and "not a JSON object" in rejected[1].reason
    assert rejected[0].record == "not json"


def test_csv_ragged_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"hello, world",x\nonly-one-field\nok,y\n')
    with pytest.raises(DataError, match=r"d\.csv:3: has 1 fields but the header has 2"):
        read_records(p)
    records, rejected = read_records(p, on_error="skip")
    assert [r.data["text"] for r in records] == ["hello, world", "ok"]
    assert len(rejected) == 1


def test_csv_multiline_field_keeps_correct_line_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"two\nlines",x\nbad\n')
    _, rejected = read_records(p, on_error="skip")
    assert rejected[0].source.endswith("d.csv:4")


def test_json_array_and_records_object(tmp_path):
    a = tmp_path / "a.json"
    a.write_text('[{"text": "a"}, 3]')
    records, rejected = read_records(a, on_error="skip")
    assert len(records) == 1 and rejected[0].source.endswith("[1]")
    b = tmp_path / "b.json"
    b.write_text('{"meta": 1, "records": [{"text": "a"}, {"text": "b"}]}')
    assert len(read_records(b)[0]) == 2


def test_missing_empty_undecodable_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "none.jsonl")
    empty = tmp_path / "e.jsonl"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_records(empty)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"l\.jsonl:2: bytes that are not UTF-8"):
        read_records(latin)
    weird = tmp_path / "w.xyz"
    weird.write_text("x")
    with pytest.raises(DataError, match="data.format"):
        read_records(weird)


def test_limit_stops_reading(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(f'{{"text": "{i}"}}\n' for i in range(10)))
    assert len(read_records(p, limit=3)[0]) == 3
