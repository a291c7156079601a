"""The peer of the generation engine: evaluation's generation before the engine (tunesmith 10d5972,
``eval/generation.generate``, greedy part): ``model.generate`` on length-sorted, left-padded fixed
batches, each batch running until its longest row ends (finished rows keep their place as padding).

Kept verbatim (minus sampling and constraints) so that the engine's benchmark and its equality test
compare against what evaluation really did.
"""

from __future__ import annotations

from collections.abc import Sequence

from tunesmith.generation.scoring import length_sorted_batches  # the batching the old path used, unchanged


def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                    stop: Sequence[str] = ()) -> list[str]:
    """Greedy completions of chat-formatted prompt strings, cut at the earliest stop string."""
    import torch

    from tunesmith.generation import cut_at_stop, stop_ids

    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outputs: list[str | None] = [None] * len(prompts)
    eos = stop_ids(tokenizer, model)
    for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
        start = enc["input_ids"].shape[1]
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                 stopping_criteria=_stop_on_text(tokenizer, start, stop) if stop else None)
        for b, i in enumerate(batch):
            outputs[i] = cut_at_stop(tokenizer.decode(out[b, start:], skip_special_tokens=True), stop)
    return outputs  # type: ignore[return-value]


def _stop_on_text(tokenizer, start: int, stop: Sequence[str]):
    """Stop a row once its generated text contains a stop string."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])
