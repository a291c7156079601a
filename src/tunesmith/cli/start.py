"""``tunesmith init DATA``: a recipe fitted to a data file, for ``tunesmith run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli import common


def init(
    data: Annotated[Path, typer.Argument(help="Your data: CSV/TSV, JSONL, JSON, Parquet, SQuAD-style JSON, chat "
                                              "JSONL (messages) or a saved Hugging Face dataset folder; UTF-8, "
                                              "UTF-16 or Korean cp949/euc-kr.")],
    target: Annotated[str | None, typer.Option(help="The field to predict (default: guessed, and said).")] = None,
    task: Annotated[str | None, typer.Option(help="classification, regression or generation (default: from the "
                                                  "target: short values that repeat are labels, other numbers "
                                                  "regression, free text generation).")] = None,
    test: Annotated[Path | None, typer.Option(help="A held-out test file with the same fields (default: 10% of "
                                                   "DATA is held out).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the recipe (default: DATA's name + .yaml, "
                                                  "in the working folder).")] = None,
    model: Annotated[str, typer.Option(help="The LLM to fine-tune: embedded name, folder or HF id.")]
    = "smollm2-135m-instruct",
    encoder: Annotated[str | None, typer.Option(help="On a CPU, the encoder of the head arm (default: by the "
                                                     "script of the input text: all-MiniLM-L6-v2 for English, "
                                                     "multilingual-e5-small for Hangul, CJK, Kana, Cyrillic, "
                                                     "Arabic and other scripts; none: no encoder arm).")] = None,
) -> None:
    """Write a recipe fitted to your data file (task, fields, lengths, epochs, batch, arms), then: tunesmith run.

    Inputs are the free-text fields: ids, URLs, dates, file names, numbers and fields that copy or determine the
    target are left out, each with its reason. Rows the run would set aside (broken lines, empty cells) are
    counted first; a file the run could not use (one label, too few rows) is refused, saying why."""
    from tunesmith.runs.starter import init as write_init

    common.quiet_libraries()
    write_init(data, target, test, out, model, encoder,
               say=lambda line: common.console.print(line, highlight=False, markup=False), task=task)
