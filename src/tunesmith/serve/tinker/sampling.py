"""The Tinker API's sampling: every waiting sample call's sequences generated together, in batches.

A call asks ``num_samples`` sequences after one prompt. Calls with the same sampling parameters (of one key or of
several, :meth:`tunesmith.serve.tinker.futures.Futures` joins them) become rows of one left-padded ``generate``, up to
:data:`BATCH_TOKENS` padded tokens a batch, each row through its own weights (a sampler checkpoint's adapter or the
base: peft's mixed-adapter batch, at most :data:`SAMPLERS_LOADED` of them): a decoding step costs a row little more
than it costs a batch, so an RL loop's group of samples (``num_samples=16``, or 16 calls of one each), or several
tenants' groups, cost about one sample's time on a GPU. A call with a ``seed`` runs alone (its rows seeded once, so
that the same call gives the same sequences).

Each sampled token's logprob is the one a training forward computes: ``log_softmax`` of the model's raw logits at
temperature 1 (read before the temperature and top-k/top-p warp them, :class:`Logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunesmith.serve.tinker.wire import Sequence

BATCH_TOKENS = 8192  # padded tokens (prompt + max_tokens) of one batch's rows: bounds the KV cache a batch holds
SAMPLERS_LOADED = 8  # sampler checkpoints kept loaded (past it, the least recently sampled is unloaded): one batch's most


@dataclass
class Want:
    """One sample call: ``n`` sequences after ``prompt`` from the weights in ``folder`` (None: the base)."""

    prompt: list[int]
    n: int
    params: dict
    folder: str | None = None
    prompt_logprobs: bool = False
    topk_prompt: int = 0

    def group(self, i: int) -> tuple:
        """Calls of the same group share a batch: the same parameters (a seeded call is a group alone)."""
        p = self.params
        stop = p.get("stop")
        if p.get("seed") is not None:
            return ("seeded", i)
        return (float(p.get("temperature", 1.0)), float(p.get("top_p", 1.0)), int(p.get("top_k", -1)),
                int(p.get("max_tokens") or 16), stop if stop is None or isinstance(stop, str) else tuple(stop))


def batches(wants: list[Want], budget: int = BATCH_TOKENS,
            weights: int = SAMPLERS_LOADED) -> list[list[tuple[int, int]]]:
    """The rows ``(call, sample)`` of ``wants`` in batches: one group's rows each, at most ``budget`` padded tokens
    (a row longer than it goes alone) and ``weights`` distinct sampler checkpoints."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, want in enumerate(wants):
        groups.setdefault(want.group(i), []).extend((i, k) for k in range(want.n))
    out: list[list[tuple[int, int]]] = []
    for rows in groups.values():
        rows.sort(key=lambda r: -len(wants[r[0]].prompt))  # like prompts together: little left padding
        batch: list[tuple[int, int]] = []
        held: set = set()
        for row in rows:
            width = len(wants[batch[0][0]].prompt) if batch else len(wants[row[0]].prompt)
            width += int(wants[row[0]].params.get("max_tokens") or 16)
            folder = wants[row[0]].folder
            new = folder is not None and folder not in held
            if batch and ((len(batch) + 1) * width > budget or (new and len(held) >= weights)):
                out.append(batch)
                batch, held = [], set()
            batch.append(row)
            if folder is not None:
                held.add(folder)
        if batch:
            out.append(batch)
    return out


def stops(stop, tokenizer) -> tuple[list[int], list[str]]:
    """The SDK's ``stop``: None → the end-of-sequence token; [] → nothing; token ids; or strings."""
    if stop is None:
        return ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []), []
    if isinstance(stop, str):
        return [], [stop]
    if all(isinstance(s, int) for s in stop):
        return list(stop), []
    return [], list(stop)


def generate(model, tokenizer, prompts: list[list[int]], params: dict,
             adapters: list[str] | None = None) -> list[Sequence]:
    """One sequence after each prompt, all in one ``generate`` (prompts left-padded), each cut at its own stop;
    ``adapters``: each row's peft adapter (``__base__``: none), for a batch of several weights."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    device = model.get_input_embeddings().weight.device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[r, width - len(prompt):] = 1
    stop_ids, stop_strings = stops(params.get("stop"), tokenizer)
    temperature = float(params.get("temperature", 1.0))
    limit = int(params.get("max_tokens") or 16)
    config = GenerationConfig(max_new_tokens=limit, do_sample=temperature > 0, pad_token_id=pad,
                              eos_token_id=[],  # the stops are :class:`Ends`' (not the model's default end token)
                              temperature=temperature if temperature > 0 else None,
                              top_p=float(params.get("top_p", 1.0)) if temperature > 0 else None,
                              top_k=max(0, int(params.get("top_k", -1))) if temperature > 0 else None)
    ends = Ends(stop_ids, stop_strings, tokenizer, width, len(prompts), device)
    scored = Logprobs()
    rows = {"adapter_names": adapters} if adapters else {}
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         logits_processor=LogitsProcessorList([scored]), stopping_criteria=StoppingCriteriaList([ends]),
                         **rows)
    tokens = out[:, width:]
    logprobs = scored.finish(tokens)
    sequences = []
    for r in range(len(prompts)):
        length = ends.lengths[r] or tokens.shape[1]
        sequences.append(Sequence(tokens[r, :length].tolist(), logprobs[r, :length].tolist(),
                                  ends.lengths[r] is not None))
    return sequences


class Logprobs:
    """A logits processor that keeps each row's logprob of the token it samples: ``log_softmax`` of the raw logits
    (it runs before the temperature and top-k/top-p warpers), read at the next step, once the token is known."""

    def __init__(self):
        self.last = None
        self.taken: list = []

    def __call__(self, input_ids, scores):
        import torch

        if self.last is not None:
            self.taken.append(self.last.gather(1, input_ids[:, -1:])[:, 0])
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, tokens):
        """A (rows, generated) array: the logprob of each generated token."""
        import torch

        taken = self.taken[:tokens.shape[1]]
        if len(taken) < tokens.shape[1]:
            taken.append(self.last.gather(1, tokens[:, -1:])[:, 0])
        return torch.stack(taken, dim=1).cpu().numpy() if taken else np.zeros((tokens.shape[0], 0), np.float32)


class Ends:
    """A stopping criterion that ends each row at its first stop token or stop string and keeps where (the
    ``eos_token_id`` attribute makes ``generate`` pad the rows that ended while others go on)."""

    def __init__(self, stop_ids: list[int], stop_strings: list[str], tokenizer, start: int, rows: int, device):
        import torch
        from transformers import StopStringCriteria

        self.eos_token_id = stop_ids
        self.ids = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.strings = StopStringCriteria(tokenizer, stop_strings) if stop_strings else None
        self.start = start
        self.lengths: list[int | None] = [None] * rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.isin(input_ids[:, -1], self.ids)
        if self.strings is not None:
            done = done | self.strings(input_ids, scores)
        length = input_ids.shape[1] - self.start
        for r in done.nonzero()[:, 0].tolist():
            if self.lengths[r] is None:
                self.lengths[r] = length
        return done


def prompt_scores(model, prompt: list[int], wanted: bool, topk: int):
    """The prompt's token logprobs (None first) when ``wanted``, and its top-k per position when ``topk``."""
    import torch

    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    chosen = logp.gather(1, ids[0, 1:, None])[:, 0].tolist()
    lists = [None, *chosen] if wanted else None
    top = None
    if topk:
        values, index = logp.topk(topk, dim=-1)
        top = (np.vstack([np.zeros((1, topk), np.int32), index.cpu().numpy().astype(np.int32)]),
               np.vstack([np.full((1, topk), np.nan, np.float32), values.cpu().numpy()]))
    return lists, top
