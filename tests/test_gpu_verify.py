"""The check that writes a GPU kind's fast-path record (tunesmith.train.verify), run here at its smoke shape on the
CPU's kernel: packed rows equal one example at a time (log-probabilities, loss, every gradient), the control shows a
leak, both sides' speed is measured; a leaking packer, a record written by hand, a slower fast path or a failed GPU
test each keep a GPU kind off the fast path, and ``probe`` reads only what the check wrote."""

from __future__ import annotations

import json

import pytest

from tunesmith.machine import verified
from tunesmith.machine.device import Wishes, choose_path, probe
from tunesmith.train import verify

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def smoke(tiny_model_dir):
    return verify.run(str(tiny_model_dir), verify.SMOKE)


def test_the_smoke_check_measures_equality_the_control_and_speed(smoke, tmp_path):
    name, evidence = smoke
    eq, tol = evidence["equality"], verify.TOLERANCES["float32"]
    assert name == "cpu" and evidence["written_by"] == verified.WRITER and evidence["kernel"] == "sdpa"
    assert eq["kernel_calls"] == {"sdpa": verify.SMOKE.layers} and eq["packed_rows"] == 1 and eq["targets"] > 0
    assert eq["logprob_mean_abs_diff"] <= tol.logprob and eq["loss_rel_diff"] <= tol.loss
    assert eq["grad_rel_diff"] <= tol.grad
    assert eq["leak_logprob_mean_abs_diff"] > 2 * tol.logprob  # the check can fail
    speed = evidence["speed"]
    assert speed["fast_tokens_s"] > 0 and speed["baseline_tokens_s"] > 0 and speed["baseline"] == verify.BASELINE
    assert speed["baseline_padded_tokens"] >= speed["tokens"] and speed["micro_batches"] >= 1
    assert evidence["verified"] == (speed["speedup"] >= 1.0)  # the same rule as the reader's
    verified.write("cpu", evidence, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["cpu"] == evidence


def test_the_control_works_over_several_packed_rows(tiny_model_dir):
    """The 1B-wide shape packs its examples into more than one row: the control tells each row it is one sequence."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    features = verify.conversations(tok, verify.SMOKE.examples)
    model = verify.random_llama(verify.SMOKE, len(tok), "cpu")
    eq = verify.equality(model, features, tok.pad_token_id, 128, "sdpa")  # rows of 128 tokens: several
    tol = verify.TOLERANCES["float32"]
    assert eq["packed_rows"] > 1 and eq["loss_rel_diff"] <= tol.loss and eq["grad_rel_diff"] <= tol.grad
    assert eq["leak_logprob_mean_abs_diff"] > 2 * tol.logprob


def test_a_leaking_packer_fails_the_check(tiny_model_dir, monkeypatch):
    """Boundaries that make each row one sequence (examples see each other) move the loss and gradients."""
    from transformers import AutoTokenizer

    from tunesmith.machine import packing

    def one_sequence(rows, width):
        return [r * width for r in range(len(rows) + 1)], width

    monkeypatch.setattr(packing, "boundaries", one_sequence)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    features = verify.conversations(tok, verify.SMOKE.examples)
    model = verify.random_llama(verify.SMOKE, len(tok), "cpu")
    eq = verify.equality(model, features, tok.pad_token_id, verify.SMOKE.capacity, "sdpa")
    evidence = {"written_by": verified.WRITER, "kernel": "sdpa", "equality": eq,
                "tolerance": vars(verify.TOLERANCES["float32"]), "speed": {"baseline": "b", "fast_tokens_s": 2.0,
                                                                          "baseline_tokens_s": 1.0}}
    assert eq["loss_rel_diff"] > verify.TOLERANCES["float32"].loss
    assert verified.verdict(evidence).startswith("packed rows differ from one at a time")


def good(smoke) -> dict:
    evidence = json.loads(json.dumps(smoke[1]))
    evidence["speed"] |= {"fast_tokens_s": 2.0, "baseline_tokens_s": 1.0}
    evidence.pop("finding", None)
    return evidence


@pytest.mark.parametrize("change, found", [
    (lambda e: e.pop("written_by"), "not written by the check"),
    (lambda e: e["equality"].update(kernel_calls={}), "kernel did not run"),
    (lambda e: e["equality"].update(grad_rel_diff=0.5), "grad_rel_diff 0.5 over the tolerance"),
    (lambda e: e["equality"].update(leak_logprob_mean_abs_diff=None), "the check could not fail"),
    (lambda e: e["speed"].update(fast_tokens_s=0.5), "not faster than"),
    (lambda e: e.update(tests={"log": "gpu_verify.log", "passed": 16, "failed": 5}), "5 GPU tests failed"),
])
def test_what_keeps_a_gpu_kind_off_the_fast_path(smoke, change, found):
    evidence = good(smoke)
    assert verified.verdict(evidence) is None
    change(evidence)
    assert found in verified.verdict(evidence)


def test_the_tests_summary_line_is_read():
    assert verify.test_failures("...\n21 passed, 1 skipped in 47.1s\n") == (21, 0)
    assert verify.test_failures("x\n16 passed, 5 failed, 2 errors in 9s\n") == (16, 7)
    assert verify.test_failures("Killed\n") is None


def test_probe_takes_the_fast_path_only_on_the_checks_record(smoke, tmp_path, monkeypatch):
    """A simulated CUDA device: unverified without a record, with a hand-written one (today's shape of the old
    records) and with a slower one; verified with the check's evidence."""
    import torch

    for name, value in {"is_available": lambda: True, "mem_get_info": lambda: (70 * 2**30, 80 * 2**30),
                        "get_device_name": lambda: H100, "is_bf16_supported": lambda: True,
                        "get_device_capability": lambda: (9, 0)}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    path = tmp_path / "gpu_verified.json"
    monkeypatch.setattr(verified, "RECORDS", path)
    assert not probe().fast_path_verified
    path.write_text(json.dumps({H100: {"loss_equal": True, "loss_tolerance": 1e-5, "speedup": 5.14,
                                       "evidence": "by hand", "date": "2026-11-26"}}))
    assert not probe().fast_path_verified
    why = choose_path(probe(), Wishes(), fits_without_checkpointing=True).reasons["path"]
    assert f"not verified on {H100} (2026-11-26: its record was not written by the check" in why
    slower = good(smoke)
    slower["speed"]["fast_tokens_s"] = 0.5
    verified.write(H100, slower)
    assert not probe().fast_path_verified
    verified.write(H100, good(smoke))
    assert probe().fast_path_verified
    assert choose_path(probe(), Wishes(), fits_without_checkpointing=True).name == "fast"


def test_the_shipped_records_verify_nothing_they_did_not_check():
    for name, record in verified.records().items():
        assert verified.verification(name)[0] == (verified.verdict(record) is None), name


def test_instruction_records_and_micro_batches_of_the_same_examples(tiny_model_dir, tmp_path):
    """The speed part reads Alpaca-style records (the kit's instruction data: lengths as a fine-tuning run meets them)
    and cuts the examples, in file order, into micro-batches of at most a row's tokens; both sides run the same ones."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    records = [{"instruction": "Say the intent.", "input": "my card has not arrived " * n, "output": "card_arrival"}
               for n in (1, 30, 2, 8)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    features = verify.conversations(tok, 10, path, longest=120)
    assert 1 <= len(features) < 4 and all(len(f["input_ids"]) <= 120 for f in features)  # the 30x one is too long
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert verify.conversations(tok, 10, tmp_path / "alpaca.jsonl", longest=120) == features
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"broken.jsonl:2: no 'output' field"):  # the file and line named
        verify.conversations(tok, 10, tmp_path / "broken.jsonl")
    groups = verify.micro_batches(features, 60)
    assert [f for g in groups for f in g] == features  # every example once, in order
    assert all(sum(len(f["input_ids"]) for f in g) <= 60 or len(g) == 1 for g in groups)
