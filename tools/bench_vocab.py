"""What XLM-R's 250,002-row embedding table costs: multilingual-e5-base against the same model with its table cut to
BERT's 30,522 rows (the same token ids, the same compute, only the gather's table differs), and against an
e5-base-shaped BERT on the same texts, interleaved in one process.

    python tools/bench_vocab.py                      # me5-base shape, 150 real texts, 1 warm-up + 5 timed passes
    python tools/bench_vocab.py --texts 400 --repeats 7 --dtype bfloat16

Models are random-init (tests/multilingual.py, tools/bench.py's e5-base), so the FLOPs are the real ones. Each pass
runs the texts' planned batches (planned once) through the engine's jitted forward + pooling; passes rotate their
order from round to round; medians count. Tokens/s counts real tokens (no padding).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import jax
    import numpy as np

    import e5lite
    from bench import prepare_model
    from corpus import build_corpus

    texts = build_corpus(args.texts)
    with tempfile.TemporaryDirectory(prefix="e5lite-vocab-") as tmp:
        full = e5lite.load(prepare_model("me5-base", Path(tmp)), dtype=args.dtype)
        cut = e5lite.load(full.model_dir, dtype=args.dtype)
        word_VD = cut.params.embeddings.word_VD
        ids = full.tokenize(texts)
        assert max(int(t.max()) for t in ids) < 30522  # the test tokenizer uses the first rows only
        cut.set_params(cut.params._replace(embeddings=cut.params.embeddings._replace(word_VD=word_VD[:30522])))
        bert = e5lite.load(prepare_model("e5-base", Path(tmp)), dtype=args.dtype)
        peers = {"me5-base, 250,002 rows": full, "me5-base, table cut to 30,522 rows": cut,
                 "e5-base (BERT, WordPiece), 30,522 rows": bert}
        tokens = {name: sum(len(t) for t in enc.tokenize(texts)) for name, enc in peers.items()}
        # The same planned batches for every peer of a tokenizer, run through the engine's jitted function: the
        # passes differ only in the table they gather from (tokenising is timed by tools/bench_host.py).
        planned = {name: list(enc.iter_batches(texts)) for name, enc in peers.items()}
        planned[names_cut := "me5-base, table cut to 30,522 rows"] = planned["me5-base, 250,002 rows"]
        times: dict[str, list[float]] = {name: [] for name in peers}
        names = list(peers)

        def one_pass(name):
            enc = peers[name]
            return [np.asarray(enc.engine.dispatch(b, True)) for b in planned[name]]

        for r in range(1 + args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                out = one_pass(name)
                dt = time.perf_counter() - t0
                if r:
                    times[name].append(dt)
            print(f"  round {r}{' (warm-up)' if r == 0 else ''}: " +
                  ", ".join(f"{n.split(',')[0]} {times[n][-1] if r else dt:.2f} s" for n in names),
                  file=sys.stderr)
        del out
        same = float(np.abs(full.encode(texts[:20]) - cut.encode(texts[:20])).max())

    print(f"# e5lite vocabulary benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
          f"jax {jax.__version__} on {jax.devices()[0]}  {args.dtype}  {args.texts} texts, 1 warm-up + "
          f"{args.repeats} timed passes (median)")
    ref = statistics.median(times[names[1]]) / tokens[names[1]]
    print("| model | real tokens | median s | tokens/s | time per token vs the cut table |")
    print("|---|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {tokens[name]:,} | {med:.2f} | {tokens[name] / med:,.0f} | "
              f"{med / tokens[name] / ref:.3f}x |")
    print(f"\nmax |difference| of the full and cut tables' embeddings on 20 texts: {same:.1e} (same ids, same rows)")


if __name__ == "__main__":
    main()
