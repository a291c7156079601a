"""Shared fixtures: a tiny random Llama with an in-process tokenizer, small data files, CLI runner.

Nothing here downloads: the tokenizer is trained on a few hundred lines in memory and the
model is built from a config (2 layers, hidden 64).
"""

from __future__ import annotations

import csv
import json
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

import tunesmith.kinds  # noqa: F401 - registers the task kinds the recipe schema checks
import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "data" / "banking77_10intents.csv"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two test processes: one thread each (and in the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # processes they start), so they share the cores, not oversubscribe

    import torch

    torch.set_num_threads(1)


def banking_rows(labels: tuple[str, ...], per_label: int) -> list[dict]:
    """Real BANKING77 rows from the repository's example file, ``per_label`` of each label."""
    out: dict[str, list[dict]] = {label: [] for label in labels}
    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            bucket = out.get(row["category"])
            if bucket is not None and len(bucket) < per_label:
                bucket.append(row)
    return [r for label in labels for r in out[label]]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama and a ChatML BPE tokenizer saved as a local HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["text"] for r in banking_rows(("card_arrival", "pin_blocked", "age_limit", "exchange_rate"), 60)]
    corpus += ["system user assistant Classify the message " + r for r in ("card_arrival", "pin_blocked", "age_limit")]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """An empty TUNESMITH_HOME so tests never touch the user's cache."""
    path = tmp_path / "home"
    monkeypatch.setenv("TUNESMITH_HOME", str(path))
    return path


def chat_lines(rows: list[dict], system: str | None = "Classify.") -> bytes:
    """An OpenAI chat fine-tuning file (bytes) of banking rows: each text asked, its category answered."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return "".join(json.dumps({"messages": [*head, {"role": "user", "content": r["text"]},
                                            {"role": "assistant", "content": r["category"]}]}) + "\n"
                   for r in rows).encode()


def finished_eval_run(client, eval_id: str, run_id: str, timeout: float = 120):
    """Poll an eval run through the official client until it leaves queued / in_progress."""
    import time

    deadline = time.monotonic() + timeout
    while (run := client.evals.runs.retrieve(run_id, eval_id=eval_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.2)
    return run


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def banking_recipe(tmp_path: Path, model_dir, data_path, *, name: str, seed: int, split: dict, **sections) -> dict:
    """A recipe over BANKING77 rows (``text`` → ``category``) in ``tmp_path/runs``; each keyword section
    (``data``, ``train``, ``eval``, ...) is merged into the section of that name."""
    doc = {"name": name, "output_dir": str(tmp_path / "runs"), "seed": seed, "model": {"name": str(model_dir)},
           "data": {"path": str(data_path), "input_fields": ["text"], "target_field": "category", "split": split}}
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    return doc


def write_recipe(path: Path, doc: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture()
def cli():
    """Run the CLI in-process; returns (exit_code, stdout+stderr)."""
    def _run(args: list[str]) -> tuple[int, str]:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from rich.console import Console

        import tunesmith.cli as cli_mod

        buf = io.StringIO()
        cli_mod.common.console = Console(file=buf, width=200, force_terminal=False)
        cli_mod.common.err_console = Console(file=buf, width=200, force_terminal=False)
        with redirect_stdout(buf), redirect_stderr(buf):
            code = cli_mod.main(args)
        return code, buf.getvalue()

    return _run


@contextmanager
def running_server(app):
    """Serve a FastAPI app with uvicorn on a free 127.0.0.1 port; yields the /v1 base URL."""
    from tunesmith.serve.launch import serve_in_thread

    srv, root = serve_in_thread(app)
    try:
        yield f"{root}/v1"
    finally:
        srv.should_exit = True
        srv.thread.join(5)


@contextmanager
def tiny_server(model_dir: Path, data_dir: Path, **settings):
    """A live server over the tiny random model on the built-in engine; yields its /v1 URL."""
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    engine = Engine(str(model_dir), {}, max_batch=settings.get("max_batch", 16), wait_ms=1)
    with running_server(create_app(ServeSettings(model=str(model_dir), data_dir=data_dir, **settings), engine)) as url:
        yield url


def http_get(url: str, key: str | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """GET with an optional bearer key; returns (status, body) for error statuses too."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT encoder (hidden 32) with a WordPiece tokenizer built from BANKING77 messages."""
    from collections import Counter

    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    corpus = [r["text"] for r in banking_rows(("card_arrival", "pin_blocked", "age_limit", "exchange_rate"), 60)]
    # the vocabulary is built here, not by WordPieceTrainer, whose choice among tied pairs changes from run to run
    # (and with it the random model every test of a session sees): characters, then the most frequent words
    words = Counter(w for text in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    frequent = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab = [*specials, *chars, *("##" + c for c in chars), *frequent][:500]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, pad_token_id=fast.pad_token_id)
    BertModel(config).save_pretrained(folder)
    return folder


EMBEDDED = "smollm2-135m-instruct"


def vllm_or_skip() -> str:
    """The embedded model's name when vLLM (``make vllm``) and the model (``make model``) are both here; else the
    test skips with what to run."""
    from tunesmith.errors import ConfigError
    from tunesmith.models import registry
    from tunesmith.serve.engines.vllm.server import vllm_python

    try:
        vllm_python()
    except ConfigError as exc:
        pytest.skip(f"vLLM is not installed here ({exc})")
    if not registry.is_cached(EMBEDDED):
        pytest.skip(f"{EMBEDDED} not cached; run `tunesmith models pull {EMBEDDED}`")
    return EMBEDDED


@contextmanager
def vllm_engine(log_dir: Path, **kw):
    """The vLLM engine over the embedded model (a real vLLM server, stopped afterwards)."""
    from tunesmith.serve.engines.vllm.engine import VllmEngine

    engine = VllmEngine(vllm_or_skip(), {}, log_dir, **kw)
    try:
        yield engine
    finally:
        engine.close()


@contextmanager
def embedded_server(engine_kind: str, data_dir: Path, **settings):
    """A live server over the embedded model on the built-in engine or on vLLM (the test skips, saying what to run,
    when the model or vLLM is missing); yields its /v1 URL."""
    from tunesmith.models import registry
    from tunesmith.serve.app import ServeSettings, create_app

    if not registry.is_cached(EMBEDDED):
        pytest.skip(f"{EMBEDDED} not cached; run `tunesmith models pull {EMBEDDED}`")
    with ExitStack() as stack:
        if engine_kind == "vllm":
            engine = stack.enter_context(vllm_engine(data_dir / "vllm"))
        else:
            from tunesmith.serve.engines.builtin import Engine

            engine = Engine(EMBEDDED, {}, wait_ms=5, request_timeout_s=settings.get("request_timeout_s", 300.0))
        app = create_app(ServeSettings(model=EMBEDDED, data_dir=data_dir, engine=engine_kind, **settings), engine)
        yield stack.enter_context(running_server(app))


def kill_under_streams(client, models: list[str], engine, delete: Path, wait_chunks: int, deadline_s: float,
                       **create) -> list[tuple[str, float]]:
    """Sixteen streamed chat requests over ``models`` (round robin); once ``wait_chunks`` chunks have arrived,
    ``delete`` (an adapter's folder) is removed and vLLM's process group killed. Returns each request's outcome
    ("answer", or its error's message) and seconds, once all have ended (or ``deadline_s`` + 30 s passed)."""
    import os
    import shutil
    import signal
    import threading
    import time

    import openai

    outcomes: list = [None] * 16
    chunks = threading.Semaphore(0)

    def stream(i: int) -> None:
        t0 = time.monotonic()
        try:
            for _ in client.chat.completions.create(model=models[i % len(models)], stream=True, **create):
                chunks.release()
            outcomes[i] = ("answer", time.monotonic() - t0)
        except openai.APIError as exc:
            outcomes[i] = (str(exc), time.monotonic() - t0)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for _ in range(wait_chunks):
        assert chunks.acquire(timeout=deadline_s), "no stream started"
    shutil.rmtree(delete)
    os.killpg(engine.server.proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(deadline_s + 30)
    return outcomes


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A PostgreSQL server of the tests' own (tests/pg.py); yields a function making a new, empty database and
    returning its URL."""
    import itertools

    import psycopg

    from .pg import missing, postgres_server

    why = missing()
    if why:
        pytest.skip(why)
    with postgres_server(("postgres_admin",)) as urls:
        counter = itertools.count()

        def new_database() -> str:
            name = f"t{next(counter)}"
            with psycopg.connect(urls["postgres_admin"], autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return urls["postgres_admin"].replace("/postgres_admin?", f"/{name}?")

        yield new_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A fresh store of each backend: SQLite in a temporary folder, then PostgreSQL (a new database of the tests'
    own server)."""
    from tunesmith.serve.store import Store

    url = request.getfixturevalue("postgres")() if request.param == "postgresql" else None
    s = Store(tmp_path / "data", url)
    yield s
    s.close()


def queued_jobs(store, owners) -> list[str]:
    """One queued fine-tuning job in ``store`` for each of ``owners``, in order; their ids."""
    from tunesmith.serve.jobs.store import JobStore

    ids = []
    for owner in owners:
        job = JobStore(store).add_job(owner, model="m", training_file="f", validation_file=None, suffix=None, seed=1,
                                      method={"type": "supervised"}, metadata=None)
        store.update_job(job["id"], status="queued")
        ids.append(job["id"])
    return ids


Q_SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}}  # an eval's items: one question
Q_CHECK = {"type": "string_check", "name": "eq", "input": "{{sample.output_text}}", "reference": "{{item.q}}",
           "operation": "eq"}  # a criterion over them: the sample repeats the question


@contextmanager
def tiny_server_on(request, model_dir: Path, data_dir: Path, **settings):
    """:func:`tiny_server` on the backend a fixture's ``request.param`` names: ``sqlite`` (in ``data_dir``) or
    ``postgresql`` (a new database of the tests' own server); yields its /v1 URL."""
    url = request.getfixturevalue("postgres")() if request.param == "postgresql" else None
    with tiny_server(model_dir, data_dir, database=url, **settings) as base:
        yield base


def wait_serving(url: str, key: str, proc, log: Path, timeout: float = 180) -> None:
    """Until ``GET <url>/models`` with ``key`` answers 200 (``proc``, a `tunesmith serve`, still running; its
    ``log``'s end in the failure otherwise)."""
    import time

    import httpx2 as httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def pytest_collection_modifyitems(config, items):
    """The tests tests/heavy.py names marked ``heavy`` (make test leaves them out; make test-heavy runs them)."""
    from .heavy import is_heavy

    for item in items:
        if is_heavy(item.nodeid):
            item.add_marker(pytest.mark.heavy)
