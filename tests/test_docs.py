"""The docs cannot drift from the code: every recipe key, `--set` path and CLI option they name exists, every
relative link resolves, the README's quickstart runs, and the CLI help shows what it says literally."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = ("model", "data", "train", "eval", "synth", "hosted")
FILE_ENDINGS = (".md", ".jsonl", ".json", ".csv", ".yaml", ".yml", ".py", ".png", ".txt", ".html", ".parquet",
                ".sqlite", ".gguf", ".safetensors", ".bin", ".log")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    body = FENCE.sub("", _text(path))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", body, re.M)}


def links(path: Path) -> list[str]:
    """Markdown links outside code (a link quoted inside code is text, not a link of the doc)."""
    return [m.group(1) for m in LINK.finditer(CODE.sub("", FENCE.sub("", _text(path))))]


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: links that do not resolve: {broken}"


def _models_in(ann) -> list:
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for arg in get_args(ann) for m in _models_in(arg)]


# named on purpose though not keys: a legacy key still read, a typo shown with the error it gets, a method
NOT_KEYS = {"eval.task": "older recipes' key, read as data.task", "train.epoch": "the typo an error example shows",
            "model.generate": "transformers' generate method"}


def is_module(dotted: str) -> bool:
    """Whether ``a.b`` (or a prefix of it) names a module of the package, e.g. ``data.prepare``."""
    parts = dotted.split(".")
    src = ROOT / "src" / "tunesmith"
    return any((src.joinpath(*parts[:i]).with_suffix(".py")).is_file() for i in range(2, len(parts) + 1))


def key_exists(dotted: str) -> bool:
    """Whether ``a.b.c`` walks the recipe schema (a value, list or mapping reached early ends the walk)."""
    from tunesmith.config import Recipe

    models = [Recipe]
    for part in dotted.split("."):
        owners = [m for m in models if part in m.model_fields]
        if not owners:
            return False
        models = _models_in(owners[0].model_fields[part].annotation)
        if not models:
            return True
    return True


def named_keys(text: str) -> set[str]:
    """Recipe keys a doc names: dotted paths in backticks or after --set, starting with a section name."""
    found = set()
    pattern = re.compile(r"(?<![\w./-])((?:" + "|".join(SECTIONS) + r")(?:\.[a-z_][a-z0-9_]*)+)")
    for span in CODE.findall(text) + FENCE.findall(text):
        for m in pattern.finditer(span):
            key = m.group(1)
            if not key.endswith(FILE_ENDINGS) and span[m.end():m.end() + 1] != "(":  # hosted.files.list(): code
                found.add(key)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_recipe_key_and_set_path_named_exists(doc):
    missing = sorted(k for k in named_keys(_text(doc)) if k not in NOT_KEYS and not is_module(k) and not key_exists(k))
    assert not missing, f"{doc.relative_to(ROOT)} names recipe keys the schema does not have: {missing}"


def test_the_key_check_catches_a_wrong_key():
    assert key_exists("train.grad_accum") and key_exists("data.split.folds") and key_exists("eval.endpoints")
    assert not key_exists("train.gradient_accumulation_steps") and not key_exists("data.shuffle")
    assert named_keys("use `--set train.epochs=2` or `data.path`, not `data.md`") == {"train.epochs", "data.path"}


def command_lines(text: str) -> list[str]:
    """``tunesmith ...`` commands in code blocks (continuation lines joined) and in inline code."""
    lines = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.strip() for line in joined.splitlines() if line.strip().startswith("tunesmith ")]
    lines += [c.strip() for c in CODE.findall(text) if c.strip().startswith("tunesmith ")]
    return lines


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def unknown_options(line: str) -> list[str]:
    """Options on a ``tunesmith`` line that its (sub)command does not take."""
    import typer

    from tunesmith.cli import app

    line = line.split(" #")[0].split(" | ")[0].split(" && ")[0]
    try:
        tokens = shlex.split(line)[1:]
    except ValueError:
        tokens = line.split()[1:]
    command = typer.main.get_command(app)
    path = ["tunesmith"]
    while tokens and hasattr(command, "commands") and tokens[0] in command.commands:
        path.append(tokens[0])
        command = command.commands[tokens.pop(0)]
    if hasattr(command, "commands") and "run" in command.commands:
        command = command.commands["run"]  # `tunesmith synth RECIPE`
    known = _options(command)
    return [f"{' '.join(path)} {t}" for t in tokens if t.startswith("--") and t.split("=")[0] not in known]


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_cli_option_named_exists(doc):
    bad = [u for line in command_lines(_text(doc)) for u in unknown_options(line)]
    assert not bad, f"{doc.relative_to(ROOT)} names CLI options that do not exist: {bad}"


def test_the_option_check_catches_a_wrong_option():
    assert unknown_options("tunesmith train r.yaml --estimate --set train.epochs=2") == []
    assert unknown_options("tunesmith data validate f.jsonl --fromat x") == ["tunesmith data validate --fromat"]
    assert unknown_options("tunesmith synth r.yaml --set synth.limit=3") == []


def test_the_contradictions_once_listed_stay_fixed():
    train, data, synth = _text(ROOT / "docs" / "train.md"), _text(ROOT / "docs" / "data.md"), _text(ROOT / "docs" / "synth.md")
    assert "gradient_accumulation_steps" not in train and "off unless you ask" not in train
    assert all(t in train.split("| `report_to` |")[1].split("\n")[0] for t in ("tensorboard", "trackio", "mlflow", "wandb"))
    assert "| `shuffle`" not in data and "data.order" in data
    assert synth.count("| `paraphrase` |") == 1 and "MiniLM embeddings, BM25 fallback" not in synth
    assert "relative to the working directory" in _text(ROOT / "docs" / "experiments.md")
    assert "513 s" not in _text(ROOT / "docs" / "eval.md")


@pytest.mark.parametrize("args, literal", [(["serve", "--help"], "tunesmith[ray]"),
                                           (["export", "--help"], "tunesmith[llama-cpp]"),
                                           (["serve", "--help"], "[default: on only without API keys]")])
def test_cli_help_shows_extras_and_brackets_as_written(cli, args, literal):
    code, out = cli(args)
    assert code == 0 and literal in " ".join(out.split()), out


def quickstart(text: str) -> list[str]:
    block = text.split("<!-- quickstart:start -->")[1].split("<!-- quickstart:end -->")[0]
    lines = [line.split(" #")[0].strip() for line in command_lines(block)]  # a comment after a command is not an argument
    return [line for line in lines if line.split()[1] in ("init", "run")]


def test_the_readme_quickstart_runs_on_a_tiny_csv(cli, tmp_path, monkeypatch, tiny_model_dir, tiny_bert_dir):
    """The README's own `tunesmith init` and `tunesmith run` lines, on a tiny CSV and the tiny test models (and
    two training steps): clone → recipe → a report with a verdict."""
    import csv

    from tests.conftest import banking_rows

    commands = quickstart(_text(ROOT / "README.md"))
    assert [c.split()[1] for c in commands] == ["init", "run"], commands
    data = shlex.split(commands[0])[2]
    monkeypatch.chdir(tmp_path)
    rows = banking_rows(("card_arrival", "pin_blocked", "age_limit", "exchange_rate"), 10)
    with open(tmp_path / data, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["category"]} for r in rows)
    code, out = cli([*shlex.split(commands[0])[1:], "--model", str(tiny_model_dir), "--encoder", str(tiny_bert_dir)])
    assert code == 0, out
    code, out = cli([*shlex.split(commands[1])[1:], "--set", "train.max_steps=2", "--set", "eval.baselines=[majority]"])
    assert code == 0, out
    report = next(tmp_path.glob("runs/*/report.md")).read_text()
    assert re.search(r"\*\*(beats the baseline|is below the baseline|is not clearly different from the baseline)\*\*",
                     report), report[:2000]
