"""Tiny random models of three architectures for GGUF export checks, built offline.

- ``llama``: a 2-layer Llama with the embedded SmolLM2 tokenizer (byte-level BPE, pre-tokenizer
  ``smollm`` for llama.cpp), so the converter recognises the tokenizer exactly as for the real model;
- ``qwen2``: a 2-layer Qwen2 (attention biases) with a SentencePiece tokenizer trained in-process on
  BANKING77 messages and ChatML's turn markers (transformers reads any BPE tokenizer of a Qwen2 model with
  Qwen's own pre-tokenizer, and llama.cpp recognises a BPE pre-tokenizer only by the hash of a real
  released tokenizer; a SentencePiece vocabulary needs no such recognition);
- ``gemma2``: a 2-layer Gemma-2 (soft-capping, sliding window, scaled embeddings) with such a
  SentencePiece tokenizer and Gemma's turn markers.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "data" / "banking77_10intents.csv"
SMOL = "smollm2-135m-instruct"
SMOL_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
ARCHITECTURES = ("llama", "qwen2", "gemma2")


def messages(n: int = 20, offset: int = 200) -> list[str]:
    """``n`` BANKING77 messages from the repository's example file (rows past ``offset``)."""
    with open(EXAMPLE_CSV, newline="", encoding="utf-8") as fh:
        rows = [r["text"] for r in csv.DictReader(fh)]
    return rows[offset: offset + n]


def smol_tokenizer(out: Path) -> None:
    """Copy the cached SmolLM2 tokenizer files (``tunesmith models pull`` puts them there)."""
    from tunesmith.models.registry import cached_path

    src = cached_path(SMOL)
    for name in SMOL_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


TURNS = {"qwen2": ("<|im_start|>", "<|im_end|>"), "gemma2": ("<start_of_turn>", "<end_of_turn>")}
END_OF_TURN = {"llama": "<|im_end|>", "qwen2": "<|im_end|>", "gemma2": "<end_of_turn>"}


def spm_tokenizer(out: Path, arch: str) -> None:
    """A 400-piece SentencePiece BPE (byte fallback, the architecture's turn markers) trained in memory."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(messages(600, 0)), model_writer=buf, vocab_size=400, model_type="bpe",
        user_defined_symbols=list(TURNS[arch]), pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
        add_dummy_prefix=False, split_digits=True, remove_extra_whitespaces=False, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>", "add_bos_token": arch == "gemma2", "add_eos_token": False,
              "chat_template": GEMMA_TEMPLATE if arch == "gemma2" else CHATML,
              # as released tokenizers mark their turn markers: special, so llama.cpp parses them as one token
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                                "rstrip": False, "single_word": False} for i, t in enumerate(TURNS[arch], 4)}}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def build(arch: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model with its tokenizer as a Hugging Face folder in ``out``."""
    import torch
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    smol_tokenizer(out) if arch == "llama" else spm_tokenizer(out, arch)
    tok = hf_tokenizer(out, arch)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.convert_tokens_to_ids(END_OF_TURN[arch]),
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config, cls = LlamaConfig(**common, tie_word_embeddings=True), "LlamaForCausalLM"
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common, tie_word_embeddings=True), "Qwen2ForCausalLM"
    elif arch == "gemma2":
        config, cls = Gemma2Config(**common, head_dim=16, sliding_window=64, query_pre_attn_scalar=16), "Gemma2ForCausalLM"
    else:
        raise ValueError(arch)
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config)
    with torch.no_grad():  # larger weights than the default init: logits with clear winners, not near-ties
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.2 if "embed" in name else 0.08)
    model.save_pretrained(out)
    return out


def hf_tokenizer(folder: Path, arch: str):
    """The tokenizer transformers uses for the model (SentencePiece ones read through GemmaTokenizer)."""
    from transformers import AutoTokenizer, GemmaTokenizer

    return AutoTokenizer.from_pretrained(folder) if arch == "llama" else GemmaTokenizer.from_pretrained(folder)
