"""How long another key's Tinker call may wait inside one long pass: the stretches between the turns a pass gives.

The trainer in process (no HTTP), the embedded model, one run at rank ``--rank``, one ``forward_backward`` of a
``--tokens``-token datum (one pass). A ``between`` that only records the time is passed, so every point where the
pass would let another key's call run is stamped: before each decoder layer's forward, after each layer's backward,
around each slice of the output layer, before the backward (``Trainer._turns``). Prints the pass's time, the number of
turns and the longest stretch without one, against the peer: a pass that gives no turn inside it (turns between
passes only, the trainer before turns by layers), whose longest stretch is the whole pass.

    python benchmarks/tinker_turns.py --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()

    import numpy as np
    import torch

    from tunesmith.serve.tinker import wire
    from tunesmith.serve.tinker.trainer import Call, Trainer

    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    trainer = Trainer(args.model)
    trainer.create("run", args.rank, 0)
    tokens = [5 + i % 900 for i in range(args.tokens + 1)]
    datum = wire.Datum(tokens[:-1], {"target_tokens": np.asarray(tokens[1:]),
                                     "weights": np.ones(args.tokens, np.float32)})
    stamps: list[tuple[float, bool]] = []

    def between() -> bool:
        stamps.append((time.perf_counter(), torch.is_grad_enabled()))
        return False

    def one_pass(turns) -> float:
        t0 = time.perf_counter()
        trainer.forward_backward_many([Call("run", [datum], "cross_entropy", {}, True)], between=turns)
        return time.perf_counter() - t0

    one_pass(None)  # warm
    whole = one_pass(None)  # the peer: no turn inside the pass
    start = time.perf_counter()
    sliced = one_pass(between)
    gaps = np.diff([start, *(s for s, _ in stamps), start + sliced])
    result = {"tokens": args.tokens, "rank": args.rank, "pass_s_without_turns": round(whole, 2),
              "pass_s_with_turns": round(sliced, 2), "turns": len(stamps),
              "turns_in_forward": sum(1 for _, g in stamps if g), "longest_stretch_s": round(float(gaps.max()), 3),
              "median_stretch_s": round(float(np.median(gaps)), 3),
              "longest_wait_ratio": round(whole / float(gaps.max()), 1), "head_apart": trainer.head_apart}
    print(f"a {args.tokens}-token pass: {whole:.2f} s without turns (the longest wait: all of it), {sliced:.2f} s "
          f"with {len(stamps)} turns; longest stretch without a turn {gaps.max():.2f} s (median {np.median(gaps):.2f} s)"
          f": {result['longest_wait_ratio']}x shorter than the whole pass")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
