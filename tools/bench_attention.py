"""Attention implementations side by side: Pallas kernel vs cuDNN vs XLA, alone and inside the model.

    python tools/bench_attention.py                    # e5-base heads (12 x 64), bf16 on GPU, fp32 on CPU
    python tools/bench_attention.py --dtype float32 --model-layers 2

Part 1 times the attention op alone on padded rows (right padding, 70% real keys) and on packed rows
(short segments), reporting the median of --repeats after a warm-up, and the max abs difference from the
XLA result. Part 2 times the whole e5lite encoder (random e5-base-shaped weights, --model-layers layers)
on packed rows with each implementation. An implementation that cannot run here is listed as such.
On CPU the Pallas kernel runs in interpret mode: that row checks correctness, not speed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from e5lite.attention import ATTENTION_IMPLS, AttentionMask, attention_core


def median_time(f, repeats: int) -> float:
    jax.block_until_ready(f())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def packed_segments(B: int, S: int, rng) -> np.ndarray:
    seg = np.zeros((B, S), np.int32)
    for b in range(B):
        pos, g = 0, 1
        while pos < S - 8:
            n = int(rng.integers(8, 96))
            seg[b, pos:pos + n] = g
            pos, g = pos + n, g + 1
    return seg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU/TPU, float32 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="rows (default 32 on GPU/TPU, 4 on CPU)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model-layers", type=int, default=12)
    args = ap.parse_args()
    platform = jax.devices()[0].platform
    dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
    B = args.batch or (4 if platform == "cpu" else 32)
    S, N, K = args.seq, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, N, S, K)) / 8, dtype) for _ in range(3))
    lengths = rng.integers(int(0.4 * S), S + 1, size=B)
    cases = {
        "padded": AttentionMask(jnp.asarray(np.arange(S)[None] < lengths[:, None])),
        "packed": (lambda seg: AttentionMask(jnp.asarray(seg > 0), jnp.asarray(seg)))(packed_segments(B, S, rng)),
    }
    print(f"# attention on {jax.devices()[0]} ({platform}), jax {jax.__version__}, {dtype.name}, "
          f"B={B} N={N} S={S} K={K}")
    print("| case | impl | ms | vs xla | max abs diff vs xla |")
    print("|---|---|---|---|---|")
    for case, mask in cases.items():
        ref = None
        base_t = None
        for impl in ATTENTION_IMPLS:
            f = jax.jit(lambda q, k, v, m, impl=impl: attention_core(q, k, v, m, impl))
            try:
                t = median_time(lambda: f(q, k, v, mask), args.repeats)
                out = np.asarray(f(q, k, v, mask), np.float32)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"| {case} | {impl} | unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |")
                continue
            if impl == "xla":
                ref, base_t = out, t
            # compare real query rows (not padding) that have at least one allowed key; cuDNN zeroes padded rows
            valid = np.broadcast_to(np.asarray(mask.logits_mask()), (B, 1, S, S)).any(-1)[:, 0]
            valid = valid & np.asarray(mask.key_valid_BT)
            diff = float(np.abs(out - ref).transpose(0, 2, 1, 3)[valid].max()) if ref is not None else 0.0
            print(f"| {case} | {impl} | {t * 1e3:.2f} | {base_t / t:.2f}x | {diff:.1e} |")

    import transformers  # random e5-base-shaped weights, saved and loaded as a user would
    import tempfile
    from pathlib import Path

    import e5lite
    from e5lite.batching import plan_packed
    with tempfile.TemporaryDirectory() as tmp:
        cfg = transformers.BertConfig(hidden_size=N * K, num_hidden_layers=args.model_layers, num_attention_heads=N,
                                      intermediate_size=4 * N * K)
        transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp)
        from bench import minilm_dir
        src = minilm_dir()
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            (Path(tmp) / name).write_bytes((src / name).read_bytes())
        lengths = rng.integers(8, 200, size=B * S // 64)
        ids = [rng.integers(1000, 20000, size=n).astype(np.int32) for n in lengths]
        batch = next(plan_packed(ids, pack_length=S, max_length=512, token_budget=B * S, max_segments=64))
        print(f"\n# whole encoder ({args.model_layers} layers x {N * K}), one packed batch {batch.shape}, "
              f"{batch.real_tokens} real tokens")
        print("| impl | ms | tokens/s | vs xla |")
        print("|---|---|---|---|")
        base_t = None
        for impl in ATTENTION_IMPLS:
            try:
                enc = e5lite.load(tmp, dtype=dtype.name, attention_impl=impl)
                f = lambda: enc.engine.dispatch(batch, True)  # noqa: E731
                t = median_time(f, max(3, args.repeats // 3))
            except Exception as e:  # noqa: BLE001
                print(f"| {impl} | unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |")
                continue
            base_t = base_t or (t if impl == "xla" else None)
            print(f"| {impl} | {t * 1e3:.1f} | {batch.real_tokens / t:,.0f} | "
                  f"{(base_t / t) if base_t else float('nan'):.2f}x |")


if __name__ == "__main__":
    main()
