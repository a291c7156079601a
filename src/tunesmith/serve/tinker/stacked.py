"""Every run's LoRA in one pass over the base: a pass's rows grouped by run (contiguous spans), each adapted layer's
base product computed once for all rows, then each run's low-rank product on its own rows (views of the input, no
copies) and the rows joined once. This replaces peft's forward on the trainer's adapted layers (peft keeps the
adapters' weights, their names and their files). peft's mixed-adapter batch, which this replaced, gathered each
adapter's rows into a copy and scattered its product back at every layer, and its backward kept those copies: four
tenants fused ran at 0.61x of one after another on a CPU.

A low-rank product per run, not one over the runs' adapters stacked side by side with the other runs' columns masked
to zero: that one costs every row every run's rank, which grows with the runs in a pass; a run's own rows cost its
rank alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial


@dataclass(frozen=True)
class Span:
    """Rows ``start:stop`` of a pass's input, read through run ``run``'s adapter. ``learns``: their loss is
    backpropagated, so the run's weights take part in the graph; else they are read detached (a forward-only call's
    run gets no gradient, not even a zero one)."""

    run: str
    start: int
    stop: int
    learns: bool


def spans_of(runs: list[tuple[str, bool]], sizes: list[int]) -> list[Span]:
    """Consecutive items of the same ``(run, learns)`` joined into spans, item ``k`` being ``sizes[k]`` rows long."""
    spans: list[Span] = []
    start = 0
    for (run, learns), size in zip(runs, sizes, strict=True):
        if spans and (spans[-1].run, spans[-1].learns) == (run, learns) and spans[-1].stop == start:
            spans[-1] = Span(run, spans[-1].start, start + size, learns)
        elif size:
            spans.append(Span(run, start, start + size, learns))
        start += size
    return spans


def clipped(spans: list[Span], start: int, stop: int) -> list[Span]:
    """The spans over rows ``start:stop`` only, numbered from ``start`` (a slice of the rows the spans cover)."""
    return [Span(s.run, max(s.start, start) - start, min(s.stop, stop) - start, s.learns)
            for s in spans if s.start < stop and s.stop > start]


class Adapters:
    """Which runs' adapters the pass running now reads, and the forward that reads them. Readings are a stack: a call
    run in another call's turn (between two of its layers) pushes its own and pops it when it ends."""

    def __init__(self):
        self.stack: list[Reading] = []

    @contextmanager
    def reading(self, spans: list[Span], stacked: dict | None = None):
        """``spans`` read by the adapted layers until it ends; ``stacked``: adapters stacked by an earlier reading of
        the same pass, kept (the output layer, read a slice at a time)."""
        self.stack.append(Reading(spans, {} if stacked is None else stacked))
        try:
            yield
        finally:
            self.stack.pop()

    def install(self, model) -> None:
        """This forward on each of ``model``'s LoRA layers that does not have it yet (a run that adapts a layer no run
        adapted before wraps it anew)."""
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer) and getattr(module, "stacked_by", None) is not self:
                module.forward = partial(self.forward, module)
                module.stacked_by = self

    def forward(self, layer, x, *args, **kwargs):
        """The base layer's output for every row plus, on each span's rows, its run's low-rank product (added in the
        adapter's precision, then cast to the output's, as peft does); the base alone outside a pass."""
        out = layer.base_layer(x, *args, **kwargs)
        reading = self.stack[-1] if self.stack else None
        if reading is None or not any(s.run in layer.lora_A for s in reading.spans):
            return out
        sizes = [s.stop - s.start for s in reading.spans]
        if sum(sizes) != x.shape[0]:
            raise RuntimeError(f"the pass's spans cover {sum(sizes)} rows of {x.shape[0]}")
        if len(sizes) == 1:
            delta = _low_rank(layer, x, reading.spans[0])
        elif len(sizes) * max(sizes) <= PADDED * x.shape[0]:
            delta = reading.batched(layer, x, sizes)
        else:  # spans of very unequal sizes: a product per span (split, not a slice each: a slice's backward fills
            # a zero gradient of the whole input, one per span)
            import torch

            delta = torch.cat([_low_rank(layer, rows, s) for rows, s in zip(x.split(sizes), reading.spans,
                                                                            strict=True)])
        return (out + delta).to(out.dtype)


PADDED = 2  # a batched product pads each span to the longest one's rows: at most this many times the rows in all


class Reading:
    """One pass's spans, and each adapted layer's adapters stacked for them (by layer and the spans' runs: a pass's
    slices share them)."""

    def __init__(self, spans: list[Span], stacked: dict):
        self.spans = spans
        self.stacked = stacked

    def weights(self, layer) -> tuple:
        """The spans' runs' A (runs x rank x inputs) and B (runs x outputs x rank) at ``layer``, each run's padded with
        zeros to the largest rank (zeros for a run that does not adapt it: its rows get no product), and their
        scalings (runs x 1 x 1). In the graph (each run's own weights get its gradients); a run that does not learn in
        this pass, detached."""
        import torch
        import torch.nn.functional as F

        key = (id(layer), tuple((s.run, s.learns) for s in self.spans))
        if key not in self.stacked:
            some = next(iter(layer.lora_A.values())).weight
            rank = max(layer.lora_A[s.run].weight.shape[0] for s in self.spans if s.run in layer.lora_A)
            a_s, b_s, scales = [], [], []
            for s in self.spans:
                if s.run not in layer.lora_A:
                    a_s.append(some.new_zeros((rank, layer.in_features)))
                    b_s.append(some.new_zeros((layer.out_features, rank)))
                    scales.append(0.0)
                    continue
                a, b = layer.lora_A[s.run].weight, layer.lora_B[s.run].weight
                if not s.learns:
                    a, b = a.detach(), b.detach()
                a_s.append(F.pad(a, (0, 0, 0, rank - a.shape[0])))
                b_s.append(F.pad(b, (0, rank - b.shape[1])))
                scales.append(float(layer.scaling[s.run]))
            self.stacked[key] = (torch.stack(a_s), torch.stack(b_s),
                                 torch.tensor(scales, dtype=some.dtype, device=some.device).view(-1, 1, 1))
        return self.stacked[key]

    def batched(self, layer, x, sizes: list[int]):
        """Every span's low-rank product at ``layer`` as one batched product of each side: the spans' rows side by side
        (a view of ``x`` when the spans are of one size; else each padded to the longest), through the stacked
        adapters, the padding dropped."""
        import torch
        import torch.nn.functional as F

        a, b, scales = self.weights(layer)
        runs, longest = len(sizes), max(sizes)
        if all(size == longest for size in sizes):
            groups = x.reshape(runs, -1, x.shape[-1])
        else:
            pad = [0, 0] * (x.dim() - 1)
            groups = torch.stack([F.pad(rows, [*pad, 0, longest - len(rows)]) for rows in x.split(sizes)])
            groups = groups.reshape(runs, -1, x.shape[-1])
        low = torch.bmm(torch.bmm(groups.to(a.dtype), a.transpose(1, 2)) * scales, b.transpose(1, 2))
        low = low.reshape(runs, longest, *x.shape[1:-1], b.shape[1])
        if all(size == longest for size in sizes):
            return low.reshape(-1, *low.shape[2:])
        return torch.cat([group[:size] for group, size in zip(low.unbind(0), sizes, strict=True)])


def _low_rank(layer, rows, span: Span):
    """``span``'s run's low-rank product of ``rows`` at ``layer`` (zeros where the run does not adapt it), in the
    adapter's precision."""
    import torch.nn.functional as F

    if span.run not in layer.lora_A:
        return rows.new_zeros((*rows.shape[:-1], layer.out_features), dtype=layer.lora_A[next(iter(layer.lora_A))]
                              .weight.dtype)
    a, b = layer.lora_A[span.run].weight, layer.lora_B[span.run].weight
    if not span.learns:
        a, b = a.detach(), b.detach()
    return F.linear(F.linear(rows.to(a.dtype), a), b) * layer.scaling[span.run]
