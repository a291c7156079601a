import numpy as np
import torch

from tunesmith.generation import cut_at_stop, generate_greedy, score_labels

PROMPTS = [
    "<|im_start|>user\nmy card has not arrived yet<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\npin<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nhow old do I need to be to open an account with you<|im_end|>\n"
    "<|im_start|>assistant\n",
]
LABELS = ["card_arrival", "pin_blocked", "age_limit"]


def brute_force(model, tok, prompt, label, suffix):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(label + suffix, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
    return float(np.mean([lp[len(p) - 1 + k, c[k]].item() for k in range(len(c))]))


def test_label_scores_match_one_sequence_at_a_time(tiny_model):
    model, tok = tiny_model
    scores = score_labels(model, tok, PROMPTS, LABELS, "<|im_end|>", batch_size=2)
    expected = np.array([[brute_force(model, tok, p, lab, "<|im_end|>") for lab in LABELS] for p in PROMPTS])
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_gold_label_losses_equal_the_answer_loss_pass(tiny_model):
    """The answer loss read off the label scores is the loss the separate answer-loss pass measures."""
    from tunesmith.scoring.perplexity import answer_losses, gold_label_losses

    model, tok = tiny_model
    gold = ["pin_blocked", "card_arrival", "age_limit"]
    scores = score_labels(model, tok, PROMPTS, LABELS, "<|im_end|>")
    derived = gold_label_losses(scores, tok, LABELS, "<|im_end|>", gold)
    measured = answer_losses(model, tok, PROMPTS, [g + "<|im_end|>" for g in gold], batch_size=2)
    assert [n for _, n in derived] == [n for _, n in measured]
    np.testing.assert_allclose([s for s, _ in derived], [s for s, _ in measured], rtol=1e-4)
    assert gold_label_losses(scores, tok, LABELS, "<|im_end|>", ["not_a_label", *gold[1:]]) is None


def test_label_chunks_give_the_same_scores_as_one_pass(tiny_model):
    """Scoring labels a few at a time (bounded memory) changes nothing: one candidate per chunk equals all at once."""
    model, tok = tiny_model
    labels = LABELS + ["exchange_rate", "card", "pin", "age"]
    whole = score_labels(model, tok, PROMPTS, labels, "<|im_end|>", batch_size=3, chunk_tokens=10**9)
    chunked = score_labels(model, tok, PROMPTS, labels, "<|im_end|>", batch_size=3, chunk_tokens=1)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_batched_label_scores_match_brute_force_under_eager_and_sdpa(tiny_model_dir):
    """Prompts of different lengths in one left-padded batch, labels split over chunks, both mask forms
    (boolean for SDPA, additive float for eager): every score equals scoring that pair alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    labels = LABELS + ["exchange_rate", "card"]
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
        scores = score_labels(model, tok, PROMPTS, labels, "<|im_end|>", batch_size=3, chunk_tokens=12)
        expected = np.array([[brute_force(model, tok, p, lab, "<|im_end|>") for lab in labels] for p in PROMPTS])
        np.testing.assert_allclose(scores, expected, atol=1e-4, err_msg=impl)


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model):
    model, tok = tiny_model
    batched = generate_greedy(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(s, str) for s in batched)


def test_stop_strings_end_generation_and_are_cut(tiny_model):
    model, tok = tiny_model
    full = generate_greedy(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)
    stops = [o[1:3] for o in full if len(o) >= 3]  # a string the unstopped output contains
    assert stops, full
    stopped = generate_greedy(model, tok, PROMPTS, max_new_tokens=12, batch_size=2, stop=[stops[0]])
    for f, s in zip(full, stopped, strict=True):
        assert s == (f[: f.index(stops[0])] if stops[0] in f else f)
    assert cut_at_stop("Paris\nThe capital", ["\n", "The"]) == "Paris" and cut_at_stop("x", []) == "x"


def test_a_row_draw_follows_its_probabilities_never_picks_a_cut_token_and_repeats_with_its_seed(tiny_model):
    """The engine's draw (its cumulative sum inverted at one uniform number) has the law of ``torch.multinomial``:
    20,000 draws land within 0.015 of each token's probability, a token of probability 0 never comes, the same seed
    gives the same tokens, and a seeded sampled row decodes the same tokens alone and beside other rows."""
    from tunesmith.generation import ContinuousBatch, GenParams, Row
    from tunesmith.generation.sampling import draw

    probs = torch.tensor([0.1, 0.0, 0.6, 0.0, 0.3])
    rng = torch.Generator().manual_seed(7)
    counts = np.bincount([draw(probs, rng) for _ in range(20_000)], minlength=5) / 20_000
    assert counts[1] == counts[3] == 0
    assert np.abs(counts - probs.numpy()).max() < 0.015
    one, other = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [draw(probs, one) for _ in range(50)] == [draw(probs, other) for _ in range(50)]
    assert draw(torch.tensor([0.0, 0.0, 1.0]), torch.Generator().manual_seed(1)) == 2

    model, tok = tiny_model
    ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]

    def decoded(n: int) -> list[int]:
        batch = ContinuousBatch(model, tok, max_rows=8)
        rows = [Row(ids, GenParams(12, temperature=1.0, seed=40 + i, stop_token_ids=())) for i in range(n)]
        for r in rows:
            batch.add(r)
        while batch.busy:
            batch.step()
        return rows[0].generated

    assert decoded(1) == decoded(5)
