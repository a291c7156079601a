"""Command-line entry point: parse, validate, call one core function, render.

Exit codes: 0 success, 2 config or usage error, 3 data error, 1 anything else.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tunesmith import __version__
from tunesmith.cli import common
from tunesmith.cli.data import data_app
from tunesmith.cli.distill import distill
from tunesmith.cli.evals import evals_app
from tunesmith.cli.models import models_app
from tunesmith.cli.start import init
from tunesmith.cli.synth import synth_app
from tunesmith.errors import TunesmithError

app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, add_completion=False,  # help text shown as written
                  help="Fine-tune a small model for one narrow task.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(synth_app, name="synth")
app.add_typer(evals_app, name="evals")
app.command("distill")(distill)
app.command("init")(init)


def _version(value: bool) -> None:
    if value:
        common.console.print(f"tunesmith {__version__}")
        raise typer.Exit()



@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    common.state["debug"] = debug


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key, e.g. --set train.epochs=2; one arm: --set arms.NAME.train.epochs=2.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help=(
        "A first verdict in about 4 minutes on a CPU: inputs cut to 128 tokens, each arm trains what its share of "
        "the time buys at this machine's speed, 80 stratified test examples are scored by label log-likelihood, "
        "only the baselines that load no model run; what was cut is said."))] = False,
    nproc: common.NprocOpt = None,
    nnodes: common.NnodesOpt = 1,
    node_rank: common.NodeRankOpt = 0,
    rdzv_endpoint: common.RdzvOpt = None,
) -> None:
    """Run a recipe end to end: data, synth, train every arm, evaluate every contender, report."""
    import contextlib
    import shlex

    from tunesmith.runs.experiment import run as run_pipeline
    from tunesmith.runs.quick import quick_threads

    cfg = common.recipe_at(recipe, set_ or [])
    common.quiet_libraries()
    with quick_threads(cfg) if quick else contextlib.nullcontext([]) as threads:
        if quick:  # the plan that chose the steps is printed
            cfg, set_ = quick_recipe(recipe, cfg, set_ or [], threads)
        else:
            print_plan(cfg)  # before the ranks start: once, in this process
        common.launch_if_asked(nproc, nnodes, node_rank, rdzv_endpoint)
        command = shlex.join(["tunesmith", "run", str(recipe), *(a for kv in (set_ or []) for a in ("--set", kv))])
        result = run_pipeline(cfg, common.rank_console(), command)
    if result is None:  # a rank other than 0: rank 0 evaluates and reports
        return
    common.console.rule("[bold green]done")
    if result.headline:
        common.console.print(result.headline.replace("**", ""))
    common.console.print(f"Report: {result.report}")


def quick_recipe(recipe: Path, cfg, set_: list[str], threads: list[str]):
    """``(recipe, --set list)`` of ``run --quick``: the cuts, then each arm's steps for this data and machine (the
    user's own ``--set`` values win); every cut said (``threads``: the CPU threads it took, if it took fewer)."""
    from tunesmith.runs.quick import quick_overrides, quick_steps

    if cfg.data is None or cfg.data.split.folds:
        raise typer.BadParameter("--quick needs a data section and no data.split.folds")
    from tunesmith.runs.plan import render_plan

    sets, cut = quick_overrides(cfg)
    steps, cut_steps, plan = quick_steps(common.recipe_at(recipe, sets + set_), common.console)
    set_ = sets + steps + set_
    cfg = common.recipe_at(recipe, set_)
    common.console.print("--quick: " + "; ".join(threads + cut + cut_steps), highlight=False, markup=False)
    common.console.print(render_plan(cfg, plan), highlight=False, markup=False)
    return cfg, set_


def print_plan(cfg) -> None:
    """The time and memory to expect, before a run starts; a plan that cannot be made is said, not fatal."""
    from tunesmith.errors import TunesmithError
    from tunesmith.machine.launch import world_size
    from tunesmith.runs.plan import estimate_text

    if world_size() > 1 or cfg.data is None or cfg.data.split.folds:  # ranks: the launching process printed it
        return
    try:
        common.console.print(estimate_text(cfg, common.console), highlight=False, markup=False)
    except TunesmithError as exc:
        common.console.print(f"(no time estimate: {exc})", highlight=False, markup=False)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key (YAML value).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help=(
        "Continue from the newest checkpoint, even of a finished training; fail instead of starting over "
        "(without it, checkpoints of the same settings are resumed and others removed)."))] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help=(
        "Print the time and peak memory to expect for every arm and the evaluation (from this machine's "
        "measured speed), then the memory of the recipe's own training in detail."))] = False,
    backend: Annotated[str, typer.Option(help="local, or openai: an OpenAI-compatible fine-tuning API "
                                              "(the recipe's hosted section).")] = "local",
    nproc: common.NprocOpt = None,
    nnodes: common.NnodesOpt = 1,
    node_rank: common.NodeRankOpt = 0,
    rdzv_endpoint: common.RdzvOpt = None,
) -> None:
    """Fine-tune as the recipe says (SFT or DPO; LoRA, DoRA, QLoRA or full) without evaluating."""

    cfg = common.recipe_at(recipe, set_ or [])
    if backend == "openai":
        from tunesmith.runs.hosted import run_hosted

        common.quiet_libraries()
        job = run_hosted(cfg, common.console)
        common.console.print(f"Fine-tuned model: {job['fine_tuned_model']}  (metrics: {cfg.run_dir / 'train' / 'metrics.csv'})")
        return
    if backend != "local":
        raise typer.BadParameter("--backend is local or openai")
    if estimate:
        from tunesmith.runs.fitting import fitted_estimate

        common.quiet_libraries()
        print_plan(cfg)
        est = fitted_estimate(cfg, common.console)
        common.console.print(est.render())
        return
    from tunesmith.runs.training import run_training

    common.launch_if_asked(nproc, nnodes, node_rank, rdzv_endpoint)
    common.quiet_libraries()
    out = common.rank_console()
    trained = run_training(cfg, out, resume=resume)
    out.print(f"Saved: {trained.output_dir}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<name>).")],
    merged: Annotated[Path | None, typer.Option(help="Write a merged Hugging Face folder here.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="Write the PEFT adapter alone here.")] = None,
    gguf: Annotated[Path | None, typer.Option(help="Write a GGUF file and an Ollama Modelfile in this folder.")] = None,
    gguf_type: Annotated[str, typer.Option(help=(
        "GGUF weight type: f32, f16, bf16, q8_0 (llama.cpp's converter); "
        "q4_0, q5_0, q4_k_m, q5_k_m, q6_k (its quantizer, needs tunesmith[llama-cpp])."))] = "f16",
    arm: Annotated[str | None, typer.Option(help="Export this arm of the run (runs/<name>/arms/<arm>).")] = None,
) -> None:
    """Export a trained run as a merged model folder, its adapter and/or a GGUF for llama.cpp and Ollama."""
    from tunesmith.errors import ConfigError

    if not merged and not adapter and not gguf:
        raise ConfigError("export: give --merged OUT, --adapter OUT and/or --gguf DIR")
    from tunesmith.export.gguf import check_gguf_type, export_gguf
    from tunesmith.export.merged import arm_dir, export_adapter, export_merged

    check_gguf_type(gguf_type)
    run_dir = arm_dir(run_dir, arm) if arm else run_dir
    common.quiet_libraries()
    if adapter:
        common.console.print(f"adapter → {export_adapter(run_dir, adapter)}")
    if merged:
        common.console.print(f"merged model → {export_merged(run_dir, merged)}")
    if gguf:
        path = export_gguf(run_dir, gguf, gguf_type)
        common.console.print(f"GGUF → {path} ({path.stat().st_size / 1e6:.1f} MB), Ollama Modelfile → {path.parent / 'Modelfile'}")
@app.command("eval")
def eval_(
    target: Annotated[str, typer.Argument(help="A recipe YAML file, or 'qa' to score a predictions file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key.")] = None,
    gold: Annotated[Path | None, typer.Option(help="qa: SQuAD/KorQuAD-style gold JSON.")] = None,
    predictions: Annotated[Path | None, typer.Option(help="qa: JSON object {question id: answer}.")] = None,
    lang: Annotated[str, typer.Option(help="qa: en (SQuAD v1.1 rules) or ko (KorQuAD v1.0 rules).")] = "en",
) -> None:
    """Evaluate every contender of a recipe side by side, or (``eval qa``) score QA predictions."""
    import json

    from tunesmith.errors import ConfigError

    if target == "qa":
        from tunesmith.scoring.qa import read_gold, read_predictions, score_qa

        if gold is None or predictions is None:
            raise ConfigError("eval qa needs --gold FILE and --predictions FILE")
        score = score_qa(read_gold(gold), read_predictions(predictions), lang)
        listed = (("missing (scored 0)", score.missing), ("not in the gold file (ignored)", score.extra))
        for label, ids in listed:
            if ids:
                common.err_console.print(f"{len(ids)} prediction id(s) {label}: {', '.join(ids[:20])}"
                                  + (" ..." if len(ids) > 20 else ""), highlight=False)
        print(json.dumps(score.headline()))
        return
    from tunesmith.eval.runner import evaluate_recipe

    cfg = common.recipe_at(Path(target), set_ or [])
    common.quiet_libraries()
    result = evaluate_recipe(cfg, common.console)
    common.console.rule("[bold green]done")
    h, fmt = result.task.headline, result.task.fmt
    for r in result.results:
        common.console.print(f"  {r.name:<16} {h} {fmt(r.metrics.get(h))}")
    common.console.print(f"Report: {result.report_md}  ·  {result.report_html}")


# --- tunesmith serve -----------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    model: Annotated[str, typer.Option(help="Base model: embedded name, folder or HF id.")] = "smollm2-135m-instruct",
    adapter: Annotated[list[str] | None, typer.Option(help="A LoRA adapter to serve, NAME=PATH (repeatable).")] = None,
    model_alias: Annotated[list[str] | None, typer.Option(help="NAME=MODEL: requests and jobs naming NAME (e.g. "
                                                          "gpt-4o-mini-2024-07-18) use MODEL (repeatable).")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where files, jobs and job runs are kept.")] = Path("tunesmith-data"),
    runs: Annotated[Path, typer.Option(help="The runs folder whose experiments the dashboard shows.")] = Path("runs"),
    database: Annotated[str | None, typer.Option(envvar="TUNESMITH_DATABASE", show_envvar=True, help=(
        "A postgresql:// URL for the store's tables (replicas sharing one --data-dir share it); prefer the "
        "environment variable for a URL with a password [default: SQLite in --data-dir]."))] = None,
    api_keys_file: Annotated[Path | None, typer.Option(help="File with one API key per line.")] = None,
    engine: Annotated[str, typer.Option(help="Inference engine: builtin (in-process), vllm (a vLLM server tunesmith "
                                        "starts and supervises; `make vllm`), or auto: vllm on a CUDA GPU when "
                                        "installed, else builtin.")] = "auto",
    vllm_python: Annotated[str | None, typer.Option(help="With --engine vllm: the Python that has vLLM "
                                                    "[default: $TUNESMITH_VLLM_PYTHON, ./.vllm-venv].")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option(help="With --engine vllm: one more argument for vLLM's "
                                                       "server, e.g. --vllm-arg=--tensor-parallel-size=2 (repeatable).")] = None,
    vllm_gpu_share: Annotated[float, typer.Option(help="With --engine vllm on a CUDA GPU: vLLM's share of its memory "
                                                  "(--gpu-memory-utilization); fine-tuning jobs get the rest.")] = 0.5,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens one request may generate.")] = 4096,
    request_timeout: Annotated[float, typer.Option(min=1, help="Seconds a generation may run (then it stops "
                                                   "with finish_reason length).")] = 300.0,
    max_batch: Annotated[int, typer.Option(min=1, help="Generations decoded together at each step.")] = 64,
    fine_tunes_loaded: Annotated[int, typer.Option(min=1, help="Fine-tuned models kept loaded at once; past it the "
                                                   "least recently used is unloaded (and loaded again by name from "
                                                   "the store at its next request).")] = 8,
    max_body_mb: Annotated[int, typer.Option(min=1, help="Largest request body in MB (uploads excepted); "
                                             "larger ones get a 413.")] = 16,
    max_upload_mb: Annotated[int, typer.Option(min=1, help="Largest file in MB: one multipart upload to /v1/files, "
                                               "or a whole /v1/uploads upload (a 413 past it).")] = 512,
    tinker_fused_steps: Annotated[bool, typer.Option(help="Tinker API: several keys' forward_backward calls waiting "
                                                     "together run as one pass on the base while they fit one "
                                                     "(each row through its own run's adapter; faster than one "
                                                     "after another: docs/benchmarks.md).")] = True,
    tinker_autosave: Annotated[float, typer.Option(min=0, help="Tinker API with replicas: seconds between the "
                                                   "states a run's replica saves on its own after an optim_step "
                                                   "(another replica resumes from the newest should it stop; 0: "
                                                   "after every step).")] = 60.0,
    batch_concurrency: Annotated[int | None, typer.Option(min=1, help="A batch's requests in flight at once "
                                                          "[default: half of --max-batch; 128 on vLLM].")] = None,
    requests_per_key: Annotated[int | None, typer.Option(min=1, help="Most inference requests of one API key in "
                                                         "flight at once (429 past it) [default: no limit].")] = None,
    tokens_per_minute_per_key: Annotated[int | None, typer.Option(min=1, help="Most tokens (prompt + max_tokens) "
                                                                  "one API key's requests may ask for in a minute "
                                                                  "(429 past it) [default: no limit].")] = None,
    docs: Annotated[bool | None, typer.Option("--docs/--no-docs", help="Serve /docs and /openapi.json "
                                              "[default: on only without API keys].", show_default=False)] = None,
    allow_random_model: Annotated[bool, typer.Option(help="Serve a random:<arch> model (random weights).")] = False,
    allow_python_graders: Annotated[bool | None, typer.Option(
        "--allow-python-graders/--no-python-graders", help="Run callers' python graders (sandboxed); "
        "default: on only without API keys.", show_default=False)] = None,
    jobs_per_key: Annotated[int, typer.Option(min=1, help="Most fine-tuning jobs of one API key running at "
                                              "once (queued jobs start round robin over keys).")] = 1,
    executor: Annotated[str, typer.Option(help="local: jobs one at a time in a worker process; ray: each job "
                                          "a Ray task, several at once (pip install 'tunesmith[ray]').")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="With --executor ray: the cluster to join "
                                                    "(default: start a local one).")] = None,
    jobs_engine: Annotated[str, typer.Option(help="With --engine vllm: where fine-tuning jobs generate (evaluations, "
                                             "reinforcement rollouts, model graders): auto (for each, the engine "
                                             "measured faster on this device), builtin (the job's own process) or "
                                             "vllm (the server's vLLM).")] = "auto",
    quota: Annotated[list[str] | None, typer.Option(help="NAME=VALUE: what one API key may keep, e.g. files=5000, "
                                                    "file_bytes=50G, responses=off (repeatable; the names and defaults "
                                                    "in docs/serve.md, Quotas).")] = None,
) -> None:
    """OpenAI-compatible server: chat/completions, files, fine-tuning jobs (with a worker) and a dashboard."""
    from tunesmith.serve.api.rate_limits import KeyLimits
    from tunesmith.serve.app import ServeSettings
    from tunesmith.serve.launch import parse_adapters, parse_model_aliases, pick_engine, serve_platform
    from tunesmith.serve.store.quotas import Quotas

    adapters = parse_adapters(adapter or [])
    aliases = parse_model_aliases(model_alias or [], {model, *adapters})
    engine = pick_engine(engine, vllm_python)
    if executor not in ("local", "ray"):
        raise typer.BadParameter("--executor is local or ray")
    from tunesmith.serve.engines.process import JOBS_ENGINES

    if jobs_engine not in JOBS_ENGINES:
        raise typer.BadParameter("--jobs-engine is " + ", ".join(JOBS_ENGINES[:-1]) + f" or {JOBS_ENGINES[-1]}")
    if executor == "ray":
        from tunesmith.serve.jobs.ray_executor import ray_module

        ray_module()  # a missing extra is said here, not in the worker's log
    keys = ServeSettings.keys_from_env(api_keys_file)
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        common.err_console.print(f"[yellow]warning:[/] serving on {host} without API keys (set TUNESMITH_API_KEYS)")
    common.quiet_libraries()
    settings = ServeSettings(model=model, adapters=adapters, api_keys=keys, data_dir=data_dir, runs_dir=runs,
                             database=database, instance=f"{socket.gethostname()}-{port}" if database else "",
                             max_tokens=max_tokens, request_timeout_s=request_timeout,
                             max_batch=max_batch, fine_tunes_loaded=fine_tunes_loaded, docs=docs,
                             allow_random_model=allow_random_model, allow_python_graders=allow_python_graders,
                             model_aliases=aliases, engine=engine, vllm_python=vllm_python,
                             vllm_args=tuple(vllm_arg or ()), vllm_gpu_share=vllm_gpu_share, max_body_mb=max_body_mb,
                             max_upload_mb=max_upload_mb,
                             key_limits=KeyLimits(requests_per_key, tokens_per_minute_per_key),
                             batch_concurrency=batch_concurrency, quotas=Quotas.parse(quota or []),
                             tinker_fused_steps=tinker_fused_steps, tinker_autosave_s=tinker_autosave)
    serve_platform(settings, host, port, say=common.console.print, jobs_per_key=jobs_per_key, executor=executor,
                  ray_address=ray_address, jobs_engine=jobs_engine)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def cookbook(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="A tinker-cookbook recipe module (tinker_cookbook.recipes.sl_loop) "
                                          "or .py file; the arguments after it are the recipe's own (key=value).")],
) -> None:
    """Run a tinker-cookbook recipe unchanged against `tunesmith serve`'s Tinker API: the bases the server serves are
    added to the cookbook's model table (tokenizer from the local model, the renderer matching its chat template),
    then the recipe runs as its own __main__. The server: base_url=URL (or $TINKER_BASE_URL); the key:
    $TINKER_API_KEY (tml-<key>)."""
    from tunesmith.clients.cookbook import run as run_recipe

    run_recipe(recipe, list(ctx.args))


# --- tunesmith data ... ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the app, mapping our errors to exit codes and one-line messages."""
    common.state["argv"] = list(sys.argv[1:] if argv is None else argv)
    try:
        status = app(args=argv, standalone_mode=False)  # click returns a typer.Exit's code here
        if isinstance(status, int) and status:
            return status
    except TunesmithError as exc:
        common.err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        if common.state["debug"]:
            common.err_console.print_exception()
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        common.err_console.print("aborted")
        return 130
    except Exception as exc:
        usage_error = getattr(exc, "show", None) and isinstance(getattr(exc, "exit_code", None), int)
        if usage_error:  # click's usage errors (typer vendors click) carry exit code 2
            exc.show()
            return exc.exit_code
        common.err_console.print(f"[bold red]unexpected error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
        if common.state["debug"]:
            common.err_console.print_exception()
        else:
            common.err_console.print("(run with --debug for the traceback)")
        return 1
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
