"""Multi-task models on HuggingFace transformers, built from tiny configs (no weights); transformers is optional.

Import this module only after ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig, BertForMaskedLM, BertModel, DistilBertConfig, DistilBertModel, ViTConfig, ViTModel,
)

VOCAB = 64
WIDTH = 16


def bert_config(dropout: float = 0.0) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * WIDTH,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )


class BertTwoHeads(nn.Module):
    """A ``BertModel`` with a sentiment head on the pooled output and a topic head on the CLS token."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.bert = BertModel(bert_config(dropout))
        self.sentiment = nn.Linear(WIDTH, 3)
        self.topic = nn.Linear(WIDTH, 4)

    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return {"sentiment": self.sentiment(out.pooler_output), "topic": self.topic(out.last_hidden_state[:, 0])}


class DistilBertTwoHeads(nn.Module):
    """A ``DistilBertModel`` (no pooler, no token types) with a class head on the first token and a regression on
    the mean of the tokens that are not padding."""

    def __init__(self):
        super().__init__()
        self.encoder = DistilBertModel(DistilBertConfig(
            vocab_size=VOCAB, dim=WIDTH, n_layers=2, n_heads=2, hidden_dim=2 * WIDTH, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0,
        ))
        self.intent = nn.Linear(WIDTH, 3)
        self.rating = nn.Linear(WIDTH, 1)

    def forward(self, input_ids, attention_mask):
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        kept = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return {"intent": self.intent(tokens[:, 0]), "rating": self.rating((tokens * kept).sum(1) / kept.sum(1))}


def bert_masked_lm() -> BertForMaskedLM:
    """BERT with its language-model head, whose decoder weight is tied to the word embeddings."""
    return BertForMaskedLM(bert_config())


def token_batch(batch: int, length: int = 8, padded: tuple[int, ...] = (5, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask whose first rows keep only ``padded[i]`` tokens (the rest padding)."""
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, kept in enumerate(padded[:batch]):
        mask[row, kept:] = 0
        ids[row, kept:] = 0
    return ids, mask


class ViTTwoHeads(nn.Module):
    """A ``ViTModel`` (16x16 images, 4x4 patches) with a class head on the CLS token and a regression on the mean."""

    def __init__(self):
        super().__init__()
        self.vit = ViTModel(ViTConfig(
            image_size=16, patch_size=4, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=2 * WIDTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ), add_pooling_layer=False)
        self.label = nn.Linear(WIDTH, 5)
        self.score = nn.Linear(WIDTH, 1)

    def forward(self, pixel_values):
        tokens = self.vit(pixel_values=pixel_values).last_hidden_state
        return {"label": self.label(tokens[:, 0]), "score": self.score(tokens[:, 1:].mean(1))}


class BertTaskLosses(nn.Module):
    """``BertTwoHeads`` as a transformers ``Trainer`` trains it: the labels in, the per-task losses out beside their
    total."""

    def __init__(self):
        super().__init__()
        self.model = BertTwoHeads()

    def forward(self, input_ids, attention_mask, sentiment, topic):
        out = self.model(input_ids, attention_mask)
        losses = {"sentiment": nn.functional.cross_entropy(out["sentiment"], sentiment),
                  "topic": nn.functional.cross_entropy(out["topic"], topic)}
        return {"loss": sum(losses.values()), "losses": losses}


def labelled_tokens(count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` examples for ``BertTaskLosses``: random token ids, some padded, and random labels."""
    ids, mask = token_batch(count, padded=(5, 3, 6))
    return [{"input_ids": i, "attention_mask": m, "sentiment": torch.randint(0, 3, ()),
             "topic": torch.randint(0, 4, ())} for i, m in zip(ids, mask)]
