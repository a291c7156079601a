"""Generation: one engine for evaluation, synthesis and serving, and label scoring beside it.

- ``engine``: continuous batching over one model (rows join and leave between decoding steps), per-row
  adapters and per-row sampling through transformers' logits processors.
- ``batch``: a list of prompts through the engine (evaluation greedy by default, synthesis sampled).
- ``scoring``: log-likelihood of candidate labels after each prompt (closed-label evaluation).
- ``logprobs``: a token's logprob and alternatives; each prompt token's, from the engine's own prefill (a
  harness's scoring request).
- ``sampling``: a row's settings, its sampler, end-of-turn ids and stop strings.

Nothing here imports the stages that use it (eval, synth, serve, tasks).
"""

from tunesmith.generation.batch import MAX_BATCH_TOKENS, Advance, Generated, Prompt, complete, generate, generate_greedy
from tunesmith.generation.engine import BASE, ContinuousBatch, Row
from tunesmith.generation.logprobs import TokenLogprob
from tunesmith.generation.sampling import GenParams, cut_at_stop, stop_ids
from tunesmith.generation.scoring import length_sorted_batches, score_labels

__all__ = [
    "BASE", "MAX_BATCH_TOKENS", "Advance", "ContinuousBatch", "GenParams", "Generated", "Prompt", "Row", "TokenLogprob",
    "complete", "cut_at_stop", "generate", "generate_greedy", "length_sorted_batches", "score_labels", "stop_ids",
]
