"""Map raw records into task examples: input fields, target field, prompt template."""

from __future__ import annotations

import math

from tunesmith.config import DataSection
from tunesmith.data.read.readers import FIX_HINT
from tunesmith.errors import DataError
from tunesmith.records import Example, Record, Rejected


def to_examples(records: list[Record], cfg: DataSection) -> tuple[list[Example], list[Rejected]]:
    """Build examples. An empty or missing input field is an empty string (an email without a subject is still an
    email); a row is rejected only when it cannot be used at all: no input text in any input field, an empty
    target, an unknown label, or a target the task kind cannot read.

    Under ``on_error: fail`` the first row with no input text or an empty target raises a ``DataError`` naming file
    and line. A target the task kind cannot use (a regression target that is not a number) is always set aside
    and counted. A rejection about the target has the stage ``target`` (see :func:`unusable_target`).
    """
    from tunesmith.config.kinds import TargetError, for_data

    task = for_data(cfg)
    examples: list[Example] = []
    rejected: list[Rejected] = []
    allowed = set(cfg.labels) if cfg.labels and task.uses_labels else None
    _check_fields_exist(records, cfg)
    for rec in records:
        stage, reason = _problem(rec, cfg, allowed)
        if reason:
            if cfg.on_error == "fail":
                raise DataError(f"{rec.source}: {reason}. {FIX_HINT}")
            rejected.append(Rejected(rec.source, stage, reason, rec.data))
            continue
        try:
            target, extra = task.read_target(rec.data.get(cfg.target_field) if cfg.target_field else None, rec.data)
        except TargetError as exc:
            where = f"field '{cfg.target_field}': " if cfg.target_field else ""
            rejected.append(Rejected(rec.source, TARGET, f"{where}{exc}", rec.data))
            continue
        inputs = {f: _text(rec.data.get(f)) for f in cfg.input_fields}
        ex_id = rec.source.rsplit("/", 1)[-1]
        examples.append(Example(id=ex_id, inputs=inputs, target=target, meta=_meta(rec, cfg) | extra))
    return examples, rejected


TARGET = "target"  # the stage of a row rejected for its target (an input problem is stage "map")


def unusable_target(r: Rejected) -> bool:
    """Whether a row was set aside because its target cannot be used (empty, unknown label, unreadable)."""
    return r.stage == TARGET


def refuse_test_targets(path, rejected: list[Rejected]) -> None:
    """A test file's rows are what the report scores: rows without a usable target are an error naming every
    line (never a silent cut)."""
    bad = [r for r in rejected if unusable_target(r)]
    if bad:
        where = ", ".join(r.source.rsplit(":", 1)[-1] for r in bad[:20]) + (" ..." if len(bad) > 20 else "")
        raise DataError(f"{path}: {len(bad):,} test row(s) without a usable target, at line(s) {where} (first: "
                        f"{bad[0].reason}). Every test row is scored: give each its target, or remove the row from "
                        "the test file")


def _meta(rec: Record, cfg: DataSection) -> dict:
    """What later steps need besides inputs and target: the source and the split's fields."""
    meta = {"source": rec.source}
    pairs = [(e.chosen_field, e.rejected_field) for e in cfg.export if e.format == "openai-dpo"]
    order = cfg.order.by if cfg.order and cfg.order.by != "target" else None
    for name in (cfg.split.stratify_field, cfg.split.group_field, order, *(f for p in pairs for f in p)):
        if name:
            meta[name] = rec.data.get(name)
    return meta


def _check_fields_exist(records: list[Record], cfg: DataSection) -> None:
    """A field that no record has is a recipe mistake, not a bad row: fail with the fields seen."""
    if not records:
        return
    seen: set[str] = set()
    for rec in records:
        seen.update(rec.data)
    order = cfg.order.by if cfg.order and cfg.order.by != "target" else None
    split_fields = [f for f in (cfg.split.stratify_field, cfg.split.group_field, order) if f]
    for name in [*cfg.input_fields, cfg.target_field, *split_fields]:
        if name is not None and name not in seen:
            raise DataError(
                f"{records[0].source.rsplit(':', 1)[0]}: no record has the field '{name}' named in the "
                "recipe; "
                f"fields present: {sorted(seen)}"
            )


def _problem(rec: Record, cfg: DataSection, allowed: set[str] | None) -> tuple[str, str | None]:
    """``(stage, reason)`` a row cannot be used for, or ``("", None)``."""
    if cfg.target_field and _empty(rec.data.get(cfg.target_field)):
        return TARGET, f"field '{cfg.target_field}' is missing or empty (the target)"
    if cfg.input_fields and all(_empty(rec.data.get(f)) for f in cfg.input_fields):
        fields = ", ".join(f"'{f}'" for f in cfg.input_fields)
        return "map", (f"no input text (field {fields} is missing or empty)" if len(cfg.input_fields) == 1
                       else f"no input text (fields {fields} are all missing or empty)")
    if allowed is not None and _text(rec.data[cfg.target_field]) not in allowed:
        return TARGET, f"label {rec.data[cfg.target_field]!r} is not in data.labels"
    return "", None


def _empty(value) -> bool:
    """A missing cell: None, a blank string, or a float NaN (how some table readers write an empty cell)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _text(value) -> str:
    """An input value as prompt text: strings stripped, a missing cell empty, anything else as written."""
    if _empty(value):
        return ""
    return value.strip() if isinstance(value, str) else str(value)


def label_set(examples: list[Example], cfg: DataSection) -> list[str]:
    """The closed label set of a classification task: the recipe's list, or the sorted labels seen in the
    data. Other task kinds have none (a price is not a label)."""
    return labels_of({e.target for e in examples}, cfg)


def labels_of(targets: set[str], cfg: DataSection) -> list[str]:
    """``label_set`` from the set of targets seen (the streaming data stage keeps only that set)."""
    from tunesmith.config.kinds import kind_class

    if not kind_class(cfg.task).uses_labels:
        return []
    return list(cfg.labels) if cfg.labels else sorted(targets)


def order_train(train: list[Example], cfg: DataSection) -> list[Example]:
    """The train split in ``data.order`` (numbers compare as numbers); unchanged without it."""
    if cfg.order is None:
        return train
    from tunesmith.records import parse_number

    def key(ex: Example):
        value = ex.target if cfg.order.by == "target" else ex.meta.get(cfg.order.by)
        number = parse_number(str(value)) if value is not None else None
        return (0, number, "") if number is not None else (1, 0.0, str(value))

    return sorted(train, key=key, reverse=cfg.order.descending)
