"""Hugging Face BERT / XLM-RoBERTa safetensors -> e5lite ``Params``, through one strict table per architecture.

Strict both ways: every checkpoint key is used or explicitly ignored, every param is filled, every shape
is checked; each error names the key and the file. Reads with safetensors' numpy API (no torch).
``to_state_dict`` goes back (Params -> BertModel tensors) through the same table, for the export.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from safetensors import safe_open

from .config import BertConfig
from .errors import WeightsError
from .files import read_json
from .model import EmbeddingParams, LayerParams, Params


class Entry(NamedTuple):
    field: str  # name in EmbeddingParams / LayerParams
    key: str  # HF key, after the architecture's prefix (`bert.`, `roberta.`) is dropped; `{i}`: layer index
    stored: tuple  # stored shape, in config dims (see _dims)
    linear: bool  # torch Linear weight stored [out, in]: transposed before the reshape


# The one weight-mapping table. Our shape is the stored one (transposed for Linear weights) reshaped to the
# field's own shape; e.g. query.weight [N*K, D] -> [D, N*K] -> q_DNK [D, N, K].
EMBEDDINGS = (
    Entry("word_VD", "embeddings.word_embeddings.weight", ("V", "D"), False),
    Entry("position_PD", "embeddings.position_embeddings.weight", ("P", "D"), False),
    Entry("token_type_YD", "embeddings.token_type_embeddings.weight", ("Y", "D"), False),
    Entry("ln_scale_D", "embeddings.LayerNorm.weight", ("D",), False),
    Entry("ln_bias_D", "embeddings.LayerNorm.bias", ("D",), False),
)
LAYER = (
    Entry("q_DNK", "encoder.layer.{i}.attention.self.query.weight", ("NK", "D"), True),
    Entry("q_bias_NK", "encoder.layer.{i}.attention.self.query.bias", ("NK",), False),
    Entry("k_DNK", "encoder.layer.{i}.attention.self.key.weight", ("NK", "D"), True),
    Entry("k_bias_NK", "encoder.layer.{i}.attention.self.key.bias", ("NK",), False),
    Entry("v_DNK", "encoder.layer.{i}.attention.self.value.weight", ("NK", "D"), True),
    Entry("v_bias_NK", "encoder.layer.{i}.attention.self.value.bias", ("NK",), False),
    Entry("o_NKD", "encoder.layer.{i}.attention.output.dense.weight", ("D", "NK"), True),
    Entry("o_bias_D", "encoder.layer.{i}.attention.output.dense.bias", ("D",), False),
    Entry("attn_ln_scale_D", "encoder.layer.{i}.attention.output.LayerNorm.weight", ("D",), False),
    Entry("attn_ln_bias_D", "encoder.layer.{i}.attention.output.LayerNorm.bias", ("D",), False),
    Entry("ffn_in_DF", "encoder.layer.{i}.intermediate.dense.weight", ("F", "D"), True),
    Entry("ffn_in_bias_F", "encoder.layer.{i}.intermediate.dense.bias", ("F",), False),
    Entry("ffn_out_FD", "encoder.layer.{i}.output.dense.weight", ("D", "F"), True),
    Entry("ffn_out_bias_D", "encoder.layer.{i}.output.dense.bias", ("D",), False),
    Entry("ffn_ln_scale_D", "encoder.layer.{i}.output.LayerNorm.weight", ("D",), False),
    Entry("ffn_ln_bias_D", "encoder.layer.{i}.output.LayerNorm.bias", ("D",), False),
)
assert [e.field for e in EMBEDDINGS] == list(EmbeddingParams._fields)
assert [e.field for e in LAYER] == list(LayerParams._fields)


# XLMRobertaModel names its modules as BertModel does (transformers copies the BERT code), so its table has
# the same keys; it is its own table so that either can change without the other.
XLMR_EMBEDDINGS = EMBEDDINGS
XLMR_LAYER = LAYER


class Architecture(NamedTuple):
    prefix: str  # the base model's prefix in checkpoints saved from a task model
    embeddings: tuple  # Entries of EmbeddingParams
    layer: tuple  # Entries of LayerParams
    ignored: re.Pattern  # keys carried but not used by the encoder (matched with and without the prefix)


ARCHITECTURES = {
    # the pooler, position/token-type buffers, and `cls.` (BERT's pre-training heads, beside `bert.`)
    "bert": Architecture(
        "bert.",
        EMBEDDINGS,
        LAYER,
        re.compile(r"^(pooler\.|embeddings\.position_ids$|embeddings\.token_type_ids$|cls\.)"),
    ),
    # the pooler, the buffers, and `lm_head.` (XLMRobertaForMaskedLM's head, beside `roberta.`)
    "xlm-roberta": Architecture(
        "roberta.",
        XLMR_EMBEDDINGS,
        XLMR_LAYER,
        re.compile(r"^(pooler\.|embeddings\.position_ids$|embeddings\.token_type_ids$|lm_head\.)"),
    ),
}
IGNORED = ARCHITECTURES["bert"].ignored

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _dims(config: BertConfig) -> dict:
    c = config
    return {
        "V": c.vocab_size,
        "P": c.max_position_embeddings,
        "Y": c.type_vocab_size,
        "D": c.hidden_size,
        "N": c.num_attention_heads,
        "K": c.head_dim,
        "NK": c.hidden_size,
        "F": c.intermediate_size,
    }


def _field_shape(field: str, dims: dict) -> tuple:
    return tuple(dims[d] for d in field.rsplit("_", 1)[1])


def architecture(config: BertConfig) -> Architecture:
    return ARCHITECTURES[config.model_type]


def normalize_key(key: str, prefix: str = "bert.") -> str:
    """Drops a leading ``prefix`` and maps legacy LayerNorm `gamma`/`beta` to `weight`/`bias`."""
    if key.startswith(prefix):
        key = key[len(prefix) :]
    if "LayerNorm." in key:
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    return key


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in [jnp.dtype(v) for v in DTYPES.values()]:
        raise ValueError(f"unsupported dtype {d}; choose one of {', '.join(DTYPES)}")
    return d


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder: the shards named by the index, or model.safetensors."""
    d = Path(model_dir)
    index = d / INDEX
    if index.is_file():
        try:
            weight_map = read_json(index, error=WeightsError)["weight_map"]
        except (KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index} names shard {f.name}, which is missing from {d}")
        return files
    if (d / SAFETENSORS).is_file():
        return [d / SAFETENSORS]
    shards = sorted(d.glob("*.safetensors"))
    if len(shards) == 1:
        return shards
    torch_files = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin") if (d / n).exists()]
    if torch_files:
        raise WeightsError(
            f"{d} has only PyTorch weights ({', '.join(torch_files)}); e5lite reads safetensors, without torch. "
            'Convert once with: python -c "from transformers import AutoModel; '
            f"AutoModel.from_pretrained('{d}').save_pretrained('{d}', safe_serialization=True)\""
        )
    raise WeightsError(f"no {SAFETENSORS} or {INDEX} in {d}")


def _open(path: Path) -> safe_open:
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise WeightsError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from None


def read_checkpoint(model_dir, arch: Architecture = ARCHITECTURES["bert"]) -> dict[str, tuple[Path, safe_open, str]]:
    """Maps each normalised key to (file, open handle, stored key); raises on duplicated keys."""
    found: dict[str, tuple[Path, safe_open, str]] = {}
    for path in checkpoint_files(model_dir):
        handle = _open(path)
        for raw in handle.keys():
            key = normalize_key(raw, arch.prefix)
            if arch.ignored.match(raw) or arch.ignored.match(key):
                continue
            if key in found:
                raise WeightsError(f"key {raw!r} in {path.name} duplicates one in {found[key][0].name}")
            found[key] = (path, handle, raw)
    return found


def expected_keys(config: BertConfig) -> list[str]:
    arch = architecture(config)
    return [e.key for e in arch.embeddings] + [
        e.key.format(i=i) for i in range(config.num_hidden_layers) for e in arch.layer
    ]


def load_params(model_dir: str | os.PathLike, config: BertConfig, dtype: npt.DTypeLike = "float32") -> Params:
    """Reads a model folder's safetensors into ``Params`` of ``dtype`` (fp16/bf16 storage is cast)."""
    dtype = resolve_dtype(dtype)
    dims, arch = _dims(config), architecture(config)
    found = read_checkpoint(model_dir, arch)
    expected = expected_keys(config)

    # Check names both ways before reading any tensor, so a wrong checkpoint fails fast.
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        path, _, raw = found[unexpected[0]]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(
            f"unexpected key {raw!r} in {path.name}{more}: not part of a "
            f"{config.num_hidden_layers}-layer {config.model_type} encoder as config.json describes"
        )
    missing = [k for k in expected if k not in found]
    if missing:
        files = ", ".join(sorted({p.name for p, _, _ in found.values()})) or "no tensors"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"missing key {missing[0]!r}{more} in {model_dir} (read {files})")

    def get(entry: Entry, i=None):
        path, handle, raw = found[entry.key.format(i=i)]
        try:
            arr = handle.get_tensor(raw)
        except Exception as e:
            raise WeightsError(f"cannot read key {raw!r} from {path}: {e}") from None
        want = tuple(dims[d] for d in entry.stored)
        if arr.shape != want:
            raise WeightsError(
                f"key {raw!r} in {path.name} has shape {list(arr.shape)}, expected {list(want)} from config.json"
            )
        if arr.dtype.kind != "f" and arr.dtype != jnp.bfloat16:
            raise WeightsError(f"key {raw!r} in {path.name} has dtype {arr.dtype}, expected a float type")
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise WeightsError(
                f"key {raw!r} in {path.name} holds {bad} non-finite values (NaN or inf): the "
                "checkpoint is corrupt or was saved after a diverged training step"
            )
        if entry.linear:
            arr = arr.T
        return arr.reshape(_field_shape(entry.field, dims)).astype(dtype)

    emb = [get(e) for e in arch.embeddings]
    layers = [np.stack([get(e, i) for i in range(config.num_hidden_layers)]) for e in arch.layer]
    emb, layers = jax.tree.map(jnp.asarray, (emb, layers))  # every tensor read and checked first
    return Params(EmbeddingParams(*emb), LayerParams(*layers))


def num_params(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# -- the way back: Params -> transformers' BertModel / XLMRobertaModel tensors (the export, e5lite/export.py) --


def _to_stored(entry: Entry, arr: np.ndarray, dims: dict) -> np.ndarray:
    """Undoes ``load_params``' step for one field: reshape to the stored shape (for a Linear weight, first to
    [in, out], then transposed back to torch's [out, in])."""
    stored = tuple(dims[d] for d in entry.stored)
    return np.ascontiguousarray(arr.reshape(stored[::-1]).T if entry.linear else arr.reshape(stored))


def to_state_dict(params: Params, config: BertConfig, dtype="float32") -> dict[str, np.ndarray]:
    """``Params`` -> BertModel (XLMRobertaModel) tensors by key, as its ``save_pretrained`` names them (no prefix).

    The exact inverse of ``load_params``, through the same table. Leaves may be jax arrays of any float dtype
    (e.g. bf16 training weights); the result is contiguous numpy arrays of ``dtype`` (float32 by default).
    """
    if not isinstance(params, Params):
        raise TypeError(f"params must be e5lite Params, got {type(params).__name__}")
    dtype = np.dtype(resolve_dtype(dtype))
    dims, L = _dims(config), config.num_hidden_layers
    out: dict[str, np.ndarray] = {}
    arch = architecture(config)
    for part, table, lead in (("embeddings", arch.embeddings, ()), ("layers", arch.layer, (L,))):
        for entry in table:
            # device_get brings a (replicated) jax array to host; astype copies it out of the device buffer.
            arr = np.asarray(jax.device_get(getattr(getattr(params, part), entry.field)))
            want = lead + _field_shape(entry.field, dims)
            if arr.shape != want:
                raise WeightsError(
                    f"params.{part}.{entry.field} has shape {list(arr.shape)}, expected "
                    f"{list(want)} from the config ({L} layers)"
                )
            arr = arr.astype(dtype)
            if lead:
                out.update({entry.key.format(i=i): _to_stored(entry, arr[i], dims) for i in range(L)})
            else:
                out[entry.key] = _to_stored(entry, arr, dims)
    return out


POOLER = re.compile(r"^pooler\.dense\.(weight|bias)$")


def read_pooler(model_dir, config: BertConfig | None = None) -> dict[str, np.ndarray]:
    """A checkpoint's ``pooler.dense`` tensors (float32; {} when it has none). ``load_params`` skips them, as
    embeddings never use the pooler; an export carries them through so transformers does not initialise
    the model's pooler at random (and warn about it)."""
    prefix = architecture(config).prefix if config is not None else "bert."
    out = {}
    for path in checkpoint_files(model_dir):
        handle = _open(path)
        for raw in handle.keys():
            key = normalize_key(raw, prefix)
            if POOLER.match(key):
                out[key] = np.ascontiguousarray(handle.get_tensor(raw), dtype=np.float32)
    return out
