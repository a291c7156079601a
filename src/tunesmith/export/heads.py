"""A trained head exported as one plain transformers folder (LoRA merged, head.json beside it)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.models.head_predictor import HeadPredictor
from tunesmith.models.heads import write_head_meta


def export_head(folder: Path, out: Path, base_model: str | None = None) -> Path:
    """A trained head as one plain transformers folder: LoRA merged into the base weights, the head layer, the
    tokenizer and head.json (labels or target transform), loadable by ``AutoModelFor…`` and by
    ``tunesmith serve --adapter`` with no base model. A mean-pooled head carries its modeling code
    (``AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)``)."""
    import shutil

    from tunesmith.models.pooled import PooledForSequenceClassification

    predictor = HeadPredictor(folder, base_model=base_model)
    model = predictor.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if isinstance(model, PooledForSequenceClassification):  # save_pretrained copies pooled.py, sets auto_map
        PooledForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    predictor.tokenizer.save_pretrained(out)
    write_head_meta(out, {**predictor.meta, "merged_from": predictor.meta.get("base_model")})
    if (Path(folder) / "labels.json").is_file():
        shutil.copy(Path(folder) / "labels.json", out / "labels.json")
    return out
