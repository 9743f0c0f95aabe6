"""Host memory while embedding growing corpora: peak RSS should grow only by the inputs and the output.

    python tools/memory.py [--sizes 2000,8000,32000]

Each size runs in a fresh process with a small random BERT (2 layers x 128; the engine's host buffers do
not depend on model size) and the real-text corpus of tools/corpus.py, repeated to length.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model_dir: str, n: int) -> dict:
    sys.path.insert(0, str(HERE))
    from corpus import build_corpus

    import e5lite
    base = build_corpus(2000)
    texts = [base[i % len(base)] + f" ({i})" for i in range(n)]
    input_mb = sum(len(t) for t in texts) / 2**20
    enc = e5lite.load(model_dir)
    before = _status_mb("VmRSS")
    out = enc.encode(texts)
    peak = _status_mb("VmHWM")  # ru_maxrss would inherit the parent's peak
    shapes, tokens = len(enc.engine.compiled_shapes), enc.engine.stats["real_tokens"]
    # Second pass over the same corpus: every shape is compiled already, so what grows now is the stream's.
    del out
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before2 = _status_mb("VmRSS")
    out = enc.encode(texts)
    peak2 = _status_mb("VmHWM")
    return {"texts": n, "input_mb": input_mb, "output_mb": out.nbytes / 2**20, "rss_before_mb": before,
            "peak_rss_mb": peak, "tokens": tokens, "shapes": shapes, "rss_before_2_mb": before2,
            "peak_rss_2_mb": peak2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,8000,32000")
    ap.add_argument("--child", nargs=2, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    import shutil

    import torch
    import transformers
    from bench import minilm_dir
    minilm = minilm_dir()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
        transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            shutil.copy(minilm / f, Path(tmp) / f)
        print("| texts | tokens | input MB | output MB | shapes | RSS before MB | 1st pass: peak RSS MB | "
              "1st: peak - before - output | 2nd pass (compiled): peak - before - output |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in map(int, args.sizes.split(",")):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, str(n)], capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rest = r["peak_rss_mb"] - r["rss_before_mb"] - r["output_mb"]  # inputs are in rss_before
            rest2 = r["peak_rss_2_mb"] - r["rss_before_2_mb"] - r["output_mb"]
            print(f"| {n:,} | {r['tokens']:,} | {r['input_mb']:.1f} | {r['output_mb']:.1f} | {r['shapes']} | "
                  f"{r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | {rest:.0f} | {rest2:.0f} |", flush=True)


if __name__ == "__main__":
    main()
