"""The E5 family beyond BERT: multilingual-e5 (XLM-RoBERTa) and multilingual-e5-small (a BERT with XLM-R's
tokenizer), against transformers' XLMRobertaModel / BertModel and its own XLMRobertaTokenizer.

Random weights at the published shapes, a sentencepiece tokenizer trained in the test (tests/multilingual.py),
text in many scripts. Tolerances (fp32) as for BERT: normalised embeddings <= 1e-5, hidden states <= 1e-4 over
real tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import e5lite
from e5lite.errors import WeightsError
from e5lite.export import save_pretrained
from e5lite.prompts import E5_PROMPTS
from e5lite.tokenizer import TextTokenizer
from conftest import hidden_error
from multilingual import (corpus, random_me5_small, random_xlmr, reference, sample_texts, save_model,
                          write_xlmr_tokenizer)

EMB_TOL = 1e-5
HIDDEN_TOL = 1e-4
PROMPTS = ("", "query: ", "passage: ")
# Full-size models get fewer texts, to keep the suite to minutes: the long one, Cyrillic, CJK, Arabic,
# Devanagari, emoji, whitespace only. Their layers run scanned (unroll=False): one layer compiled rather than 12 or
# 24 (the CPU's default unrolls them; test_engine checks that the two layouts agree).
FULL_SIZE = [9, 0, 1, 2, 7, 8, 11]


@pytest.fixture(scope="module")
def texts():
    return sample_texts()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_xlmr_tokenizer(tmp_path_factory.mktemp("xlmr-tokenizer"), corpus())


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert type(tok).__name__ == "XLMRobertaTokenizer"  # the class sentence-transformers would use
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok_dir):
    model = random_xlmr("tiny", seed=3)
    # E5-named (prompts.py): it stands for a tiny multilingual-e5, with E5's prompts
    return model, save_model(model, tmp_path_factory.mktemp("xlmr-tiny") / "multilingual-e5-tiny", tok_dir)


def check_parity(model, folder, hf_tokenizer, texts, *, hidden: bool, prompt: str = "", truncates: bool = True,
                 **knobs):
    enc = e5lite.load(folder, **knobs)
    want_ids, want_h, _, want_emb = reference(model, hf_tokenizer, texts, prompt=prompt)
    ids = enc.tokenize(texts, prompt=prompt)
    for i, (a, b) in enumerate(zip(ids, want_ids)):
        assert a.tolist() == b.tolist(), f"text {i}: token ids differ from transformers'"
    assert enc.max_length == 512 and (max(len(t) for t in ids) == 512) == truncates  # the long text was cut
    got = enc.encode(texts, prompt=prompt)
    err = float(np.abs(got - want_emb).max())
    assert err <= EMB_TOL, f"embeddings differ by {err:.2e}"
    if hidden:
        h_err = hidden_error(enc, ids, want_h, pad_id=1)  # XLM-R's <pad>; masked out either way
        assert h_err <= HIDDEN_TOL, f"last hidden states differ by {h_err:.2e}"
    return enc


# ---------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_transformers(tok_dir, hf_tokenizer, texts):
    """Every text of the training corpus and the parity texts, bare and behind each prompt (with truncation),
    gets transformers' ids; the raw tokenizer.json pipeline would not (whitespace), so the check can fail."""
    from tokenizers import Tokenizer
    enc_tok = TextTokenizer.from_dir(tok_dir, 512)
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    inputs = [p + t for p in PROMPTS for t in corpus(n_per_locale=100, seed=5) + texts]
    want = hf_tokenizer(inputs, truncation=True, max_length=512)["input_ids"]
    got = enc_tok(inputs)
    mismatches = [i for i, (a, b) in enumerate(zip(got, want)) if a.tolist() != b]
    assert not mismatches, f"{len(mismatches)} of {len(inputs)} differ, first {inputs[mismatches[0]][:60]!r}"
    raw_differs = sum(r.ids[:512] != w for r, w in zip(raw.encode_batch(inputs), want))
    assert raw_differs > 0  # "query: " + "" and trailing whitespace: one "▁" token more in the raw pipeline
    assert enc_tok.pad_token_id == hf_tokenizer.pad_token_id == 1
    assert enc_tok.tokens(got[0][:1]) == ["<s>"] and enc_tok.tokens(got[0][-1:]) == ["</s>"]


# ---------------------------------------------------------------------------------------------- XLM-R

@pytest.mark.slow
def test_tiny_parity_and_config(tiny, hf_tokenizer, texts):
    model, folder = tiny
    enc = check_parity(model, folder, hf_tokenizer, texts, hidden=True, packing=False)
    assert enc.config.model_type == "xlm-roberta" and enc.config.position_offset == 2
    assert enc.tokenizer.pad_token_id == 1
    for prompt in ("query: ", "passage: "):
        check_parity(model, folder, hf_tokenizer, texts, hidden=False, prompt=prompt)


@pytest.mark.parametrize("knobs", [dict(packing=True, token_budget=2048), dict(packing=True, min_window=16),
                                   dict(packing=True, attention_impl="pallas", token_budget=2048),
                                   dict(packing="auto", token_budget=1024, batch_size=3)])
def test_tiny_layouts_and_batch_invariance(tiny, hf_tokenizer, texts, knobs):
    """Packed rows (positions offset per segment), attention windows, the Pallas kernel (interpreted on CPU),
    small batches: each equals transformers on the same texts, and each text embedded alone."""
    model, folder = tiny
    knobs = dict(knobs)
    batch_size = knobs.pop("batch_size", None)
    enc = e5lite.load(folder, small_inputs=0, **knobs)  # 15 texts: past the small-input path, to the planner
    _, _, _, want = reference(model, hf_tokenizer, texts, prompt="query: ")
    got = enc.encode(texts, prompt_name="query", batch_size=batch_size)
    assert float(np.abs(got - want).max()) <= EMB_TOL
    if knobs.get("packing") is True:
        assert any(len(s) == 4 for s in enc.engine.compiled_shapes)  # (rows, length, segments, window)
    alone = np.stack([enc.encode(t, prompt_name="query") for t in texts[:4]])
    np.testing.assert_allclose(alone, got[:4], atol=EMB_TOL, rtol=0)


@pytest.mark.slow
def test_tiny_bf16_and_two_devices(tiny, hf_tokenizer, texts, tmp_path):
    """bf16 (cosine >= 0.999 against transformers fp32) and batches sharded over two host devices (in a
    subprocess with two CPU devices; padded and packed) give XLM-R's embeddings too."""
    import os
    import subprocess
    import sys
    import textwrap
    model, folder = tiny
    _, _, _, want = reference(model, hf_tokenizer, texts)
    bf16 = e5lite.load(folder, dtype="bfloat16").encode(texts)
    assert (bf16 * want).sum(1).min() >= 0.999
    np.save(tmp_path / "texts.npy", np.array(texts, dtype=object), allow_pickle=True)
    script = f"""
        import jax, numpy as np, e5lite
        texts = list(np.load({str(tmp_path / 'texts.npy')!r}, allow_pickle=True))
        for packing in (True, False):
            enc = e5lite.load({str(folder)!r}, packing=packing, token_budget=2048)
            assert len(enc.devices) == 2, enc.devices
            np.save({str(tmp_path)!r} + f"/out_{{packing}}.npy", enc.encode(texts))
    """
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for packing in (True, False):
        np.testing.assert_allclose(np.load(tmp_path / f"out_{packing}.npy"), want, atol=EMB_TOL, rtol=0)


def test_checkpoint_quirks_load_the_same(tiny, tok_dir, tmp_path):
    """`roberta.` prefix with an lm_head and a position_ids buffer, sharded files: the same params as
    save_pretrained's; fp16 storage: the fp16-rounded params."""
    model, folder = tiny
    params = e5lite.load(folder).params
    for name, kw in (("prefixed", dict(prefix="roberta.")), ("sharded", dict(shard_size=200_000))):
        quirk = save_model(model, tmp_path / name, tok_dir, **kw)
        if name == "sharded":
            assert len(list(quirk.glob("*.safetensors"))) >= 2
        jax.tree.map(np.testing.assert_array_equal, e5lite.load(quirk).params, params)
    fp16 = e5lite.load(save_model(model, tmp_path / "fp16", tok_dir, dtype="float16")).params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32)),
                 fp16, params)


def test_strict_keys_per_architecture(tiny, tok_dir, tmp_path):
    """A `bert.`-prefixed key is not an XLM-R key: the table is per architecture and names the key."""
    from safetensors.numpy import load_file, save_file
    model, folder = tiny
    bad = Path(shutil.copytree(folder, tmp_path / "bad"))
    sd = load_file(str(bad / "model.safetensors"))
    sd["bert." + "embeddings.word_embeddings.weight"] = sd.pop("embeddings.word_embeddings.weight")
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError, match="bert.embeddings.word_embeddings.weight"):
        e5lite.load(bad)


def test_export_round_trip(tiny, hf_tokenizer, texts, tmp_path):
    """save_pretrained writes an XLMRobertaModel that transformers loads and that embeds the same."""
    import transformers
    model, folder = tiny
    enc = e5lite.load(folder)
    out = save_pretrained(enc, tmp_path / "export")
    back = transformers.AutoModel.from_pretrained(str(out), attn_implementation="eager").eval()
    assert type(back).__name__ == "XLMRobertaModel"
    _, _, _, want = reference(back, hf_tokenizer, texts)
    np.testing.assert_allclose(enc.encode(texts), want, atol=EMB_TOL, rtol=0)


@pytest.mark.slow
def test_me5_base_shape(tmp_path, tok_dir, hf_tokenizer, texts):
    """multilingual-e5-base's shape (12 x 768, 250,002 rows): hidden states and embeddings."""
    model = random_xlmr("me5-base", seed=1)
    check_parity(model, save_model(model, tmp_path / "me5-base", tok_dir), hf_tokenizer,
                 [texts[i] for i in FULL_SIZE], hidden=True, prompt="query: ", unroll=False)


@pytest.mark.slow
def test_me5_large_shape(tmp_path, tok_dir, hf_tokenizer, texts):
    """multilingual-e5-large's shape (24 x 1024, 250,002 rows): embeddings. Its hidden states, fp16 storage,
    the `roberta.` prefix and the 512th position (the long text, which costs most of a full-size forward) are
    checked at me5-base's and the tiny shape; this adds the one shape neither has."""
    model = random_xlmr("me5-large", seed=2)
    check_parity(model, save_model(model, tmp_path / "me5-large", tok_dir), hf_tokenizer,
                 [texts[i] for i in FULL_SIZE[1:]], hidden=False, prompt="passage: ", truncates=False, unroll=False)


@pytest.mark.slow
def test_me5_small_layout(tmp_path, tok_dir, hf_tokenizer, texts):
    """multilingual-e5-small: a BERT (positions from 0) with XLM-R's tokenizer (pad 1, <s> ... </s>)."""
    model = random_me5_small(seed=4)
    texts = [texts[i] for i in FULL_SIZE]
    enc = check_parity(model, save_model(model, tmp_path / "me5-small", tok_dir), hf_tokenizer, texts, hidden=True,
                       prompt="query: ", unroll=False)
    assert enc.config.model_type == "bert" and enc.config.position_offset == 0
    assert enc.tokenizer.pad_token_id == 1 != enc.config.pad_token_id
    packed = e5lite.load(enc.model_dir, packing=True, unroll=False).encode(texts)
    np.testing.assert_allclose(packed, enc.encode(texts), atol=EMB_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------- instruct

def test_instruct_prompts(tiny, hf_tokenizer, texts, tmp_path):
    """An -instruct model: queries get "Instruct: {task}\\nQuery: " (a given task, or web search by default),
    documents no prefix; task= equals the same prefix through transformers; the model's own prompts win."""
    import json
    model, folder = tiny
    inst = Path(shutil.copytree(folder, tmp_path / "multilingual-e5-tiny-instruct"))
    enc = e5lite.load(inst)
    task = "Given a question in any language, retrieve passages that answer it"
    assert enc.prompts["passage"] == "" and enc.prompts["query"].startswith("Instruct: Given a web search query")
    _, _, _, want = reference(model, hf_tokenizer, texts[:5], prompt=f"Instruct: {task}\nQuery: ")
    np.testing.assert_allclose(enc.encode(texts[:5], task=task), want, atol=EMB_TOL, rtol=0)
    np.testing.assert_array_equal(enc.encode_queries(texts[:5], task=task), enc.encode(texts[:5], task=task))
    _, _, _, docs = reference(model, hf_tokenizer, texts[:5])
    np.testing.assert_allclose(enc.encode_passages(texts[:5]), docs, atol=EMB_TOL, rtol=0)
    with pytest.raises(ValueError, match="one of prompt, prompt_name and task"):
        enc.encode(texts[:1], task=task, prompt_name="query")
    with pytest.raises(ValueError, match="task must be a non-empty str"):
        enc.encode(texts[:1], task=" ")
    assert e5lite.load(folder).prompts == E5_PROMPTS  # not an -instruct model
    (inst / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "Q: ", "passage": ""}}))
    assert e5lite.load(inst).prompts["query"] == "Q: "


@pytest.mark.slow
def test_cli_task_and_info(tiny, tmp_path):
    import json
    import subprocess
    import sys
    _, folder = tiny
    run = lambda *a: subprocess.run([sys.executable, "-m", "e5lite.cli", *a], capture_output=True, text=True,
                                    check=True).stdout
    info = json.loads(run("info", "--model", str(folder)))
    assert info["architecture"] == "xlm-roberta" and info["tokenizer"] == "Unigram"
    out = tmp_path / "q.npy"
    run("embed", "--model", str(folder), "--task", "Find the answer", "--output", str(out), "Где мой дом?")
    want = e5lite.load(folder).encode(["Где мой дом?"], prompt="Instruct: Find the answer\nQuery: ")
    np.testing.assert_allclose(np.load(out), want, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_one_sgd_step_equals_torch(tiny, texts, tmp_path):
    """Fine-tuning an XLM-R: one plain SGD step of `e5lite train` on multilingual pairs moves the weights as
    the same InfoNCE step does on transformers' XLMRobertaModel (padded with <pad> = 1)."""
    import copy
    import json

    import torch

    from e5lite.cli import main
    from e5lite.train_data import TokenisedPairs, read_pairs
    from safetensors.numpy import load_file
    model, folder = tiny
    model = copy.deepcopy(model)
    records = tmp_path / "pairs.jsonl"
    records.write_text("".join(json.dumps({"query": " ".join(t.split()[:3]), "positive": t}) + "\n"
                               for t in texts[:4]))
    out = tmp_path / "trained"
    assert main(["train", "--model", str(folder), "--train", str(records), "--output", str(out), "--optimizer",
                 "sgd", "--learning-rate", "0.05", "--weight-decay", "0", "--dropout", "0", "--no-shuffle",
                 "--batch-size", "4", "--max-steps", "1"]) == 0
    batch, _ = TokenisedPairs(e5lite.load(folder), read_pairs(records)).batch(np.arange(4))
    assert (np.asarray(batch.q_ids)[np.asarray(batch.q_mask) == 0] == 1).all()  # XLM-R's pad id

    def embed(ids, mask):
        h = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask, dtype=torch.float32)[..., None]
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    logits = embed(batch.q_ids, batch.q_mask) @ embed(batch.p_ids, batch.p_mask).T / 0.01
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    saved = load_file(str(out / "model.safetensors"))
    for name, p in model.named_parameters():
        if p.grad is not None:  # the pooler is not part of the embedding
            assert np.abs(saved[name] - p.detach().numpy()).max() <= 1e-5, name
    assert json.loads((out / "config.json").read_text())["model_type"] == "xlm-roberta"
