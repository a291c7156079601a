"""``tunesmith init DATA``: a first recipe fitted to a data file, so that ``tunesmith run`` works on it unedited.

It reads the first :data:`SAMPLE_ROWS` rows of the file through the reader ``tunesmith data prepare`` streams
(``data.batches.read_sample``: CSV/TSV, JSONL, JSON, Parquet, SQuAD-style JSON, chat JSONL with ``messages``, a saved
Hugging Face dataset folder; broken lines by file:line, the encoding), shows its fields, takes the target
(``--target``, else the one field whose name or values say so) and the task kind (``--task``, else from the
target: SQuAD → qa, chat → generation, short values that repeat → classification, other numbers → regression,
free text → generation). The inputs are the free-text fields; ids, URLs, dates, file names, numbers and fields
that copy or determine the target are left out, each with its reason (:mod:`tunesmith.runs.fields`). Then it
maps the rows the way the run will and says what the run would set aside or refuse, sizes the training to the
data and the machine (:mod:`tunesmith.runs.sizing`) and writes a short commented recipe. A file the run could
not use is refused with the reason and the fix.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import ConfigError, DataError
from tunesmith.records import Record
from tunesmith.runs.chat_start import chat_pairs, write_chat_pairs
from tunesmith.runs.fields import (
    TARGET_NAMES,
    Column,
    columns_of,
    guess_kind,
    is_free_text,
    is_label_set,
    label_counts,
    leave_out,
    not_content,
)

if TYPE_CHECKING:
    from tunesmith.data.read.batches import Sample

TASKS = ("classification", "regression", "generation")  # --task choices for a file of fields (qa: SQuAD files)
ACCEPTS = ("CSV/TSV (.csv, .tsv), JSON Lines (.jsonl, .ndjson), JSON (.json: a list of objects or SQuAD-style), "
           "Parquet (.parquet), chat JSONL (messages), or a folder written by datasets' save_to_disk")
MIN_PER_LABEL = 3  # rows per label (median) below which a label set is refused: too few to train, check and test
MIN_ROWS = 10  # fewer usable rows than this leaves nothing to split into train, validation and test
VAL_EXAMPLES = 200  # the validation split aims at this many examples (capped at 20% of the data) to tell arms apart
SAMPLE_ROWS = 20_000  # rows init reads: enough for every choice it makes (at this many, validation and test are 10%
#                       each and the cookbook's rule gives 1 epoch, as for any larger file), and memory stays bounded


@dataclass
class Start:
    """What init found and decided; ``said`` holds every decision with its reason, in order."""

    data: Path
    fmt: str
    records: list[Record]
    columns: list[Column]
    complete: bool = True  # the records are every row of the file (else its first SAMPLE_ROWS)
    target: str | None = None
    kind: str = "classification"
    inputs: list[str] = field(default_factory=list)
    system_prompt: str | None = ""
    on_error: str = "fail"
    said: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    def say(self, line: str) -> None:
        self.said.append(line)


def read_data(path: Path, say=print) -> tuple[str, Sample]:
    """``(format, sample)``: the first :data:`SAMPLE_ROWS` rows, read by the reader ``data prepare`` streams
    through; SQuAD JSON is named ``squad``, chat JSONL ``chat``. A folder that is not a saved dataset, an unknown
    format and bytes that are not text are refused, saying what is accepted and how to fix it."""
    from tunesmith.data.read.batches import read_sample
    from tunesmith.data.read.readers import NOT_UTF8, detect_format, resave_hint

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir() and not any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json",
                                                                 "state.json")):
        raise DataError(f"{path} is a folder; init reads one data file: {ACCEPTS}. Give one file of the folder "
                        "(or, for a folder of PDF/TXT/Markdown documents, start from examples/synth_docs_qa.yaml)")
    try:
        fmt = detect_format(path)
    except DataError:
        raise DataError(f"{path}: init cannot read '{path.suffix or path.name}' files; it reads {ACCEPTS}") from None
    sample = read_sample(path, fmt, SAMPLE_ROWS)
    if sample.note:
        say(sample.note)
    rejected = sample.rejected
    if any(r.reason == NOT_UTF8 for r in rejected):
        first = next(r for r in rejected if r.reason == NOT_UTF8)
        raise DataError(f"{first.source}: bytes that are not UTF-8 (nor UTF-16 or Korean cp949); "
                        f"{resave_hint(path)}")
    if not sample.records:
        raise DataError(f"{path}: no readable rows" + (f" (first problem: {rejected[0].source}: {rejected[0].reason})"
                                                       if rejected else ""))
    first = sample.records[0].data
    if fmt == "json" and {"context", "question", "answers"} <= set(first):
        fmt = "squad"
    elif fmt == "jsonl" and isinstance(first.get("messages"), list):
        fmt = "chat"
    return fmt, sample


def inspect(path: Path, target: str | None, task: str | None = None, say=print) -> Start:
    """Read the data, pick the target, the task kind and the input fields; every choice said."""
    fmt, sample = read_data(path, say)
    start = Start(Path(path), fmt, sample.records, columns_of(sample.records), complete=sample.complete)
    if sample.rejected:
        unreadable(start, sample.rejected)
    if not sample.complete:
        set_skip(start, f"init read the first {len(sample.records):,} rows; a row further on that the run cannot use "
                        "is set aside in data/rejected.jsonl instead of stopping the run")
    if (target is not None or task is not None) and fmt in ("squad", "chat"):
        start.say(f"--target/--task: not used; a {fmt} file says what the task and the answer are")
    if fmt == "squad":
        start.kind, start.target, start.inputs = "qa", "answers", ["context", "question"]
        start.say("task: qa (a SQuAD-style file: context, question and answers)")
        return start
    if fmt == "chat":
        rows, start.system_prompt = chat_pairs(sample.records)
        start.records = [Record(row, r.source) for row, r in zip(rows, sample.records, strict=True)]
        start.columns = columns_of(start.records)
        start.kind, start.target, start.inputs = "generation", "completion", ["prompt"]
        start.say("task: generation (chat JSONL: the model learns each conversation's last assistant message)")
        return start
    by_name = {c.name: c for c in start.columns}
    if target is not None and target not in by_name:
        raise ConfigError(f"--target {target}: no such field; the fields are {', '.join(by_name)}")
    col = by_name[target] if target else guess_target(start)
    start.target = col.name
    if col.distinct < 2:
        only = str(col.present[0]) if col.present else ""
        raise DataError(f"{start.data}: every row has the same '{col.name}' ({only!r}, {len(col.present):,} rows): "
                        "nothing to learn. Give a file with more than one value to predict, or another --target")
    start.kind = choose_kind(start, col, task)
    if start.kind == "classification":
        check_labels(start, col)
    start.inputs = input_fields(start, col)
    return start


def unreadable(start: Start, rejected: list) -> None:
    """Rows the reader cannot read (broken JSON lines, short CSV rows): said with their lines; the run sets them
    aside (``data.on_error: skip``)."""
    where = ", ".join(r.source.rsplit(":", 1)[-1] for r in rejected[:5]) + (" ..." if len(rejected) > 5 else "")
    start.say(f"unreadable: {len(rejected):,} row(s) at line(s) {where}, e.g. {rejected[0].reason}")
    set_skip(start, f"{len(rejected):,} unreadable row(s) (line(s) {where}) are set aside in the run's "
                    "data/rejected.jsonl")


def set_skip(start: Start, why: str) -> None:
    start.on_error = "skip"
    start.notes["data.on_error"] = "; ".join(filter(None, [start.notes.get("data.on_error"), why]))


def guess_target(start: Start) -> Column:
    """The field to predict when ``--target`` is not given: a conventional name, else the one field of labels
    or numbers."""
    for name in TARGET_NAMES:
        for c in start.columns:
            if c.name.lower() == name and not_content(c) is None:
                start.say(f"target: {c.name} (its name says so; choose another with --target FIELD)")
                return c
    short = [c for c in start.columns if not_content(c) is None and (c.numeric or (c.is_text and is_label_set(c)))]
    if len(short) == 1:
        start.say(f"target: {short[0].name} (the only field of labels or numbers; choose another with "
                  "--target FIELD)")
        return short[0]
    names = ", ".join(c.name for c in start.columns)
    raise ConfigError(f"{start.data}: which field should the model predict? Give --target FIELD (fields: {names})")


def choose_kind(start: Start, col: Column, task: str | None) -> str:
    """``--task`` when given (checked against the target), else the kind the target's values ask for."""
    if task is None:
        kind, why = guess_kind(col)
        start.say(f"task: {kind} ({why}; choose another with --task)")
        return kind
    if task not in TASKS:
        raise ConfigError(f"--task {task}: choose one of {', '.join(TASKS)} (qa comes from a SQuAD-style file)")
    if task == "regression" and not col.numeric:
        bad = next(v for v in col.present if not Column("x", [v]).numeric)
        raise ConfigError(f"--task regression: '{col.name}' is not a number on every row (e.g. {bad!r})")
    start.say(f"task: {task} (--task)")
    return task


def check_labels(start: Start, col: Column) -> None:
    """A label set the run can learn: more than one label, and enough rows of most labels to train and test."""
    counts = label_counts(col)
    median = statistics.median(counts.values())
    if median < MIN_PER_LABEL:
        raise DataError(f"{start.data}: '{col.name}' has {len(counts):,} labels with a median of {median:g} row(s) "
                        f"each: too few to learn and test each label (at least {MIN_PER_LABEL} each). Give more rows "
                        "per label, merge rare labels, or --task generation")
    rare = [k for k, n in counts.items() if n < MIN_PER_LABEL]
    if rare:
        start.say(f"labels: {len(counts):,}; {len(rare):,} with fewer than {MIN_PER_LABEL} rows "
                  f"({', '.join(rare[:5])}{' ...' if len(rare) > 5 else ''}) may be missing from a split")
    else:
        start.say(f"labels: {len(counts):,}, {min(counts.values()):,} to {max(counts.values()):,} rows each")


def input_fields(start: Start, target: Column) -> list[str]:
    """The fields the model reads: free text besides the target; when no field is free text, every other text
    field. Each field left out is said with its reason."""
    out: dict[str, str] = {}
    texts = []
    for c in start.columns:
        if c is target:
            continue
        why = leave_out(c, target)
        if why:
            out[c.name] = why
        else:
            texts.append(c)
    free = [c for c in texts if is_free_text(c)]
    for c in texts:
        if free and c not in free:
            out[c.name] = f"a category ({c.distinct:,} short values), not free text"
    inputs = [c.name for c in free or texts]
    if not inputs:
        raise DataError(f"{start.data}: no text field besides the target '{target.name}' to learn from"
                        + (f" (left out: {'; '.join(f'{k}: {v}' for k, v in out.items())})" if out else ""))
    start.say(f"input: {', '.join(inputs)} (free text besides the target)")
    for name, why in out.items():
        start.say(f"  left out {name}: {why}")
    if out:
        start.say("  (name other inputs in data.input_fields)")
    return inputs


SYSTEM_PROMPTS = {
    "classification": "Answer with the label only.",
    "regression": "Answer with the number only.",
    "qa": "Answer with the shortest span copied from the passage.",
}


def recipe_doc(start: Start, name: str, data_path: str, test: str | None, model: str) -> dict:
    """The recipe's data section and top level (training is sized by :mod:`tunesmith.runs.sizing`)."""
    data: dict = {"path": data_path} if test is None else {"splits": {"train": data_path, "test": test}}
    data |= {"task": start.kind, "input_fields": start.inputs, "target_field": start.target}
    if start.kind == "qa":
        data["prompt"] = "{context}\n\nQuestion: {question}"
    elif len(start.inputs) > 1:
        data["prompt"] = "\n".join(f"{f}: {{{f}}}" for f in start.inputs)
    else:
        data["prompt"] = f"{{{start.inputs[0]}}}"
    data["system_prompt"] = start.system_prompt if start.kind == "generation" else SYSTEM_PROMPTS[start.kind]
    if start.on_error == "skip":
        data["on_error"] = "skip"
    data["split"] = split_shares(start, test is not None) | ({"group_field": "title"} if start.kind == "qa" else {})
    return {"name": name, "output_dir": "runs", "seed": 42, "model": {"name": model}, "data": data}


def split_shares(start: Start, test_file: bool) -> dict:
    """Validation big enough to tell arms apart: :data:`VAL_EXAMPLES` examples, within 10-20% of the data."""
    n = len(start.records)
    val = round(min(0.2, max(0.1, VAL_EXAMPLES / max(1, n))), 2)
    test = 0 if test_file else 0.1
    of = f"{n:,} rows" if start.complete else f"the first {n:,} rows read, more in the whole file"
    start.notes["data.split"] = (f"validation: {int(n * val):,} of {of} ({VAL_EXAMPLES} where the data allows, "
                                 "10-20% of it), so that the validation scores can separate the arms")
    return {"train": round(1 - val - test, 2), "val": val, "test": test}


def check_rows(start: Start, doc: dict) -> None:
    """Map the rows as the run will (``data prepare``'s mapping): the rows it would refuse (no input text at all, an
    empty target, a target that is not a number for regression; an empty input field is an empty string, not a
    reason) are said, and ``data.on_error: skip`` sets them aside; too few usable rows are refused."""
    from tunesmith.config import DataSection
    from tunesmith.data.steps.examples import to_examples

    cfg = DataSection.model_validate({**doc["data"], "on_error": "skip"})
    examples, rejected = to_examples(start.records, cfg)
    if len(examples) < MIN_ROWS:
        why = f" ({rejected[0].source}: {rejected[0].reason})" if rejected else ""
        raise DataError(f"{start.data}: {len(examples)} usable row(s) of {len(start.records):,}{why}; at least "
                        f"{MIN_ROWS} are needed to train, validate and test")
    if not rejected:
        return
    reasons = Counter(r.reason for r in rejected)
    for reason, n in reasons.most_common():
        first = next(r.source for r in rejected if r.reason == reason)
        start.say(f"rows the run sets aside: {n:,} with {reason} (first: {first})")
    set_skip(start, f"{len(rejected):,} row(s) with no input text or no usable target are set aside in the run's "
                    "data/rejected.jsonl")
    doc["data"] = {**doc["data"], "on_error": "skip"}


def check_test_rows(start: Start, doc: dict, test: Path, say=print) -> None:
    """The ``--test`` file mapped as the run will map it: every row is scored, so a row without a usable target is
    refused here, naming its line; a row with no input text at all (or unreadable) is said, and the report's
    verdict line will say it was set aside."""
    from tunesmith.config import DataSection
    from tunesmith.data.steps.examples import refuse_test_targets, to_examples

    _, sample = read_data(test, say)
    cfg = DataSection.model_validate({**doc["data"], "on_error": "skip"})
    examples, rejected = to_examples(sample.records, cfg)
    refuse_test_targets(test, rejected)
    aside = sample.rejected + rejected
    first = f" (first: {aside[0].source}: {aside[0].reason})" if aside else ""
    start.say(f"test: {len(examples):,} of {len(sample.records) + len(sample.rejected):,} rows of {test.name} are "
              f"scored" + (f"; {len(aside):,} set aside, and the report's verdict says so{first}" if aside else ""))
    if aside:
        set_skip(start, f"{len(aside):,} test row(s) with no input text or unreadable are set aside; the report's "
                        "verdict line counts them")
        doc["data"] = {**doc["data"], "on_error": "skip"}


def rows_read(start: Start) -> str:
    """How many rows init looked at: every row of the file, or its first :data:`SAMPLE_ROWS`."""
    n = len(start.records)
    if start.complete:
        return f"{n:,} rows"
    return f"the first {n:,} rows (init reads no further; the run reads every row)"


def recipe_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "my-task"
    return name[:60]


def init(data: Path, target: str | None = None, test: Path | None = None, out: Path | None = None,
         model: str = "smollm2-135m-instruct", encoder: str | None = None, say=print, task: str | None = None) -> Path:
    """Inspect ``data``, size the training, write the recipe (``out``, default ``<data stem>.yaml`` in the working
    folder) and return its path. ``encoder``: the encoder of the head arm on a CPU (default: by the script of
    the input text; ``none`` leaves the arm out). ``task`` overrides the task kind guessed from the target."""
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks data.task against
    import tunesmith.train  # noqa: F401 - registers the training methods the memory estimate reads
    from tunesmith.machine.placement import pick_placement
    from tunesmith.runs.sizing import size

    out = Path(out or f"{recipe_name(Path(data))}.yaml")
    if out.exists():
        raise ConfigError(f"{out} exists; give another --out, or remove it")
    start = inspect(Path(data), target, task, say)
    say(f"{data}: {rows_read(start)} ({start.fmt})")
    for c in start.columns:
        say("  " + c.describe())
    data_path = out.with_name(f"{out.stem}.pairs.jsonl") if start.fmt == "chat" else Path(data)
    rel = lambda p: _relative(Path(p), out.parent)  # noqa: E731
    doc = recipe_doc(start, recipe_name(Path(data)), rel(data_path), rel(test) if test else None, model)
    check_rows(start, doc)
    if test is not None:
        check_test_rows(start, doc, Path(test), say)
    device = pick_placement().device
    texts = [" ".join(str(r.data.get(f) or "") for f in start.inputs) for r in start.records[:2000]]
    sized = size(start, _absolute(doc, out.parent), device, encoder, texts)
    doc |= {"train": sized.train, "arms": sized.arms, "eval": sized.eval}
    notes = start.notes | sized.notes
    for line in start.said:
        say(line)
    for key, why in notes.items():
        say(f"{key}: {shown(_get(doc, key))} — {why}")
    if start.fmt == "chat":  # the conversations as prompt/completion rows, next to the recipe
        write_chat_pairs(start, data_path, say)
    out.write_text(render(doc, notes, header(start, data, device)), encoding="utf-8")
    say(f"Recipe → {out}")
    say(f"Next: tunesmith run {out}   (time and memory first: tunesmith train {out} --estimate)")
    return out


def shown(value) -> str:
    """A recipe value as a person reads it: lists of arms by name, mappings as ``key value`` pairs."""
    if isinstance(value, list):
        return ", ".join(a["name"] if isinstance(a, dict) and "name" in a else str(a) for a in value)
    if isinstance(value, dict) and "name" in value:  # an arm
        model = (value.get("model") or {}).get("name")
        return f"{value['name']}" + (f" ({model})" if model else "")
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def _relative(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), base.resolve())


def _absolute(doc: dict, base: Path) -> dict:
    """The doc with its data paths resolved against ``base`` (the recipe's folder), as loading it would."""
    data = dict(doc["data"])
    if "path" in data:
        data["path"] = str((base / data["path"]).resolve())
    if "splits" in data:
        data["splits"] = {k: str((base / v).resolve()) for k, v in data["splits"].items()}
    return {**doc, "data": data}


def _get(doc: dict, dotted: str):
    node = doc
    for part in dotted.split(".")[:2]:
        node = node.get(part) if isinstance(node, dict) else next((a for a in node if a.get("name") == part), None)
    return node


def header(start: Start, data: Path, device: str) -> str:
    lines = [f"Written by `tunesmith init {data}` from {'' if start.complete else 'the first '}"
             f"{len(start.records):,} rows: a {start.kind} task, "
             f"{', '.join(start.inputs)} → {start.target}, trained on this machine's {device}.",
             "Run it as is: tunesmith run THIS_FILE   (memory to expect: tunesmith train THIS_FILE --estimate)",
             "Every key: docs/recipe.md. The comments say why each value was chosen."]
    return "".join(f"# {line}\n" for line in lines)


def render(doc: dict, notes: dict[str, str], head: str) -> str:
    """The recipe as YAML, one key a line in flow style, each chosen value followed by its reason."""
    import yaml

    def flow(v) -> str:
        return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True, width=10_000, sort_keys=False).strip().removesuffix(
            "\n...").strip()

    def line(indent: str, key: str, value, note: str | None) -> str:
        return f"{indent}{key}: {flow(value)}" + (f"   # {note}" if note else "") + "\n"

    out = [head]
    for section, value in doc.items():
        if isinstance(value, dict):
            out.append(f"{section}:\n")
            out += [line("  ", k, v, notes.get(f"{section}.{k}")) for k, v in value.items()]
        elif isinstance(value, list) and value:
            out.append(f"{section}:" + (f"   # {notes[section]}" if section in notes else "") + "\n")
            for arm in value:
                note = notes.get(f"{section}.{arm.get('name')}")
                out.append(f"  - {flow(arm)}" + (f"   # {note}" if note else "") + "\n")
        elif not isinstance(value, list):
            out.append(line("", section, value, notes.get(section)))
    return "".join(out)
