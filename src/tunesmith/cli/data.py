"""``tunesmith data``: prepare, profile and validate data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli import common

data_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Prepare, profile and validate data.")

DEFAULT_TOKENIZER = "smollm2-135m-instruct"




@data_app.command("prepare")
def data_prepare(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key (data.limit=100).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Rebuild even if cached.")] = False,
) -> None:
    """Run the data stage only: read, curate, split, write (and profile/export if the recipe says so)."""
    import time

    from tunesmith.data.prepare import prepare

    cfg = common.recipe_at(recipe, set_ or [])
    common.quiet_libraries()
    t0 = time.perf_counter()
    data = prepare(cfg, cfg.run_dir / "data", common.console, use_cache=False if no_cache else None)
    seconds = time.perf_counter() - t0
    if data.steps:
        from tunesmith.data.steps.curation import summary_table

        common.console.print(summary_table(data.steps))
    common.console.print(", ".join(f"{k}: {v}" for k, v in data.summary.items() if not k.startswith("step ")))
    n = data.summary["rows read"]
    common.console.print(f"{n:,} records in {seconds:.2f} s ({n / max(seconds, 1e-9):,.0f} records/s)"
                  f"{' from the cache' if data.cached else ''} → {cfg.run_dir / 'data'}")


@data_app.command("profile")
def data_profile(
    input_: Annotated[Path, typer.Argument(metavar="INPUT", help="Data file (CSV, JSONL, Parquet...).")],
    field: Annotated[list[str] | None, typer.Option("--field", help="Text field (repeatable).")] = None,
    label: Annotated[str | None, typer.Option(help="Label field for the bar chart.")] = None,
    numeric: Annotated[list[str] | None, typer.Option("--numeric", help="Numeric field.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("profile"),
    model: Annotated[str, typer.Option(help="Tokenizer: model name or folder.")] = "smollm2-135m-instruct",
    max_tokens: Annotated[int | None, typer.Option(help="Limit drawn on the token histogram.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, jsonl, csv, json, parquet, hf_disk.")] = "auto",
) -> None:
    """Profile a data file: counts, missing values, lengths, labels, numbers, duplicates, plots."""
    from tunesmith.data.profile import profile
    from tunesmith.data.read.readers import read_records
    from tunesmith.models.loading import load_tokenizer

    common.quiet_libraries()
    records, rejected = read_records(input_, fmt, on_error="skip")
    fields = field or [next((k for k, v in records[0].data.items() if isinstance(v, str)), "text")]
    report = profile(records, fields, label, numeric or [], load_tokenizer(model), out, (None, max_tokens),
                     title=f"Profile of {input_.name}")
    if rejected:
        common.console.print(f"[yellow]{len(rejected)} unreadable row(s) left out[/] (first: {rejected[0].source})")
    common.console.print(f"{len(records):,} records → {report}")


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="JSONL file in an OpenAI fine-tuning format.")],
    fmt: Annotated[str, typer.Option("--format", help="openai-chat, -dpo or -completion.")] = "openai-chat",
    model: Annotated[str | None, typer.Option(help="Hosted model, for its token limit.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Token limit per example.")] = None,
    price: Annotated[float | None, typer.Option(help="Price in $ per 1M training tokens.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the cookbook's rule).")] = None,
    tokenizer: Annotated[str, typer.Option(help="Model name/folder or cl100k_base.")] = DEFAULT_TOKENIZER,
) -> None:
    """Check a file for hosted fine-tuning: format errors by kind, token counts, cost estimate."""
    from tunesmith.data.formats.validate import DEFAULT_LIMIT, MODEL_LIMITS, VALIDATORS, render, token_counter
    from tunesmith.errors import ConfigError, DataError

    if fmt not in VALIDATORS:
        raise ConfigError(f"--format {fmt}: use one of {sorted(VALIDATORS)}")
    if model and model not in MODEL_LIMITS and max_tokens is None:
        raise ConfigError(f"--model {model}: limit unknown ({sorted(MODEL_LIMITS)}); pass --max-tokens")
    common.quiet_libraries()
    limit = max_tokens or MODEL_LIMITS.get(model or "", DEFAULT_LIMIT)
    result = VALIDATORS[fmt](file, token_counter(tokenizer), limit)
    common.console.print(render(result, price, epochs, tokenizer), highlight=False)
    if result.errors:
        raise DataError(f"{file}: {sum(result.errors.values())} format error(s); fix them before uploading")
