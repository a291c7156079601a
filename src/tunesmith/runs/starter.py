"""``tunesmith init DATA``: a first recipe fitted to a data file, so that ``tunesmith run`` works on it unedited.

It reads the file (CSV/TSV, JSONL, JSON, Parquet, SQuAD-style JSON, or chat JSONL with ``messages``), shows its
fields, takes the target (``--target``, else the one field whose name or values say so) and guesses the task
kind from it: SQuAD → qa, chat → generation, numbers with many values → regression, few distinct values →
classification, long free text → generation. Every guess is said, with the reason. Then it sizes the training
to the data and the machine (:mod:`tunesmith.runs.sizing`) and writes a short commented recipe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.steps import number_value
from tunesmith.errors import ConfigError, DataError
from tunesmith.records import Record

TARGET_NAMES = ("label", "labels", "category", "class", "intent", "target", "y", "sentiment", "rating", "stars",
                "score", "price", "answer", "output", "completion", "response")
ID_NAMES = re.compile(r"(^|_)(id|uuid|index|idx|key)$", re.IGNORECASE)
MAX_CLASSES = 50  # more distinct values than this (and not numbers) is free text, not a label set


@dataclass
class Column:
    """One field of the data: what its values look like."""

    name: str
    values: list

    @property
    def present(self) -> list:
        return [v for v in self.values if v not in (None, "")]

    @property
    def numeric(self) -> bool:
        return bool(self.present) and all(number_value(v) is not None for v in self.present)

    @property
    def distinct(self) -> int:
        return len({json.dumps(v, sort_keys=True, default=str) for v in self.present})

    @property
    def mean_chars(self) -> float:
        return sum(len(str(v)) for v in self.present) / max(1, len(self.present))

    @property
    def is_text(self) -> bool:
        return all(isinstance(v, str) for v in self.present) and not self.numeric

    def describe(self) -> str:
        kind = "number" if self.numeric else "text" if self.is_text else type(self.present[0]).__name__ \
            if self.present else "empty"
        example = str(self.present[0]) if self.present else ""
        example = example if len(example) <= 40 else example[:37] + "..."
        return (f"{self.name}: {kind}, {self.distinct:,} distinct, {self.mean_chars:,.0f} chars on average, "
                f"e.g. {example!r}")


@dataclass
class Start:
    """What init found and decided; ``said`` holds every decision with its reason, in order."""

    data: Path
    fmt: str
    records: list[Record]
    columns: list[Column]
    target: str | None = None
    kind: str = "classification"
    inputs: list[str] = field(default_factory=list)
    system_prompt: str | None = ""
    said: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.said.append(line)


def read_data(path: Path) -> tuple[str, list[Record]]:
    """``(format, records)`` of a data file, through the project's readers; SQuAD JSON is named ``squad``."""
    from tunesmith.data.readers import detect_format, read_records

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    fmt = detect_format(path)
    records, rejected = read_records(path, fmt, on_error="skip")
    if not records:
        raise DataError(f"{path}: no readable rows" + (f" (first problem: {rejected[0].source}: {rejected[0].reason})"
                                                       if rejected else ""))
    if fmt == "json" and {"context", "question", "answers"} <= set(records[0].data):
        fmt = "squad"
    elif fmt == "jsonl" and isinstance(records[0].data.get("messages"), list):
        fmt = "chat"
    return fmt, records


def columns_of(records: list[Record]) -> list[Column]:
    names = list(dict.fromkeys(k for r in records[:1000] for k in r.data))
    return [Column(n, [r.data.get(n) for r in records]) for n in names]


def inspect(path: Path, target: str | None) -> Start:
    """Read the data, pick the target and the task kind, and the input fields; every choice said."""
    fmt, records = read_data(path)
    start = Start(Path(path), fmt, records, columns_of(records))
    if target is not None and fmt in ("squad", "chat"):
        start.say(f"--target {target}: not used; a {fmt} file says what the answer is")
    if fmt == "squad":
        start.kind, start.target, start.inputs = "qa", "answers", ["context", "question"]
        start.say("task: qa (a SQuAD-style file: context, question and answers)")
        return start
    if fmt == "chat":
        rows, start.system_prompt = chat_pairs(records)
        start.records = [Record(row, r.source) for row, r in zip(rows, records, strict=True)]
        start.columns = columns_of(start.records)
        start.kind, start.target, start.inputs = "generation", "completion", ["prompt"]
        start.say("task: generation (chat JSONL: the model learns each conversation's last assistant message)")
        return start
    by_name = {c.name: c for c in start.columns}
    if target is not None and target not in by_name:
        raise ConfigError(f"--target {target}: no such field; the fields are {', '.join(by_name)}")
    col = by_name[target] if target else guess_target(start)
    start.target = col.name
    start.kind, why = guess_kind(col, len(records))
    start.say(f"task: {start.kind} ({why})")
    start.inputs = input_fields(start.columns, col)
    if not start.inputs:
        raise DataError(f"{path}: no text field besides the target '{col.name}' to learn from")
    left = [c.name for c in start.columns if c.name not in start.inputs and c is not col]
    start.say(f"input: {', '.join(start.inputs)} (free text besides the target"
              + (f"; left out: {', '.join(left)} (ids, dates, numbers or categories; name inputs in "
                 "data.input_fields)" if left else "") + ")")
    return start


def guess_target(start: Start) -> Column:
    """The field to predict when ``--target`` is not given: a conventional name, else the one short field."""
    for name in TARGET_NAMES:
        for c in start.columns:
            if c.name.lower() == name:
                start.say(f"target: {c.name} (its name says so; choose another with --target FIELD)")
                return c
    short = [c for c in start.columns if not ID_NAMES.search(c.name) and (c.numeric or c.distinct <= MAX_CLASSES)]
    if len(short) == 1:
        start.say(f"target: {short[0].name} (the only field with few values or numbers; choose another with "
                  "--target FIELD)")
        return short[0]
    names = ", ".join(c.name for c in start.columns)
    raise ConfigError(f"{start.data}: which field should the model predict? Give --target FIELD (fields: {names})")


def guess_kind(col: Column, rows: int) -> tuple[str, str]:
    """The task kind a target field asks for, and why."""
    n = col.distinct
    if col.numeric and n > min(20, max(2, rows // 10)):
        return "regression", f"'{col.name}' holds numbers with {n:,} distinct values"
    if n <= MAX_CLASSES and (col.numeric or n <= max(2, rows // 2) or col.mean_chars < 30):
        what = "numbers" if col.numeric else "values"
        return "classification", f"'{col.name}' holds {n} distinct {what}: each one a label"
    return "generation", f"'{col.name}' is free text ({n:,} distinct values, {col.mean_chars:,.0f} chars on average)"


DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def input_fields(columns: list[Column], target: Column) -> list[str]:
    """The text fields the model reads: free text (many distinct values, or long), not the target, ids or dates;
    when no field is free text, every text field but those."""
    texts = [c for c in columns if c is not target and c.is_text and not ID_NAMES.search(c.name) and c.distinct > 1
             and not all(DATE.match(str(v)) for v in c.present[:200])]
    free = [c for c in texts if c.distinct > MAX_CLASSES or c.mean_chars >= 40]
    return [c.name for c in free or texts]


def chat_pairs(records: list[Record]) -> tuple[list[dict], str | None]:
    """Chat JSONL as prompt/completion rows: the last assistant message is the completion, the turns before it
    the prompt (earlier turns written as ``role: text`` lines). A system message all conversations share becomes
    the recipe's system prompt (returned); one that differs stays in the prompt."""
    systems = set()
    rows = []
    for r in records:
        msgs = [m for m in r.data.get("messages") or [] if isinstance(m, dict)]
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise DataError(f"{r.source}: a conversation without an assistant message to learn")
        sys_msgs = [m for m in msgs[:last] if m.get("role") == "system"]
        systems.add(sys_msgs[0].get("content", "") if sys_msgs else "")
        rows.append((msgs[:last], msgs[last].get("content") or ""))
    shared = systems.pop() if len(systems) == 1 else None
    out = []
    for before, answer in rows:
        turns = [m for m in before if not (m.get("role") == "system" and shared is not None)]
        prompt = turns[-1].get("content", "") if len(turns) == 1 else "\n".join(
            f"{m.get('role')}: {m.get('content', '')}" for m in turns)
        out.append({"prompt": prompt, "completion": answer})
    return out, shared


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
    data["split"] = ({"train": 0.9, "val": 0.1, "test": 0} if test else {"train": 0.8, "val": 0.1, "test": 0.1}) | (
        {"group_field": "title"} if start.kind == "qa" else {})
    return {"name": name, "output_dir": "runs", "seed": 42, "model": {"name": model}, "data": data}


def recipe_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "my-task"
    return name[:60]


def init(data: Path, target: str | None = None, test: Path | None = None, out: Path | None = None,
         model: str = "smollm2-135m-instruct", encoder: str | None = None, say=print) -> Path:
    """Inspect ``data``, size the training, write the recipe (``out``, default ``<data stem>.yaml`` in the working
    folder) and return its path. ``encoder``: the encoder of the head arm on a CPU (default: by the text's
    script; ``none`` leaves the arm out)."""
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks data.task against
    import tunesmith.train  # noqa: F401 - registers the training methods the memory estimate reads
    from tunesmith.machine.placement import pick_placement
    from tunesmith.runs.sizing import size

    start = inspect(Path(data), target)
    say(f"{data}: {len(start.records):,} rows ({start.fmt})")
    for c in start.columns:
        say("  " + c.describe())
    out = Path(out or f"{recipe_name(Path(data))}.yaml")
    if out.exists():
        raise ConfigError(f"{out} exists; give another --out, or remove it")
    data_path = Path(data)
    if start.fmt == "chat":  # the conversations as prompt/completion rows, next to the recipe
        data_path = out.with_name(f"{out.stem}.pairs.jsonl")
        data_path.write_text("".join(json.dumps(r.data, ensure_ascii=False) + "\n" for r in start.records),
                             encoding="utf-8")
        say(f"conversations as prompt/completion rows → {data_path}")
    rel = lambda p: _relative(Path(p), out.parent)  # noqa: E731
    doc = recipe_doc(start, recipe_name(Path(data)), rel(data_path), rel(test) if test else None, model)
    device = pick_placement().device
    texts = [str(r.data.get(start.inputs[0], "")) for r in start.records[:2000]]
    sized = size(start, _absolute(doc, out.parent), device, encoder, texts)
    doc |= {"train": sized.train, "arms": sized.arms, "eval": sized.eval}
    for line in start.said:
        say(line)
    for key, why in sized.notes.items():
        value = _get(doc, key)
        say(f"{key}: {value if not isinstance(value, list) else ', '.join(a['name'] for a in value)} — {why}")
    out.write_text(render(doc, sized.notes, header(start, data, device)), encoding="utf-8")
    say(f"Recipe → {out}")
    say(f"Next: tunesmith run {out}")
    return out


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
    lines = [f"Written by `tunesmith init {data}` for {len(start.records):,} rows: a {start.kind} task, "
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
