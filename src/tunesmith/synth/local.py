"""Batched chat generation with a local Hugging Face model (greedy or sampled, n per prompt)."""

from __future__ import annotations

from tunesmith.eval.generation import stop_ids
from tunesmith.synth.calls import ChatReply


def generate_chat(model, tokenizer, conversations, temperature, top_p, max_tokens, n, seed) -> list[ChatReply]:
    """One batch: left-padded prompts, ``n`` samples each; token counts exclude padding."""
    import torch

    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sample = temperature > 0
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            num_return_sequences=n,
            eos_token_id=stop_ids(tokenizer, model),  # the same end-of-turn handling as evaluation and serving
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
    replies = []
    for b in range(len(prompts)):
        rows = new[b * n : (b + 1) * n]
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        completion = int(sum((r != tokenizer.pad_token_id).sum().item() for r in rows))
        replies.append(ChatReply(texts, int(prompt_lens[b]), completion))
    return replies
