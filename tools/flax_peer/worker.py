"""Throughput peer: transformers 4.57 ``FlaxBertModel`` (fp32) encoding a JSON corpus.

Run with the venv made by ``tools/flax_peer/setup.sh`` (transformers 5 has no Flax classes)::

    .bench-venvs/flax/bin/python tools/flax_peer/worker.py --model DIR --corpus texts.json \
        --batch-size 32 --max-length 256 --warmup 1 --repeats 3 [--pooling mean] [--save emb.npy]

DIR is a Hugging Face BERT folder (config.json, model.safetensors as saved by PyTorch, tokenizer.json).
Texts are tokenised once (truncated to --max-length, not timed), sorted by token length (longest first) and
cut into batches of --batch-size, each padded to its own longest text, as sentence-transformers does; every
distinct batch shape compiles once during warm-up. One timed pass runs the jitted FlaxBertModel call plus
masked pooling and L2 normalisation over the whole corpus and blocks until the results are ready.

Weights are mapped from the checkpoint strictly (``FlaxBertModel.from_pretrained`` would silently
random-initialise any parameter it fails to match): an optional ``bert.`` prefix is dropped, PyTorch
``weight``/``gamma``/``beta`` names and transposed Linear kernels are handled, and any model parameter
that the checkpoint lacks is an error. transformers 4.x and 5.x checkpoints both load.

stdout gets exactly one JSON line; logs go to stderr. With ``--serve`` (how tools/bench.py runs it, interleaved
with the other peers) the passes are driven over stdin instead of --warmup/--repeats: the worker prints
``{"ready": true}``, times one pass per ``pass`` line (printing ``{"pass_s": seconds}``), and on ``done``
prints its result line.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time


def _peak_rss_mb():
    # VmHWM: ru_maxrss would inherit the parent's peak across fork/exec
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load_params(model, path):
    """Flax params for ``model`` from a PyTorch-format safetensors file, strictly."""
    import numpy as np
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors.numpy import load_file

    ckpt = {k.removeprefix("bert."): v for k, v in load_file(path).items()}
    names = {"kernel": ("weight",), "embedding": ("weight",), "scale": ("weight", "gamma"), "bias": ("bias", "beta")}
    params, used = {}, set()
    for key, shape in flatten_dict(model.params_shape_tree).items():
        stem = ".".join(key[:-1])
        found = [f"{stem}.{n}" for n in names[key[-1]] if f"{stem}.{n}" in ckpt]
        if not found:
            raise SystemExit(f"checkpoint {path} has no weight for Flax parameter {'/'.join(key)}")
        w = ckpt[found[0]].astype(np.float32)
        w = w.T if key[-1] == "kernel" else w
        if w.shape != shape.shape:
            raise SystemExit(f"{found[0]}: shape {w.shape}, FlaxBertModel expects {shape.shape}")
        params[key], used = w, used | {found[0]}
    log(f"loaded {len(params)} tensors; unused checkpoint keys: {sorted(set(ckpt) - used)}")
    return unflatten_dict(params)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    ap.add_argument("--save", help="write float32 embeddings, in input order, to this .npy path")
    ap.add_argument("--serve", action="store_true", help="passes driven over stdin (see above)")
    args = ap.parse_args()
    stdout, sys.stdout = sys.stdout, sys.stderr  # keep library chatter off the JSON channel

    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers
    from tokenizers import Tokenizer
    from transformers import BertConfig, FlaxBertModel

    with open(args.corpus, encoding="utf-8") as f:
        texts = json.load(f)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(args.max_length)
    t0 = time.perf_counter()
    ids = [e.ids for e in tok.encode_batch(texts)]
    tokenize_s = time.perf_counter() - t0
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    config = BertConfig.from_pretrained(args.model)
    pad = config.pad_token_id or 0
    batches = []
    for s in range(0, len(order), args.batch_size):
        rows = order[s:s + args.batch_size]
        width = max(len(ids[i]) for i in rows)
        x = np.full((len(rows), width), pad, np.int32)
        m = np.zeros((len(rows), width), np.int32)
        for r, i in enumerate(rows):
            x[r, :len(ids[i])], m[r, :len(ids[i])] = ids[i], 1
        batches.append((x, m))

    model = FlaxBertModel(config, dtype=jnp.float32, add_pooling_layer=False, _do_init=False)
    params = jax.device_put(load_params(model, os.path.join(args.model, "model.safetensors")))

    @jax.jit
    def embed(params, input_ids, mask):
        h = model(input_ids, attention_mask=mask, params=params, train=False).last_hidden_state
        if args.pooling == "cls":
            e = h[:, 0]
        else:
            w = mask[..., None].astype(h.dtype)
            e = (h * w).sum(1) / jnp.maximum(w.sum(1), 1e-9)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    def run_pass():
        t = time.perf_counter()
        out = jax.block_until_ready([embed(params, x, m) for x, m in batches])
        return time.perf_counter() - t, out

    seconds, out, warm = [], None, []
    if args.serve:  # the driver's protocol, from tools/bench.py (stdlib + numpy: importable from this venv)
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench import serve_passes
        out = serve_passes(lambda: run_pass()[1], stdout)
    else:
        warm = [run_pass()[0] for _ in range(args.warmup)]
        log(f"warm-up passes: {[round(s, 3) for s in warm]} ({len({x.shape for x, _ in batches})} batch shapes)")
        for _ in range(args.repeats):
            s, out = run_pass()
            seconds.append(s)
    median = statistics.median(seconds) if seconds else None
    real = sum(len(i) for i in ids)
    result = {
        "peer": "flax", "transformers": transformers.__version__, "jax": jax.__version__,
        "seconds": seconds, "median_s": median,
        "real_tokens": real, "padded_tokens": int(sum(x.size for x, _ in batches)), "texts": len(texts),
        "tokens_per_s": real / median if median else None,
        "compile_s": warm[0] - median if warm and median else None, "tokenize_s": tokenize_s,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if args.save and out:
        emb = np.empty((len(texts), out[0].shape[1]), np.float32)
        emb[order] = np.concatenate([np.asarray(o) for o in out])
        with open(args.save, "wb") as f:  # a file object: np.save adds no ".npy" suffix
            np.save(f, emb)
        result["embeddings_file"] = os.path.abspath(args.save)
    print(json.dumps(result), file=stdout, flush=True)


if __name__ == "__main__":
    main()
