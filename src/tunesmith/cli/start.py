"""``tunesmith init DATA``: a recipe fitted to a data file, for ``tunesmith run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli import common


def init(
    data: Annotated[Path, typer.Argument(help="Your data: CSV/TSV, JSONL, JSON, Parquet, SQuAD-style JSON or chat "
                                              "JSONL (messages).")],
    target: Annotated[str | None, typer.Option(help="The field to predict (default: guessed, and said).")] = None,
    test: Annotated[Path | None, typer.Option(help="A held-out test file with the same fields (default: 10% of "
                                                   "DATA is held out).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the recipe (default: DATA's name + .yaml, "
                                                  "in the working folder).")] = None,
    model: Annotated[str, typer.Option(help="The LLM to fine-tune: embedded name, folder or HF id.")]
    = "smollm2-135m-instruct",
    encoder: Annotated[str | None, typer.Option(help="On a CPU, the encoder of the head arm (default: MiniLM, "
                                                     "or multilingual-e5-small for non-Latin text; none: no "
                                                     "encoder arm).")] = None,
) -> None:
    """Write a recipe fitted to your data file (task, fields, lengths, epochs, batch, arms), then: tunesmith run."""
    from tunesmith.runs.starter import init as write_init

    common.quiet_libraries()
    write_init(data, target, test, out, model, encoder,
               say=lambda line: common.console.print(line, highlight=False, markup=False))
