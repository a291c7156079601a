"""Batched greedy generation and closed-label log-likelihood scoring.

Both sort prompts by length so that a batch pads to similar lengths (padding to the longest
prompt dominates CPU time otherwise), and return results in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Advance = Callable[[int], None]


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    advance: Advance = lambda n: None,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy completions for chat-formatted prompt strings (special tokens already in them).

    ``stop`` strings end a row early (a batch ends when every row has stopped) and are cut from
    the returned text together with anything after them.
    """
    import torch

    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    eos = stop_ids(tokenizer, model)
    for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=_stop_on_text(tokenizer, enc["input_ids"].shape[1], stop) if stop else None,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        for row, i in enumerate(batch):
            outputs[i] = cut_at_stop(tokenizer.decode(new[row], skip_special_tokens=True), stop)
        advance(len(batch))
    return outputs


def _stop_on_text(tokenizer, start: int, stop: Sequence[str]):
    """Stop a row once its *generated* text contains a stop string (transformers' own ``stop_strings``
    also match across the prompt boundary, e.g. a prompt ending in a newline)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def stop_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus the generation config's EOS ids (generation stops at any of them)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def score_labels(
    model,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[str],
    suffix: str,
    batch_size: int = 8,
    advance: Advance = lambda n: None,
):
    """Mean per-token log-probability of each ``label + suffix`` after each prompt.

    Returns a float array of shape (len(prompts), len(labels)). The prompt is run once per
    batch and its KV cache is shared by all candidate labels, so the cost is one prompt pass
    plus a few tokens per label instead of a full pass per (prompt, label) pair.
    """
    import numpy as np
    import torch

    tokenizer.padding_side = "left"
    cand = [tokenizer(label + suffix, add_special_tokens=False)["input_ids"] for label in labels]
    n_lab, t_max = len(cand), max(len(c) for c in cand)
    pad = tokenizer.pad_token_id
    cand_ids = torch.tensor([c + [pad] * (t_max - len(c)) for c in cand])
    cand_mask = torch.tensor([[1] * len(c) + [0] * (t_max - len(c)) for c in cand])
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    scores = np.zeros((len(prompts), n_lab), dtype=np.float64)
    dev = model.device
    for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(dev)
        b = len(batch)
        with torch.inference_mode():
            positions = (enc["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)  # left padding
            # only the last position's logits are needed: skip the vocabulary projection elsewhere
            out = model(**enc, position_ids=positions, use_cache=True, logits_to_keep=1)
            first_logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (b, V)
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_lab)
            prompt_len = enc["attention_mask"].sum(dim=1)  # (b,)
            ids = cand_ids.repeat(b, 1).to(dev)  # (b*n_lab, t_max)
            cmask = cand_mask.repeat(b, 1).to(dev)
            attn = torch.cat([enc["attention_mask"].repeat_interleave(n_lab, dim=0), cmask], dim=1)
            pos = prompt_len.repeat_interleave(n_lab).unsqueeze(1) + torch.arange(t_max, device=dev)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # (b*n_lab, t_max, V)
            # token k of a candidate is predicted by the prompt's last position (k=0) or candidate pos. k-1
            tok_lp = torch.empty(b * n_lab, t_max, device=dev)
            tok_lp[:, 0] = first_logp.repeat_interleave(n_lab, dim=0).gather(1, ids[:, :1]).squeeze(1)
            if t_max > 1:
                tok_lp[:, 1:] = logp[:, :-1, :].gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            mean = (tok_lp * cmask).sum(1) / cmask.sum(1)
        scores[batch] = mean.view(b, n_lab).cpu().numpy()
        advance(b)
    return scores
