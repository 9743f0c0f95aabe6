"""Multilingual text, an XLM-R-style sentencepiece tokenizer trained on it, and random XLM-R / BERT models
with that tokenizer at the multilingual-e5 shapes (for the parity tests of the E5 family).

Text: Faker's locale word lists and names (real words in Cyrillic, CJK, Arabic, Devanagari, Greek, Thai, Latin
scripts, and emoji) and Python's own docs; deterministic (seeded). The tokenizer: sentencepiece trains a Unigram
model with its nmt_nfkc normaliser; ``write_xlmr_tokenizer`` lays it out as XLM-R's published tokenizer.json does
(fairseq ids <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last; Precompiled + Replace normaliser; Metaspace
pre-tokeniser), with ``tokenizer_class: XLMRobertaTokenizer``, so transformers loads it as it loads
multilingual-e5's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# multilingual-e5-base / -large (XLM-R base / large), and multilingual-e5-small (a BERT with XLM-R's tokenizer).
# The vocabulary is the published one (250,002 rows, 250,037 for -small); the trained tokenizer uses its first
# rows only, as a real text uses a few of the published ones.
XLMR_SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=8002),
    "me5-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=250002),
    "me5-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      vocab_size=250002),
}
ME5_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
                 vocab_size=250037, max_position_embeddings=512)
TOKENIZER_VOCAB = 6000  # sentencepiece pieces; the tokenizer has 6000 + 2 ids (<pad> and <mask> added)

LOCALES = ("ru_RU", "zh_CN", "ar_AA", "ja_JP", "el_GR", "th_TH", "uk_UA", "fr_FR", "de_DE", "en_US")


def corpus(n_per_locale: int = 300, seed: int = 0) -> list[str]:
    """Sentences in many scripts (Faker's word lists, Devanagari names and places, emoji) and pydoc text."""
    from faker import Faker
    from pydoc_data.topics import topics
    out = []
    for loc in LOCALES:
        f = Faker(loc)
        f.seed_instance(seed)
        out += [f.text(max_nb_chars=160).replace("\n", " ") for _ in range(n_per_locale)]
    hi = Faker("hi_IN")
    hi.seed_instance(seed)
    out += [f"{hi.name()} {hi.city()} {hi.address()}".replace("\n", " ") for _ in range(n_per_locale)]
    em = Faker()
    em.seed_instance(seed)
    out += [f"{em.sentence()} {em.emoji()}{em.emoji()}" for _ in range(n_per_locale // 3)]
    out += [p.strip() for t in sorted(topics)[:60] for p in topics[t].split("\n\n") if len(p.strip()) > 40]
    return out


def sample_texts(seed: int = 1) -> list[str]:
    """Parity inputs: one text per script, mixed scripts, whitespace edge cases, an empty text, and one text
    several times past 512 tokens."""
    from faker import Faker
    texts = []
    for loc in LOCALES[:7]:
        f = Faker(loc)
        f.seed_instance(seed)
        texts.append(f.text(max_nb_chars=200).replace("\n", " "))
    hi = Faker("hi_IN")
    hi.seed_instance(seed)
    texts.append(f"{hi.name()}, {hi.city()}: {hi.job()}")
    em = Faker()
    em.seed_instance(seed)
    texts.append(f"{em.sentence()} {em.emoji()} {em.emoji()}{em.emoji()}")
    ru, zh = Faker("ru_RU"), Faker("zh_CN")
    ru.seed_instance(seed + 1)
    zh.seed_instance(seed + 1)
    long_text = " ".join(f"{ru.sentence()} {zh.sentence()}" for _ in range(120))
    return texts + [
        long_text,
        "",
        "   ",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines  and   runs of spaces",
        "ﬁ ligature, full-width ＡＢＣ１２３ and ① (NFKC)",
    ]


def write_xlmr_tokenizer(folder: Path, texts: list[str], vocab: int = TOKENIZER_VOCAB) -> Path:
    """Trains sentencepiece on ``texts`` and writes tokenizer.json, tokenizer_config.json and
    special_tokens_map.json in XLM-R's published layout into ``folder``."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc",
                                   character_coverage=0.9995, seed_sentencepiece_size=200_000,
                                   num_threads=1, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    # fairseq's ids, as transformers' XLMRobertaConverter lays them out: specials first, <mask> last
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(p.piece, p.score) for p in proto.pieces[3:]] + [("<mask>", 0.0)]
    tok = Tokenizer(Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<pad>", "</s>", "<unk>")]
                           + [AddedToken("<mask>", special=True, lstrip=True)])
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, **specials}))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


def random_xlmr(name: str, seed: int = 0):
    """A random-init transformers XLMRobertaModel (eager attention) at a multilingual-e5 shape."""
    import transformers
    from conftest import random_init
    cfg = transformers.XLMRobertaConfig(**XLMR_SHAPES[name], max_position_embeddings=514, type_vocab_size=1,
                                        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return random_init(lambda: transformers.XLMRobertaModel(cfg, add_pooling_layer=True), seed)


def random_me5_small(seed: int = 0):
    """multilingual-e5-small's layout: a BERT (12 x 384) whose tokenizer is XLM-R's."""
    import transformers
    from conftest import random_init
    cfg = transformers.BertConfig(**ME5_SMALL, pad_token_id=0)
    return random_init(lambda: transformers.BertModel(cfg, add_pooling_layer=True), seed)


def reference(model, tokenizer, texts: list[str], prompt: str = "", max_length: int = 512):
    """transformers' own tokenizer + forward + mean pooling -> (ids per text, last hidden [B, S, D], mask [B, S],
    normalised embeddings [B, D]); the way sentence-transformers runs the model."""
    import torch
    batch = tokenizer([prompt + t for t in texts], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    from conftest import each_alone
    with torch.no_grad():
        h = each_alone(model, batch["input_ids"], batch["attention_mask"])
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    mask = batch["attention_mask"].numpy()
    ids = [row[:n] for row, n in zip(batch["input_ids"].numpy(), mask.sum(1))]
    return ids, h.numpy(), mask, pooled.numpy()


def save_model(model, folder: Path, tokenizer_from: Path, *, prefix: str | None = None, dtype: str | None = None,
               shard_size: int | None = None) -> Path:
    """save_pretrained plus the tokenizer files; ``prefix`` ("roberta.") and ``dtype`` ("float16") write a
    single model.safetensors as such checkpoints store it; ``shard_size`` a sharded checkpoint."""
    import shutil

    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / f, folder / f)
    if prefix is None and dtype is None:
        model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
        return folder
    model.config.to_json_file(folder / "config.json")
    sd = {(prefix or "") + k: v.detach().numpy() for k, v in model.state_dict().items()}
    if dtype:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    if prefix:
        sd[prefix + "embeddings.position_ids"] = np.arange(model.config.max_position_embeddings)[None]
        sd["lm_head.bias"] = np.zeros(model.config.vocab_size, np.float32)
    save_file(sd, str(folder / "model.safetensors"))
    return folder
