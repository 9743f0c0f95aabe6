"""WordPiece tokenisation (tokenizer.json, or vocab.txt), max length and prompts of a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .config import BertConfig
from .errors import E5LiteError, TextTooLongError
from .files import read_json

DEFAULT_PROMPTS = {"query": "query: ", "passage": "passage: "}


def resolve_max_length(model_dir, config: BertConfig, max_length: int | None = None) -> int:
    """sentence_bert_config.json's max_seq_length, else min(model_max_length, max_position_embeddings).

    An explicit ``max_length`` wins but may not exceed max_position_embeddings.
    """
    d = Path(model_dir)
    limit = config.max_position_embeddings
    if max_length is not None:
        if not isinstance(max_length, int) or max_length < 2 or max_length > limit:
            raise ValueError(f"max_length must be an int in [2, {limit}] (max_position_embeddings), "
                             f"got {max_length!r}")
        return max_length
    st = read_json(d / "sentence_bert_config.json", default={}).get("max_seq_length")
    if st:
        return min(int(st), limit)
    tok = read_json(d / "tokenizer_config.json", default={}).get("model_max_length")
    if isinstance(tok, (int, float)) and tok > 0:
        return int(min(tok, limit))
    return limit


def read_prompts(model_dir) -> tuple[dict[str, str], str | None]:
    """Prompts from config_sentence_transformers.json when it defines any, else E5's query/passage."""
    cfg = read_json(Path(model_dir) / "config_sentence_transformers.json", default={})
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise E5LiteError(f"{model_dir}/config_sentence_transformers.json: 'prompts' must map names to strings")
    default = cfg.get("default_prompt_name") or None
    prompts = dict(prompts) if prompts else dict(DEFAULT_PROMPTS)
    if default is not None and default not in prompts:
        raise E5LiteError(f"default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    return prompts, default


class WordPieceTokenizer:
    """Wraps ``tokenizers.Tokenizer``: adds [CLS]/[SEP], truncates to ``max_length``, never pads."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        self.max_length = max_length
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        pad = self._tok.token_to_id("[PAD]")
        self.pad_token_id = 0 if pad is None else pad

    @classmethod
    def from_dir(cls, model_dir, max_length: int) -> "WordPieceTokenizer":
        d = Path(model_dir)
        if (d / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise E5LiteError(f"cannot read {d / 'tokenizer.json'}: {e}") from None
        elif (d / "vocab.txt").is_file():
            from tokenizers import BertWordPieceTokenizer
            lower = read_json(d / "tokenizer_config.json", default={}).get("do_lower_case", True)
            tok = BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=bool(lower))
        else:
            raise E5LiteError(f"no tokenizer in {d}: expected tokenizer.json or vocab.txt")
        return cls(tok, max_length)

    def __call__(self, texts: Sequence[str], truncate: bool = True) -> list[np.ndarray]:
        """Token ids per text (variable lengths, at most max_length), as int32 arrays. ``truncate=False``
        raises TextTooLongError naming the first text that does not fit."""
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use, which is faster.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts))
        if not truncate:
            for i, e in enumerate(encodings):
                if e.overflowing:
                    raise TextTooLongError(i, self.max_length)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def tokens(self, ids) -> list[str]:
        """The token strings of ids ("[CLS]", "token", "##izer", ...), e.g. for axis labels."""
        return [self._tok.id_to_token(int(i)) or f"<{int(i)}>" for i in ids]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()
