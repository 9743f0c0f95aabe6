"""Host pipeline throughput: how fast e5lite turns texts into device-ready batches (tokenise, plan, build the
arrays), against `tokenizers` encode_batch_fast alone on the same texts and against the forward's own rate.

    python tools/bench_host.py                          # minilm, e5-base, me5-base; 50,000 real texts
    python tools/bench_host.py --models minilm --texts 200000 --repeats 7
    python tools/bench_host.py --baseline /path/to/older/checkout   # the same, run on another e5lite

Accelerator batch sizes: the engine's accelerator settings (token budget 65,536, no attention windows), on
this machine's CPU. Every token is placed exactly once (checked: real tokens summed over the batches equal
the tokenizer's count). Texts: real English paragraphs (tools/corpus.py) with E5's "passage: " prompt. Each
measure is the median of --repeats timed passes after one warm-up, interleaved. The model's own rate is
encode() on --forward-texts texts with the default settings of this machine's backend: on a CPU it is far
below the host's; on an accelerator it is the rate the host must keep up with.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCELERATOR = dict(token_budget=65536, min_window=0, streams=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,e5-base,me5-base")
    ap.add_argument("--texts", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--forward-texts", type=int, default=256, help="texts timed for the model's own rate")
    ap.add_argument("--baseline", default=None, help="import e5lite from this checkout instead (a 'before')")
    args = ap.parse_args()
    if args.baseline:
        sys.path.insert(0, str(Path(args.baseline).resolve()))
    sys.path[1:1] = [str(ROOT / "tools"), str(ROOT / "tests")]

    import jax
    import numpy as np

    import e5lite
    from bench import prepare_model
    from corpus import build_corpus

    texts = build_corpus(args.texts)
    print(f"# e5lite host pipeline  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} cpus  "
          f"jax {jax.__version__} on {jax.devices()[0]}  e5lite from {Path(e5lite.__file__).parent}")
    with tempfile.TemporaryDirectory(prefix="e5lite-host-") as tmp:
        for name in args.models.split(","):
            folder = prepare_model(name, Path(tmp))
            enc = e5lite.load(folder, **ACCELERATOR)
            reference = enc.tokenizer._tok  # the tokenizers.Tokenizer e5lite is verified against
            prompt = "passage: "  # E5's, given: a benchmarked model need not have prompts of its own
            prompted = [prompt + t for t in texts]

            def tokenizers_alone():
                return sum(len(e.ids) for e in reference.encode_batch_fast(prompted))

            def tokenise():
                return sum(len(t) for t in enc.tokenize(texts, prompt=prompt))

            def pipeline():
                if hasattr(enc, "iter_batches"):
                    return sum(b.real_tokens for b in enc.iter_batches(texts, prompt=prompt))
                total = 0  # an e5lite without iter_batches: the engine's own chunks, tokenised and planned
                for lo, hi in enc.engine._chunks(len(texts)):
                    _, batches = enc.engine.plan(enc.tokenize(texts[lo:hi], prompt=prompt))
                    total += sum(b.real_tokens for b in batches)
                return total

            measures = {"tokenizers encode_batch_fast alone": tokenizers_alone,
                        "e5lite tokenize()": tokenise, "e5lite host pipeline (tokenise, plan, arrays)": pipeline}
            times = {k: [] for k in measures}
            counts = {}
            keys = list(measures)
            for r in range(1 + args.repeats):
                for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                    t0 = time.perf_counter()
                    counts[k] = measures[k]()
                    if r:
                        times[k].append(time.perf_counter() - t0)
            tokens = counts[keys[0]]
            assert counts[keys[2]] == tokens == counts[keys[1]], counts  # every token placed exactly once

            # the forward's own rate on this machine: encode() with its default (CPU-sized) settings
            device_enc = e5lite.load(folder)
            sample = texts[:args.forward_texts]
            device_enc.encode(sample, prompt=prompt)  # compile
            t0 = time.perf_counter()
            device_enc.encode(sample, prompt=prompt)
            fwd = sum(len(t) for t in device_enc.tokenize(sample, prompt=prompt)) / (time.perf_counter() - t0)
            del device_enc

            cfg = enc.config
            print(f"\n## {name}: {cfg.model_type}, {cfg.num_hidden_layers} x {cfg.hidden_size}, tokenizer "
                  f"{getattr(enc.tokenizer, 'kind', 'WordPiece')} ({getattr(enc.tokenizer, 'backend', 'tokenizers')}"
                  f"), {len(texts):,} texts, {tokens:,} real tokens, median of {args.repeats}")
            print("| stage | median s | tokens/s | vs tokenizers alone |")
            print("|---|---|---|---|")
            ref = statistics.median(times[keys[0]])
            for k in keys:
                med = statistics.median(times[k])
                print(f"| {k} | {med:.3f} | {tokens / med:,.0f} | {ref / med:.2f}x |")
            print(f"| the model itself: encode() on {jax.devices()[0].platform} ({len(sample)} texts, default "
                  f"settings) | - | {fwd:,.0f} | - |", flush=True)


if __name__ == "__main__":
    main()
