"""Tokenize chat examples with a loss mask, and collate batches packed without cross-contamination.

Packing puts several examples into one row so that a batch carries less padding. Restarting
``position_ids`` alone does not isolate the examples under ``sdpa`` or ``eager`` attention
(measured: the second example's logits move by ~0.5), so the collator also passes an explicit
4D block-diagonal causal mask: a token attends only to earlier tokens of its own example.

Under variable-length attention (``mask_kind="varlen"``, :mod:`tunesmith.machine.varlen`) the collator passes
no mask but the examples' boundaries, found here on the host: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (the
offsets of every example, and of each row's padding tail, in the flattened batch) and ``max_length_q`` /
``max_length_k`` (the longest, a Python int), which the model hands to its attention function.

Rows are never longer than the longest example of the batch (first-fit decreasing into bins of
that size), so packing only removes padding and never makes attention more expensive.

Logits are only computed where a loss is taken: the collator marks the positions whose next
token is a completion token (``logits_mask``, and as flat indices ``target_index``) and gives their
targets as a flat ``labels`` vector. With a 49k vocabulary the output projection is about a fifth of the model's compute;
skipping it on prompt tokens, and never materialising their logits, saves time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.machine.masks import block_causal_mask
from tunesmith.machine.varlen import boundaries


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins whose total length is at most ``capacity`` (longest first)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class PackedCollator:
    """Collate tokenized examples into rows (packed or one per row) with a block-diagonal causal mask.

    ``mask_kind``: ``"bool"`` for sdpa, ``"float"`` (additive, 0 / dtype min) for eager, ``"none"``
    for kernels that separate packed examples by their restarting position ids, ``"varlen"`` for
    tunesmith's variable-length attention (the examples' boundaries instead of a mask).
    """

    pad_id: int
    pack: bool = True
    mask_kind: str = "bool"
    dtype: object = None  # torch dtype of the additive mask
    capacity: int | None = None  # tokens per packed row; None: the longest example of the batch

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        capacity = max(max(lengths), self.capacity or 0)
        rows = first_fit_decreasing(lengths, capacity) if self.pack else [[i] for i in range(len(features))]
        width = max(sum(lengths[i] for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segment = torch.full(shape, -1, dtype=torch.long)
        keep = torch.zeros(shape, dtype=torch.bool)
        for r, row in enumerate(rows):
            offset = 0
            for k, i in enumerate(row):
                ids, n = features[i]["input_ids"], lengths[i]
                input_ids[r, offset : offset + n] = torch.tensor(ids)
                position_ids[r, offset : offset + n] = torch.arange(n)
                segment[r, offset : offset + n] = k
                # position p predicts token p+1: keep it when that token carries a loss
                keep[r, offset : offset + n - 1] = torch.tensor(
                    features[i]["completion_mask"][1:], dtype=torch.bool
                )
                offset += n
        targets = torch.roll(input_ids, -1, dims=1)
        labels = targets[keep]
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "logits_mask": keep,
            # the same positions as flat integer indices, found here on the host: gathering by them sizes
            # nothing from the device's values (tunesmith.train.chunked_loss)
            "target_index": keep.flatten().nonzero().squeeze(1),
            "labels": labels,
            "shift_labels": labels,  # tells the trainer the targets are already aligned (for token counting)
            "num_tokens": sum(lengths),  # a Python int: counting tokens needs no device round trip
        }
        if self.mask_kind == "varlen":
            offsets, longest = boundaries([[lengths[i] for i in row] for row in rows], width)
            cu = torch.tensor(offsets, dtype=torch.int32)
            batch |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        elif self.mask_kind != "none":
            batch["attention_mask"] = block_causal_mask(segment, self.mask_kind, self.dtype)
        return batch


