"""Human review of generated items: export a CSV with an empty decision column, import decisions.

Only accepted and edited items reach ``synth/accepted.jsonl``, the file training reads.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tunesmith.errors import DataError

EDIT_FIELD = {
    "paraphrase": "question",
    "qa_from_documents": "answer",
    "seed_questions": "answer",
    "evol_instruct": "instruction",
    "preference_pairs": "chosen",
}
DECISIONS = {"accept", "reject", "edit", ""}


def items_path(synth_dir: Path) -> Path:
    return synth_dir / "items.jsonl"


def read_items(synth_dir: Path) -> list[dict]:
    path = items_path(synth_dir)
    if not path.is_file():
        raise DataError(f"{path} not found: run `tunesmith synth RECIPE` first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_items(synth_dir: Path, items: list[dict]) -> None:
    """Rewrite items.jsonl and accepted.jsonl (accepted or edited items, edits applied)."""
    with open(items_path(synth_dir), "w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps(it, ensure_ascii=False) + "\n")
    with open(synth_dir / "accepted.jsonl", "w", encoding="utf-8") as fh:
        for it in items:
            if it["status"] in ("accepted", "edited"):
                fh.write(json.dumps({"id": it["id"], **it["data"]}, ensure_ascii=False) + "\n")


def _cell(value) -> str:
    if isinstance(value, list):
        return " | ".join(map(str, value))
    return "" if value is None else str(value)


def export_review(synth_dir: Path, out: Path) -> int:
    items = read_items(synth_dir)
    columns = sorted({k for it in items for k in it["data"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "task", "status", *columns, "decision", "edited_text"])
        for it in items:
            decision = {"accepted": "accept", "rejected": "reject", "edited": "edit"}.get(it["status"], "")
            writer.writerow([it["id"], it["task"], it["status"], *(_cell(it["data"].get(c)) for c in columns),
                             decision, it.get("edited_text", "")])
    return len(items)


def import_review(synth_dir: Path, review_csv: Path) -> dict[str, int]:
    """Apply decisions; every problem in the CSV is reported with its line before anything is written."""
    items = read_items(synth_dir)
    by_id = {it["id"]: it for it in items}
    if not review_csv.is_file():
        raise DataError(f"Review file not found: {review_csv}")
    problems, decisions = [], {}
    with open(review_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"id", "decision", "edited_text"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{review_csv}: missing column(s) {sorted(missing)}; export a fresh file with `synth review export`")
        for row in reader:
            line = reader.line_num
            decision = (row["decision"] or "").strip().lower()
            if row["id"] not in by_id:
                problems.append(f"{review_csv}:{line}: unknown id {row['id']!r}")
            elif decision not in DECISIONS:
                problems.append(f"{review_csv}:{line}: decision {decision!r} is not accept, reject, edit or empty")
            elif decision == "edit" and not (row["edited_text"] or "").strip():
                problems.append(f"{review_csv}:{line}: decision 'edit' needs edited_text")
            else:
                decisions[row["id"]] = (decision, (row["edited_text"] or "").strip())
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the review file:\n" + "\n".join(f"  - {p}" for p in problems))
    counts = {"accepted": 0, "edited": 0, "rejected": 0, "pending": 0}
    for it in items:
        decision, edited = decisions.get(it["id"], ("", ""))
        if decision == "accept":
            it["status"] = "accepted"
        elif decision == "reject":
            it["status"] = "rejected"
        elif decision == "edit":
            it["status"] = "edited"
            it["edited_text"] = edited
            it["data"][EDIT_FIELD[it["task"]]] = edited
        counts[it["status"]] = counts.get(it["status"], 0) + 1
    write_items(synth_dir, items)
    return counts
