"""Map raw records into task examples: input fields, target field, prompt template."""

from __future__ import annotations

from tunesmith.config import DataSection
from tunesmith.data.readers import FIX_HINT
from tunesmith.errors import DataError
from tunesmith.records import Example, Record, Rejected


def to_examples(records: list[Record], cfg: DataSection) -> tuple[list[Example], list[Rejected]]:
    """Build examples; rows missing a field, with an empty target or an unknown label are rejected.

    Under ``on_error: fail`` the first such row raises a ``DataError`` naming file and line. A target
    the task kind cannot use (a regression target that is not a number) is always set aside and counted.
    """
    from tunesmith.config.kinds import TargetError, for_data

    task = for_data(cfg)
    examples: list[Example] = []
    rejected: list[Rejected] = []
    allowed = set(cfg.labels) if cfg.labels and task.uses_labels else None
    _check_fields_exist(records, cfg)
    for rec in records:
        reason = _problem(rec, cfg, allowed)
        if reason:
            if cfg.on_error == "fail":
                raise DataError(f"{rec.source}: {reason}. {FIX_HINT}")
            rejected.append(Rejected(rec.source, "map", reason, rec.data))
            continue
        try:
            target, extra = task.read_target(rec.data.get(cfg.target_field) if cfg.target_field else None, rec.data)
        except TargetError as exc:
            where = f"field '{cfg.target_field}': " if cfg.target_field else ""
            rejected.append(Rejected(rec.source, "map", f"{where}{exc}", rec.data))
            continue
        inputs = {f: _text(rec.data[f]) for f in cfg.input_fields}
        ex_id = rec.source.rsplit("/", 1)[-1]
        examples.append(Example(id=ex_id, inputs=inputs, target=target, meta=_meta(rec, cfg) | extra))
    return examples, rejected


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


def _problem(rec: Record, cfg: DataSection, allowed: set[str] | None) -> str | None:
    for name in [*cfg.input_fields, *([cfg.target_field] if cfg.target_field else [])]:
        value = rec.data.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return f"field '{name}' is missing or empty"
    if allowed is not None and _text(rec.data[cfg.target_field]) not in allowed:
        return f"label {rec.data[cfg.target_field]!r} is not in data.labels"
    return None


def _text(value) -> str:
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
