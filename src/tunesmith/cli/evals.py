"""``tunesmith evals``: keep an account's evals in a folder, and recreate them on a tunesmith server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli import common

evals_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                        help="Save evals from an OpenAI-compatible server, and load them into another.")

FolderArg = Annotated[Path, typer.Argument(help="The folder the evals are saved in.")]
KeyEnvOpt = Annotated[str | None, typer.Option(
    "--api-key-env", help="Environment variable holding the server's API key (unset: no key sent).")]


def _client(base_url: str, key_env: str | None):
    import openai

    from tunesmith.clients.keys import api_key

    return openai.OpenAI(base_url=base_url, api_key=api_key(key_env, "--api-key-env"))


def _bar(description: str, total: int):
    from tunesmith.progress import task_bar

    return task_bar(common.console, description, total)


def _counts(counts: dict) -> str:
    return ", ".join(f"{n:,} {what.replace('_', ' ')}" for what, n in counts.items())


@evals_app.command("save")
def evals_save(
    folder: FolderArg,
    base_url: Annotated[str, typer.Option(help="The server to read the evals from.")] = "https://api.openai.com/v1",
    api_key_env: KeyEnvOpt = "OPENAI_API_KEY",
) -> None:
    """Save every eval the key sees: definitions, runs, output items with their grades, and the runs' data files."""
    from tunesmith.clients.evals_transfer import save_evals

    counts = save_evals(_client(base_url, api_key_env), folder, _bar)
    common.console.print(f"saved {_counts(counts)} → {folder}")
    if counts["skipped"]:
        common.console.print(f"not saved: see {folder / 'skipped.jsonl'}")


@evals_app.command("load")
def evals_load(
    folder: FolderArg,
    base_url: Annotated[str, typer.Option(help="The tunesmith server to create the evals on.")] =
        "http://127.0.0.1:8000/v1",
    api_key_env: KeyEnvOpt = None,
) -> None:
    """Create the saved evals and upload their data files on a tunesmith server; run again to go on after a stop."""
    from tunesmith.clients.evals_transfer import load_evals

    counts = load_evals(_client(base_url, api_key_env), folder, _bar)
    common.console.print(f"loaded {_counts(counts)}; new ids: {folder / 'loaded.json'}")
    if counts["skipped"]:
        common.console.print(f"not loaded: see {folder / 'skipped.jsonl'}")
