"""Training benchmark: tokens/s and peak memory of e5lite's training step against sentence-transformers'
trainer with (Cached)MultipleNegativesRankingLoss, on the same machine, model, records, batch and max length.

    python tools/bench_train.py                                          # MiniLM, batch 32, 2 + 10 steps
    python tools/bench_train.py --model e5-base --batch-size 16 --steps 5 --json train.json
    python tools/bench_train.py --peers e5lite-bf16,e5lite-bf16-cached,st-fp16,st-fp16-cached   # on a GPU

Peers (each in its own process, loaded once, then --warmup + --steps optimiser steps, of which the first
--warmup are not timed): `e5lite` runs the code `e5lite.train.fit` runs per step (TokenisedPairs, batch_index,
train_step, make_optimizer: AdamW, lr 2e-5, weight decay 0.01, no warm-up, dropout from the checkpoint), but
no checkpoints, log or export, and it first compiles every batch shape of the run on throw-away copies of
its state (time and count in "compiles s (shapes)"), since a long run compiles each shape once, and it runs
in the environment `e5lite train` restarts itself with (huge pages for glibc's malloc, e5lite/runtime.py;
the header says which); `st` runs
SentenceTransformerTrainer with MultipleNegativesRankingLoss(scale=100, i.e. temperature 0.01), the same
optimiser and schedule. `-cached`: GradCache, chunks of a quarter batch (chunk_size / CachedMNRL
mini_batch_size); `-bf16`: bfloat16 compute (e5lite's dtype, the trainer's bf16=True: CPU or GPU autocast);
`-fp16` (st, GPU): float16 mixed precision. Records: Python's pydoc
topics (tests/pydoc_beir.py), each with its opening as positive and the next topic's opening as its one hard
negative, in list order (no shuffle), prefixed with the model's "query: " / "passage: " prompts for both peers.
Tokens/s counts the real (unpadded) tokens of the timed steps, computed once here with e5lite's tokenizer.
Like for like: the trainer's collator (tokenisation) runs before the clock, as e5lite tokenises before its loop
(its time is printed apart); no gradient clipping (e5lite has none); no evaluation, saving or progress bar.
Models: the real all-MiniLM-L6-v2, or random-init BERTs at e5-base/e5-large shape (tools/bench.py).
The st peer needs the dev extra (accelerate: the transformers Trainer requires it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]
from bench import minilm_dir, peak_rss_mb, prepare_model  # noqa: E402

PEERS = "e5lite,e5lite-cached,st,st-cached"


def pairs(n: int) -> dict:
    """n records from the pydoc topics, repeated as needed; every record has exactly one hard negative (the
    next topic's opening), since the trainer needs a fixed number of columns and e5lite's padding rows for
    records without one would otherwise be work that only e5lite does."""
    from pydoc_beir import training_records
    recs = training_records()
    q = [r["query"] for r in recs]
    p = [r["positive"] for r in recs]
    neg = [p[(i + 1) % len(p)] for i in range(len(p))]
    take = [i % len(recs) for i in range(n)]
    return {"queries": [q[i] for i in take], "positives": [p[i] for i in take], "negatives": [[neg[i]] for i in take]}


# ----------------------------------------------------------------------------------------------- workers

def run_e5lite(cfg: dict, mods: set) -> dict:
    import jax
    import jax.numpy as jnp

    import e5lite
    from e5lite.train import TrainSettings, make_optimizer
    from e5lite.train_data import Pairs, TokenisedPairs, batch_index
    from e5lite.train_step import StepConfig, decay_mask, train_step
    B, total = cfg["batch_size"], cfg["warmup"] + cfg["steps"]
    s = TrainSettings(batch_size=B, shuffle=False, max_steps=total, dtype="bfloat16" if "bf16" in mods else "float32",
                      chunk_size=B // 4 if "cached" in mods else None)
    enc = e5lite.load(cfg["model_dir"], max_length=cfg["max_length"])
    data = TokenisedPairs(enc, Pairs(**cfg["pairs"]))
    # from here on, what _Run.__init__ and _Run.loop do (train.py), less checkpoints, log, progress bar, export,
    # on one device (its data-parallel placement is then a plain device_put)
    params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), enc.params))
    optimizer, _ = make_optimizer(s, total, decay_mask(params))
    opt_state, key = optimizer.init(params), jax.random.PRNGKey(s.seed)
    c = enc.config  # dropout=None: the checkpoint's rates, as TrainSettings' default
    sc = StepConfig(c, enc.pooling, s.temperature, c.hidden_dropout_prob, c.attention_probs_dropout_prob, s.dtype,
                    s.gradient_checkpointing, s.chunk_size)
    # Compile every batch shape the run will meet before the clock (a long run compiles each once, out of
    # thousands of steps; here one compile would be a sizeable part of ten steps). The steps run on copies
    # and are thrown away: the timed run starts from the same state as sentence-transformers'.
    t, shapes = time.perf_counter(), {}
    for step in range(total):
        batch, _ = data.batch(batch_index(step, len(data), s))
        shapes.setdefault((batch.q_ids.shape, batch.p_ids.shape), batch)
    for batch in shapes.values():
        copy = jax.tree.map(jnp.copy, (params, opt_state))
        jax.block_until_ready(train_step(*copy, jax.device_put(batch), key, sc=sc, optimizer=optimizer))
    compile_s = time.perf_counter() - t
    times, losses = [], []
    for step in range(total):
        t = time.perf_counter()
        batch, _ = data.batch(batch_index(step, len(data), s))
        params, opt_state, loss = train_step(params, opt_state, jax.device_put(batch), jax.random.fold_in(key, step),
                                             sc=sc, optimizer=optimizer)
        losses.append(float(loss))  # waits for the step, as fit's per-step float(loss) does
        times.append(time.perf_counter() - t)
    stats = (jax.default_backend() != "cpu" and jax.devices()[0].memory_stats()) or {}
    return {"times": times, "losses": losses, "device": str(jax.devices()[0]), "dtype": s.dtype,
            "compile_s": compile_s, "shapes": len(shapes),
            "device_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None}


def run_st(cfg: dict, mods: set, scratch: str) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    B, total, cuda = cfg["batch_size"], cfg["warmup"] + cfg["steps"], torch.cuda.is_available()
    model = SentenceTransformer(cfg["model_dir"], device="cuda" if cuda else "cpu")
    model.max_seq_length = cfg["max_length"]
    qp, pp, pr = cfg["prefix"]["query"], cfg["prefix"]["passage"], cfg["pairs"]
    rows = {"anchor": [qp + t for t in pr["queries"]], "positive": [pp + t for t in pr["positives"]],
            "negative": [pp + n[0] for n in pr["negatives"]]}
    loss = (losses.CachedMultipleNegativesRankingLoss(model, scale=100.0, mini_batch_size=B // 4) if "cached" in mods
            else losses.MultipleNegativesRankingLoss(model, scale=100.0))

    class InOrder(DefaultBatchSampler):  # the records in list order, as e5lite's shuffle=False
        def __init__(self, dataset, batch_size, drop_last, **_):
            super().__init__(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last)

    clock, losses_ = [], []

    class Clock(TrainerCallback):  # one mark per optimiser step: intervals hold everything the trainer does
        def on_train_begin(self, *a, **k):
            clock.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            clock.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses_.append(logs["loss"])

    args = SentenceTransformerTrainingArguments(
        output_dir=scratch, per_device_train_batch_size=B, max_steps=total, learning_rate=2e-5, weight_decay=0.01,
        warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=0.0,  # e5lite does not clip: same update
        fp16="fp16" in mods, bf16="bf16" in mods, batch_sampler=InOrder, dataloader_num_workers=0,
        logging_steps=1,  # loss every step
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0, use_cpu=not cuda)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), loss=loss,
                                         callbacks=[Clock()])
    # The trainer tokenises each batch in its data collator, inside the step; e5lite tokenises all records once
    # before its loop. For a like-for-like step, collate every batch ahead of the clock (timed, reported apart).
    inner, t = trainer.data_collator, time.perf_counter()
    batches = [inner([{k: v[i] for k, v in rows.items()} for i in range(j * B, (j + 1) * B)]) for j in range(total)]
    collate_s = (time.perf_counter() - t) / total
    st_tokens = [sum(int(v.sum()) for k, v in b.items() if k.endswith("attention_mask")) for b in batches]

    ahead = iter(batches)
    trainer.data_collator = lambda features: next(ahead)  # the sampler's rows, in order: the batches above
    trainer.data_collator.valid_label_columns = inner.valid_label_columns  # read by get_train_dataloader
    trainer.train()
    return {"times": list(np.diff(clock)), "losses": losses_, "collate_ms": 1000 * collate_s, "st_tokens": st_tokens,
            "device": "cuda" if cuda else "cpu", "optim": str(args.optim), "threads": torch.get_num_threads(),
            "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def worker(peer: str, cfg_path: str, scratch: str) -> dict:
    stdout, sys.stdout = sys.stdout, sys.stderr  # library chatter must not reach the driver's JSON line
    cfg = json.loads(Path(cfg_path).read_text())
    kind, *mods = peer.split("-")
    r = run_e5lite(cfg, set(mods)) if kind == "e5lite" else run_st(cfg, set(mods), scratch)
    sys.stdout = stdout
    return {"peer": peer, "peak_rss_mb": peak_rss_mb(), **r}


# ----------------------------------------------------------------------------------------------- driver

def run_peer(peer: str, cfg_path: Path, scratch: Path, timeout, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", peer, "--cfg", str(cfg_path), "--scratch", str(scratch / peer)]
    with tempfile.TemporaryFile(mode="w+") as err:  # a file, not a pipe: a chatty worker cannot block
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"peer": peer, "error": f"timed out after {timeout} s"}
        err.seek(0)
        if p.returncode != 0:
            tail = err.read()
            print(f"  {peer} failed:\n{tail[-3000:]}", file=sys.stderr)
            return {"peer": peer, "error": ((tail.strip().splitlines() or ["failed"])[-1])[:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=["tiny", "minilm", "e5-base", "e5-large"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--peers", default=PEERS)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="runs of every peer, in an order rotating run to run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--peer-timeout", type=float, default=None)
    ap.add_argument("--worker", default=None)  # worker mode (internal)
    ap.add_argument("--cfg")
    ap.add_argument("--scratch")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.cfg, args.scratch)))
        return
    bad = [p for p in args.peers.split(",") if p.split("-")[0] not in ("e5lite", "st")
           or not set(p.split("-")[1:]) <= {"cached", "bf16", *(() if p.startswith("e5lite") else ("fp16",))}]
    if bad:
        raise SystemExit(f"unknown peers {bad}: e5lite or st, with -cached and -bf16 (st also -fp16)")
    if args.batch_size % 4:
        raise SystemExit("--batch-size must be a multiple of 4 (the cached peers use chunks of a quarter batch)")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # the workers' environment: the default backend
    os.environ["JAX_PLATFORMS"] = "cpu"  # this driver only tokenises: it holds none of the accelerator

    import e5lite
    from e5lite.train import TrainSettings
    from e5lite.train_data import Pairs, TokenisedPairs, batch_index
    peers, B, total = args.peers.split(","), args.batch_size, args.warmup + args.steps
    versions = []
    for dist in ("jax", "torch", "sentence-transformers", "transformers", "accelerate"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    print(f"# e5lite training benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} cpus  "
          f"{platform.processor() or platform.machine()}  " + "  ".join(versions))
    from e5lite.runtime import huge_pages_tunables  # e5lite's workers: the environment `e5lite train` restarts with
    e5_env = {**env, "GLIBC_TUNABLES": huge_pages_tunables(env) or env.get("GLIBC_TUNABLES", "")}
    print(f"# e5lite's GLIBC_TUNABLES: {e5_env['GLIBC_TUNABLES'] or '(none)'}")
    with tempfile.TemporaryDirectory(prefix="e5lite-bench-train-") as tmp:
        tmp = Path(tmp)
        model_dir = prepare_model(args.model, tmp) if args.model != "minilm" else minilm_dir()
        enc = e5lite.load(model_dir, max_length=args.max_length)
        cfg = {"model_dir": str(model_dir), "batch_size": B, "steps": args.steps, "warmup": args.warmup,
               "max_length": args.max_length, "pairs": pairs(total * B),
               "prefix": {k: enc.prompt_for(k) for k in ("query", "passage")}}
        # the real tokens of each step, by the very code e5lite's trainer counts them with (train.py's loop)
        data, s = TokenisedPairs(enc, Pairs(**cfg["pairs"])), TrainSettings(batch_size=B, shuffle=False)
        step_tokens = [data.batch(batch_index(k, len(data), s))[1] for k in range(total)]
        timed_tokens = sum(step_tokens[args.warmup:])
        cfg_path = tmp / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        c = enc.config
        print(f"\n## {args.model}: {c.num_hidden_layers} layers x {c.hidden_size}, batch {B} (query, positive, 1 "
              f"negative), max length {args.max_length}, {args.warmup} warm-up + {args.steps} timed steps, "
              f"{timed_tokens:,} real tokens timed ({timed_tokens / args.steps / B / 3:.0f} per text)")
        runs: dict[str, list] = {p: [] for p in peers}
        for rep in range(args.repeats):
            for peer in peers[rep % len(peers):] + peers[:rep % len(peers)]:
                print(f"  run {rep + 1}/{args.repeats}: {peer} ...", file=sys.stderr, flush=True)
                runs[peer].append(run_peer(peer, cfg_path, tmp, args.peer_timeout,
                                            e5_env if peer.startswith("e5lite") else env))
    rows = []
    for peer, rs in runs.items():
        ok = [r for r in rs if "times" in r and len(r["times"]) == total]
        if not ok:
            rows.append({"peer": peer, "error": next((r.get("error") for r in rs if "error" in r), "no timings")})
            continue
        for r in ok:
            r["timed_s"] = float(sum(r["times"][args.warmup:]))
        med = sorted(ok, key=lambda r: r["timed_s"])[len(ok) // 2]  # the median run
        row = {**med, "steps_per_s": args.steps / med["timed_s"], "tokens_per_s": timed_tokens / med["timed_s"],
               "first_step_s": med["times"][0], "final_loss": med["losses"][-1] if med["losses"] else None,
               "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "runs_s": [r["timed_s"] for r in ok]}
        if "st_tokens" in row and sum(row["st_tokens"][args.warmup:]) != timed_tokens:  # same tokenisation?
            print(f"  note: {peer} tokenised {sum(row['st_tokens'][args.warmup:]):,} real tokens, e5lite "
                  f"{timed_tokens:,}", file=sys.stderr)
        rows.append(row)
    base = {r["peer"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["peer"].startswith("st")}
    dev = any(r.get("device_peak_mb") for r in rows)
    head = ["peer", "steps/s", "tokens/s", *(f"vs {p}" for p in base), "peak host MB",
            *(["peak device MB"] if dev else []), "compiles s (shapes)", "first step s", "final loss"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['peer']} | skipped: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["peer"], f"{r['steps_per_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                 *(f"{r['tokens_per_s'] / v:.2f}x" for v in base.values()), f"{r['peak_rss_mb']:,.0f}",
                 *([f"{r['device_peak_mb']:,.0f}" if r.get("device_peak_mb") else "-"] if dev else []),
                 f"{r['compile_s']:.1f} ({r['shapes']})" if "compile_s" in r else "-",
                 f"{r['first_step_s']:.1f}", "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    st = next((r for r in rows if "collate_ms" in r), None)
    if st:
        print(f"\n(sentence-transformers' collator tokenises inside each step; it took {st['collate_ms']:.1f} ms a "
              f"batch, collated ahead of the clock and not counted above, as e5lite tokenises before its loop)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "batch_size": B, "max_length": args.max_length,
                                               "timed_tokens": timed_tokens, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
