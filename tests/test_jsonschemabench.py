"""Real-world JSON schemas (a sample of JSONSchemaBench in tests/data/jsonschemabench: its PROVENANCE.md names the
source, commit and licence) through a live server on the embedded model, as ``benchmarks/jsonschemabench.py`` sends
them (``response_format`` json_schema, not strict; the official client).

Two passes: every schema of the sample with ``max_tokens`` 1 and only the first 500 characters of the schema in the
system message (whether the server accepts or refuses a schema is decided before decoding and does not depend on the
messages, so this pass is cheap), then one schema per subset (the sampling rule's pick) answered with up to
128 tokens. Asserted: no answer that ends (``stop``) breaks its schema, no 5xx; every refusal is a 400 naming a
keyword and its path (``'<kw>' at '#...'``); and every schema llguidance itself compiles is answered, unless it is
refused for one of the keywords the server documents as unenforced (``UNENFORCED`` / ``SERVED_ONLY_AT`` of
tunesmith.generation.schemas): the only refusals beyond llguidance's are those. The built-in engine in
``make test``; vLLM in ``make test-vllm``."""

import copy
import importlib.util

import openai
import pytest

from .conftest import EMBEDDED, REPO, embedded_server

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("jsonschemabench", REPO / "benchmarks" / "jsonschemabench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

ANSWERED_PER_SUBSET = 1
MAX_TOKENS = 128


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.vllm)])
def sample(request, tmp_path_factory) -> dict[str, list[dict]]:
    """{"accepted": every sample schema asked with max_tokens 1, "answered": one per subset asked with 128}, each
    entry with its ``answer`` and llguidance's own verdict (``llg_raw``, ``llg_served``)."""
    every = bench.load_schemas(bench.SAMPLE)
    answered = bench.load_schemas(bench.SAMPLE, ANSWERED_PER_SUBSET)
    assert len(every) >= 30 and len({e["subset"] for e in answered}) == len(bench.SUBSETS)
    with embedded_server(request.param, tmp_path_factory.mktemp("jsonschemabench"), max_tokens=256,
                         request_timeout_s=300) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=360)
        bench.run_schemas(client, every, EMBEDDED, max_tokens=1, concurrency=4, together=True, prompt_chars=500,
                          progress=lambda *a, **k: None)
        # the ones refused in the first pass are refused again: only the accepted ones are answered
        refused = {e["name"] for e in every if e["answer"]["outcome"] == "refused"}
        answered = [copy.deepcopy(e) for e in answered if e["name"] not in refused]
        bench.run_schemas(client, answered, EMBEDDED, max_tokens=MAX_TOKENS, concurrency=len(answered),
                          together=True, progress=lambda *a, **k: None)
    bench.llguidance_coverage(every, bench.llguidance_bridge(EMBEDDED))
    return {"accepted": every, "answered": answered}


def _show(entries: list[dict]) -> str:
    return "\n".join(f"{e['subset']}/{e['name']}: {e['answer']}" for e in entries)


def test_no_answer_breaks_its_schema_and_no_5xx(sample):
    entries = sample["accepted"] + sample["answered"]
    broken = [e for e in entries if e["answer"]["outcome"] == "non_conforming"]
    assert not broken, f"answers that end (stop) and break their schema:\n{_show(broken)}"
    server_errors = [e for e in entries if (e["answer"].get("status") or 0) >= 500]
    assert not server_errors, f"5xx:\n{_show(server_errors)}"
    lost = [e for e in entries if e["answer"]["outcome"] == "failed"]
    assert not lost, f"failed (timeout, connection, finish_reason):\n{_show(lost)}"
    # the answered pass answers: each conforming, cut at max_tokens, or (jsonschema cannot judge it) unjudgeable
    assert sample["answered"] and all(e["answer"]["outcome"] in ("conforming", "cut", "unjudgeable")
                                      for e in sample["answered"]), _show(sample["answered"])
    assert any(e["answer"]["outcome"] == "conforming" for e in sample["answered"]), _show(sample["answered"])


def test_every_refusal_is_a_400_naming_a_keyword_and_its_path(sample):
    refused = [e for e in sample["accepted"] if e["answer"]["outcome"] == "refused"]
    unnamed = [e for e in refused if e["answer"]["status"] != 400 or not e["answer"]["keyword"]
               or not (e["answer"]["path"] or "").startswith("#")]
    assert not unnamed, f"refusals that name no keyword and path ('<kw>' at '#...'):\n{_show(unnamed)}"


def test_refusals_beyond_llguidance_are_the_documented_unenforced_keywords(sample):
    every = sample["accepted"]
    unenforced = bench.unenforced_keywords()
    llg = [e for e in every if e["llg_raw"]["ok"]]
    refused_unenforced = [e for e in llg if e["answer"]["outcome"] == "refused" and e["answer"]["keyword"] in unenforced]
    accepted = [e for e in every if e["answer"].get("status") == 200]
    assert llg, "llguidance compiles none of the sample: the measurement is broken"
    missing = bench.gaps(every)
    assert not missing, ("schemas llguidance compiles that the server does not answer, other than refusals for a "
                         "documented unenforced keyword:\n" + "\n".join(map(str, missing)))
    assert len(accepted) >= len(llg) - len(refused_unenforced)
