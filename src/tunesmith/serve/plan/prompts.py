"""A text completion's prompts as token ids and as text, from any of the forms OpenAI's spec allows (a string, an
array of strings, an array of token ids, an array of token-id arrays; the body's form is checked by
:func:`tunesmith.serve.plan.schemas.prompt_form`): strings are tokenized as they are (no template), token ids are
checked against the served model's vocabulary and decoded for ``echo``. What a harness sends: lm-evaluation-harness's
``local-completions`` scores a context and continuation it tokenized itself, as token ids."""

from __future__ import annotations

from tunesmith.serve.errors import APIError
from tunesmith.serve.plan.messages import check_text
from tunesmith.serve.plan.sampling import check_prompt_size


def completion_prompts(prompt: str | list, engine) -> tuple[list[str], list[list[int]]]:
    """(each prompt's text, each prompt's token ids); a token id outside the vocabulary is a 400 naming its index."""
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        texts = [prompt] if isinstance(prompt, str) else prompt
        check_text(prompt, "prompt")
        check_prompt_size(engine, texts, "prompt")
        return texts, [engine.text_prompt_ids(t) for t in texts]
    one = isinstance(prompt[0], int)
    arrays = [prompt] if one else prompt
    vocab = len(engine.tokenizer)
    for i, ids in enumerate(arrays):
        if (bad := outside_vocabulary(ids, vocab)) is not None:
            where = f"prompt[{bad}]" if one else f"prompt[{i}][{bad}]"
            raise APIError(400, f"{where}: {ids[bad]} is not a token id of this model (0 to {vocab - 1}); token ids "
                           "come from the served model's own tokenizer", param="prompt", code="invalid_value")
    return [engine.tokenizer.decode(ids) for ids in arrays], arrays


def outside_vocabulary(ids, vocab: int) -> int | None:
    """The index of the first of ``ids`` that is not a token id of a vocabulary of ``vocab`` tokens; None when all
    are."""
    return next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
