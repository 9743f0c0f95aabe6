"""Sentence pooling over token states, and the sentence-transformers pooling config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from .errors import E5LiteError
from .files import json_field, json_type, read_json
from .numerics import HostOrDeviceArray

MODES = ("mean", "cls", "max", "mean_sqrt_len")


def mean_pool(hidden_BSD: HostOrDeviceArray, mask_BS: HostOrDeviceArray) -> jax.Array:
    """Mean over non-padding tokens: [B, S, D], [B, S] -> [B, D] float32."""
    m_BS1 = mask_BS.astype(jnp.float32)[..., None]
    total_BD = jnp.sum(hidden_BSD.astype(jnp.float32) * m_BS1, axis=1)
    # Clamped as sentence-transformers does, so an all-padding row gives 0 rather than NaN.
    return total_BD / jnp.maximum(jnp.sum(m_BS1, axis=1), 1e-9)


def cls_pool(hidden_BSD: HostOrDeviceArray, mask_BS: HostOrDeviceArray | None = None) -> HostOrDeviceArray:
    """First token ([CLS]) state: [B, S, D] -> [B, D] float32."""
    return hidden_BSD[:, 0].astype(jnp.float32)


def max_pool(hidden_BSD: HostOrDeviceArray, mask_BS: HostOrDeviceArray) -> jax.Array:
    """Max over non-padding tokens: [B, S, D], [B, S] -> [B, D] float32."""
    h = hidden_BSD.astype(jnp.float32)
    h = jnp.where(mask_BS[..., None] > 0, h, -1e9)  # the value sentence-transformers fills with
    return jnp.max(h, axis=1)


def mean_sqrt_len_pool(hidden_BSD: HostOrDeviceArray, mask_BS: HostOrDeviceArray) -> jax.Array:
    """Sum over non-padding tokens divided by sqrt(token count): [B, S, D] -> [B, D] float32."""
    m_BS1 = mask_BS.astype(jnp.float32)[..., None]
    total_BD = jnp.sum(hidden_BSD.astype(jnp.float32) * m_BS1, axis=1)
    return total_BD / jnp.sqrt(jnp.maximum(jnp.sum(m_BS1, axis=1), 1e-9))


POOLERS: dict[str, Callable[[HostOrDeviceArray, HostOrDeviceArray], HostOrDeviceArray]] = {
    "mean": mean_pool,
    "cls": cls_pool,
    "max": max_pool,
    "mean_sqrt_len": mean_sqrt_len_pool,
}


def pool(hidden_BSD: HostOrDeviceArray, mask_BS: HostOrDeviceArray, mode: str = "mean") -> HostOrDeviceArray:
    """Pools [B, S, D] token states into [B, D] float32 sentence vectors with the given mode."""
    if mode not in POOLERS:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {', '.join(MODES)}")
    return POOLERS[mode](hidden_BSD, mask_BS)


PACKED_MODES = ("mean", "cls", "mean_sqrt_len")


def pool_segments(
    hidden_BSD: HostOrDeviceArray,
    segment_ids_BS: HostOrDeviceArray,
    position_ids_BS: HostOrDeviceArray,
    num_segments: int,
    mode: str = "mean",
) -> jax.Array:
    """Pools packed rows per sequence: [B, S, D] with segment ids 1..G -> [B, G, D] float32.

    Slot g-1 of a row holds sequence g (all zeros where a row has fewer sequences).
    """
    if mode not in PACKED_MODES:
        raise ValueError(f"pooling {mode!r} is not available for packed rows; use one of {PACKED_MODES}")
    onehot_BSG = (segment_ids_BS[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
    if mode == "cls":  # each sequence's first token
        onehot_BSG = onehot_BSG * (position_ids_BS[..., None] == 0)
    h = hidden_BSD.astype(jnp.float32)
    total_BGD = jnp.einsum("BSG,BSD->BGD", onehot_BSG, h, precision="highest")
    if mode == "cls":
        return total_BGD
    count_BG1 = jnp.maximum(jnp.sum(onehot_BSG, axis=1), 1e-9)[..., None]
    return total_BGD / (count_BG1 if mode == "mean" else jnp.sqrt(count_BG1))


def l2_normalize(x_BD: HostOrDeviceArray, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm (as torch.nn.functional.normalize)."""
    x = x_BD.astype(jnp.float32)
    return jnp.divide(x, jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps))


def read_pooling_mode(model_dir) -> str:
    """The pooling mode of a sentence-transformers folder (modules.json / 1_Pooling/config.json); mean if none."""
    d = Path(model_dir)
    pooling_dir = d / "1_Pooling"
    modules = d / "modules.json"
    if modules.is_file():
        entries = read_json(modules, expect=list)
        known = {"Transformer", "Pooling", "Normalize"}
        for i, m in enumerate(entries):
            if not isinstance(m, dict):
                raise E5LiteError(f"{modules}: entry {i} must be an object, got {json_type(m)}")
            json_field(modules, m, "path", (str,))
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind not in known:
                raise E5LiteError(
                    f"{modules}: module {m.get('name')!r} of type {m.get('type')!r} is not "
                    f"supported (e5lite runs Transformer -> Pooling -> Normalize)"
                )
            if kind == "Pooling":
                pooling_dir = d / m.get("path", "1_Pooling")
    cfg_path = pooling_dir / "config.json"
    if not cfg_path.is_file():
        return "mean"
    cfg = read_json(cfg_path, expect=dict)
    for field in cfg:
        if field.startswith("pooling_mode_") or field == "include_prompt":
            json_field(cfg_path, cfg, field, (bool,))
    if "pooling_mode" in cfg:
        json_field(cfg_path, cfg, "pooling_mode", (str, list))  # newer sentence-transformers write the mode(s) by name
        named = cfg["pooling_mode"] if isinstance(cfg["pooling_mode"], list) else [cfg["pooling_mode"]]
        modes = [{"mean_tokens": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len"}.get(str(m), str(m)) for m in named]
    else:
        modes = [
            m
            for m in ("cls", "mean", "max", "mean_sqrt_len")
            if cfg.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")
        ]
        for other in ("weightedmean", "lasttoken"):
            if cfg.get(f"pooling_mode_{other}_tokens") or cfg.get(f"pooling_mode_{other}_token"):
                modes.append(other)
    if cfg.get("include_prompt") is False:
        raise E5LiteError(f"{cfg_path}: include_prompt=false is not supported")
    if len(modes) != 1 or modes[0] not in MODES:
        raise E5LiteError(
            f"{cfg_path}: pooling {modes or 'none'} is not supported; e5lite supports exactly one of {', '.join(MODES)}"
        )
    return modes[0]
