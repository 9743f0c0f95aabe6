"""The e5lite command end to end, through a subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import e5lite


def run(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "e5lite.cli", *map(str, args)], input=stdin, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def enc(tiny):
    return tiny


@pytest.mark.slow
def test_embed_args_to_stdout(tiny_dir, enc):
    out = run("embed", "--model", tiny_dir, "--prompt-name", "query", "hello", "world")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    np.testing.assert_allclose(np.array(rows, np.float32), enc.encode_queries(["hello", "world"]), atol=1e-6)


@pytest.mark.slow
def test_embed_txt_to_npy_and_jsonl(tiny_dir, enc, tmp_path):
    texts = ["first line", "", "third line is longer than the others"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = run("embed", "--model", tiny_dir, "--input", tmp_path / "in.txt", "--output", tmp_path / "o.npy")
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), enc.encode(texts), atol=1e-6)
    out = run("embed", "--model", tiny_dir, "--input", tmp_path / "in.txt", "--output", tmp_path / "o.jsonl",
              "--no-normalize")
    assert out.returncode == 0, out.stderr
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    np.testing.assert_allclose([r["embedding"] for r in recs], enc.encode(texts, normalize=False), atol=1e-6)


def test_embed_jsonl_stdin_field(tiny_dir, enc):
    lines = "\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(["alpha", "beta"]))
    out = run("embed", "--model", tiny_dir, "--input", "-", "--field", "body", stdin=lines)
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose([json.loads(x) for x in out.stdout.splitlines()], enc.encode(["alpha", "beta"]),
                               atol=1e-6)


def test_progress_bar_on_stderr(tiny_dir, tmp_path):
    (tmp_path / "big.txt").write_text("\n".join(f"text {i}" for i in range(300)))
    out = run("embed", "--model", tiny_dir, "--input", tmp_path / "big.txt", "--output", tmp_path / "b.npy")
    assert out.returncode == 0, out.stderr
    assert "300/300" in out.stderr and np.load(tmp_path / "b.npy").shape == (300, 32)


@pytest.mark.slow
def test_score_and_info(tiny_dir):
    out = run("score", "--model", tiny_dir, "--query", "how much protein", "--query", "summit define",
              "--passage", "protein for women is 46 grams", "--passage", "summit: the top of a mountain")
    assert out.returncode == 0, out.stderr
    table = out.stdout.splitlines()
    assert table[0].split() == ["P0", "P1"] and table[1].split()[0] == "Q0" and len(table[2].split()) == 3
    out = run("info", "--model", tiny_dir)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["dim"] == 32 and info["pooling"] == "mean" and info["max_length"] == 128
    assert info["config"]["num_hidden_layers"] == 2 and info["parameters"] > 990_000


@pytest.mark.parametrize("args, stdin, message", [
    (["embed", "--model", "/no/such/model", "x"], None, "does not exist"),
    (["embed", "--model", "{tiny}", "--input", "/no/such/file.txt"], None, "input file"),
    (["embed", "--model", "{tiny}", "--input", "-", "--field", "text"], '{"text": 1}\n',
     "<stdin> line 1 (byte 0): field 'text' is int"),
    (["embed", "--model", "{tiny}", "--input", "-", "--field", "t"], '{"text": "a"}\nnot json\n',
     "<stdin> line 1 (byte 0): no field 't'"),
    (["embed", "--model", "{tiny}", "--output", "out.csv", "x"], None, "use a .npy or .jsonl suffix"),
    (["embed", "--model", "{tiny}"], None, "no texts"),
    (["embed", "--model", "{tiny}", "--prompt-name", "nope", "x"], None, "unknown prompt_name"),
])
def test_errors_are_one_line(tiny_dir, args, stdin, message, monkeypatch, capsys):
    """In this process (``main``, as the ``e5lite`` script calls it; a subprocess each cost an interpreter's
    imports): an exception other than the one-line refusal would fail the test here, as a traceback would."""
    from e5lite.cli import main
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((stdin or "").encode())))
    assert main([a.format(tiny=tiny_dir) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.strip().startswith("e5lite: error:") and message in err and "\n" not in err.strip(), err


def test_failed_write_keeps_old_output(tiny_dir, tmp_path):
    target = tmp_path / "o.npy"
    target.write_bytes(b"precious")
    out = run("embed", "--model", tiny_dir, "--input", tmp_path / "missing.txt", "--output", target)
    assert out.returncode == 1 and target.read_bytes() == b"precious"


@pytest.mark.slow
def test_embed_compact_vectors_equal_encode(tiny_dir, enc, tmp_path):
    """--precision, --truncate-dim, --calibration, --ranges and --long-inputs to stdout, .npy and .jsonl: the
    rows (ints where quantised) equal encode() with the same options."""
    texts = [f"{w} number {i} " + "and more words " * (i % 7) * 9 for i, w in enumerate(["river", "bridge", "storm",
                                                                                         "budget"] * 4)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    calib = enc.encode(texts[:5], prompt_name="query", truncate_dim=16)
    out = run("embed", "--model", tiny_dir, "--input", tmp_path / "in.txt", "--prompt-name", "query", "--precision",
              "int8", "--truncate-dim", "16", "--calibration", "5")
    assert out.returncode == 0, out.stderr
    got = np.array([json.loads(line) for line in out.stdout.splitlines()])
    assert got.dtype == np.int64 and got.shape == (16, 16)  # JSON ints
    np.testing.assert_array_equal(got, enc.encode(texts, prompt_name="query", truncate_dim=16, precision="int8",
                                                  calibration_embeddings=calib))
    ranges = np.vstack((calib.min(0) - 0.1, calib.max(0) + 0.1)).astype(np.float32)
    np.save(tmp_path / "r.npy", ranges)
    out = run("embed", "--model", tiny_dir, "--input", tmp_path / "in.txt", "--output", tmp_path / "o.jsonl",
              "--prompt-name", "query", "--precision", "uint8", "--truncate-dim", "16", "--ranges", tmp_path / "r.npy")
    assert out.returncode == 0, out.stderr
    assert "wrote 16 x 16 embeddings to" in out.stderr and "(uint8)" in out.stderr
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    np.testing.assert_array_equal([r["embedding"] for r in recs], enc.encode(
        texts, prompt_name="query", truncate_dim=16, precision="uint8", ranges=ranges))
    out = run("embed", "--model", tiny_dir, "--input", tmp_path / "in.txt", "--output", tmp_path / "o.npy",
              "--max-length", "32", "--long-inputs", "chunk", "--chunk-overlap", "4", "--precision", "ubinary")
    assert out.returncode == 0, out.stderr
    got = np.load(tmp_path / "o.npy")
    chunked = e5lite.load(tiny_dir, max_length=32).encode(texts, long_inputs="chunk", chunk_overlap=4)
    assert got.dtype == np.uint8 and got.shape == (16, 4)
    np.testing.assert_array_equal(got, np.packbits(chunked > 0, axis=1))


# ------------------------------------------------------------------ in-process: flags, Parquet, broken pipes

@pytest.mark.parametrize("args, message", [
    (["--output", "o.npy", "--shard-format", "parquet"], "--shard-format: corpus-run flags, for --output DIR"),
    (["--output", "o.jsonl", "--rows-per-shard", "5"], "--rows-per-shard: corpus-run flags"),
    (["--output", "/no/such/dir/o.npy"], "output folder '/no/such/dir' does not exist"),
    (["--output", "o.csv"], "use a .npy or .jsonl suffix"),
])
def test_flag_errors_come_before_the_model_loads(args, message, tmp_path, capsys, monkeypatch):
    """The model named does not exist: each error is the flags', so none waited for a model to load."""
    from e5lite.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["embed", "--model", "/no/such/model", "x", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("e5lite: error:") and message in err and "\n" not in err, err


def test_serve_on_a_busy_port_fails_before_the_model_loads(capsys):
    """The model named does not exist: the port's error comes first, without a model load and warm-up."""
    import socket
    from e5lite.cli import main
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "/no/such/model", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("e5lite: error:") and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err, err


def test_embed_parquet_input_to_one_file(tiny_dir, enc, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from e5lite.cli import main
    texts = ["first", "second text", "third", "fourth one"]
    pq.write_table(pa.table({"body": texts}), tmp_path / "in.parquet", row_group_size=3)  # two row groups
    assert main(["embed", "--model", str(tiny_dir), "--input", str(tmp_path / "in.parquet"), "--field", "body",
                 "--output", str(tmp_path / "o.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), enc.encode(texts), atol=1e-6)
    assert main(["embed", "--model", str(tiny_dir), "--input", str(tmp_path / "in.parquet"), "--output",
                 str(tmp_path / "o.npy")]) == 1
    assert "no column 'text' (set --field)" in capsys.readouterr().err


def test_broken_pipe_ends_quietly(tiny_dir, capsys, monkeypatch):
    """`e5lite embed ... | head -1`: the reader leaves; no traceback, no error line, SIGPIPE's status."""
    from e5lite.cli import EXIT_BROKEN_PIPE, main

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["embed", "--model", str(tiny_dir), "one", "two"]) == EXIT_BROKEN_PIPE == 141
    assert capsys.readouterr().err == ""
