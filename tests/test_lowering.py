"""The engine's programs lowered for TPU and GPU on this CPU-only machine (``jax.export``, no device, no compile).

What lowering proves: every shape, dtype and primitive of the real programs is accepted for the target platform,
the Pallas kernel goes through Mosaic (TPU) or Triton (GPU) rather than interpret mode, and the data-parallel
program carries its sharding for a mesh of devices this machine does not have. What it cannot: that Mosaic or
Triton compile the kernel, the numbers a device computes, or their speed (README, "Lowering for TPU and GPU").
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from e5lite.config import BertConfig
from e5lite.jitted import embed_batch, embed_packed
from e5lite.model import EmbeddingParams, LayerParams, Params, fuse_layers
from e5lite.train_step import StepBatch, StepConfig, decay_mask, train_step

# Shapes as the released checkpoints' config.json give them: e5-base-v2 (BERT-base) and multilingual-e5-base
# (XLM-R: a 250k vocabulary, positions from pad_token_id + 1).
MODELS = {
    "e5-base": BertConfig(),
    "xlm-r": BertConfig(
        vocab_size=250002,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        model_type="xlm-roberta",
    ),
}
# The Pallas kernel's call for each platform. Triton calls carry no compatibility guarantee, so jax.export
# refuses them unless told.
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
ALLOW_TRITON = [export.DisabledSafetyCheck.custom_call(KERNEL_CALL["cuda"])]
PADDED_BS = (16, 384)  # a padded batch: rows x a bucketed length that is not a power of two
PACKED_BS, WINDOW, SEGMENTS = (8, 512), 128, 16  # packed rows of 512 tokens in attention windows of 128


def abstract_layers(config: BertConfig, dtype) -> tuple[EmbeddingParams, LayerParams]:
    """Embeddings and stacked layers as ShapeDtypeStructs: shapes from the fields' shape names (model.py)."""
    c = config
    dims = dict(V=c.vocab_size, P=c.max_position_embeddings, Y=c.type_vocab_size, D=c.hidden_size)
    dims.update(N=c.num_attention_heads, K=c.head_dim, F=c.intermediate_size, L=c.num_hidden_layers)

    def structs(cls, leading: str):
        shapes = (tuple(dims[d] for d in leading + f.rsplit("_", 1)[1]) for f in cls._fields)
        return cls(*(jax.ShapeDtypeStruct(shape, dtype) for shape in shapes))

    return structs(EmbeddingParams, ""), structs(LayerParams, "L")


def engine_params(config: BertConfig, dtype) -> Params:
    """As an accelerator's engine runs them (jitted.run_layout, unroll off): Q, K, V fused, layers stacked."""
    embeddings, layers = abstract_layers(config, dtype)
    return Params(embeddings, jax.eval_shape(fuse_layers, layers))


def ints(shape, sharding=None):
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)


def export_padded(platform: str, config: BertConfig, dtype, impl: str, params=None, rows=None) -> export.Exported:
    kw = dict(config=config, pooling="mean", normalize=True, attention_impl=impl)
    params = engine_params(config, dtype) if params is None else params
    return export.export(embed_batch, platforms=[platform], disabled_checks=ALLOW_TRITON)(
        params, ints(PADDED_BS, rows), ints(PADDED_BS, rows), **kw
    )


def export_packed(platform: str, config: BertConfig, dtype, impl: str) -> export.Exported:
    kw = dict(config=config, pooling="mean", normalize=True, attention_impl=impl)
    kw.update(num_segments=SEGMENTS, attention_window=WINDOW)
    return export.export(embed_packed, platforms=[platform], disabled_checks=ALLOW_TRITON)(
        engine_params(config, dtype), ints(PACKED_BS), ints(PACKED_BS), ints(PACKED_BS), **kw
    )


def custom_calls(exp: export.Exported) -> set[str]:
    return set(re.findall(r"custom_call @?([\w$.]+)", exp.mlir_module()))


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_engine_programs_lower_with_the_kernel_compiled(platform, impl, dtype, model):
    """Padded batches and packed rows in windows: the Pallas kernel through Mosaic / Triton, not interpreted."""
    config = MODELS[model]
    for exp in (export_padded(platform, config, dtype, impl), export_packed(platform, config, dtype, impl)):
        assert exp.platforms == (platform,)
        assert exp.out_avals[0].dtype == jnp.float32 and exp.out_avals[0].shape[-1] == config.hidden_size
        assert (KERNEL_CALL[platform] in custom_calls(exp)) == (impl == "pallas")


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_a_gradcache_training_step_lowers(platform):
    """train_step as train.py runs it (AdamW with weight decay masked, bfloat16 compute, GradCache chunks)."""
    import optax

    embeddings, layers = abstract_layers(MODELS["e5-base"], jnp.float32)
    params = Params(embeddings, layers)
    optimizer = optax.adamw(1e-5, weight_decay=0.01, mask=decay_mask(params))
    sc = StepConfig(MODELS["e5-base"], "mean", 0.01, 0.1, 0.1, "bfloat16", False, chunk_size=4)
    q_BS, p_BS = (8, 32), (16, 128)  # 8 queries, each with a positive and one negative passage
    batch = StepBatch(ints(q_BS), ints(q_BS), ints(p_BS), ints(p_BS), jax.ShapeDtypeStruct(p_BS[:1], jnp.bool_))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    exp = export.export(train_step, platforms=[platform])(
        params, jax.eval_shape(optimizer.init, params), batch, key, sc=sc, optimizer=optimizer
    )
    new_params, _, loss = jax.tree.unflatten(exp.out_tree, exp.out_avals)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_params) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert loss.shape == () and loss.dtype == jnp.float32


def test_an_exported_forward_serializes_and_round_trips():
    """The parameter NamedTuples are registered for serialization: the exported program is a byte string."""
    exp = export_padded("tpu", MODELS["e5-base"], jnp.bfloat16, "pallas")
    back = export.deserialize(exp.serialize())
    assert back.in_tree == exp.in_tree and back.in_avals == exp.in_avals
    assert back.mlir_module_serialized == exp.mlir_module_serialized


def argument_shardings(exp: export.Exported) -> dict[str, str]:
    """Argument name (its pytree path) -> its Shardy sharding in the exported module, e.g. '[{"data"}, {}]'."""
    main = next(line for line in exp.mlir_module().splitlines() if "func.func public @main(" in line)
    return {name: dims for dims, name in re.findall(r'sdy\.sharding<@\w+, (\[[^>]*\])>} loc\("([\w.]+)"\)', main)}


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_data_parallel_program_lowers_for_an_8_device_pod(impl):
    """The engine's multi-device layout on a mesh this machine does not have: batch rows split over "data",
    weights replicated (engine.Engine: NamedSharding of PartitionSpec("data") and of PartitionSpec(), its mesh
    in context while tracing). The Pallas kernel runs per device, under shard_map: XLA cannot partition it."""
    mesh = AbstractMesh((8,), ("data",))
    replicated, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    config = MODELS["e5-base"]
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), engine_params(config, jnp.bfloat16)
    )
    with jax.sharding.use_abstract_mesh(mesh):
        exp = export_padded("tpu", config, jnp.bfloat16, impl, params=params, rows=rows)
    assert exp.nr_devices == 8
    text = exp.mlir_module()
    assert re.search(r'sdy\.mesh @\w+ = <\["data"=8\]>', text), "a mesh of 8 devices along data"
    shardings = argument_shardings(exp)
    assert len(shardings) == len(jax.tree.leaves(params)) + 2
    assert shardings.pop("input_ids") == shardings.pop("attention_mask") == '[{"data"}, {}]'
    assert all(name.startswith("params.") and "data" not in dims for name, dims in shardings.items())
    if impl == "pallas":  # each device's kernel sees its 16 / 8 rows
        manual = re.search(r"sdy\.manual_computation.*manual_axes=\{\"data\"\} \(%\w+: tensor<2x12x384x64xbf16>", text)
        assert manual and KERNEL_CALL["tpu"] in custom_calls(exp)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_int8_forward_lowers(platform):
    """weights="int8" (engine layout, layers stacked): each layer's four projections are int8 x int8 -> int32
    dots, nothing else is; the program serializes (``QuantizedWeight`` is registered) and reads back."""
    from e5lite.int8 import quantize_layers

    config = MODELS["e5-base"]
    embeddings, layers = abstract_layers(config, jnp.float32)
    params = Params(embeddings, jax.eval_shape(lambda x: quantize_layers(fuse_layers(x), lead=1), layers))
    exp = export_padded(platform, config, jnp.float32, "xla", params=params)
    dots = re.findall(r"stablehlo\.dot_general.*", exp.mlir_module())
    int8 = [d for d in dots if re.search(r"\(tensor<[\dx]+xi8>, tensor<[\dx]+xi8>\) -> tensor<[\dx]+xi32>", d)]
    assert len(int8) == 4 and all("xi8>" not in d for d in dots if d not in int8), dots
    assert export.deserialize(exp.serialize()).in_avals == exp.in_avals
