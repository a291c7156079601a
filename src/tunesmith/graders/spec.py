"""Checking a grader object before anything runs: the shapes of the official client's ``types/graders``
(openai 3.54) plus what those types cannot say (template variables, formula, labels, python source).

Every problem is a :class:`GraderError` naming the field (``grader.operation``, ``grader.graders.f1.input``),
so the API answers 400 with that ``param``.
"""

from __future__ import annotations

from tunesmith.errors import ConfigError
from tunesmith.graders import formula, template

TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
MODEL_TYPES = ("score_model", "label_model")


class GraderError(ConfigError):
    """A grader object is invalid; ``param`` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.detail = param, message


def _openai_type(kind: str):
    from openai.types import graders

    return {"string_check": graders.StringCheckGrader, "text_similarity": graders.TextSimilarityGrader,
            "python": graders.PythonGrader, "score_model": graders.ScoreModelGrader,
            "label_model": graders.LabelModelGrader}[kind]


def check(grader: object, param: str = "grader", allow_python: bool = True) -> dict:
    """The grader as a plain dict, or GraderError naming the first bad field. ``allow_python``: False on a
    server that does not run callers' code (the message says how to allow it)."""
    if not isinstance(grader, dict):
        raise GraderError(param, "a grader is an object with a 'type'")
    kind = grader.get("type")
    if kind not in TYPES:
        raise GraderError(f"{param}.type", f"unknown grader type {kind!r}; one of {', '.join(TYPES)}")
    if kind == "multi":
        return _check_multi(grader, param, allow_python)
    _check_shape(grader, kind, param)
    if kind == "python" and not allow_python:
        raise GraderError(f"{param}.type", "python graders run the caller's code and are off on this server; "
                          "start it with `tunesmith serve --allow-python-graders` to allow them")
    for field, text in _templates(grader, param):
        why = template.bad_variable(text)
        if why:
            raise GraderError(f"{param}.{field}", why)
    if kind == "label_model":
        extra = sorted(set(grader["passing_labels"]) - set(grader["labels"]))
        if extra:
            raise GraderError(f"{param}.passing_labels", f"{extra} are not among the labels {grader['labels']}")
    if kind == "score_model" and grader.get("range") is not None:
        low_high = grader["range"]
        if len(low_high) != 2 or low_high[0] >= low_high[1]:
            raise GraderError(f"{param}.range", "range is [lowest, highest] with lowest < highest")
    if kind == "python":
        _check_python(grader["source"], param)
    return grader


def _check_shape(grader: dict, kind: str, param: str) -> None:
    from pydantic import ValidationError

    try:
        _openai_type(kind).model_validate(grader)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise GraderError(f"{param}.{where}" if where else param, first["msg"]) from None


def _templates(grader: dict, param: str) -> list[tuple[str, str]]:
    """(field path, template text) for every templated string of a non-multi grader."""
    out = [(f, grader[f]) for f in ("input", "reference") if isinstance(grader.get(f), str)]
    for i, message in enumerate(grader.get("input") if isinstance(grader.get("input"), list) else []):
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for j, part in enumerate(parts):
            text = part if isinstance(part, str) else (part or {}).get("text")
            if not isinstance(text, str):
                raise GraderError(f"{param}.input.{i}.content", "only text content can be graded here "
                                  "(images and audio are not supported)")
            out.append((f"input.{i}.content" + (f".{j}" if isinstance(content, list) else ""), text))
    return out


MAX_SOURCE_BYTES = 256 * 1024


def _check_python(source: str, param: str) -> None:
    import ast

    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise GraderError(f"{param}.source", f"the source is larger than {MAX_SOURCE_BYTES // 1024} KiB")
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise GraderError(f"{param}.source", f"not valid Python (line {exc.lineno}: {exc.msg})") from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise GraderError(f"{param}.source", f"not valid Python ({type(exc).__name__})") from None
    if not any(isinstance(n, ast.FunctionDef) and n.name == "grade" for n in tree.body):
        raise GraderError(f"{param}.source", "the source must define grade(sample, item) returning a number")


def sub_graders(grader: dict) -> dict[str, dict]:
    """A multi grader's graders by name: OpenAI's API takes a mapping; the 3.54 client types one grader
    (then its ``name`` is the formula's variable). Both are accepted."""
    inner = grader.get("graders")
    if isinstance(inner, dict) and "type" in inner and not isinstance(inner.get("type"), dict):
        return {inner.get("name", "grader"): inner}
    return inner if isinstance(inner, dict) else {}


def _check_multi(grader: dict, param: str, allow_python: bool) -> dict:
    for field in ("name", "calculate_output"):
        if not isinstance(grader.get(field), str):
            raise GraderError(f"{param}.{field}", "a string is required")
    subs = sub_graders(grader)
    if not subs:
        raise GraderError(f"{param}.graders", "a multi grader needs graders: {name: grader, ...}")
    single = isinstance(grader["graders"], dict) and "type" in grader["graders"]
    for name, sub in subs.items():
        if not name.isidentifier():
            raise GraderError(f"{param}.graders", f"grader name {name!r} cannot be used in a formula")
        where = f"{param}.graders" if single else f"{param}.graders.{name}"
        if isinstance(sub, dict) and sub.get("type") == "multi":
            raise GraderError(f"{where}.type", "a multi grader cannot contain another multi grader")
        check(sub, where, allow_python)
    try:
        formula.parse(grader["calculate_output"], set(subs))
    except formula.FormulaError as exc:
        raise GraderError(f"{param}.calculate_output", str(exc)) from None
    return grader


def uses_python(grader: dict) -> bool:
    if grader["type"] == "multi":
        return any(uses_python(g) for g in sub_graders(grader).values())
    return grader["type"] == "python"


def model_names(grader: dict) -> set[str]:
    """The models a grader (or its sub-graders) asks."""
    if grader["type"] == "multi":
        return set().union(*(model_names(g) for g in sub_graders(grader).values()))
    return {grader["model"]} if grader["type"] in MODEL_TYPES else set()


def item_fields(grader: dict) -> set[str]:
    """The item fields a checked grader's templates read (first path part of each ``{{item.*}}``), so that a
    data file can be checked against them before anything runs; a python grader's reads are not known."""
    if grader["type"] == "multi":
        return set().union(*(item_fields(g) for g in sub_graders(grader).values()))
    return {v.split(".")[1] for _, text in _templates(grader, "grader") for v in template.variables(text)
            if v.startswith("item.")}
