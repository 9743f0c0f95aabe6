"""Encoder configuration, read from a Hugging Face ``config.json`` (HF field names): BERT and XLM-RoBERTa.

Both are the same post-LayerNorm encoder; XLM-R (multilingual-e5) differs only in where positions start
(``position_offset``), besides its defaults and its tokenizer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .files import read_json

# hidden_act -> the activation ``model.activation`` computes: exact erf GELU, tanh-approximated GELU, or ReLU.
ACTIVATIONS = {
    "gelu": "gelu",  # exact erf GELU, as torch.nn.functional.gelu
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}

# model_type -> the weight table in weights.py. XLM-R counts positions from padding_idx + 1 (transformers'
# create_position_ids_from_input_ids), so its position table has pad_token_id + 1 rows before position 0.
ARCHITECTURES = ("bert", "xlm-roberta")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    model_type: str = "bert"
    hidden_dropout_prob: float = 0.1  # training only (e5lite.train); inference never drops
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: e5lite runs BERT and XLM-RoBERTa encoders "
                f"(model_type {' or '.join(map(repr, ARCHITECTURES))})"
            )
        if self.position_embedding_type != "absolute":
            raise ConfigError(f"unsupported position_embedding_type {self.position_embedding_type!r}: only 'absolute'")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
            )
        if self.max_tokens < 2:
            raise ConfigError(
                f"max_position_embeddings {self.max_position_embeddings} leaves no room for "
                f"tokens after the position offset {self.position_offset}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """Row of the position table for a sequence's first token: 0 (BERT), pad_token_id + 1 (XLM-R)."""
        return self.pad_token_id + 1 if self.model_type == "xlm-roberta" else 0

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table holds (XLM-R: 514 rows, 512 tokens)."""
        return self.max_position_embeddings - self.position_offset

    @property
    def activation(self) -> str:
        return ACTIVATIONS[self.hidden_act]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        """Keeps the fields e5lite uses; other HF fields (dropout, architectures, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if "model_type" not in d:
            raise ConfigError(f"config has no 'model_type' (expected one of {', '.join(ARCHITECTURES)})")
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        d = read_json(path, error=ConfigError, expect=dict)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: bad field value: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
