"""``tunesmith distill``: a fine-tuning file from the stored completions of a tunesmith server (the answers a strong
model gave behind it with ``store: true``), selected by metadata and model; the server checks and keeps the file, and
it is written here too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli import common


def distill(
    out: Annotated[Path, typer.Argument(help="Where to write the fine-tuning file (JSON lines).")],
    base_url: Annotated[str, typer.Option(help="The tunesmith server holding the stored completions.")] =
        "http://127.0.0.1:8000/v1",
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", help="Environment variable holding the server's API key (unset: no key sent).")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE a stored completion must carry "
                                                             "(repeatable).")] = None,
    model: Annotated[str | None, typer.Option(help="Only the answers of this model.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many examples.")] = None,
    drop_system: Annotated[bool, typer.Option(help="Leave out system messages (a prompt the fine-tune learns "
                                                   "by heart).")] = False,
    recipe: Annotated[bool, typer.Option(help="Also write a recipe for `tunesmith run` on the file (as `tunesmith "
                                              "init` writes it) whose report sets the model the answers came from "
                                              "beside the fine-tune and the baselines.")] = False,
) -> None:
    """Make a fine-tuning file of stored completions on the server and save it; prints the file id to train on."""
    import openai

    from tunesmith.clients.keys import api_key

    pairs = dict(p.split("=", 1) for p in metadata or [] if "=" in p)
    if len(pairs) != len(metadata or []):
        raise typer.BadParameter("--metadata takes KEY=VALUE")
    client = openai.OpenAI(base_url=base_url, api_key=api_key(api_key_env, "--api-key-env"))
    body = {"metadata": pairs or None, "model": model, "limit": limit, "drop_system_messages": drop_system,
            "filename": out.name}
    made = client.post("/files/from_stored_completions", body={k: v for k, v in body.items() if v is not None},
                       cast_to=object)
    out.parent.mkdir(parents=True, exist_ok=True)
    with client.files.with_streaming_response.content(made["id"]) as response, out.open("wb") as f:
        for block in response.iter_bytes():  # written as it arrives: 100,000 examples are never held here at once
            f.write(block)
    common.console.print(f"{made['examples']:,} examples (left out: {made['left_out_cut_by_max_tokens']:,} cut by "
                         f"max_tokens, {made.get('left_out_empty', 0):,} empty) → {out}; on the server as {made['id']}: "
                         f"client.fine_tuning.jobs.create(training_file=\"{made['id']}\", model=...)")
    if recipe:
        teacher = next(iter(made["models"]))
        written = recipe_with_teacher(out, teacher, base_url, api_key_env)
        common.console.print(f"recipe → {written}: tunesmith run {written}  (the report sets {teacher}, whose answers "
                             "these are, beside the fine-tune and the baselines)")


def recipe_with_teacher(data: Path, teacher: str, base_url: str, api_key_env: str | None) -> Path:
    """``tunesmith init``'s recipe for the distilled file, with the teacher as an ``eval.endpoints`` contender.

    The teacher's name comes from the server (a fine-tune's name carries its job's ``suffix``), so the entry is
    written by a YAML serializer, never pasted into YAML text: whatever the name holds (quotes, a line break,
    ``base_url: ...``) stays the value of ``model`` and cannot add a key, such as another ``base_url`` that
    ``tunesmith run`` would send the ``api_key_env`` key to. The written recipe is read back to prove it."""
    import textwrap

    import yaml

    from tunesmith.config import load_recipe
    from tunesmith.errors import ConfigError
    from tunesmith.runs.starter import init as write_init

    common.quiet_libraries()
    path = data.with_suffix(".yaml")
    write_init(data, out=path, say=lambda line: common.console.print(line, highlight=False, markup=False))
    entry = {"name": "teacher", "base_url": base_url, "model": teacher, "api_key_env": api_key_env, "ask_as": "plain"}
    block = yaml.safe_dump({"endpoints": [entry]}, sort_keys=False, allow_unicode=True, width=10_000)
    endpoint = ("  # endpoints: the model whose stored answers the fine-tune learned (tunesmith distill)\n"
                + textwrap.indent(block, "  "))
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.rstrip() == "eval:")
    path.write_text("".join([*lines[: at + 1], endpoint, *lines[at + 1:]]), encoding="utf-8")
    written = load_recipe(path).eval.endpoints  # a recipe that would not load is this command's error, not the run's
    if [(e.name, e.base_url, e.model, e.api_key_env) for e in written] != [("teacher", base_url, teacher, api_key_env)]:
        raise ConfigError(f"{path}: eval.endpoints did not read back as the teacher {teacher!r} at {base_url}; "
                          "remove the file and run tunesmith distill --recipe again")
    return path
