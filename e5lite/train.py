"""Contrastive fine-tuning of an E5/BERT encoder: ``e5lite train`` and ``e5lite.train.fit``.

The loop: records are tokenised once (queries with the model's query prompt, passages and hard negatives
with its passage prompt), shuffled per epoch from the seed, cut into batches padded to the length buckets
of inference (so a run compiles at most one step per pair of query and passage buckets), and each batch
takes one optimiser step (``train_step.py``). Resumable checkpoints, a JSONL log, a progress bar, periodic
retrieval evaluation, and at the end a Hugging Face / sentence-transformers model folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .files import write_atomic

if TYPE_CHECKING:
    from .encoder import Encoder

LOG = "train_log.jsonl"
STATE_DIR = "training"  # inside the output folder: checkpoints and the log


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a run's result; ``--resume`` refuses a checkpoint made with other settings.

    ``dropout`` None takes the checkpoint's ``hidden_dropout_prob`` / ``attention_probs_dropout_prob``; 0
    turns dropout off (a step is then deterministic). ``max_steps`` None runs ``epochs`` epochs.
    ``dtype``: the compute dtype ("bfloat16": bf16 matmuls, float32 master weights, loss and optimiser).
    ``chunk_size``: GradCache chunk rows (None: the whole batch at once).
    """

    batch_size: int = 32
    learning_rate: float = 2e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None
    temperature: float = 0.01
    seed: int = 0
    shuffle: bool = True
    dropout: float | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("max_steps", "chunk_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.learning_rate <= 0 or self.temperature <= 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0, learning_rate and temperature > 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.chunk_size is not None and self.batch_size % self.chunk_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of chunk_size {self.chunk_size}")


def make_optimizer(s: TrainSettings, steps: int, mask):
    """AdamW (or SGD) with linear warm-up to the learning rate and linear decay to 0 at the last step, as
    transformers' get_linear_schedule_with_warmup; weight decay only where ``mask`` is True."""
    import optax

    decay = optax.linear_schedule(s.learning_rate, 0.0, max(steps - s.warmup_steps, 1))
    schedule = (
        decay
        if not s.warmup_steps
        else optax.join_schedules(
            [optax.linear_schedule(0.0, s.learning_rate, s.warmup_steps), decay], [s.warmup_steps]
        )
    )
    if s.optimizer == "adamw":
        return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=s.weight_decay, mask=mask), schedule
    return optax.chain(optax.add_decayed_weights(s.weight_decay, mask), optax.sgd(schedule)), schedule


def _check_output(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {str(out)!r} is a file")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise InputError(
            f"--output {str(out)!r} is not empty; pass --resume to continue a run there, or choose another folder"
        )


class _Log:
    """The JSONL log of steps and evaluations; on resume, lines past the checkpoint (steps that will run
    again) are dropped, so the log reads as one uninterrupted run. Only the writing process (0) writes."""

    def __init__(self, path: Path, start: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= start]
            write_atomic(path, "".join(ln + "\n" for ln in keep).encode())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _dropout_rates(config, s: TrainSettings) -> tuple[float, float]:
    if s.dropout is not None:
        return s.dropout, s.dropout
    return config.hidden_dropout_prob, config.attention_probs_dropout_prob


def _meta(enc, train: Path, s: TrainSettings, fields: tuple) -> dict:
    """What a checkpoint was made from; a resume with anything else is refused."""
    from .shards import input_identity

    return {
        "model": str(enc.model_dir),
        "train": input_identity(train, jsonl=True),
        "fields": list(fields),
        "settings": dataclasses.asdict(s),
    }


def _flag(name: str) -> str:
    """The ``e5lite train`` flag of a ``TrainSettings`` field."""
    return "--no-shuffle" if name == "shuffle" else "--" + name.replace("_", "-")


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between a checkpoint's ``_meta`` and this run's, per flag: "--learning-rate: 2e-05 in the
    checkpoint, 0.001 now", so that a refused resume says which flag to put back."""
    out = []
    for key in new:
        if key == "settings":
            was, now = old.get(key) or {}, new[key]
            out += [
                f"{_flag(k)}: {was.get(k)!r} in the checkpoint, {v!r} now" for k, v in now.items() if was.get(k) != v
            ]
        elif key == "train" and old.get(key) != new[key]:  # a file identity (size, hash): no value to quote
            out.append("--train: not the records the checkpoint was trained on")
        elif old.get(key) != new[key]:
            flag = {"model": "--model", "fields": "--query-field/--positive-field/--negative-field"}.get(key, key)
            out.append(f"{flag}: {old.get(key)!r} in the checkpoint, {new[key]!r} now")
    return out


def _evaluate(enc, params, eval_data, step: int, log: _Log) -> dict:
    """Every process evaluates (encode is collective under jax.distributed); ``params`` are host arrays."""
    from .evaluate import evaluate_retrieval

    enc.set_params(params)
    report = evaluate_retrieval(enc, eval_data, show_progress_bar=False)
    log.write({"step": step, "eval": report})
    return report


def fit(
    model: Encoder | str | os.PathLike,
    train: str | os.PathLike,
    output: str | os.PathLike,
    *,
    settings: TrainSettings | None = None,
    eval_data: str | os.PathLike | None = None,
    eval_every: int | None = None,
    save_every: int | None = None,
    resume: bool = False,
    query_field: str = "query",
    positive_field: str = "positive",
    negative_field: str = "negative",
    show_progress: bool = True,
) -> dict:
    """Fine-tunes ``model`` (a folder, hub id or ``Encoder``) on the records of ``train`` (JSONL) and writes a
    Hugging Face / sentence-transformers model folder to ``output``; returns a summary (steps, last loss,
    tokens/s, final evaluation). Checkpoints (every ``save_every`` steps) and the JSONL log live in
    ``output/training/``; ``resume`` continues from the last checkpoint there, bit for bit as if uninterrupted.
    ``eval_data``: a BEIR folder evaluated every ``eval_every`` steps and at the end.

    On CPU under glibc, start the process with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``e5lite train``
    restarts itself so): steps are shorter (``e5lite/runtime.py`` says why; BENCHMARKS.md, "Training speed",
    has the figures)."""
    import jax

    from .runtime import huge_pages_tunables

    if huge_pages_tunables() is not None and jax.default_backend() == "cpu":
        logging.getLogger("e5lite").info(
            "e5lite: training steps on CPU run faster in a process started with "
            "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (as `e5lite train` restarts itself; BENCHMARKS.md, "
            "'Training speed')"
        )
    run = _Run(model, train, output, settings or TrainSettings(), (query_field, positive_field, negative_field), resume)
    return run.loop(eval_data, eval_every, save_every, show_progress)


class _Run:
    """One training run's state: the encoder, tokenised data, placed parameters, optimiser and step."""

    def __init__(self, model, train, output, s: TrainSettings, fields: tuple, resume: bool):
        import jax

        from .checkpoint import load_checkpoint
        from .encoder import Encoder, load
        from .train_data import TokenisedPairs, read_pairs, total_steps
        from .train_step import StepConfig, decay_mask

        self.s, self.out = s, Path(output)
        _check_output(self.out, resume)
        self.place = _Placement(s)
        self.place.barrier("checked the output folder")  # before process 0 creates anything there
        pairs = read_pairs(train, **dict(zip(("query_field", "positive_field", "negative_field"), fields, strict=True)))
        self.enc = model if isinstance(model, Encoder) else load(model)
        if self.enc.weights == "int8":  # its params are int8 ones dequantised: training them would train those
            raise ValueError("a weights='int8' encoder cannot be trained: load the model with weights=None")
        self.data = TokenisedPairs(self.enc, pairs)
        self.steps = total_steps(len(self.data), s)
        self.params = self.place.params(jax.tree.map(lambda x: np.asarray(x, np.float32), self.enc.params))
        self.optimizer, self.schedule = make_optimizer(s, self.steps, decay_mask(self.params))
        # placed as train_step returns it (replicated on the mesh): left where init puts it, the step counters
        # would make the second step compile the whole program again
        self.opt_state = self.place.params(jax.tree.map(np.asarray, self.optimizer.init(self.params)))
        self.start = 0
        if self.place.writer:
            (self.out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self.meta = _meta(self.enc, Path(train), s, fields)
        found = load_checkpoint(self.out / STATE_DIR, (self.params, self.opt_state)) if resume else None
        if found is not None:
            self.start, state, old = found
            changed = _differences(old, self.meta)
            if changed:
                raise InputError(
                    f"{self.out / STATE_DIR} holds a run with other settings: {'; '.join(changed)}. Resume with "
                    "the original run's flags, or start a new --output"
                )
            self.params, self.opt_state = self.place.params(state)
        hidden, attention = _dropout_rates(self.enc.config, s)
        self.sc = StepConfig(
            self.enc.config,
            self.enc.pooling,
            s.temperature,
            hidden,
            attention,
            s.dtype,
            s.gradient_checkpointing,
            s.chunk_size,
        )
        self.log = _Log(self.out / STATE_DIR / LOG, self.start, self.place.writer)

    def loop(self, eval_data, eval_every, save_every, show_progress) -> dict:
        import jax

        from .checkpoint import save_checkpoint
        from .export import save_pretrained
        from .train_data import batch_index
        from .train_step import train_step

        key, loss, speed = jax.random.PRNGKey(self.s.seed), float("nan"), _Throughput()
        with _bar(self.steps, self.start, show_progress) as bar:
            for step in range(self.start, self.steps):
                if speed.steps == 0:  # the bar would sit silent through seconds of compiling otherwise
                    bar.set_postfix_str("compiling the training step (first step only)...")
                batch, n = self.data.batch(batch_index(step, len(self.data), self.s))
                self.params, self.opt_state, loss = train_step(
                    self.params,
                    self.opt_state,
                    self.place.batch(batch),
                    jax.random.fold_in(key, step),
                    sc=self.sc,
                    optimizer=self.optimizer,
                )
                loss, lr = float(self.place.host(loss)), float(self.schedule(step))
                timing = speed.step(n)
                self.log.write({"step": step + 1, "loss": loss, "learning_rate": lr, "tokens": n, **timing})
                bar.update(1)
                bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {speed.describe()}")
                done = step + 1
                if save_every and done % save_every == 0 and done < self.steps and self.place.writer:
                    save_checkpoint(
                        self.out / STATE_DIR, done, self.place.host((self.params, self.opt_state)), self.meta
                    )
                if eval_data is not None and eval_every and done % eval_every == 0 and done < self.steps:
                    _evaluate(self.enc, self.place.host(self.params), eval_data, done, self.log)
        params = self.place.host(self.params)
        final = _evaluate(self.enc, params, eval_data, self.steps, self.log) if eval_data is not None else None
        if self.place.writer:
            save_pretrained(self.enc, self.out, params=params, overwrite=True, keep=(STATE_DIR,))
        self.place.barrier("wrote the model")
        return {
            "steps": self.steps,
            "resumed_at": self.start,
            "loss": loss,
            "tokens": speed.tokens,
            "tokens_per_s": speed.rate(),  # None when no step ran after the first (it times the compiling)
            "eval": final,
            "output": str(self.out),
        }


class _Throughput:
    """Tokens per second of the steps after this process's first, whose time is mostly compiling the step
    program (seconds on CPU): counted in, it would read as a rate of a few tokens/s."""

    def __init__(self):
        self.steps, self.tokens, self._t0, self._timed_tokens = 0, 0, time.perf_counter(), 0

    def step(self, n: int) -> dict:
        """Counts a step of ``n`` tokens; its log fields: the first step's seconds, the rate after it."""
        self.steps, self.tokens = self.steps + 1, self.tokens + n
        if self.steps == 1:
            first_s, self._t0 = time.perf_counter() - self._t0, time.perf_counter()
            return {"tokens_per_s": None, "first_step_s": round(first_s, 2)}  # first_step_s: compiling included
        self._timed_tokens += n
        return {"tokens_per_s": round(self.rate() or 0.0, 1)}

    def rate(self) -> float | None:
        if self.steps < 2:
            return None
        return self._timed_tokens / max(time.perf_counter() - self._t0, 1e-9)

    def describe(self) -> str:
        rate = self.rate()
        return "first step compiled" if rate is None else f"{rate:,.0f} tokens/s"


def _bar(total: int, initial: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", disable=not show, file=sys.stderr, dynamic_ncols=True
    )


class _Placement:
    """Data parallel: parameters and optimiser state replicated, batch rows split over every device — the
    local ones, or under jax.distributed all processes' (each process builds the same global batch and
    places its own rows). Process 0 writes the files."""

    def __init__(self, s: TrainSettings):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.devices()
        n = len(devices)
        if s.batch_size % n or (s.chunk_size and s.chunk_size % n):
            raise ValueError(f"batch_size {s.batch_size} (and chunk_size) must be a multiple of the {n} devices")
        mesh = Mesh(np.array(devices), ("data",))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._rows = NamedSharding(mesh, PartitionSpec("data"))
        self._put = jax.device_put
        self.writer = jax.process_index() == 0
        self._multi = jax.process_count() > 1

    def params(self, tree):
        return self._put(tree, self._replicated)

    def batch(self, batch):
        return self._put(batch, self._rows)

    def host(self, tree):
        """Numpy values of replicated arrays (each process holds a whole copy: no gather needed)."""
        import jax

        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)

    def barrier(self, what: str) -> None:
        if self._multi:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"e5lite train: {what}")
