"""The export (e5lite/export.py) and the table run backwards (weights.to_state_dict).

A folder written by ``save_pretrained`` must load in transformers, sentence-transformers and e5lite and embed
as the encoder it came from: normalised embeddings within 1e-5, prompts, pooling and max length kept.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import e5lite
from conftest import TEXTS, random_bert, save_layout, torch_reference, write_json
from e5lite import export
from e5lite.config import BertConfig
from e5lite.errors import E5LiteError, WeightsError
from e5lite.export import WEIGHTS, save_pretrained
from e5lite.weights import IGNORED, load_params, normalize_key, to_state_dict

TOL = 1e-5


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def checkpoint_tensors(folder, *, keep=lambda key: not IGNORED.match(key)) -> dict[str, np.ndarray]:
    """A model folder's tensors by normalised key (no `bert.`, LayerNorm weight/bias), as stored."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            out.update({normalize_key(k): f.get_tensor(k) for k in f.keys() if keep(normalize_key(k))})
    return out


def transformers_embed(folder, ids) -> np.ndarray:
    """transformers' BertModel from ``folder``, mean pooled and L2-normalised; every weight must load."""
    import transformers
    model, info = transformers.AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return torch_reference(model.float().eval(), ids)[2]


@pytest.fixture(scope="module")
def enc(minilm):
    return minilm


@pytest.fixture(scope="module")
def expected(enc) -> dict:
    return {None: enc.encode(TEXTS), "query": enc.encode(TEXTS, prompt_name="query")}


@pytest.fixture(scope="module")
def exported(enc, tmp_path_factory):
    return save_pretrained(enc, tmp_path_factory.mktemp("export") / "minilm")


@pytest.fixture(scope="module")
def tiny_enc(tiny):
    return tiny


# -- to_state_dict: load_params backwards, bit for bit --

def check_inverse(folder, dtype="float32"):
    config = BertConfig.from_json(folder / "config.json")
    got = to_state_dict(load_params(folder, config), config, dtype=dtype)
    want = checkpoint_tensors(folder)
    assert sorted(got) == sorted(want)
    for key, arr in got.items():
        assert arr.dtype == np.dtype(dtype) and arr.flags.c_contiguous, key
        np.testing.assert_array_equal(arr, want[key].astype(dtype), err_msg=key)


def test_to_state_dict_inverts_load_params_minilm(minilm_dir):
    check_inverse(minilm_dir)


@pytest.mark.parametrize("layout", ["plain", "legacy", "bf16"])
def test_to_state_dict_inverts_load_params_tiny(layout, tmp_path, minilm_dir):
    folder = save_layout(random_bert("tiny", seed=3), tmp_path / layout, layout, minilm_dir)
    check_inverse(folder)
    if layout == "bf16":  # dtype= gives back the stored bf16 tensors exactly
        check_inverse(folder, dtype="bfloat16")


def test_to_state_dict_names_a_wrong_shape(tiny_enc, enc):
    with pytest.raises(WeightsError, match=r"params\.embeddings\.word_VD has shape \[30522, 32\], expected "
                                           r"\[30522, 384\]"):
        to_state_dict(tiny_enc.params, enc.config)
    with pytest.raises(TypeError, match="must be e5lite Params"):
        to_state_dict(dict(enc.params._asdict()), enc.config)


# -- (a) the exported MiniLM embeds the same in all three loaders --

def test_export_files(exported, enc, minilm_dir):
    assert sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "config.json", "config_sentence_transformers.json", WEIGHTS, "modules.json",
        "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.txt"]
    config = json.loads((exported / "config.json").read_text())
    source = json.loads((minilm_dir / "config.json").read_text())
    assert config == {**source, "architectures": ["BertModel"], "torch_dtype": "float32", "dtype": "float32"}
    assert json.loads((exported / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 256, "do_lower_case": False}
    pooling = json.loads((exported / "1_Pooling/config.json").read_text())
    assert pooling["word_embedding_dimension"] == 384 and pooling["pooling_mode_mean_tokens"] is True
    assert sum(v is True for k, v in pooling.items() if k.startswith("pooling_mode_")) == 1
    st = json.loads((exported / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == enc.prompts == {"query": "", "document": ""}  # MiniLM's, as sentence-transformers
    assert st["default_prompt_name"] is None and st["similarity_fn_name"] == "cosine"
    with safe_open(str(exported / WEIGHTS), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(f.keys())  # carried over from the source
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_transformers_embeds_the_export(exported, enc, expected):
    assert max_diff(transformers_embed(exported, enc.tokenize(TEXTS)), expected[None]) <= TOL


def test_sentence_transformers_embeds_the_export(exported, enc, expected):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(exported), device="cpu")
    assert st.max_seq_length == enc.max_length
    assert max_diff(st.encode(TEXTS), expected[None]) <= TOL
    assert max_diff(st.encode(TEXTS, prompt_name="query"), expected["query"]) <= TOL


def test_e5lite_loads_the_export(exported, enc, expected):
    again = e5lite.load(exported)
    assert (again.pooling, again.max_length, again.prompts, again.default_prompt_name) == (
        enc.pooling, enc.max_length, enc.prompts, enc.default_prompt_name)
    jax.tree.map(np.testing.assert_array_equal, again.params, enc.params)
    assert max_diff(again.encode(TEXTS, prompt_name="query"), expected["query"]) <= TOL


# -- (b, c) the params passed are the ones saved, in float32 --

@pytest.mark.slow
def test_passed_params_are_saved(enc, expected, minilm_dir, tmp_path):
    layers = enc.params.layers
    tuned = enc.params._replace(layers=layers._replace(q_bias_NK=layers.q_bias_NK.at[0].add(0.1)))
    out = save_pretrained(enc, tmp_path / "tuned", params=tuned)
    key = "encoder.layer.0.attention.self.query.bias"
    saved, source = checkpoint_tensors(out)[key], checkpoint_tensors(minilm_dir)[key]
    np.testing.assert_allclose(saved, source + np.float32(0.1), rtol=0, atol=1e-7)
    got = e5lite.load(out).encode(TEXTS)
    assert max_diff(got, expected[None]) > 1e-3  # the change shows ...
    assert max_diff(transformers_embed(out, enc.tokenize(TEXTS)), got) <= TOL  # ... the same in transformers


def test_bf16_params_are_saved_as_float32(enc, minilm_dir, tmp_path):
    out = save_pretrained(enc, tmp_path / "bf16", params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), enc.params))
    saved, source = checkpoint_tensors(out), checkpoint_tensors(minilm_dir)
    for key, want in source.items():
        assert saved[key].dtype == np.float32, key
        np.testing.assert_array_equal(saved[key], want.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=key)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_prompts_pooling_and_max_length_round_trip(tiny_dir, tmp_path):
    """A source with its own prompts, default prompt, CLS pooling and max length keeps them all."""
    source = shutil.copytree(tiny_dir, tmp_path / "source")
    write_json(source / "config_sentence_transformers.json", {"prompts": {"q": "search: ", "d": ""},
                                                              "default_prompt_name": "q"})
    write_json(source / "1_Pooling/config.json", {"word_embedding_dimension": 32, "pooling_mode_cls_token": True})
    write_json(source / "sentence_bert_config.json", {"max_seq_length": 64})
    tiny = e5lite.load(source)
    out = save_pretrained(tiny, tmp_path / "out")
    again = e5lite.load(out)
    assert (again.prompts, again.default_prompt_name, again.pooling, again.max_length) == (
        {"query": "", "document": "", "q": "search: ", "d": ""}, "q", "cls", 64)  # ST's defaults, then the source's
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(out), device="cpu")
    assert max_diff(st.encode(TEXTS), tiny.encode(TEXTS)) <= TOL  # default prompt "search: ", CLS, 64 tokens


# -- (d) never a half-written folder --

def test_refuses_a_non_empty_folder_unless_overwrite(tiny_enc, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(E5LiteError, match=r"out: the folder is not empty \(pass overwrite=True"):
        save_pretrained(tiny_enc, out)
    assert os.listdir(out) == ["notes.txt"] and os.listdir(tmp_path) == ["out"]
    save_pretrained(tiny_enc, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / WEIGHTS).is_file()
    assert os.listdir(tmp_path) == ["out"]  # the old folder, moved aside, is gone
    (tmp_path / "empty").mkdir()
    save_pretrained(tiny_enc, tmp_path / "empty")  # an empty folder is fine
    (tmp_path / "file").write_text("")
    with pytest.raises(E5LiteError, match="file: it exists and is not a folder"):
        save_pretrained(tiny_enc, tmp_path / "file", overwrite=True)


def test_overwrite_the_source_folder_in_place(tiny_copy):
    """Saving over the folder the encoder came from (a fine-tuning run updating its model) reads it first."""
    tiny = e5lite.load(tiny_copy)
    save_pretrained(tiny, tiny_copy, overwrite=True)
    jax.tree.map(np.testing.assert_array_equal, e5lite.load(tiny_copy).params, tiny.params)
    assert (tiny_copy / "modules.json").is_file()
    assert not [p for p in tiny_copy.parent.iterdir() if p.name.startswith(".")]


def test_a_failed_write_leaves_no_folder(tiny_enc, tmp_path, monkeypatch):
    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # a partial file, as a crash mid-write leaves
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(tiny_enc, tmp_path / "new")
    assert os.listdir(tmp_path) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_text("the previous model")
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(tiny_enc, old, overwrite=True)
    assert os.listdir(tmp_path) == ["old"] and os.listdir(old) == ["model.safetensors"]
    assert (old / "model.safetensors").read_text() == "the previous model"


def test_bad_params_fail_before_any_file(tiny_enc, enc, tmp_path):
    with pytest.raises(WeightsError, match="word_VD"):
        save_pretrained(enc, tmp_path / "out", params=tiny_enc.params)
    assert os.listdir(tmp_path) == []
