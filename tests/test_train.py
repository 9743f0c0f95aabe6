"""e5lite train end to end: one SGD step equals torch's, the saved folder loads in sentence-transformers, a
killed run resumes bit-identically, evaluation during training, and one-line errors for bad data."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from pydoc_beir import training_records
from safetensors.numpy import load_file

import e5lite
from e5lite.cli import main
from e5lite.runtime import huge_pages_tunables
from e5lite.train_data import TokenisedPairs, read_pairs



def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("train") / "pairs.jsonl", training_records())


@pytest.fixture(scope="module")
def sgd_step_run(minilm_dir, tmp_path_factory):
    """One step of plain SGD on MiniLM over the records of test_train_step (with hard negatives, some rows
    padded): (records file, output folder). Compared with torch's step, then loaded in sentence-transformers."""
    from test_train_step import PAIRS
    tmp_path = tmp_path_factory.mktemp("sgd-step")
    records_file = write_records(tmp_path / "pairs.jsonl", [
        {"query": q, "positive": p, "negative": n} for q, p, n in zip(PAIRS.queries, PAIRS.positives, PAIRS.negatives)])
    out = tmp_path / "model"
    assert main(["train", "--model", str(minilm_dir), "--train", str(records_file), "--output", str(out),
                 "--optimizer", "sgd", "--learning-rate", "0.05", "--weight-decay", "0", "--dropout", "0",
                 "--no-shuffle", "--batch-size", "4", "--max-steps", "1"]) == 0
    return records_file, out


@pytest.mark.slow
def test_one_sgd_step_equals_torch(minilm_dir, sgd_step_run):
    records_file, out = sgd_step_run
    import transformers
    model = transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").float().eval()
    batch, _ = TokenisedPairs(e5lite.load(minilm_dir), read_pairs(records_file)).batch(np.arange(4))

    def embed(ids, mask):
        h = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask, dtype=torch.float32)[..., None]
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    logits = embed(batch.q_ids, batch.q_mask) @ embed(batch.p_ids, batch.p_mask).T / 0.01
    logits = logits.masked_fill(~torch.tensor(batch.p_valid)[None, :], float("-inf"))
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    saved = load_file(str(out / "model.safetensors"))
    moved = 0.0
    for name, p in model.named_parameters():
        if p.grad is None:  # the pooler: not part of the embedding
            continue
        want = p.detach().numpy()
        moved = max(moved, float(np.abs(p.grad.numpy()).max()) * 0.05)
        assert np.abs(saved[name] - want).max() <= 1e-5, (name, np.abs(saved[name] - want).max())
    assert moved > 1e-3  # the step changed the weights well beyond the tolerance


@pytest.mark.slow
def test_the_trained_folder_loads_in_sentence_transformers(minilm_dir, sgd_step_run):
    """The folder that test_one_sgd_step_equals_torch checks weight by weight (the run is shared: a second
    MiniLM training run here cost half a minute of compiling)."""
    _, out = sgd_step_run
    from sentence_transformers import SentenceTransformer
    texts = [r["query"] for r in training_records()[:6]]
    ours = e5lite.load(out).encode(texts, prompt_name="query")
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts, prompt_name="query", normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    # the prompts it trained with (MiniLM's own: none), so that both libraries embed as it was trained
    written = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert written == e5lite.load(out).prompts == {"query": "", "document": ""}
    assert np.abs(ours - e5lite.load(minilm_dir).encode(texts, prompt_name="query")).max() > 1e-4  # it trained
    log = [json.loads(line) for line in (out / "training" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and all(r["loss"] > 0 and r["tokens"] > 0 for r in log)


# 16 tokens: every batch's queries and passages pad to the same length, so a run compiles one step program
# rather than one per pair of lengths (what is checked here does not depend on the lengths)
SHORT = ("--max-length", "16")


def train_cmd(model, records, out, *extra):
    return [sys.executable, "-m", "e5lite.cli", "train", "--model", str(model), "--train", str(records), "--output",
            str(out), "--batch-size", "8", "--epochs", "3", "--learning-rate", "1e-3", "--save-every", "3", *SHORT,
            *extra]


@pytest.mark.slow
def test_a_killed_run_resumes_bit_identically(tiny_dir, records_file, tmp_path):
    """Dropout on (the checkpoint's 0.1), shuffled epochs: kill -9 after a checkpoint, resume, and the final
    weights equal an uninterrupted run's exactly."""
    # one compilation cache for the three runs (the same program: the same executable, so bit-equality still
    # tests the checkpoint), so that the second and third do not compile again
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "E5LITE_COMPILATION_CACHE": str(tmp_path / "jax-cache")}
    whole = subprocess.run(train_cmd(tiny_dir, records_file, tmp_path / "whole"), env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(train_cmd(tiny_dir, records_file, tmp_path / "cut"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut" / "training" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(checkpoint.read_text())["step"]
    assert 0 < step < 27 and not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = subprocess.run(train_cmd(tiny_dir, records_file, tmp_path / "cut", "--resume"), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    log, whole_log = ([json.loads(line) for line in (tmp_path / run / "training" / "train_log.jsonl").read_text()
                       .splitlines()] for run in ("cut", "whole"))
    assert [r["step"] for r in log] == list(range(1, 28)) and [r["loss"] for r in log] == [r["loss"] for r in whole_log]


@pytest.mark.slow
def test_evaluation_during_training(tiny_dir, records_file, pydoc_beir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, "e5lite")
    out = tmp_path / "model"
    assert main(["train", "--model", str(tiny_dir), "--train", str(records_file), "--output", str(out),
                 "--batch-size", "8", "--max-steps", "4", "--eval", str(pydoc_beir), "--eval-every", "2", *SHORT]) == 0
    log = [json.loads(line) for line in (out / "training" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["eval"]["ndcg_at_10"] <= 1 for r in evals)
    captured = capsys.readouterr()
    assert "| 10 |" in captured.out  # the final evaluation's table
    # the first step's seconds are mostly compiling: shown as such, not as a rate; the rate starts after it
    steps = [r for r in log if "loss" in r]
    assert steps[0]["tokens_per_s"] is None and steps[0]["first_step_s"] > 0
    assert all(r["tokens_per_s"] > 0 for r in steps[1:])
    assert "compiling the training step (first step only)..." in captured.err
    assert re.search(r"trained 4 steps \(loss [\d.]+, [\d,]+ tokens/s after the first step\)", captured.err)
    # this process did not start with huge pages (runtime.py): fit says how to, where it would help
    hint = [r for r in caplog.records if "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in r.getMessage()]
    assert len(hint) == (huge_pages_tunables() is not None and jax.default_backend() == "cpu")


@pytest.mark.parametrize("records, args, message", [
    ([{"query": "q", "positive": "p"}, {"query": "q2"}], [], "pairs.jsonl line 2 (byte 32): no field 'positive'"),
    ([{"query": 3, "positive": "p"}], [], "line 1 (byte 0): field 'query' is int, expected a string"),
    ([{"query": "q", "positive": "p", "negative": [1]}], [], "field 'negative' must be a string or a list"),
    ([{"question": "q", "positive": "p"}], ["--query-field", "question", "--batch-size", "2"],
     "1 training records do not fill one batch of 2: pass --batch-size 1 or smaller"),
    ([{"query": "q", "positive": "p"}] * 4, ["--batch-size", "4", "--chunk-size", "3"],
     "batch_size 4 must be a multiple of chunk_size 3"),
])
def test_bad_training_data_is_one_line(tiny_dir, tmp_path, capsys, records, args, message):
    path = write_records(tmp_path / "pairs.jsonl", records)
    assert main(["train", "--model", str(tiny_dir), "--train", str(path), "--output", str(tmp_path / "o"),
                 *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("e5lite: error:") and message in err and "\n" not in err, err


@pytest.mark.slow
def test_output_and_resume_are_checked(tiny_dir, records_file, tmp_path, capsys):
    out = tmp_path / "model"
    base = ["train", "--model", str(tiny_dir), "--train", str(records_file), "--output", str(out), "--batch-size",
            "8", "--max-steps", "4", "--save-every", "2", *SHORT]
    from e5lite.train_step import train_step
    train_step.clear_cache()
    assert main(base) == 0
    # one program for the four steps (one shape): the optimiser state starts placed as each step leaves it
    assert train_step._cache_size() == 1
    assert main(base) == 1 and "is not empty; pass --resume" in capsys.readouterr().err
    assert main([*base, "--resume", "--learning-rate", "1e-3"]) == 1
    err = capsys.readouterr().err
    assert "holds a run with other settings: --learning-rate: 2e-05 in the checkpoint, 0.001 now" in err
    assert "Resume with the original run's flags" in err


TWO_STEPS = dict(batch_size=8, max_steps=2, dropout=0.0, optimizer="sgd", learning_rate=0.1, shuffle=False)


def _two_step_run(model, records, out, env_extra, *argv_prefix, rank=None):
    script = f"""
        import sys, e5lite
        from e5lite.train import TrainSettings, fit
        if {rank is not None}:
            e5lite.initialize_distributed(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
        fit(e5lite.load({str(model)!r}, max_length=16), {str(records)!r}, {str(out)!r}, show_progress=False,
            settings=TrainSettings(**{TWO_STEPS!r}))
    """
    import textwrap
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *argv_prefix],
                            env={**os.environ, "JAX_PLATFORMS": "cpu", **env_extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_data_parallel_over_devices_and_processes(tiny_dir, records_file, tmp_path):
    """The same two SGD steps on 1 device, on 4 host devices, and on two processes under jax.distributed (gloo)
    give the same weights (the batch's rows split across devices; rounding of the split reductions aside).
    SGD, because Adam turns the rounding noise of zero gradients (key biases) into full-size steps."""
    import socket

    from e5lite.train import TrainSettings, fit
    # one device: this process (the runs below need processes of their own: their device count, jax.distributed)
    fit(e5lite.load(tiny_dir, max_length=16), records_file, tmp_path / "one", show_progress=False,
        settings=TrainSettings(**TWO_STEPS))
    four = _two_step_run(tiny_dir, records_file, tmp_path / "four",
                         {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert four.wait(timeout=300) == 0, four.stderr.read()[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_two_step_run(tiny_dir, records_file, tmp_path / "two", {}, f"127.0.0.1:{port}", str(r), rank=r)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    ref = load_file(str(tmp_path / "one" / "model.safetensors"))
    base = load_file(str(tiny_dir / "model.safetensors"))
    for run in ("four", "two"):
        got = load_file(str(tmp_path / run / "model.safetensors"))
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=2e-5, rtol=0, err_msg=f"{run}: {k}")
    assert max(np.abs(ref[k] - base[k]).max() for k in ref if k in base) > 1e-3  # 50x the tolerance
