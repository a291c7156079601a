"""``tunesmith synth RECIPE``: read inputs, run the task through the cached client, write items.
The synth stage of ``tunesmith run`` (:mod:`tunesmith.synth.augment`) runs the same, then turns the
items into training examples.

Writes ``runs/<name>/synth/``: ``items.jsonl`` (every kept item with its review status),
``accepted.jsonl`` (what training reads), ``rejected.jsonl`` (every dropped input or reply with
the reason and raw text), ``stats.json`` (calls, cache hits, retries, tokens, cost) and
``calls.sqlite`` (the per-call cache that makes reruns resume). ``stats.json`` also holds
kept / set aside by reason, the same numbers as the table ``tunesmith synth`` ends with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tunesmith.clients.calls import CallStats
from tunesmith.clients.chat import LocalChatClient, OpenAIChatClient
from tunesmith.clients.retry import RetryPolicy
from tunesmith.config import Recipe, SynthSection, dump_resolved
from tunesmith.errors import ConfigError
from tunesmith.progress import task_bar
from tunesmith.synth import generators as tasks
from tunesmith.synth.cache import CallCache, run_calls
from tunesmith.synth.review import write_items
from tunesmith.synth.structured import run_structured


@dataclass
class SynthResult:
    out_dir: Path
    items: int
    rejected: int
    stats: CallStats
    summary: dict


def make_client(cfg: SynthSection, engine: str = "builtin"):
    """The provider's client; a local one generates on ``engine`` (auto already resolved)."""
    p = cfg.provider
    if p.kind == "local":
        return LocalChatClient(p.model, batch_size=p.batch_size, constrained=cfg.constrained, engine=engine)
    return OpenAIChatClient(
        p.base_url, p.model, p.api_key_env, p.concurrency, p.requests_per_minute, p.timeout_s,
        RetryPolicy(max_retries=p.max_retries),
    )


def run_synth(recipe: Recipe, console: Console | None = None) -> SynthResult:
    console = console or Console()
    cfg = recipe.synth
    if cfg is None:
        raise ConfigError("this recipe has no synth section (see examples/synth_*.yaml)")
    if cfg.input is None:
        raise ConfigError("synth.input: required but missing (only a paraphrase stage of `tunesmith run` may omit it)")
    out_dir = recipe.run_dir / "synth"
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_resolved(recipe, recipe.run_dir / "config.resolved.yaml")
    p = cfg.provider
    from tunesmith.generation import remote

    engine = remote.pick(cfg.engine, "synth", say=console.print) if p.kind == "local" else "builtin"
    client = make_client(cfg, engine)
    cache = CallCache(out_dir / "calls.sqlite")
    stats = CallStats()
    with remote.using(spec=engine, base_model=p.model, log_dir=out_dir / "engine"), \
            task_bar(console, f"{cfg.task}: LLM calls", 0) as advance:

        def complete(reqs):
            advance(0, grow=len(reqs))  # one bar for the whole run: every round, re-asks included, adds to it
            return run_calls(client, cache, reqs, stats, p.price_input_per_m, p.price_output_per_m, advance)

        ctx = tasks.SynthContext(
            cfg,
            ask=lambda reqs, schema, max_items=None: run_structured(complete, reqs, schema, cfg.max_parse_attempts,
                                                                    max_items),
            complete=lambda reqs: complete(reqs)[0],
            say=console.print,
        )
        output, early_rejects = _run_task(cfg, ctx, console, cache, stats, out_dir)
    status = "pending" if cfg.review_required else "accepted"
    items = [{"id": f"{cfg.task}-{i + 1:06d}", "task": cfg.task, "status": status, "data": d}
             for i, d in enumerate(output.items)]
    write_items(out_dir, items)
    rejected = early_rejects + output.rejected
    with open(out_dir / "rejected.jsonl", "w", encoding="utf-8") as fh:
        for r in rejected:
            fh.write(json.dumps({"task": cfg.task, **r}, ensure_ascii=False) + "\n")
    summary = summarize(len(items), rejected, stats)
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return SynthResult(out_dir, len(items), len(rejected), stats, summary)


def summarize(kept: int, rejected: list[dict], stats: CallStats) -> dict:
    """stats.json: kept, set aside by reason, and the call statistics (calls, cache hits, tokens, cost)."""
    from collections import Counter

    from tunesmith.synth.gates import reason_key

    by_reason = Counter(reason_key(str(r.get("reason", ""))) for r in rejected)
    return {"kept": kept, "set_aside": len(rejected), "set_aside_by_reason": dict(by_reason.most_common()),
            **stats.to_json()}


def summary_table(summary: dict):
    """The table ``tunesmith synth`` ends with (the same numbers as stats.json)."""
    from rich.table import Table

    table = Table(title="synth summary", show_header=False)
    table.add_row("kept", str(summary["kept"]))
    table.add_row("set aside", str(summary["set_aside"]))
    for reason, n in summary["set_aside_by_reason"].items():
        table.add_row(f"  {reason}", str(n))
    table.add_row("LLM calls made", str(summary["calls_made"]))
    table.add_row("  re-asked (unusable reply)", str(summary["reasks"]))
    table.add_row("  retried (all)", str(summary["retries"]))
    table.add_row("  failed", str(summary["failures"]))
    table.add_row("cache hits", str(summary["cache_hits"]))
    table.add_row("tokens (prompt + completion)", f"{summary['prompt_tokens']:,} + {summary['completion_tokens']:,}")
    table.add_row("cost", f"${summary['cost_usd']:.4f}")
    table.add_row("seconds in calls", f"{summary['seconds']:.1f}")
    return table


def _run_task(cfg: SynthSection, ctx, console: Console, cache: CallCache, stats: CallStats, out_dir: Path):
    """Read the task's inputs and run it; call statistics are saved even when the run stops halfway."""
    task = tasks.synth_task(cfg.task)
    try:
        inputs, early_rejects = task.read(cfg, console.print)
        output = task.run(ctx, inputs)
    finally:
        (out_dir / "stats.json").write_text(json.dumps(stats.to_json(), indent=2), encoding="utf-8")  # partial
        cache.close()
    return output, early_rejects
