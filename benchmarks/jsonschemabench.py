"""How `tunesmith serve` treats real-world JSON schemas: JSONSchemaBench (guidance-ai/jsonschemabench; the same
schemas as the Hugging Face dataset epfl-dlab/JSONSchemaBench, MIT per its dataset card).

The server is started in-process as the tests start it (``ServeSettings`` / ``create_app`` / ``running_server``,
on the built-in engine or on ``--engine vllm``). Each schema gets ONE chat completion through the official ``openai``
client (base_url only): ``response_format`` ``json_schema`` (not strict) with the schema, temperature 0, the schema
in the system message (compact, cut at 6,000 characters so a large one fits the model's context) and a user message
asking for one valid example. Each answer is classified:

* ``conforming``: finish_reason ``stop`` and the content validates under the ORIGINAL schema (``jsonschema``, the
  validator the schema's ``$schema`` names, 2020-12 when none; format checking off);
* ``unjudgeable``: finish_reason ``stop`` but ``jsonschema`` itself cannot handle the schema (a remote ``$ref``, a
  regex Python cannot compile, ...): counted apart;
* ``cut``: finish_reason ``length`` (the answer ran into ``max_tokens``);
* ``refused``: a 4xx; its status, code and message are kept, and the keyword and path it names (``'<kw>' at '#...'``);
* ``failed``: a 5xx, a timeout or a lost connection, or ``non_conforming`` (finish_reason ``stop`` and content that
  is not JSON valid under the schema: the one outcome the server promises never to give).

In the same run, llguidance's own coverage of the same schemas with the served model's tokenizer (as
``tunesmith.generation.constrained.JsonConstraint`` compiles: ``LLMatcher.grammar_from_json_schema`` then
``LLMatcher.validate_grammar`` over ``llguidance.hf.from_tokenizer``): on the raw schema, and on
``output_schema(schema)``, the narrower form the server decodes under.

Prints the load average, one line per schema, then a table per subset: schemas, conforming, cut, refused (top
refusal keywords), failed, non-conforming, unjudgeable, server coverage = (conforming + cut) / schemas, llguidance
compiles / schemas (raw, and the served form) and the wall time; writes everything to ``--out``.

    python benchmarks/jsonschemabench.py [--schemas tests/data/jsonschemabench] [--engine builtin|vllm]
        [--per-subset N] [--max-tokens 256] [--concurrency 1] [--threads N] [--out result.json]
    python benchmarks/jsonschemabench.py --make-sample DEST --from-git /path/to/jsonschemabench.git [--per-subset 4]

``--schemas`` takes the test sample (files ``<subset>__<name>.json``) or a checkout's ``data/`` folder (one
sub-folder per subset). ``--per-subset N`` picks N per subset by the sampling rule below; ``--make-sample`` writes
a sample from the repository (a bare git directory is enough) with a PROVENANCE.md.

Sampling rule (one rule for the sample and for ``--per-subset``): in each subset, files sorted by name, files over
``--max-bytes`` (50,000) and repeated contents (the first kept) left out; of the E left, N at a fixed stride:
indices ``int(i * E / N + E / (2 * N))`` for i = 0..N-1.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "jsonschemabench"
MODEL = "smollm2-135m-instruct"
SUBSETS = ("Glaiveai2K", "Github_trivial", "Github_easy", "Github_medium", "Github_hard", "Github_ultra",
           "Kubernetes", "Snowplow", "JsonSchemaStore", "WashingtonPost")
MAX_BYTES = 50_000
PROMPT_SCHEMA_CHARS = 6_000  # the schema as the system message shows it: ~2k tokens at most (the context is 8k)
SOURCE_REPO = "https://github.com/guidance-ai/jsonschemabench"
HF_DATASET = "epfl-dlab/JSONSchemaBench"
KEYWORD_AT = re.compile(r"'([^']+)' at '(#[^']*)'")
USER = "Give one valid example of a JSON document under this schema, with realistic values."


# --- which schemas ------------------------------------------------------------------------------------------------

def pick(entries: list, n: int | None) -> list:
    """``n`` of ``entries`` (already sorted, filtered) at a fixed stride; all of them when ``n`` is None or more."""
    if n is None or n >= len(entries):
        return list(entries)
    return [entries[int(i * len(entries) / n + len(entries) / (2 * n))] for i in range(n)]


def eligible(files: list[tuple[str, int, str]], max_bytes: int) -> list[tuple[str, int, str]]:
    """(name, size, content id) sorted by name, those over ``max_bytes`` (0: no limit) and repeated contents left out."""
    seen, out = set(), []
    for name, size, digest in sorted(files):
        if (max_bytes and size > max_bytes) or digest in seen:
            continue
        seen.add(digest)
        out.append((name, size, digest))
    return out


def subset_files(folder: Path) -> dict[str, list[Path]]:
    """subset -> its JSON files: one sub-folder per subset (a checkout's data/), or files named
    ``<subset>__<name>.json`` (the test sample)."""
    groups: dict[str, list[Path]] = collections.defaultdict(list)
    for path in sorted(folder.rglob("*.json")):
        rel = path.relative_to(folder)
        if len(rel.parts) > 1:
            groups[rel.parts[0]].append(path)
        else:
            groups[path.name.split("__", 1)[0] if "__" in path.name else folder.name].append(path)
    return dict(sorted(groups.items(), key=lambda kv: (SUBSETS.index(kv[0]) if kv[0] in SUBSETS else 99, kv[0])))


def load_schemas(folder: Path = SAMPLE, per_subset: int | None = None, max_bytes: int = MAX_BYTES,
                 subsets: list[str] | None = None) -> list[dict]:
    """[{subset, name, schema, bytes}] picked by the sampling rule, subsets in the benchmark's order."""
    out = []
    for subset, paths in subset_files(Path(folder)).items():
        if subsets and subset not in subsets:
            continue
        data = {p.name: p.read_bytes() for p in paths}
        files = [(p.name, len(data[p.name]), hashlib.sha1(data[p.name]).hexdigest()) for p in paths]
        for name, size, _ in pick(eligible(files, max_bytes), per_subset):
            out.append({"subset": subset, "name": name, "schema": json.loads(data[name]), "bytes": size})
    return out


def make_sample(git_dir: str, dest: Path, per_subset: int, max_bytes: int) -> list[dict]:
    """Copy ``per_subset`` schemas of each subset from the repository at ``git_dir`` (HEAD) into ``dest`` as
    ``<subset>__<name>.json`` (the bytes as they are), with a PROVENANCE.md."""
    git = ["git", "-C", git_dir]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    when = subprocess.run([*git, "log", "-1", "--format=%cI"], capture_output=True, text=True, check=True).stdout.strip()
    tree = subprocess.run([*git, "ls-tree", "-r", "-l", "HEAD", "data/"], capture_output=True, text=True,
                          check=True).stdout
    by: dict[str, list] = collections.defaultdict(list)
    absent = 0
    for line in tree.splitlines():
        meta, path = line.split("\t", 1)
        _, _, blob, size = meta.split()
        _, subset, name = path.split("/", 2)
        if not size.isdigit():  # the blob is not in this copy of the repository
            absent += 1
            continue
        by[subset].append((name, int(size), blob))
    dest.mkdir(parents=True, exist_ok=True)
    chosen = []
    for subset in [s for s in SUBSETS if s in by] + sorted(set(by) - set(SUBSETS)):
        files = eligible(by[subset], max_bytes)
        for name, size, blob in pick(files, per_subset):
            body = subprocess.run([*git, "cat-file", "blob", blob], capture_output=True, check=True).stdout
            (dest / f"{subset}__{name}").write_bytes(body)
            chosen.append({"subset": subset, "name": name, "bytes": size, "blob": blob, "of": len(by[subset]),
                           "eligible": len(files)})
    lines = [
        "# JSONSchemaBench sample: provenance", "",
        f"These {len(chosen)} JSON schemas are copied unchanged (byte for byte) from JSONSchemaBench:", "",
        f"* source repository: {SOURCE_REPO}, commit `{commit}` ({when}), folder `data/<subset>/`;",
        f"* the same schemas are published as the Hugging Face dataset `{HF_DATASET}` "
        "(https://huggingface.co/datasets/epfl-dlab/JSONSchemaBench), whose dataset card gives the licence as "
        "**MIT**; the GitHub repository itself has no licence file;",
        "* paper: Geng et al., *Generating Structured Outputs from Language Models: Benchmark and Studies*, "
        "arXiv:2501.10868.", "",
        "Each file is named `<subset>__<original file name>`. How the sample was chosen (deterministic, no random "
        f"numbers; `benchmarks/jsonschemabench.py --make-sample` writes it): in each subset the files sorted by name, "
        f"files over {max_bytes:,} bytes and repeated contents (the first kept) left out; of the E left, "
        f"{per_subset} at a fixed stride, indices `int(i * E / {per_subset} + E / {2 * per_subset})` for "
        f"i = 0..{per_subset - 1}.", "",
        "```",
        f"python benchmarks/jsonschemabench.py --make-sample tests/data/jsonschemabench --from-git <repo> "
        f"--per-subset {per_subset} --max-bytes {max_bytes}",
        "```", "",
        "| subset | file | bytes | git blob | files in subset | eligible |", "|---|---|---|---|---|---|",
        *(f"| {c['subset']} | {c['name']} | {c['bytes']:,} | `{c['blob'][:12]}` | {c['of']:,} | {c['eligible']:,} |"
          for c in chosen), "",
        f"Total: {sum(c['bytes'] for c in chosen):,} bytes." + (f" ({absent} file(s) of the repository absent "
                                                                 "from the copy read, not considered.)" if absent else ""),
        "",
    ]
    (dest / "PROVENANCE.md").write_text("\n".join(lines), encoding="utf-8")
    return chosen


# --- llguidance's own coverage -------------------------------------------------------------------------------------

def llguidance_bridge(model: str = MODEL):
    """The served model's tokenizer for llguidance, as the built-in engine builds it (its vocabulary size and
    stop ids: the tokenizer's EOS and the generation config's)."""
    import llguidance.hf
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from tunesmith.models import registry

    folder = registry.cached_path(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    eos = {tokenizer.eos_token_id}
    try:
        gen = GenerationConfig.from_pretrained(folder).eos_token_id
        eos |= set(gen if isinstance(gen, list) else [gen])
    except OSError:
        pass
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=sorted(i for i in eos if i is not None))


def llguidance_compiles(bridge, schema) -> dict:
    """Whether llguidance compiles ``schema`` for this tokenizer: {ok, error, ms}."""
    import llguidance

    t0 = time.perf_counter()
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        error = llguidance.LLMatcher.validate_grammar(grammar, bridge)
    except Exception as exc:  # noqa: BLE001 - any refusal of the schema is the measurement
        error = f"{type(exc).__name__}: {exc}"
    return {"ok": not error, "error": (error or None) and error[:300], "ms": round(1000 * (time.perf_counter() - t0), 1)}


def llguidance_coverage(schemas: list[dict], bridge) -> None:
    """Adds ``llg_raw`` (the schema as given) and ``llg_served`` (``output_schema(schema)``, what the server
    compiles) to each entry."""
    from tunesmith.generation.constrained import output_schema

    for entry in schemas:
        entry["llg_raw"] = llguidance_compiles(bridge, entry["schema"])
        try:
            served = output_schema(entry["schema"]) if isinstance(entry["schema"], dict) else entry["schema"]
        except Exception as exc:  # noqa: BLE001
            entry["llg_served"] = {"ok": False, "error": f"output_schema: {type(exc).__name__}: {exc}"[:300], "ms": 0}
            continue
        entry["llg_served"] = llguidance_compiles(bridge, served)


# --- judging an answer ---------------------------------------------------------------------------------------------

def judge(schema, text: str) -> tuple[str, str | None]:
    """("valid" | "invalid" | "unjudgeable", why) for ``text`` under the original ``schema`` (jsonschema, the
    draft its ``$schema`` names, 2020-12 when none, formats not checked)."""
    import jsonschema

    try:
        instance = json.loads(text)
    except ValueError as exc:
        return "invalid", f"not JSON: {exc}"
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        error = jsonschema.exceptions.best_match(cls(schema).iter_errors(instance))
    except Exception as exc:  # noqa: BLE001 - jsonschema could not handle the schema: no verdict
        return "unjudgeable", f"{type(exc).__name__}: {exc}"[:300]
    if error is None:
        return "valid", None
    return "invalid", f"{error.message[:200]} at {error.json_path}"


# --- one request ---------------------------------------------------------------------------------------------------

def prompt_schema(schema, chars: int = PROMPT_SCHEMA_CHARS) -> str:
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= chars else text[:chars] + " …(cut)"


# a refusal that names no keyword and path: what llguidance (or the plan's deadline) said, in a word
UNNAMED = ((re.compile(r"oneOf constraints are not supported"), "oneOf"),
           (re.compile(r"Unknown format: (\S+)"), "format {}"),
           (re.compile(r"circular references with sibling keys"), "$ref cycle with siblings"),
           (re.compile(r"Unsatisfiable schema"), "unsatisfiable"),
           (re.compile(r"Unimplemented keys: \[?([^\]\n]+)"), "{}"),
           (re.compile(r"regex parse error|look-around"), "pattern"),
           (re.compile(r"could not be planned within"), "plan deadline"))


def refusal_label(answer: dict) -> str:
    """The keyword a refusal names, else ``"<what llguidance said>*"`` (the star: no keyword and path named)."""
    if answer.get("keyword"):
        return answer["keyword"]
    message = answer.get("message") or ""
    for pattern, label in UNNAMED:
        found = pattern.search(message)
        if found:
            return label.format(*(g.strip('"') for g in found.groups())) + "*"
    return (message[:40] or f"HTTP {answer.get('status')}") + "*"


def ask(client, model: str, schema, max_tokens: int, prompt_chars: int = PROMPT_SCHEMA_CHARS) -> dict:
    """One chat completion under ``schema``; the outcome classified (see the module's docstring)."""
    import openai

    t0 = time.perf_counter()
    out: dict = {}
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, temperature=0, max_tokens=max_tokens,
            messages=[{"role": "system", "content": f"Answer in JSON with this schema: {prompt_schema(schema, prompt_chars)}"},
                      {"role": "user", "content": USER}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        completion = raw.parse()
        choice = completion.choices[0]
        text = choice.message.content or ""
        out.update(status=raw.http_response.status_code, finish_reason=choice.finish_reason, content=text[:2000],
                   tokens=completion.usage.completion_tokens if completion.usage else None,
                   ignored=raw.headers.get("x-tunesmith-ignored-keywords"))
        if choice.finish_reason == "length":
            out["outcome"] = "cut"
        elif choice.finish_reason == "stop":
            verdict, why = judge(schema, text)
            out["outcome"] = {"valid": "conforming", "invalid": "non_conforming", "unjudgeable": "unjudgeable"}[verdict]
            if why:
                out["why"] = why
        else:
            out.update(outcome="failed", why=f"finish_reason {choice.finish_reason}")
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}  # the client passes the envelope's "error" member
        if isinstance(body.get("error"), dict):
            body = body["error"]
        message = str(body.get("message") or exc.message)
        out.update(status=exc.status_code, code=body.get("code", getattr(exc, "code", None)), message=message[:500])
        if 400 <= exc.status_code < 500:
            found = KEYWORD_AT.search(message)
            out.update(outcome="refused", keyword=found and found.group(1), path=found and found.group(2))
            out["label"] = refusal_label(out)
        else:
            out.update(outcome="failed", why=f"HTTP {exc.status_code}")
    except openai.APITimeoutError:
        out.update(outcome="failed", why="timeout")
    except openai.APIConnectionError as exc:
        out.update(outcome="failed", why=f"connection: {exc}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def run_schemas(client, schemas: list[dict], model: str = MODEL, max_tokens: int = 256, concurrency: int = 1,
                progress=print, together: bool = False, prompt_chars: int = PROMPT_SCHEMA_CHARS) -> dict[str, float]:
    """Ask for each schema (subset after subset, ``concurrency`` requests at a time within one; with ``together``
    all subsets at once); each entry gets ``answer``. Returns each subset's wall time in seconds (with
    ``together``, the whole run's under "all"). ``prompt_chars``: how much of the schema the system message shows."""
    walls: dict[str, float] = {}
    done, lock = [0], threading.Lock()
    by_subset: dict[str, list[dict]] = collections.defaultdict(list)
    for entry in schemas:
        by_subset[entry["subset"]].append(entry)

    def one(entry: dict) -> None:
        entry["answer"] = ask(client, model, entry["schema"], max_tokens, prompt_chars)
        with lock:
            done[0] += 1
            a = entry["answer"]
            detail = a.get("label") or a.get("why") or a.get("finish_reason") or ""
            progress(f"[{done[0]}/{len(schemas)}] {entry['subset']}/{entry['name']}: {a['outcome']} "
                     f"({str(detail)[:90]}) {a.get('tokens') or 0} tokens, {a['seconds']:.1f} s", flush=True)

    if together:
        by_subset = {"all": list(schemas)}
    for subset, entries in by_subset.items():
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            list(pool.map(one, entries))
        walls[subset] = round(time.perf_counter() - t0, 1)
    return walls


# --- the table -----------------------------------------------------------------------------------------------------

def unenforced_keywords() -> set[str]:
    from tunesmith.generation.schemas import SERVED_ONLY_AT, UNENFORCED

    return set(UNENFORCED) | set(SERVED_ONLY_AT)


def summarize(schemas: list[dict], walls: dict[str, float] | None = None) -> dict[str, dict]:
    """Per subset (and "all"): the counts of the table."""
    rows: dict[str, dict] = {}
    groups = collections.defaultdict(list)
    for e in schemas:
        groups[e["subset"]].append(e)
    groups["all"] = list(schemas)
    for subset, entries in groups.items():
        outcomes = collections.Counter(e["answer"]["outcome"] for e in entries if "answer" in e)
        refused = [e["answer"] for e in entries if e.get("answer", {}).get("outcome") == "refused"]
        failed = [e["answer"] for e in entries if e.get("answer", {}).get("outcome") in ("failed", "non_conforming")]
        n = len(entries)
        rows[subset] = {
            "schemas": n, "conforming": outcomes["conforming"], "cut": outcomes["cut"],
            "refused": outcomes["refused"], "failed": len(failed), "non_conforming": outcomes["non_conforming"],
            "unjudgeable": outcomes["unjudgeable"],
            "http_5xx": sum(1 for a in failed if (a.get("status") or 0) >= 500),
            "refusal_keywords": dict(collections.Counter(refusal_label(a) for a in refused)
                                     .most_common()),
            "server_coverage": round((outcomes["conforming"] + outcomes["cut"]) / n, 3) if n else None,
            "llguidance_raw_compiles": sum(1 for e in entries if e.get("llg_raw", {}).get("ok")),
            "llguidance_served_compiles": sum(1 for e in entries if e.get("llg_served", {}).get("ok")),
            "wall_s": round(sum((walls or {}).get(s, 0) for s in {e["subset"] for e in entries}), 1),
        }
    return rows


def table(rows: dict[str, dict]) -> str:
    head = ("| subset | schemas | conforming | cut | refused (top keywords) | failed | non-conforming | unjudgeable | "
            "server coverage | llguidance compiles (raw) | llguidance compiles (served form) | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for subset, r in rows.items():
        top = ", ".join(f"{k} {v}" if v > 1 else k for k, v in list(r["refusal_keywords"].items())[:3])
        name = f"**{subset}**" if subset == "all" else subset
        lines.append(f"| {name} | {r['schemas']} | {r['conforming']} | {r['cut']} | {r['refused']}"
                     f"{f' ({top})' if top else ''} | {r['failed']} | {r['non_conforming']} | {r['unjudgeable']} | "
                     f"{r['server_coverage']:.0%} | {r['llguidance_raw_compiles']}/{r['schemas']} | "
                     f"{r['llguidance_served_compiles']}/{r['schemas']} | {r['wall_s']:.0f} |")
    lines.append("\n(refusal keywords: the keyword the 400 names at its path; * the 400 names none: llguidance's own "
                 "message, in a word)")
    return "\n".join(lines)


def gaps(schemas: list[dict]) -> list[dict]:
    """Schemas llguidance compiles (raw) that the server did not answer, other than refusals for the documented
    unenforced keywords (tunesmith.generation.schemas.UNENFORCED / SERVED_ONLY_AT): what the server refuses
    beyond llguidance."""
    unenforced = unenforced_keywords()
    return [{"subset": e["subset"], "name": e["name"], **{k: e["answer"].get(k) for k in
                                                           ("outcome", "status", "keyword", "message", "why")}}
            for e in schemas if e["llg_raw"]["ok"] and e["answer"].get("status") != 200
            and not (e["answer"]["outcome"] == "refused" and e["answer"].get("keyword") in unenforced)]


# --- the server ----------------------------------------------------------------------------------------------------

@contextmanager
def served(engine_kind: str, data_dir: Path, **settings):
    """The server over the embedded model, in-process, as tests/conftest.py's ``embedded_server`` starts it;
    yields its /v1 URL."""
    from tunesmith.models import registry
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.launch import serve_in_thread

    if not registry.is_cached(MODEL):
        sys.exit(f"{MODEL} is not cached; run `tunesmith models pull {MODEL}`")
    with ExitStack() as stack:
        if engine_kind == "vllm":
            from tunesmith.serve.engines.vllm.engine import VllmEngine

            engine = VllmEngine(MODEL, {}, data_dir / "vllm")
            stack.callback(engine.close)
        else:
            from tunesmith.serve.engines.builtin import Engine

            engine = Engine(MODEL, {}, wait_ms=5, request_timeout_s=settings.get("request_timeout_s", 300.0))
        app = create_app(ServeSettings(model=MODEL, data_dir=data_dir, engine=engine_kind, **settings), engine)
        srv, root = serve_in_thread(app)
        try:
            yield f"{root}/v1"
        finally:
            srv.should_exit = True
            srv.thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", type=Path, default=SAMPLE, help="the test sample, or a checkout's data/ folder")
    parser.add_argument("--engine", choices=["builtin", "vllm"], default="builtin")
    parser.add_argument("--per-subset", type=int, default=None, help="schemas per subset (default: all)")
    parser.add_argument("--subsets", nargs="*", help="only these subsets")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="leave out larger schema files (0: none)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=1, help="requests at once within a subset")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="the server's deadline per request (an answer still running then ends as 'length'); "
                             "the client gives up a minute later")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the engine (default: torch's own); 1 keeps a run steady on a machine "
                             "shared with other torch processes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--make-sample", type=Path, default=None, metavar="DEST",
                        help="write a sample from --from-git instead of benchmarking")
    parser.add_argument("--from-git", default=None, help="the JSONSchemaBench repository (a bare git directory works)")
    args = parser.parse_args()

    if args.make_sample:
        if not args.from_git:
            parser.error("--make-sample needs --from-git")
        chosen = make_sample(args.from_git, args.make_sample, args.per_subset or 4, args.max_bytes)
        print(f"wrote {len(chosen)} schemas ({sum(c['bytes'] for c in chosen):,} bytes) to {args.make_sample}")
        return

    import openai

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)", flush=True)
    schemas = load_schemas(args.schemas, args.per_subset, args.max_bytes, args.subsets)
    print(f"{len(schemas)} schemas from {args.schemas} ({len({e['subset'] for e in schemas})} subsets); engine "
          f"{args.engine}, max_tokens {args.max_tokens}, concurrency {args.concurrency}, torch threads "
          f"{args.threads or 'default'}", flush=True)
    t0 = time.perf_counter()
    bridge = llguidance_bridge()
    llguidance_coverage(schemas, bridge)
    llg_s = time.perf_counter() - t0
    print(f"llguidance: raw {sum(e['llg_raw']['ok'] for e in schemas)}/{len(schemas)}, served form "
          f"{sum(e['llg_served']['ok'] for e in schemas)}/{len(schemas)} compile ({llg_s:.1f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with served(args.engine, Path(tmp), max_tokens=max(args.max_tokens, 256),
                    request_timeout_s=args.timeout) as url:
            print(f"server up in {time.perf_counter() - t0:.1f} s at {url}", flush=True)
            # the client waits a minute longer than the server's deadline, which ends an answer as "length"
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=args.timeout + 60)
            walls = run_schemas(client, schemas, MODEL, args.max_tokens, args.concurrency)
    rows = summarize(schemas, walls)
    end_load = os.getloadavg()
    print()
    print(table(rows))
    missing = gaps(schemas)
    print(f"\nllguidance compiles (raw) but the server did not answer, beyond the documented unenforced keywords: "
          f"{len(missing)}")
    for g in missing:
        print(f"  {g['subset']}/{g['name']}: {g['outcome']} {g.get('status')} {(g.get('message') or g.get('why') or '')[:200]}")
    print(f"load average at end: {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    if args.out:
        commit = None
        provenance = Path(args.schemas) / "PROVENANCE.md"
        if provenance.is_file():
            found = re.search(r"commit `([0-9a-f]{40})`", provenance.read_text(encoding="utf-8"))
            commit = found and found.group(1)
        doc = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "engine": args.engine,
               "model": MODEL, "schemas_folder": str(args.schemas), "schemas_commit": commit,
               "per_subset": args.per_subset, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
               "torch_threads": args.threads,
               "load_average_start": load, "load_average_end": end_load, "cpus": os.cpu_count(),
               "llguidance_seconds": round(llg_s, 1), "table": rows, "gaps": missing,
               "results": [{k: v for k, v in e.items() if k != "schema"} for e in schemas]}
        args.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
