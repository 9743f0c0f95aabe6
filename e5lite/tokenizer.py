"""Tokenisation (tokenizer.json, or vocab.txt) and max length of a model folder (its prompts: ``prompts.py``).

BERT checkpoints (E5, multilingual-e5-small's weights aside) carry a WordPiece ``tokenizer.json`` that runs as
it is. multilingual-e5 carries XLM-R's sentencepiece Unigram; transformers' ``XLMRobertaTokenizer`` does not
run that file's pipeline but rebuilds one around its vocabulary (see ``_as_transformers_xlmr``), and the
reference is what transformers produces, so e5lite rebuilds the same."""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from .config import BertConfig
from .errors import E5LiteError, TextEncodingError, TextTooLongError
from .fast_tokenizer import SAMPLE as FAST_PATH_SAMPLE
from .fast_tokenizer import TokieFastPath
from .files import json_field, read_json
from .ragged import Ragged
from .text_cut import TextCutter

logger = logging.getLogger("e5lite")


def resolve_max_length(model_dir, config: BertConfig, max_length: int | None = None) -> int:
    """sentence_bert_config.json's max_seq_length, else min(model_max_length, the model's positions).

    An explicit ``max_length`` wins but may not exceed the positions (``config.max_tokens``: XLM-R's 514
    position rows hold 512 tokens).
    """
    d = Path(model_dir)
    limit = config.max_tokens
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2 or max_length > limit:
            raise ValueError(f"max_length must be an int in [2, {limit}] (the model's positions), got {max_length!r}")
        return max_length
    st_path, tok_path = d / "sentence_bert_config.json", d / "tokenizer_config.json"
    st = json_field(st_path, read_json(st_path, default={}, expect=dict), "max_seq_length", (int,))
    if st is not None and st < 1:
        raise E5LiteError(f"{st_path}: field 'max_seq_length' must be a positive integer, got {st}")
    if st:
        return min(st, limit)
    tok = json_field(tok_path, read_json(tok_path, default={}, expect=dict), "model_max_length", (int, float))
    if tok is not None and tok > 0:
        return int(min(tok, limit))
    return limit


XLMR_CLASSES = ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast")
XLMR_UNK_ID = 3  # transformers' XLMRobertaTokenizer builds its Unigram with unk_id=3, whatever the file says


def _token_name(value) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_transformers_xlmr(tok: Tokenizer, raw: dict, tok_config: dict) -> Tokenizer:
    """The pipeline transformers' XLMRobertaTokenizer runs for this tokenizer.json: the file's vocabulary and
    added tokens, only its Precompiled (sentencepiece) normaliser, WhitespaceSplit + Metaspace pre-tokenisation
    and ``<s> $A </s>``. The file's own pipeline (Metaspace alone, a Replace normaliser) differs on whitespace:
    it gives "query: " a trailing "▁" token where transformers gives none."""
    model = raw.get("model", {})
    if model.get("unk_id") != XLMR_UNK_ID or model.get("byte_fallback"):
        tok.model = Unigram([tuple(v) for v in model["vocab"]], unk_id=XLMR_UNK_ID, byte_fallback=False)
    norm = raw.get("normalizer") or {}
    parts = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    charsmap = next(
        (n["precompiled_charsmap"] for n in parts if n.get("type") == "Precompiled" and n.get("precompiled_charsmap")),
        None,
    )
    tok.normalizer = normalizers.Precompiled(base64.b64decode(charsmap)) if charsmap else normalizers.Sequence([])
    scheme = "always" if tok_config.get("add_prefix_space", True) else "never"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    bos = _token_name(tok_config.get("bos_token")) or "<s>"
    eos = _token_name(tok_config.get("eos_token")) or "</s>"
    for t in (bos, eos):
        if tok.token_to_id(t) is None:
            raise E5LiteError(f"XLM-R tokenizer has no special token {t!r}")
    tok.post_processor = processors.TemplateProcessing(
        single=[bos, "$A", eos],
        pair=[bos, "$A", eos, eos, "$B", eos],
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    return tok


def _pad_id(tok: Tokenizer, tok_config: dict, config_pad: int) -> int:
    """The tokenizer's own pad id: tokenizer_config.json's pad_token, the file's padding, [PAD] or <pad>;
    else config.json's pad_token_id. (multilingual-e5-small is a BERT whose XLM-R tokenizer pads with 1.)"""
    name = _token_name(tok_config.get("pad_token"))
    pad_id = tok.token_to_id(name) if name is not None else None
    if pad_id is not None:
        return pad_id
    if tok.padding:
        return int(tok.padding["pad_id"])
    for name in ("[PAD]", "<pad>"):
        pad_id = tok.token_to_id(name)
        if pad_id is not None:
            return pad_id
    return config_pad


TOKENIZER_BACKENDS = ("auto", "tokie", "tokenizers")


class TextTokenizer:
    """Wraps ``tokenizers.Tokenizer``: adds the model's specials ([CLS] ... [SEP], or <s> ... </s>), truncates
    to ``max_length``, never pads (``pad_token_id`` is for the batches).

    ``backend``: "auto" encodes with tokie (the ``fast`` extra) when it is installed and agrees with
    `tokenizers` (see ``fast_tokenizer.py``), else with `tokenizers`; "tokie" requires it; "tokenizers" never
    uses it. ``backend`` afterwards says which one runs."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token_id: int = 0, backend: str = "auto"):
        if backend not in TOKENIZER_BACKENDS:
            raise ValueError(f"tokenizer_backend must be one of {TOKENIZER_BACKENDS}, got {backend!r}")
        self.max_length = max_length
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.pad_token_id = pad_token_id
        self._fast, self.backend, self.fast_unavailable = None, "tokenizers", "tokenizer_backend='tokenizers'"
        if backend != "tokenizers":
            self._fast, self.fast_unavailable = TokieFastPath.build(self._tok, max_length)
            if self._fast is not None:
                self.backend = "tokie"
            elif backend == "tokie":
                raise E5LiteError(f"tokenizer_backend='tokie' cannot be used: {self.fast_unavailable}")
            else:
                logger.info("tokenising with tokenizers: %s", self.fast_unavailable)

    @classmethod
    def from_dir(cls, model_dir, max_length: int, config_pad_token_id: int = 0, backend: str = "auto") -> TextTokenizer:
        d = Path(model_dir)
        tok_config = read_json(d / "tokenizer_config.json", default={}, expect=dict)
        if (d / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise E5LiteError(f"cannot read {d / 'tokenizer.json'}: {e}") from None
            if tok_config.get("tokenizer_class") in XLMR_CLASSES:
                raw = read_json(d / "tokenizer.json")
                if raw.get("model", {}).get("type") != "Unigram":
                    raise E5LiteError(
                        f"{d / 'tokenizer.json'}: tokenizer_class {tok_config['tokenizer_class']} "
                        f"needs a Unigram model, found {raw.get('model', {}).get('type')!r}"
                    )
                tok = _as_transformers_xlmr(tok, raw, tok_config)
        elif (d / "vocab.txt").is_file():
            from tokenizers import BertWordPieceTokenizer

            lower = tok_config.get("do_lower_case", True)
            tok = BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=bool(lower))._tokenizer  # the Tokenizer
        else:
            raise E5LiteError(f"no tokenizer in {d}: expected tokenizer.json or vocab.txt")
        return cls(tok, max_length, _pad_id(tok, tok_config, config_pad_token_id), backend)

    def __call__(self, texts: Sequence[str], truncate: bool = True, offset: int = 0) -> list[np.ndarray]:
        """Token ids per text (variable lengths, at most max_length), as int32 arrays. ``truncate=False``
        raises TextTooLongError naming the first text that does not fit; a text that cannot be tokenised
        (e.g. a lone surrogate, which is not Unicode text) raises TextEncodingError naming it. ``offset``: the
        index of texts[0] in the caller's list, for those errors."""
        return self.encode_ragged(texts, truncate, offset).tolist()

    def encode_ragged(self, texts: Sequence[str], truncate: bool = True, offset: int = 0) -> Ragged:
        """As ``__call__``, laid end to end in one ``Ragged`` (what the planner takes: no array per text)."""
        texts = self.cut(texts, "right")
        fast = self._fast
        # a call of at most SAMPLE texts would be encoded twice (all of them are re-encoded as the sample), so
        # the reference alone does it, in less time than both
        if fast is not None and len(texts) > FAST_PATH_SAMPLE:
            try:
                ids, full = fast.encode(texts)
            except Exception:  # e.g. a lone surrogate: the reference path below names the text
                ids = None
            if ids is not None:
                bad = fast.disagreement(self._tok, texts, ids, fast.sample(full))
                if bad is None:
                    over = np.flatnonzero(full > fast.max_body) if not truncate else np.zeros(0, np.intp)
                    if len(over):
                        raise TextTooLongError(offset + int(over[0]), self.max_length)
                    return ids
                logger.warning(
                    "tokie's token ids differ from tokenizers' for text %d; tokenising with tokenizers from now on",
                    offset + bad,
                )
                self._fast, self.backend = None, "tokenizers"
                self.fast_unavailable = f"tokie disagreed with tokenizers on text {offset + bad} of a call"
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use, which is faster.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        try:
            encodings = encode(texts)
        except Exception as e:
            raise self._failure(texts, offset, e) from None
        if not truncate:
            for i, encoding in enumerate(encodings):
                if encoding.overflowing:
                    raise TextTooLongError(offset + i, self.max_length)
        lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        return Ragged(
            np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, int(lengths.sum())), lengths
        )

    def _failure(self, texts: list[str], offset: int, error: Exception) -> TextEncodingError:
        """The first text that fails alone, as an error naming its index (the batch call does not say)."""
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                return TextEncodingError(
                    offset + i, f"it is not valid Unicode text ({e.reason} at character {e.start}: {t[e.start]!r})"
                )
            try:
                self._tok.encode(t)
            except Exception as e:
                return TextEncodingError(offset + i, f"{type(e).__name__}: {e}")
        return TextEncodingError(offset, f"the batch failed ({type(error).__name__}: {error})")

    def cut(self, texts: Sequence[str], side: str) -> list[str]:
        """``texts`` with those far past max_length replaced by a piece whose truncated ids are the whole
        text's, cut from the ``side`` truncation cuts ("right" or "left"; see ``text_cut.py``): truncating a
        long text then costs no more than tokenising a page. Only for truncating (or refusing) paths: chunked
        long inputs need the whole text (``body_ids``)."""
        if "_cutter" not in self.__dict__:
            before, after = self.special_ids
            self._cutter = TextCutter.build(self._variant("none"), self.max_length - len(before) - len(after))
        return list(texts) if self._cutter is None else self._cutter.cut(texts, side)

    def _variant(self, key: str, **truncation) -> Tokenizer:
        """A copy of the reference tokenizer with other truncation (``{}``: none), made once."""
        cache = self.__dict__.setdefault("_variants", {})
        if key not in cache:
            tok = Tokenizer.from_str(self._tok.to_str())
            tok.no_padding()
            if truncation:
                tok.enable_truncation(self.max_length, **truncation)
            else:
                tok.no_truncation()
            cache[key] = tok
        return cache[key]

    def _encode_with(self, tok: Tokenizer, texts: list[str], offset: int, **kw) -> list:
        try:
            return tok.encode_batch(texts, **kw)
        except Exception as e:
            raise self._failure(texts, offset, e) from None

    def body_ids(self, texts: Sequence[str], offset: int = 0) -> list[np.ndarray]:
        """Token ids per text without the special tokens and without truncation (int32): what long inputs
        are cut into windows from."""
        encodings = self._encode_with(self._variant("none"), list(texts), offset, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    @property
    def special_ids(self) -> tuple[list[int], list[int]]:
        """The ids the model's template puts before and after a text: ([CLS], [SEP]) or (<s>, </s>)."""
        if "_specials" not in self.__dict__:
            marker = "e5lite"
            enc = self._variant("none").encode(marker)
            body = self._variant("none").encode(marker, add_special_tokens=False).ids
            ids = enc.ids
            at = next(i for i in range(len(ids) - len(body) + 1) if ids[i : i + len(body)] == body)
            self._specials = (ids[:at], ids[at + len(body) :])
        return self._specials

    def encode_left(self, texts: Sequence[str], offset: int = 0) -> list[np.ndarray]:
        """As ``__call__`` with truncation from the left: a long text keeps its last tokens (transformers'
        ``truncation_side="left"``), the special tokens stay."""
        encodings = self._encode_with(self._variant("left", direction="left"), self.cut(texts, "left"), offset)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def encode_tokens(
        self, texts: Sequence[str], *, add_special_tokens: bool = True, offset: int = 0
    ) -> list[list[tuple[int, str, bool, tuple[int, int] | None]]]:
        """Per text, per token: (id, token string, special?, (start, stop) character offsets in the text, or
        None for a special token), not truncated (TEI's ``/tokenize``)."""
        encodings = self._encode_with(self._variant("none"), list(texts), offset, add_special_tokens=add_special_tokens)
        return [
            [
                (i, t, bool(s), None if s else (a, b))
                for i, t, s, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets, strict=True)
            ]
            for e in encodings
        ]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids, as the tokenizer's decoder writes it."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def tokens(self, ids) -> list[str]:
        """The token strings of ids ("[CLS]", "token", "##izer", or "<s>", "\u2581token", ...), e.g. for axis
        labels."""
        return [self._tok.id_to_token(int(i)) or f"<{int(i)}>" for i in ids]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def kind(self) -> str:
        """The tokenizer's model: "WordPiece" (BERT, E5) or "Unigram" (XLM-R's sentencepiece)."""
        return type(self._tok.model).__name__
