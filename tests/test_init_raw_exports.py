"""`tunesmith init` on raw exports as teams write them (tests/raw_exports.py): an inbox export with RFC 2822 dates that
leak the label, senders, empty subjects and HTML bodies, and a held-out test file; a CRM ticket export with
created-at timestamps, agent e-mail addresses, phone numbers and refund amounts; an Excel-saved CSV (BOM, CRLF,
``;``). Each field is read for what it is, empty cells are empty text, no test row is set aside unsaid, and the
recipe passes `tunesmith data prepare` unedited; `run --quick` gives its verdict on a small inbox export."""

from __future__ import annotations

import re

import pytest

from tests.raw_exports import crm_tickets, csv_text, email_export, excel_csv, shared_files
from tests.test_init_corpus import MINILM, banking, chosen, init_said
from tunesmith.config import load_recipe


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def inbox():
    files = shared_files()
    if files is None:
        pytest.skip("shared data (instructions, banking77, products_amazon_in) not found under ../shared/data")
    return files


def write_export(tmp_path, train: list[dict], test: list[dict]):
    data, held = tmp_path / "emails.csv", tmp_path / "emails_test.csv"
    data.write_text(csv_text(train), encoding="utf-8")
    held.write_text(csv_text(test), encoding="utf-8")
    return data, held


def test_an_inbox_export_reads_subject_and_body_and_leaves_out_the_leaking_date_and_the_senders(cli, tmp_path, inbox,
                                                                                              tiny_model_dir):
    train, test = email_export(inbox)
    train, test = train[::2], test[::2]  # half of it: the same kinds of rows, in half the time
    data, held = write_export(tmp_path, train, test)
    empty = sum(not r["subject"] for r in test)
    cfg, said, prepared, encoder = chosen(cli, data, tiny_model_dir, "--test", str(held))
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "label", ["subject", "body"], MINILM)
    said = " ".join(said.split())
    assert "left out message_id: an id" in said
    assert re.search(r"left out date: dates \(RFC 2822, e\.g\. '\w{3}, \d\d \w{3} 2002 [\d:]{8} [+-]\d{4}", said)
    assert re.search(r"a likely leak: on its own it puts 100% of rows in the right label .*ham 2002-08-0\d to "
                     r"2002-(09-30|10-01), spam 2002-10-0\d to 2002-(11-30|12-01)", said), said
    assert "left out from: e-mail addresses" in said
    assert empty > 10 and "rows the run sets aside" not in said and cfg.data.on_error == "fail"
    assert f"test: {len(test):,} of {len(test):,} rows of emails_test.csv are scored" in said
    prepared = " ".join(prepared.split())
    assert f"{len(train) + len(test):,} records in" in prepared and "rejected (see data/rejected.jsonl): 0" in prepared


def test_an_inbox_test_file_says_its_unusable_rows_and_refuses_a_missing_label(cli, tmp_path, inbox, tiny_model_dir):
    """Two test emails with neither subject nor body are set aside and counted in the verdict; a test email without
    its label is an error naming its line, from init and from the run alike."""
    train, test = email_export(inbox, unusable_test=2)
    train, test = train[::3], test[:300]
    data, held = write_export(tmp_path, train, test)
    cfg, said, prepared, _ = chosen(cli, data, tiny_model_dir, "--test", str(held))
    said = " ".join(said.split())
    assert f"test: {len(test) - 2:,} of {len(test):,} rows of emails_test.csv are scored; 2 set aside" in said
    assert "emails_test.csv:2: no input text (fields 'subject', 'body' are all missing or empty)" in said
    assert cfg.data.on_error == "skip" and "2 record(s) set aside" in prepared
    test[9]["label"] = ""
    held.write_text(csv_text(test), encoding="utf-8")
    code, said, _ = init_said(cli, data, "--test", str(held), model=tiny_model_dir)
    found = re.search(r"emails_test\.csv: 1 test row\(s\) without a usable target, at line\(s\) (\d+)",
                      " ".join(said.split()))
    assert code != 0 and found, said
    line = int(found.group(1))  # bodies span lines: the row's first line in the file
    assert held.read_text(encoding="utf-8").splitlines()[line - 1].startswith(test[9]["message_id"])
    code, out = cli(["data", "prepare", str(tmp_path / "emails-0-recipe.yaml")])  # the recipe written above
    assert code != 0 and f"1 test row(s) without a usable target, at line(s) {line}" in " ".join(out.split())


def test_a_crm_ticket_export_reads_the_ticket_text_not_its_timestamps_people_or_amounts(cli, tmp_path, tiny_model_dir):
    rows = crm_tickets(banking()[::3])
    data = tmp_path / "tickets.csv"
    data.write_text(csv_text(rows), encoding="utf-8")
    cfg, said, prepared, encoder = chosen(cli, data, tiny_model_dir)
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "category", ["subject", "description"], MINILM)
    said = " ".join(said.split())
    for name, why in (("ticket", "an id (a different number on every row)"), ("created_at", "dates (ISO 8601, e.g."),
                      ("agent_email", "e-mail addresses"), ("customer_phone", "phone numbers"),
                      ("refund", "amounts of money ($)"), ("channel", "a category (3 short values), not free text")):
        assert f"left out {name}: {why}" in said, name
    assert "rows the run sets aside" not in said and f"{len(rows):,} kept" in prepared  # empty subjects kept


def test_an_excel_saved_csv_with_a_bom_crlf_and_semicolons_is_read_as_its_fields(cli, tmp_path, tiny_model_dir):
    rows = [{"Datum": f"{i % 28 + 1:02d}.03.2024 {i % 24:02d}:15", "Nachricht": r["text"], "Betrag": f"{i % 90},50 €",
             "Kategorie": r["category"]} for i, r in enumerate(banking()[::4])]
    data = tmp_path / "export.csv"
    data.write_bytes(excel_csv(rows))
    assert data.read_bytes().startswith(b"\xef\xbb\xbfDatum;Nachricht;") and b"\r\n" in data.read_bytes()
    cfg, said, prepared, encoder = chosen(cli, data, tiny_model_dir, "--target", "Kategorie")
    assert (cfg.data.task, cfg.data.target_field, cfg.data.input_fields, encoder) == (
        "classification", "Kategorie", ["Nachricht"], MINILM)
    said = " ".join(said.split())
    assert "left out Datum: dates (written out, e.g. '01.03.2024 00:15')" in said
    assert "left out Betrag: amounts of money (€)" in said
    assert f"{len(rows):,} kept" in prepared
    recipe = load_recipe(next(tmp_path.glob("export-*-recipe.yaml")))
    assert recipe.data.input_fields == ["Nachricht"]


@pytest.mark.slow
def test_run_quick_on_a_small_inbox_export_gives_a_verdict_with_every_part_planned(cli, tmp_path, inbox,
                                                                                   tiny_model_dir, tiny_bert_dir):
    """The issue's path end to end on a small export with tiny models: init, then `run --quick`: the plan names
    the probe and every part, the report's verdict says the sample and the two test rows set aside, and the
    training tables say the steps that ran."""
    train, test = email_export(inbox, n_banking=60, unusable_test=2)
    data, held = write_export(tmp_path, train[::8], test[:90])
    code, said, recipe = init_said(cli, data, "--test", str(held), "--encoder", str(tiny_bert_dir),
                                   model=tiny_model_dir)
    assert code == 0, said
    code, out = cli(["run", str(recipe), "--quick", "--set", "eval.bootstrap=50"])
    assert code == 0, out
    said = " ".join(out.split())
    plan = re.search(r"encoder-head +([\d,]+) +(\d+) +[\d,]+ +[\d,]+ MB +(\d+ s)", said)
    assert plan and plan.group(3), said  # the probe is in the plan
    assert "so far start-up and data:" in said and "total about" in said
    report = (tmp_path / "runs" / "emails" / "report.md").read_text()
    assert ("on 80 held-out test examples (a seeded sample of the 88 in the test split); test rows set aside: 2 with "
            "no input text (fields 'subject', 'body' are all missing or empty) (data/rejected.jsonl).") in report
    assert report.count("| steps / learning rate |") == 2 and "epochs / learning rate" not in report
