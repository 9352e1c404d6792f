"""The sweep's transformers sample: common architectures of HuggingFace ``transformers`` built from small configs
(no weights), each pooled into ``FEATURES`` outputs by a linear classifier, so that it sits under task heads as the
timm and torchvision backbones do. Names are ``"transformers/<model type>"``.

Text models take ``{"input_ids", "attention_mask"}`` (a batch whose first rows are padded) and average the hidden
states over the tokens the mask keeps; vision models take images and average over their tokens (or use the pooled
output of a CNN). torch.fx cannot trace transformers 5.x: these models show what the torch.export route covers.
"""

from __future__ import annotations

import torch
from torch import nn

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
IMAGE = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# model type -> (config class, model class, config arguments, width of the pooled output); classes by their names.
MODELS = {
    "bert": ("BertConfig", "BertModel", TEXT, 32),
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0), 32),
    "roberta": ("RobertaConfig", "RobertaModel", TEXT, 32),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", TEXT, 32),
    "albert": ("AlbertConfig", "AlbertModel", dict(TEXT, embedding_size=16), 32),
    "electra": ("ElectraConfig", "ElectraModel", dict(TEXT, embedding_size=16), 32),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", TEXT, 32),
    "mpnet": ("MPNetConfig", "MPNetModel", TEXT, 32),
    "gpt2": ("GPT2Config", "GPT2Model", dict(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
        use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), 32),
    "t5": ("T5Config", "T5EncoderModel", dict(
        vocab_size=100, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, dropout_rate=0.0), 32),
    "vit": ("ViTConfig", "ViTModel", IMAGE, 32),
    "deit": ("DeiTConfig", "DeiTModel", IMAGE, 32),
    "swin": ("SwinConfig", "SwinModel", dict(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0), 32),
    "convnext": ("ConvNextConfig", "ConvNextModel", dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), 16),
    "resnet": ("ResNetConfig", "ResNetModel", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]), 16),
    "mobilevit": ("MobileViTConfig", "MobileViTModel", dict(
        image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 32],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0), 32),
}
SIZE = 32  # pixels of the vision models' images
LENGTH = 16  # tokens of the text models' sequences


class Pooled(nn.Module):
    """A transformers model, pooled (by ``forward``) into ``width`` values per sample, then a linear classifier."""

    def __init__(self, model: nn.Module, width: int, features: int):
        super().__init__()
        self.model = model
        self.classifier = nn.Linear(width, features)


class TextBackbone(Pooled):
    """A text model's hidden states averaged over the tokens that are not padding, then a linear classifier."""

    def forward(self, tokens):
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        kept = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * kept).sum(1) / kept.sum(1))


class ImageBackbone(Pooled):
    """A vision model's pooled output (a CNN's), or its tokens averaged, then a linear classifier."""

    def forward(self, images):
        out = self.model(pixel_values=images)
        pooled = getattr(out, "pooler_output", None)
        pooled = pooled.flatten(1) if pooled is not None and pooled.dim() in (2, 4) else \
            out.last_hidden_state.mean(1)
        return self.classifier(pooled)


def backbone(model_type: str, features: int) -> nn.Module:
    """``model_type``'s small model, random weights, pooled into ``features`` outputs."""
    import transformers

    config_class, model_class, arguments, width = MODELS[model_type]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**arguments))
    return (TextBackbone if is_text(model_type) else ImageBackbone)(model, width, features)


def is_text(model_type: str) -> bool:
    return "vocab_size" in MODELS[model_type][2]


def inputs(model_type: str, batch: int, generator: torch.Generator):
    """A batch for ``model_type``: images, or token ids with a mask whose first rows are padded."""
    if not is_text(model_type):
        return torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    ids = torch.randint(1, MODELS[model_type][2]["vocab_size"], (batch, LENGTH), generator=generator)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    for row, kept in enumerate((LENGTH // 2, LENGTH - 3)[:batch]):
        mask[row, kept:] = 0
        ids[row, kept:] = 0
    return {"input_ids": ids, "attention_mask": mask}
