"""The one result every training method returns, and the files every method writes beside it:
``metrics.csv`` (OpenAI's results-file columns), ``loss.png`` and ``summary.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


@dataclass
class TrainResult:
    output_dir: Path  # adapter/ (LoRA, DoRA, QLoRA), model/ (full), classifier/ or head/ (regression, span)
    kind: str  # "adapter", "model", "classifier" or "head"
    rows: list[dict]  # metrics.csv rows
    seconds: float
    tokens: int  # non-padding tokens seen
    trainable_params: int
    total_params: int
    tensors_changed: int  # trainable tensors whose values moved during training
    tensors_trainable: int
    model: object  # the trained model, in eval mode
    examples: int = 0
    too_long: int = 0  # training examples set aside for exceeding train.max_seq_length
    resumed: bool = False
    train_path: dict | None = None  # the chosen training path (tunesmith.machine.device.TrainPath.to_json())
    random_weights: str | None = None  # the random:<arch> name when the base model has random weights
    sharding: dict | None = None  # train.distributed: fsdp: how the parameters were split between the ranks
    warning: str | None = None  # a training that ran but learned nothing usable, said in every summary
    end_peak_mb: float = 0.0  # the peak read when training ended (a training shorter than logging_steps logs none)
    steps: int | None = None  # optimizer steps run (the trainer's count: the last logged row may be before the last)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def peak_memory_mb(self) -> float:
        return max([self.end_peak_mb, *(r.get("peak_memory_mb") or 0 for r in self.rows)])


def trainable_snapshot(model) -> dict:
    """Copies of the trainable tensors, to count afterwards which of them training moved."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def make_result(trainer, kind: str, final_dir: Path, before: dict, seconds: float, rows: list[dict],
                examples: int, resumed: bool | Path) -> TrainResult:
    """Collect what every method reports once ``trainer`` has trained and saved to ``final_dir``; every rank
    calls it (a sharded model's parameters are gathered one by one to compare them)."""
    from tunesmith.machine.fsdp import full_value, sharding_summary
    from tunesmith.train.trainer import peak_memory_mb

    end_peak = peak_memory_mb()  # before the comparison below copies parameters
    model = trainer.model
    after = dict(model.named_parameters())
    changed = sum(not full_value(after[n].detach()).equal(full_value(v)) for n, v in before.items())
    tokens = int(trainer.state.num_input_tokens_seen or max((int(h.get("num_tokens", 0)) for h in
                                                             trainer.state.log_history), default=0))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(v.numel() for v in before.values())
    return TrainResult(final_dir, kind, rows, seconds, tokens, trainable, total, changed, len(before),
                       model.eval(), examples, 0, bool(resumed), sharding=sharding_summary(model), end_peak_mb=end_peak,
                       steps=int(trainer.state.global_step))


def write_outputs(result: TrainResult, out_dir: Path, title: str) -> None:
    """metrics.csv, loss.png and summary.json in ``out_dir``."""
    from tunesmith.train.metrics import plot_loss, write_metrics_csv

    write_metrics_csv(result.rows, out_dir / "metrics.csv")
    plot_loss(result.rows, out_dir / "loss.png", title)
    summary = {
        "kind": result.kind,
        "seconds": result.seconds,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_tensors": result.tensors_trainable,
        "trainable_tensors_changed": result.tensors_changed,
        "examples": result.examples,
        "set_aside_too_long": result.too_long,
        "resumed": result.resumed,
        "train_path": result.train_path,
    }
    if result.sharding:
        summary["sharding"] = result.sharding
    if result.warning:
        summary["warning"] = result.warning
    if result.random_weights:  # first, so that nobody reads these numbers as a trained model's
        summary = {"random_weights": f"{result.random_weights}: random weights, speed and memory only"} | summary
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


class Artefact(StrEnum):
    """What a trained folder holds, and so how it is loaded and asked."""

    MODEL = "model"  # an adapter or a merged model (or none: the base model): a language model that generates
    CLASSIFIER = "classifier"  # a classifier head with its labels.json
    HEAD = "head"  # a regression or span head with its head.json

    @classmethod
    def of_folder(cls, folder: Path) -> Artefact:
        """What a trained folder given by path holds, told by the files each kind saves."""
        folder = Path(folder)
        if (folder / "labels.json").is_file():
            return cls.CLASSIFIER
        return cls.HEAD if (folder / "head.json").is_file() else cls.MODEL


TRAINED_FOLDERS = {"adapter": Artefact.MODEL, "model": Artefact.MODEL, "classifier": Artefact.CLASSIFIER,
                   "head": Artefact.HEAD}  # train/<folder>/ in the order a run folder is searched


def trained_output(run_dir: Path) -> tuple[Path, Artefact] | None:
    """The trained artefact in a run (or arm) folder: (folder, what it holds) or None before training."""
    for sub, kind in TRAINED_FOLDERS.items():
        folder = run_dir / "train" / sub
        if folder.is_dir() and any(folder.iterdir()):
            return folder, kind
    return None
