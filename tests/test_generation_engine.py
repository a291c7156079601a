"""The one generation engine (continuous batching) gives exactly what evaluation's earlier path gave
(``model.generate`` on length-sorted fixed batches) under greedy decoding: on rows of very different
lengths, with fewer batch slots than rows, and with LoRA adapters mixed row by row."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tunesmith.generation import BASE, ContinuousBatch, GenParams, Row, generate, generate_greedy
from tunesmith.generation.engine import prefill_groups

from .conftest import banking_rows

PEER = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "fixed_batch_generate.py"


def _peer():
    spec = importlib.util.spec_from_file_location("fixed_batch_generate", PEER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixed_batches = _peer()


def redraw(model, std: float = 0.2):
    """Seeded weights large enough that greedy answers differ from prompt to prompt and step to step (the tiny
    model's initial weights answer newlines to everything, which would make any two paths agree)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to share between threads: on a busy machine two threads
    wait on each other for most of each step (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def varied(tiny_model):
    model, tok = tiny_model
    return redraw(model), tok


def mixed_prompts(tok, n: int = 10) -> list[str]:
    """Chat prompts from 1 to about 20 real messages long: 10 to a few hundred tokens."""
    texts = [r["text"] for r in banking_rows(("card_arrival", "pin_blocked", "age_limit", "exchange_rate"), 6)]
    out = []
    for i in range(n):
        content = " ".join(texts[i : i + 1 + (i * 7) % 20])
        out.append(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True))
    return out


def test_greedy_engine_equals_fixed_batches_of_model_generate(varied):
    model, tok = varied
    prompts = mixed_prompts(tok)
    lengths = sorted(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert lengths[0] < 40 and lengths[-1] > 200, lengths
    expected = fixed_batches.generate_greedy(model, tok, prompts, 10, batch_size=4)
    assert generate_greedy(model, tok, prompts, 10, batch_size=3) == expected
    stop = [s for s in (e[2:4] for e in expected) if s.strip()][0]  # ends some rows early, others run on
    stopped = fixed_batches.generate_greedy(model, tok, prompts, 10, batch_size=4, stop=[stop])
    assert stopped != expected and len(set(expected)) == len(expected)
    assert generate_greedy(model, tok, prompts, 10, batch_size=3, stop=[stop]) == stopped


def test_rows_leave_as_they_finish_and_waiting_rows_join(varied):
    """Rows with 2 to 14 new tokens through 3 slots: every step runs only unfinished rows, waiting rows join
    a batch that is mid-generation, and each row's text equals model.generate's with its own limit."""
    model, tok = varied
    prompts = mixed_prompts(tok, 9)
    limits = [2 + (5 * i) % 13 for i in range(len(prompts))]
    batch = ContinuousBatch(model, tok, max_rows=3)
    rows = [Row(tok(p, add_special_tokens=False)["input_ids"], GenParams(m)) for p, m in zip(prompts, limits, strict=True)]
    for row in rows:
        batch.add(row)
    joined_mid_flight = finished_early = 0
    while batch.busy:
        before = {id(r): len(r.generated) for r in batch.active}
        batch.step()
        assert len(batch.active) <= 3 and all(len(r.generated) < r.params.max_tokens for r in batch.active)
        now = {id(r) for r in batch.active}
        joined_mid_flight += bool(now - before.keys()) and any(g > 0 for k, g in before.items() if k in now)
        finished_early += bool(before.keys() - now) and bool(now & before.keys())
    assert joined_mid_flight and finished_early
    for row, prompt, limit in zip(rows, prompts, limits, strict=True):
        assert row.finish_reason in ("stop", "length")
        assert batch.text(row) == fixed_batches.generate_greedy(model, tok, [prompt], limit)[0]


def test_prefill_groups_keep_padding_small_and_short_prompts_together():
    lengths = [57, 472, 40, 300, 50, 400, 38, 45]
    groups = prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:  # padded tokens within 1.25x the real ones
        assert max(lengths[i] for i in g) * len(g) <= 1.25 * sum(lengths[i] for i in g)
    assert groups == [[1, 5, 3], [0, 4, 7, 2, 6]]  # the long prompts together, the short ones together
    assert prefill_groups([50] * 16) == [list(range(16))]


@pytest.fixture()
def two_adapters(tiny_model_dir, tmp_path):
    """The tiny model with two saved LoRA adapters ("a", "b") of random, non-zero weights, loaded by name."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(tmp_path / name)
    base = redraw(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    model = PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    return model.eval()


def test_adapters_mixed_row_by_row_equal_each_adapter_alone(two_adapters, tiny_model):
    model, (_, tok) = two_adapters, tiny_model
    prompts = mixed_prompts(tok, 9)
    names = [("a", BASE, "b")[i % 3] for i in range(len(prompts))]
    mixed = generate_greedy(model, tok, prompts, 8, batch_size=4, adapters=names)
    alone = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        alone[name] = fixed_batches.generate_greedy(model, tok, prompts, 8, batch_size=4)
    with model.disable_adapter():
        alone[BASE] = fixed_batches.generate_greedy(model, tok, prompts, 8, batch_size=4)
    assert mixed == [alone[n][i] for i, n in enumerate(names)]
    assert alone["a"] != alone[BASE] and alone["b"] != alone["a"]  # the adapters change the answers
    model.set_adapter("b")  # unnamed rows run the model as it is: its active adapter
    assert generate_greedy(model, tok, prompts, 8, batch_size=4) == alone["b"]


def test_sampling_is_per_row_and_goes_through_the_warpers(varied):
    model, tok = varied
    prompts = mixed_prompts(tok, 6)
    greedy = generate_greedy(model, tok, prompts, 8, batch_size=3)
    # top-p that keeps only the most likely token: sampling at any temperature is then greedy decoding
    assert [g.texts[0] for g in generate(model, tok, prompts, 8, 3, temperature=1.5, top_p=1e-9, seed=0)] == greedy
    sampled = generate(model, tok, prompts, 8, 2, temperature=1.5, n=2, seed=7)
    again = generate(model, tok, prompts[:1], 8, 1, temperature=1.5, n=2, seed=7)
    assert again[0].texts == sampled[0].texts  # a seeded row draws the same whatever shares its batch
    assert any(g.texts[0] != g.texts[1] for g in sampled)  # the n choices draw with their own seeds
    assert [g.texts[0] for g in sampled] != greedy
