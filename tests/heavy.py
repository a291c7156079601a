"""The heavy tests: each takes minutes on 2 CPU cores (many processes, servers started, attacked and killed, Ray
clusters, GGUF files written, schema sweeps). ``make test`` leaves them out so that it stays a few minutes; ``make
test-heavy`` runs them, and CI (``.ci/run``) runs it after ``make test``: none is dropped. ``tests/conftest.py``
marks them ``heavy`` by this list. Seconds: each file's or test's share of a ``make test`` run on 2 cores (load
average 5 to 7, so about twice what a quiet machine takes), 2026-11-29."""

from __future__ import annotations

FILES = {  # a whole file: what it buys (its seconds)
    "test_serve_hostile.py": "a hostile key's every attack against a real server, another key still answered (334)",
    "test_train_nproc.py": "training over two torchrun ranks (DDP, FSDP, DPO, heads) equal to one process (301)",
    "test_gguf_export.py": "exported GGUF files carry the tokenizer metadata llama.cpp needs, three architectures "
                           "(243; llama.cpp's runtime checks: make test-export)",
    "test_serve_ray.py": "fine-tuning jobs on a local Ray cluster: two at once, pause, cancel, a killed worker (191)",
    "test_data_ray.py": "curation on Ray Data: the same rows as the local engine, the driver's peak bounded (185)",
    "test_jsonschemabench.py": "JSONSchemaBench's schemas: every answer valid, no 5xx (162)",
    "test_graders_lifetime.py": "python graders die with a killed server or worker (146)",
    "test_serve_keys_at_rest.py": "no API key in any byte of a live server's data folder; raw keys migrated (117)",
    "test_serve_server_kill.py": "a server killed mid-job and mid-batch resumes with nothing lost (94)",
    "test_harness_scoring.py": "lm-evaluation-harness scores through the API as its own hf backend (86)",
}

TESTS = {  # one test of a file that otherwise runs in make test: what it buys (its seconds)
    "test_structured_outputs.py::test_every_construct_validates_greedy_and_sampled":
        "every JSON-schema construct answered valid, greedy and sampled (129)",
    "test_data_dedup.py::test_a_5000_row_bucket_keeps_the_same_rows_in_memory_and_at_any_batch_size":
        "near-dedup of a 5,000-row bucket the same in memory and in batches (114)",
    "test_serve_stored_completions.py::test_the_distillation_loop_store_select_eval_file_job":
        "the distillation loop: stored completions to an eval, a file and a job (111)",
    "test_openai_conformance.py::test_embeddings_over_the_shipped_encoder":
        "/v1/embeddings with the shipped MiniLM parsed by the official client (102)",
}


def is_heavy(nodeid: str) -> bool:
    """Whether the test ``nodeid`` (``tests/<file>::<test>[params]``) is one of the heavy ones."""
    path, _, name = nodeid.partition("::")
    file = path.rpartition("/")[2]
    return file in FILES or f"{file}::{name.partition('[')[0]}" in TESTS
