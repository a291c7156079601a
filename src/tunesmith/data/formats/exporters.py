"""Formatters (chat, prompt/completion, Alpaca, preference pairs) and exporters of the splits.

Exports: OpenAI chat JSONL, OpenAI (legacy) completion JSONL, OpenAI DPO JSONL, Alpaca JSON
lines, a Hugging Face dataset folder (one split each) and Parquet files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.config import DataSection, ExportSpec
from tunesmith.errors import DataError
from tunesmith.records import Example, render_prompt

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


def chat_row(prompt: str, answer: str, system: str | None = None) -> dict:
    """OpenAI chat format; no system message when ``system`` is None."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return {
        "messages": messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    }


def completion_row(prompt: str, completion: str, separator: str = "\n\n###\n\n", stop: str = "\n") -> dict:
    """Legacy prompt/completion: the prompt ends with a separator, the completion starts with a space."""
    return {"prompt": prompt.rstrip() + separator, "completion": " " + completion.strip() + stop}


def alpaca_text(instruction: str, output: str, input_text: str = "") -> str:
    template = ALPACA_WITH_INPUT if input_text.strip() else ALPACA_NO_INPUT
    return template.format(instruction=instruction.strip(), input=input_text.strip(), output=output.strip())


def preference_row(prompt: str, chosen: str, rejected: str, system: str | None = None) -> dict:
    """OpenAI DPO format: input messages, one preferred and one non-preferred assistant message."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return {
        "input": {
            "messages": messages + [{"role": "user", "content": prompt}],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def _rows(examples: list[Example], cfg: DataSection, spec: ExportSpec):
    system = cfg.system_prompt or None  # OpenAI rejects a message with empty content
    for e in examples:
        prompt = render_prompt(e, cfg.prompt)
        if spec.format == "openai-chat":
            yield chat_row(prompt, e.target, system)
        elif spec.format == "openai-completion":
            yield completion_row(prompt, e.target, spec.separator, spec.stop)
        elif spec.format == "alpaca":
            yield {"text": alpaca_text(prompt, e.target)}
        elif spec.format == "openai-dpo":
            chosen, rejected = e.meta.get(spec.chosen_field), e.meta.get(spec.rejected_field)
            if chosen in (None, "") or rejected in (None, ""):
                raise DataError(
                    f"{e.meta.get('source', e.id)}: openai-dpo export needs fields "
                    f"'{spec.chosen_field}' and '{spec.rejected_field}'"
                )
            yield preference_row(prompt, str(chosen), str(rejected), system)
        else:  # hf / parquet: flat columns
            yield {"id": e.id, **e.inputs, "target": e.target, "prompt": prompt}


def export_splits(splits: dict[str, list[Example]], cfg: DataSection, out_dir: Path) -> list[Path]:
    """Write every ``data.export`` entry for train/val/test; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = [n for n in ("train", "val", "test") if splits.get(n)]
    for spec in cfg.export:
        if spec.format == "hf":
            import datasets

            folder = out_dir / "hf"
            datasets.DatasetDict(
                {n: datasets.Dataset.from_list(list(_rows(splits[n], cfg, spec))) for n in names}
            ).save_to_disk(str(folder))
            written.append(folder)
        elif spec.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            for n in names:
                path = out_dir / f"{n}.parquet"
                pq.write_table(pa.Table.from_pylist(list(_rows(splits[n], cfg, spec))), path)
                written.append(path)
        else:
            for n in names:
                path = out_dir / f"{n}.{spec.format}.jsonl"
                with open(path, "w", encoding="utf-8") as fh:
                    for row in _rows(splits[n], cfg, spec):
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                written.append(path)
    return written
