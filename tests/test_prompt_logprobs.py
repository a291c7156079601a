"""Prompt logprobs on the continuous-batching engine: rows that score their prompt get, from their prefill, each
prompt token's logprob under the model (the same numbers as one plain forward pass of that prompt alone), whatever
the padding beside other prompts, the chunks the prefill is cut into, a prompt shared by several choices, or rows
that only generate in the same step; ``max_tokens`` 0 scores the prompt alone; the end of sequence that stops a row
is kept apart."""

import pytest
import torch

from tunesmith.generation import ContinuousBatch, GenParams, Row, logprobs


def reference(model, ids: list[int]) -> list[float]:
    """Each token's logprob after the ones before it, from one plain forward pass of the prompt alone."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return [float(logp[p, ids[p + 1]]) for p in range(len(ids) - 1)]


def run(batch: ContinuousBatch, rows: list[Row]) -> None:
    for r in rows:
        batch.add(r)
    while batch.busy:
        batch.step()


@pytest.mark.parametrize("chunk_logits", [logprobs.SCORED_LOGITS, 3 * 600])  # whole, or 3 positions a chunk
def test_prompt_logprobs_match_a_plain_forward_pass(tiny_model, monkeypatch, chunk_logits):
    model, tok = tiny_model
    monkeypatch.setattr(logprobs, "SCORED_LOGITS", chunk_logits)
    texts = ["my card has not arrived yet", "pin blocked", "what is the exchange rate for euros today"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = ContinuousBatch(model, tok, max_rows=8)
    scoring = [Row(ids, GenParams(max_tokens=2), logprobs=2, prompt_logprobs=2) for ids in prompts]
    shared = Row(prompts[0], GenParams(max_tokens=2), logprobs=0, prompt_logprobs=0)  # the same prompt: prefilled once
    plain = Row(prompts[1], GenParams(max_tokens=3))  # only generates, in the same steps
    alone = Row(prompts[2], GenParams(max_tokens=0), logprobs=1, prompt_logprobs=1)
    run(batch, [*scoring, shared, plain, alone])
    for row, ids in zip([*scoring, shared, alone], [*prompts, prompts[0], prompts[2]], strict=True):
        got = row.prompt_token_logprobs
        assert [t.token for t in got] == ids[1:]
        assert [t.logprob for t in got] == pytest.approx(reference(model, ids), abs=1e-5)
        assert all(len(t.top) == row.prompt_logprobs for t in got)
        assert all(t.top[0][1] >= t.logprob - 1e-6 for t in got if t.top)
    assert plain.prompt_token_logprobs == [] and len(plain.generated) == 3
    assert alone.generated == [] and alone.finish_reason == "length" and alone.token_logprobs == []
    assert all(len(r.generated) == 2 and len(r.token_logprobs) == 2 for r in scoring)


def test_the_end_of_sequence_that_stops_a_row_is_kept_apart(tiny_model):
    model, tok = tiny_model
    ids = tok("my card", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        first = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    batch = ContinuousBatch(model, tok)
    batch.eos_ids = {first}  # the greedy first token ends the row
    row = Row(ids, GenParams(max_tokens=4), logprobs=1)
    run(batch, [row])
    assert row.finish_reason == "stop" and row.generated == [] and row.token_logprobs == []
    assert row.end_logprob is not None and row.end_logprob.token == first and len(row.end_logprob.top) == 1
