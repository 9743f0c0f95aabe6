"""Resumable ``e5lite embed --input FILE --output DIR``: kill -9 at any moment, restart, same output."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import e5lite
from e5lite.cli import main

ROWS = 4000
SHARD = "100"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A .jsonl corpus of ROWS short texts with string ids (and a blank line, which is skipped)."""
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "river", "mountain", "protein", "summit", "budget", "bridge",
             "winter", "storm", "café", "東京"]
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 24))) for _ in range(ROWS)]
    path = tmp_path_factory.mktemp("corpus") / "big.jsonl"
    lines = [json.dumps({"id": f"doc-{i}", "text": t}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines[:10] + [""] + lines[10:]) + "\n")
    return path, texts


def embed_args(tiny_dir, corpus_path, out, *extra):
    return ["embed", "--model", str(tiny_dir), "--input", str(corpus_path), "--output", str(out),
            "--rows-per-shard", SHARD, "--id-field", "id", *extra]


@pytest.fixture(scope="module")
def reference(tiny_dir, corpus, tmp_path_factory):
    """An uninterrupted run: (folder, embeddings, ids)."""
    out = tmp_path_factory.mktemp("ref") / "emb"
    assert main(embed_args(tiny_dir, corpus[0], out)) == 0
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    return out, emb, ids


def test_uninterrupted_run_matches_encode(tiny_dir, corpus, reference):
    out, emb, ids = reference
    texts = corpus[1]
    assert ids == [f"doc-{i}" for i in range(ROWS)]
    np.testing.assert_allclose(emb, e5lite.load(tiny_dir).encode(texts), atol=1e-6, rtol=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == ROWS and len(manifest["shards"]) == ROWS // int(SHARD)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [n for s in manifest["shards"] for n in s["files"]])


def test_kill_9_and_resume(tiny_dir, corpus, reference, tmp_path):
    out = tmp_path / "emb"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "e5lite.cli", *embed_args(tiny_dir, corpus[0], out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    assert proc.returncode == -signal.SIGKILL and 1 <= len(state["shards"]) and not state["complete"], state["rows"]
    with pytest.raises(e5lite.E5LiteError, match="unfinished"):
        e5lite.read_embeddings(out)

    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {ROWS} x 32 embeddings in {ROWS // int(SHARD)} shards" in done.stderr
    assert "row/s" in done.stderr and "tokens/s" in done.stderr  # the progress bar
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == reference[2]
    np.testing.assert_array_equal(emb, reference[1])


def test_resume_after_kill_mid_write(tiny_dir, corpus, reference, tmp_path):
    """The states a kill can leave between the steps of a commit: a half-written shard temporary, a shard
    renamed into place that the manifest does not list yet, a half-written manifest temporary."""
    out = shutil.copytree(reference[0], tmp_path / "emb")
    manifest = json.loads((out / "manifest.json").read_text())
    kept = manifest["shards"][:7]
    manifest.update(shards=kept, rows=sum(s["rows"] for s in kept), offset=kept[-1]["end_offset"], complete=False)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-00007.npy").write_bytes(b"stale, renamed before the manifest said so")
    (out / "shard-00008.npy.tmp").write_bytes(b"\x93NUMPY half a shard")
    (out / "manifest.json.tmp").write_text('{"format": "e5lite-embed')
    assert main(embed_args(tiny_dir, corpus[0], out)) == 0
    assert not list(out.glob("*.tmp"))
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == reference[2]
    np.testing.assert_array_equal(emb, reference[1])


def test_changed_input_or_options_are_refused(tiny_dir, corpus, reference, tmp_path, capsys):
    out = shutil.copytree(reference[0], tmp_path / "emb")
    changed = tmp_path / "big.jsonl"
    changed.write_text(corpus[0].read_text() + json.dumps({"id": "doc-new", "text": "one more row"}) + "\n")
    assert main(embed_args(tiny_dir, changed, out)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("e5lite: error:") and "\n" not in err
    assert "holds a run with a different input path, input size, input sha256, input rows" in err
    assert main(embed_args(tiny_dir, corpus[0], out, "--no-normalize")) == 1
    assert "different normalize; pass --overwrite" in capsys.readouterr().err
    assert main(embed_args(tiny_dir, changed, out, "--overwrite")) == 0
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids[-1] == "doc-new" and emb.shape == (ROWS + 1, 32)
    np.testing.assert_array_equal(emb[:ROWS], reference[1])


def test_txt_input_and_parquet_shards(tiny_dir, tmp_path):
    pytest.importorskip("pyarrow")
    texts = ["first line", "", "third line\r", "fourth"]
    (tmp_path / "in.txt").write_text("\n".join(texts))
    out = tmp_path / "pq/"
    args = ["embed", "--model", str(tiny_dir), "--input", str(tmp_path / "in.txt"), "--output", f"{out}/",
            "--rows-per-shard", "3", "--shard-format", "parquet", "--prompt-name", "query"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.parquet", "shard-00001.parquet"]
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == [0, 1, 2, 3]
    want = e5lite.load(tiny_dir).encode_queries(["first line", "", "third line", "fourth"])
    np.testing.assert_allclose(emb, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/dir/", "some text"], "needs --input FILE"),
    (["--input", "-", "--output", "{tmp}/dir"], "needs --input FILE"),
    (["--input", "{tmp}/missing.jsonl", "--output", "{tmp}/dir"], "input file"),
    (["--input", "{tmp}/bad.jsonl", "--output", "{tmp}/dir"], "bad.jsonl line 2 (byte 14): no field 'text'"),
    (["--id-field", "id", "--output", "{tmp}/o.npy", "x"], "--id-field needs --output DIR"),
])
def test_errors(tiny_dir, tmp_path, capsys, args, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    assert main(["embed", "--model", str(tiny_dir), *[a.format(tmp=tmp_path) for a in args]]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, when it started
    assert err.startswith("e5lite: error:") and message in err, err


def test_read_embeddings_checks_shards(reference, tmp_path):
    out = shutil.copytree(reference[0], tmp_path / "emb")
    np.save(out / "shard-00003.npy", np.zeros((99, 32), np.float32))
    with pytest.raises(e5lite.E5LiteError, match="shard-00003.npy does not hold the 100 rows"):
        e5lite.read_embeddings(out)
    with pytest.raises(e5lite.E5LiteError, match="no manifest.json"):
        e5lite.read_embeddings(tmp_path)
