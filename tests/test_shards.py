"""Resumable ``e5lite embed --input FILE --output DIR``: kill -9 at any moment, restart, same output."""

from __future__ import annotations

import json
import os
import random
import re
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


@pytest.mark.slow
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
    import pyarrow.parquet as pq
    # the metadata per-host and Ray shards carry (shard_files._file_metadata), for readers without the manifest
    meta = json.loads(pq.read_schema(out / "shard-00001.parquet").metadata[b"e5lite"])
    assert meta["prompt"] == "query: " and meta["pooling"] == "mean" and meta["normalize"] is True
    assert meta["model"] == str(tiny_dir) and meta["dim"] == 32 and meta["precision"] == "float32"
    assert meta["shard"] == 1 and re.fullmatch(r"in\.txt bytes \d+-\d+", meta["input"]), meta["input"]


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


# ------------------------------------------------------------------------- long inputs and compact vectors

def test_int8_run_equals_quantized_float_run(tiny_dir, corpus, reference, tmp_path):
    """--precision int8: the ranges are fixed once from the first --calibration texts, recorded in the manifest,
    and every shard is the float run's rows quantised with them (bit for bit: same shards, same batches)."""
    from e5lite.quantize import quantize_embeddings
    out = tmp_path / "int8"
    assert main(embed_args(tiny_dir, corpus[0], out, "--precision", "int8", "--calibration", "300")) == 0
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert (run["precision"], run["calibration"], run["dim"], run["truncate_dim"]) == ("int8", 300, 32, None)
    ranges = np.asarray(run["ranges"], np.float32)
    first = reference[1][:300]  # the float run's first rows: the calibration set's vectors
    np.testing.assert_allclose(ranges, np.vstack((first.min(0), first.max(0))), atol=1e-6, rtol=0)
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert emb.dtype == np.int8 and emb.shape == (ROWS, 32) and ids == reference[2]
    np.testing.assert_array_equal(emb, quantize_embeddings(reference[1], "int8", ranges=ranges))
    assert np.load(out / "shard-00000.npy").dtype == np.int8


def test_quantized_resume_keeps_the_manifests_ranges(tiny_dir, corpus, tmp_path, monkeypatch, capsys):
    """A uint8 run cut after 7 shards (the manifest of a kill) resumes without calibrating again and equals the
    uninterrupted run; a resume with other vector settings is refused, naming them."""
    import e5lite.shards.writer as writer  # where the calibration is looked up
    full = tmp_path / "full"
    args = ("--precision", "uint8", "--truncate-dim", "24", "--calibration", "200")
    assert main(embed_args(tiny_dir, corpus[0], full, *args)) == 0
    want, want_ids = e5lite.read_embeddings(full, with_ids=True)
    assert want.dtype == np.uint8 and want.shape == (ROWS, 24)
    out = shutil.copytree(full, tmp_path / "cut")
    manifest = json.loads((out / "manifest.json").read_text())
    kept = manifest["shards"][:7]
    manifest.update(shards=kept, rows=sum(s["rows"] for s in kept), offset=kept[-1]["end_offset"], complete=False)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for changed, name in ((("--precision", "int8", "--truncate-dim", "24", "--calibration", "200"), "precision"),
                          (("--precision", "uint8", "--truncate-dim", "16", "--calibration", "200"),
                           "dim, truncate_dim"),
                          (("--precision", "uint8", "--truncate-dim", "24", "--calibration", "100"), "calibration"),
                          (("--precision", "uint8", "--truncate-dim", "24", "--calibration", "200", "--long-inputs",
                            "chunk"), "long_inputs"),
                          ((*args, "--weights", "int8"), "weights")):  # int8 rows must not join float32 ones
        assert main(embed_args(tiny_dir, corpus[0], out, *changed)) == 1
        assert f"holds a run with a different {name}; pass --overwrite" in capsys.readouterr().err

    def no_calibration(*a, **k):
        raise AssertionError("a resumed run must take the manifest's ranges, not compute them again")

    monkeypatch.setattr(writer, "calibration_ranges", no_calibration)
    assert main(embed_args(tiny_dir, corpus[0], out, *args)) == 0
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == want_ids
    np.testing.assert_array_equal(emb, want)


@pytest.mark.parametrize("precision, fmt, dtype", [("binary", "parquet", np.int8), ("ubinary", "npy", np.uint8)])
def test_packed_bits_round_trip(tiny_dir, tmp_path, precision, fmt, dtype):
    """Sign bits of the first 20 components, packed in 3 bytes a row (the last padded), read back as written."""
    from e5lite.quantize import quantize_embeddings
    texts = [f"text number {i} about {w}" for i, w in enumerate(["rivers", "bridges", "protein", "winter"] * 5)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "bits"
    assert main(["embed", "--model", str(tiny_dir), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--rows-per-shard", "7", "--shard-format", fmt, "--precision", precision,
                 "--truncate-dim", "20"]) == 0
    emb = e5lite.read_embeddings(out)
    assert emb.dtype == dtype and emb.shape == (20, 3)
    want = quantize_embeddings(e5lite.load(tiny_dir).encode(texts, truncate_dim=20), precision)
    np.testing.assert_array_equal(emb, want)
    # every bit: unpacked, they are the signs of the truncated vectors
    bits = np.unpackbits(emb.view(np.uint8) if precision == "ubinary" else (emb.astype(np.int16) + 128).astype(
        np.uint8), axis=1)[:, :20]
    np.testing.assert_array_equal(bits, e5lite.load(tiny_dir).encode(texts, truncate_dim=20) > 0)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        import pyarrow as pa
        kind = pq.read_schema(out / "shard-00000.parquet").field("embedding").type
        assert (kind.value_type, kind.list_size) == (pa.int8(), 3)


def test_long_inputs_chunk_equals_encode(tiny_dir, tmp_path):
    """--long-inputs chunk over real paragraphs, many past --max-length 64: the rows equal encode(...,
    long_inputs="chunk") (windows sharing --chunk-overlap tokens, averaged by token count)."""
    from test_distributed_corpus import paragraphs
    texts = sorted(paragraphs()[:400], key=len)[-60:]  # the longest: most span several windows
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "chunk"
    assert main(["embed", "--model", str(tiny_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                 "--rows-per-shard", "25", "--max-length", "64", "--long-inputs", "chunk", "--chunk-overlap", "8",
                 "--prompt-name", "passage"]) == 0
    enc = e5lite.load(tiny_dir, max_length=64)
    from e5lite.long_inputs import split
    assert (split(enc.tokenizer, texts, enc.prompts["passage"], 8).counts > 1).all()  # every text is past 64
    want = enc.encode(texts, prompt_name="passage", long_inputs="chunk", chunk_overlap=8)
    np.testing.assert_allclose(e5lite.read_embeddings(out), want, atol=1e-6, rtol=0)
    truncated = enc.encode(texts, prompt_name="passage")
    assert np.abs(want - truncated).max() > 1e-2  # not the truncating path by another name
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert (run["long_inputs"], run["chunk_overlap"], run["max_length"]) == ("chunk", 8, 64)


@pytest.mark.parametrize("extra, message", [
    (["--truncate-dim", "64"], "--truncate-dim 64 is larger than the model's embedding dimension 32"),
    (["--chunk-overlap", "4"], "--chunk-overlap 4 needs --long-inputs chunk"),
    (["--long-inputs", "chunk", "--chunk-overlap", "200", "--max-length", "64"],
     "--chunk-overlap must be less than the window of 62 text tokens (--max-length 64 "),
    (["--calibration", "10"], "--calibration sets the int8/uint8 buckets: it needs --precision int8 or uint8"),
    (["--precision", "binary", "--ranges", "{tmp}/r.npy"], "--ranges sets the int8/uint8 buckets"),
    (["--precision", "int8", "--calibration", "10", "--ranges", "{tmp}/r.npy"],
     "--calibration N and --ranges: pass one"),
    (["--precision", "int8", "--ranges", "{tmp}/r.npy"], "--ranges {tmp}/r.npy has 16 dimensions; the vectors have 32"),
    (["--precision", "int8", "--ranges", "{tmp}/bad.npy"], "expected shape (2, dim)"),
    (["--precision", "int8", "--ranges", "{tmp}/nothing.npy"], "--ranges {tmp}/nothing.npy: no such file"),
    (["--precision", "int8", "--ranges", "{tmp}"], "a folder without manifest.json"),
    (["--precision", "int4"], "invalid choice: 'int4'"),
])
@pytest.mark.parametrize("output", ["{tmp}/o.npy", "{tmp}/dir"])
def test_bad_vector_flags(tiny_dir, tmp_path, capsys, extra, message, output):
    np.save(tmp_path / "r.npy", np.zeros((2, 16), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((3, 32), np.float32))
    (tmp_path / "in.txt").write_text("one\ntwo\nthree\n")
    argv = ["embed", "--model", str(tiny_dir), "--input", str(tmp_path / "in.txt"), "--output",
            output.format(tmp=tmp_path), *[a.format(tmp=tmp_path) for a in extra]]
    if "invalid choice" in message:
        with pytest.raises(SystemExit):
            main(argv)
    else:
        assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "dir").exists() or not any((tmp_path / "dir").glob("shard-*"))


def test_queries_in_a_corpus_buckets(tiny_dir, tmp_path, capsys):
    """--ranges DIR quantises queries with the ranges an int8 corpus run fixed; one text needs them."""
    texts = [f"passage {i} on {w}" for i, w in enumerate(["rivers", "bridges", "storms"] * 10)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "corpus"
    assert main(["embed", "--model", str(tiny_dir), "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--precision", "int8", "--calibration", "10"]) == 0
    capsys.readouterr()
    base = ["embed", "--model", str(tiny_dir), "--prompt-name", "query", "--precision", "int8"]
    assert main([*base, "how long are bridges"]) == 1
    assert "--precision int8 of one text needs --ranges" in capsys.readouterr().err
    assert main([*base, "--ranges", str(out), "how long are bridges"]) == 0
    got = np.array(json.loads(capsys.readouterr().out))
    ranges = np.asarray(json.loads((out / "manifest.json").read_text())["run"]["ranges"], np.float32)
    want = e5lite.load(tiny_dir).encode_queries(["how long are bridges"], precision="int8", ranges=ranges)[0]
    np.testing.assert_array_equal(got, want)
    assert main([*base[:-1], "float32", "--ranges", str(out), "x"]) == 1
    assert "--ranges sets the int8/uint8 buckets" in capsys.readouterr().err
