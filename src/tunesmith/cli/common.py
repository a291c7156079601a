"""What every command shares: the consoles, the process-wide flags, recipe loading, library quieting and the
multi-process launch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)
state: dict = {"debug": False, "argv": []}
NprocOpt = Annotated[int | None, typer.Option("--nproc", min=1, help="Training processes on this node: starts "
                                               "torchrun (gloo on CPU, one GPU per process).")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", min=1, help="With --nproc: nodes taking part.")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", min=0, help="With --nnodes: this node's number (0 first).")]
RdzvOpt = Annotated[str | None, typer.Option("--rdzv-endpoint", help="With --nnodes: HOST:PORT of node 0.")]


def recipe_at(path: Path, overrides: list[str]):
    """The recipe at ``path`` with ``--set`` overrides, checked against the task kinds (registered on import)."""
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks data.task against
    import tunesmith.serve.engines.vllm.server  # noqa: F401 - registers the vllm generation engine (eval.engine, synth.engine)
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import load_recipe

    return load_recipe(path, overrides)


def quiet_libraries(progress_bars: bool = False) -> None:
    """Silence library chatter; our own rich bars report progress (HF's tqdm bars only if asked)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def launch_if_asked(nproc: int | None, nnodes: int, node_rank: int, rdzv_endpoint: str | None) -> None:
    """With ``--nproc``/``--nnodes`` asking for more than this one process, re-run the command under torchrun
    and exit with its status; inside a torchrun worker the options were the launcher's and are ignored."""
    from tunesmith.machine.launch import launch, launched

    if launched() or ((nproc or 1) == 1 and nnodes == 1):
        return
    raise typer.Exit(launch(state["argv"], nproc or 1, nnodes, node_rank, rdzv_endpoint))


def rank_console() -> Console:
    """The console of this process: rank 0 (or a single process) prints, the other ranks stay quiet."""
    from tunesmith.machine.launch import is_main

    return console if is_main() else Console(quiet=True)
