"""Bad models fail fast with an error that names the file, key or field."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import e5lite
from e5lite.errors import ConfigError
from e5lite.errors import E5LiteError, ModelNotFoundError, WeightsError


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_weights(folder, fn):
    sd = load_file(str(folder / "model.safetensors"))
    save_file(fn(sd), str(folder / "model.safetensors"))


def test_missing_directory_is_fast(tmp_path):
    t = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        e5lite.load(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        e5lite.load("./relative/missing/model")
    assert time.perf_counter() - t < 2.0  # a local path never goes to the network


def test_file_instead_of_folder(tiny_copy):
    with pytest.raises(ModelNotFoundError, match="is a file"):
        e5lite.load(tiny_copy / "config.json")


def test_missing_config(tiny_copy):
    (tiny_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="missing config.json"):
        e5lite.load(tiny_copy)


def test_missing_tokenizer(tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    (tiny_copy / "vocab.txt").unlink()
    with pytest.raises(E5LiteError, match="no tokenizer.*tokenizer.json or vocab.txt"):
        e5lite.load(tiny_copy)


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "roberta", "unsupported model_type 'roberta'"),
    ("position_embedding_type", "relative_key", "unsupported position_embedding_type"),
    ("hidden_act", "silu", "unsupported hidden_act 'silu'"),
    ("num_attention_heads", 5, "not a multiple"),
])
def test_unsupported_architecture(tiny_copy, field, value, match):
    edit_config(tiny_copy, **{field: value})
    with pytest.raises(ConfigError, match=match):
        e5lite.load(tiny_copy)


def test_truncated_safetensors(tiny_copy):
    f = tiny_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        e5lite.load(tiny_copy)


def test_missing_key(tiny_copy):
    key = "encoder.layer.1.attention.self.value.bias"
    edit_weights(tiny_copy, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(WeightsError, match=f"missing key '{key}'"):
        e5lite.load(tiny_copy)


def test_wrong_shape(tiny_copy):
    key = "encoder.layer.0.intermediate.dense.weight"
    edit_weights(tiny_copy, lambda sd: {**sd, key: sd[key][:, :-1].copy()})
    with pytest.raises(WeightsError, match=rf"'{key}' in model.safetensors has shape \[64, 31\], expected \[64, 32\]"):
        e5lite.load(tiny_copy)


def test_unexpected_key(tiny_copy):
    edit_weights(tiny_copy, lambda sd: {**sd, "encoder.layer.2.output.dense.bias": np.zeros(32, np.float32)})
    with pytest.raises(WeightsError, match="unexpected key 'encoder.layer.2.output.dense.bias'"):
        e5lite.load(tiny_copy)


def test_more_layers_in_config_than_checkpoint(tiny_copy):
    edit_config(tiny_copy, num_hidden_layers=3)
    with pytest.raises(WeightsError, match="missing key 'encoder.layer.2"):
        e5lite.load(tiny_copy)


def test_duplicate_key_after_prefix(tiny_copy):
    edit_weights(tiny_copy, lambda sd: {**sd, "bert.embeddings.LayerNorm.gamma": sd["embeddings.LayerNorm.weight"]})
    with pytest.raises(WeightsError, match="duplicates"):
        e5lite.load(tiny_copy)


def test_pytorch_bin_only(tiny_copy):
    (tiny_copy / "model.safetensors").rename(tiny_copy / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="safetensors.*save_pretrained"):
        e5lite.load(tiny_copy)


def test_missing_shard(tiny_copy):
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(WeightsError, match="model-00001-of-00002.safetensors, which is missing"):
        e5lite.load(tiny_copy)


def test_unsupported_pooling(tiny_copy):
    (tiny_copy / "1_Pooling").mkdir()
    (tiny_copy / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}')
    with pytest.raises(E5LiteError, match="1_Pooling/config.json: pooling"):
        e5lite.load(tiny_copy)


def test_unsupported_module(tiny_copy):
    (tiny_copy / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(E5LiteError, match="2_Dense|Dense"):
        e5lite.load(tiny_copy)


@pytest.mark.parametrize("file, content, match", [
    ("config.json", "[1, 2]", r"config.json: expected an object at the top level, got an array"),
    ("1_Pooling/config.json", "[]", r"1_Pooling/config.json: expected an object at the top level, got an array"),
    ("1_Pooling/config.json", '{"pooling_mode_mean_tokens": "yes"}',
     r"1_Pooling/config.json: field 'pooling_mode_mean_tokens' must be true/false, got a string"),
    ("sentence_bert_config.json", '{"max_seq_length": "128"}',
     r"sentence_bert_config.json: field 'max_seq_length' must be an integer, got a string"),
    ("sentence_bert_config.json", '{"max_seq_length": true}',
     r"sentence_bert_config.json: field 'max_seq_length' must be an integer, got true/false"),
    ("sentence_bert_config.json", '"text"', r"sentence_bert_config.json: expected an object"),
    ("config_sentence_transformers.json", '{"prompts": ["query: "]}',
     r"config_sentence_transformers.json: field 'prompts' must be an object, got an array"),
    ("config_sentence_transformers.json", '{"prompts": {"query": 5}}',
     r"config_sentence_transformers.json: field 'prompts.query' must be a string, got an integer"),
    ("config_sentence_transformers.json", '{"prompts": {"q": "q: "}, "default_prompt_name": 3}',
     r"config_sentence_transformers.json: field 'default_prompt_name' must be a string"),
    ("tokenizer_config.json", "7", r"tokenizer_config.json: expected an object"),
    ("modules.json", '{"0": "Transformer"}', r"modules.json: expected an array at the top level, got an object"),
    ("modules.json", '["Transformer"]', r"modules.json: entry 0 must be an object, got a string"),
])
def test_json_files_of_the_wrong_shape_name_file_and_field(tiny_copy, file, content, match):
    (tiny_copy / file).parent.mkdir(exist_ok=True)
    (tiny_copy / file).write_text(content)
    with pytest.raises(E5LiteError, match=match):
        e5lite.load(tiny_copy)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_key(tiny_copy, value):
    def poison(sd):
        sd["encoder.layer.1.output.dense.weight"][3, 5] = value
        return sd
    edit_weights(tiny_copy, poison)
    with pytest.raises(WeightsError, match=r"key 'encoder.layer.1.output.dense.weight' in model.safetensors holds "
                                           r"1 non-finite values"):
        e5lite.load(tiny_copy)
