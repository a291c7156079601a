"""A sequence head on a sentence embedding: the mean of a model's token states, L2-normalised, then a linear layer.

Sentence-embedding encoders (all-MiniLM-L6-v2, multilingual-e5) are trained to mean their token states into
one unit vector; transformers' ``BertForSequenceClassification`` reads the [CLS] token through a pooler those
models never trained, so a head on it starts from a worse text representation than the embedding baseline
it is compared with. This head reads the embedding the model was trained to produce, which also lets a
linear probe (logistic or ridge regression on those embeddings) start it (``train.head_init: probe``).

The file imports only torch and transformers: an exported head folder carries a copy of it as its modeling
code, so ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

ARCHITECTURE = "PooledForSequenceClassification"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The unit-length mean of the token states that the attention mask keeps (all of them without one)."""
    if attention_mask is None:
        pooled = hidden.mean(1)
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled.float(), dim=-1).to(hidden.dtype)


class PooledForSequenceClassification(PreTrainedModel):
    """``backbone`` (any ``AutoModel``) → mean pooling → dropout → ``score`` (``num_labels`` outputs; one output
    trains with MSE, more with cross-entropy), in the ``*ForSequenceClassification`` interface."""

    config_class = PretrainedConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # the loss is a batch mean: the Trainer scales it for gradient accumulation

    def __init__(self, config, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config)
        if getattr(self.backbone, "pooler", None) is not None:  # BERT's [CLS] pooler: unused here
            self.backbone.pooler = None
        p = getattr(config, "classifier_dropout", None)
        p = p if p is not None else getattr(config, "hidden_dropout_prob", 0.0)
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.config.architectures = [ARCHITECTURE]
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def embed(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs) -> torch.Tensor:
        """The sentence embedding the head reads: one unit vector per row."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        for key in ("return_dict", "labels", "num_items_in_batch"):
            kwargs.pop(key, None)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        pooled = self.embed(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.score(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.view(-1).float(), labels.view(-1).float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
