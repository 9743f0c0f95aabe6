"""Corpus runs per host (``e5lite embed --output DIR --coordinator ...``) and the inputs they take: byte-range
shards of .txt/.jsonl, Parquet row groups, folders and globs; resume after kill -9; bad input named."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import e5lite
from e5lite.cli import main
from e5lite.corpus_inputs import describe_inputs, plan_shards, read_shard, resolve_inputs
from e5lite.errors import InputError
from e5lite.files import read_records
from e5lite.shards import embed_per_host

SHARD_SIZE = "6K"  # ~60 shards over the corpus below: many per process, each a few dozen paragraphs


def paragraphs() -> list[str]:
    """Real English text: the paragraphs of Python's own documentation topics (pydoc_data)."""
    from pydoc_data.topics import topics
    paras = [" ".join(p.split()) for t in topics.values() for p in re.split(r"\n\s*\n", t)]
    return [p for p in paras if len(p.split()) >= 5]


def write_corpus(folder: Path) -> tuple[list[str], list[str]]:
    """A folder of two .jsonl files (one with a blank line) and a Parquet file of 4 row groups, all with an
    ``_id``; -> (texts, ids) in input order (files sorted by name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    paras = paragraphs()
    parts = {"a.jsonl": paras[:800], "b.jsonl": paras[800:1600], "c.parquet": paras[1600:2000]}
    folder.mkdir(parents=True, exist_ok=True)
    texts, ids = [], []
    for name, chunk in parts.items():
        stem = name.split(".")[0]
        chunk_ids = [f"{stem}-{i}" for i in range(len(chunk))]
        if name.endswith(".parquet"):
            pq.write_table(pa.table({"_id": chunk_ids, "text": chunk}), folder / name, row_group_size=100)
        else:
            lines = [json.dumps({"_id": i, "text": t}) for i, t in zip(chunk_ids, chunk)]
            (folder / name).write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")
        texts += chunk
        ids += chunk_ids
    return texts, ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "in"
    texts, ids = write_corpus(folder)
    return folder, texts, ids


def embed_args(model, folder, out, *extra):
    return ["embed", "--model", str(model), "--input", str(folder), "--output", str(out), "--id-field", "_id",
            "--prompt-name", "passage", "--shard-size", SHARD_SIZE, *extra]


@pytest.fixture(scope="module")
def one_process(tiny_dir, corpus, tmp_path_factory):
    """The same run in one process: (folder, embeddings, ids)."""
    out = tmp_path_factory.mktemp("one") / "emb"
    assert main(embed_args(tiny_dir, corpus[0], out)) == 0
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    return out, emb, ids


def records(out: Path) -> dict[str, dict]:
    """The shards' commit records (shard-K.json, not the ids files shard-K.ids.json)."""
    return {p.name: json.loads(p.read_text()) for p in out.iterdir() if re.fullmatch(r"shard-\d+\.json", p.name)}


@pytest.mark.slow
def test_one_process_matches_encode(tiny_dir, corpus, one_process):
    out, emb, ids = one_process
    assert ids == corpus[2]
    want = e5lite.load(tiny_dir).encode(corpus[1], prompt_name="passage")
    np.testing.assert_allclose(emb, want, atol=1e-6, rtol=0)
    manifest = json.loads((out / "manifest.json").read_text())
    plan = manifest["plan"]
    assert [s.get("row_group") for s in plan if "row_group" in s] == [0, 1, 2, 3] and len(plan) > 40
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [n for r in records(out).values() for n in r["files"]] + list(records(out)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model, folder, out, logs: Path, n: int = 2, extra=()) -> list[subprocess.Popen]:
    port, env = free_port(), {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    procs = []
    for rank in range(n):
        cmd = [sys.executable, "-m", "e5lite.cli", *embed_args(model, folder, out, *extra),
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(rank)]
        log = logs / f"p{rank}-{time.monotonic_ns()}.log"
        with open(log, "w") as f:  # stderr to a file: a progress bar must not block on a full pipe
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f))
        procs[-1].log = log
    return procs


def finish(procs, timeout=240) -> list[str]:
    for p in procs:
        p.wait(timeout=timeout)
    logs = [p.log.read_text() for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(log[-3000:] for log in logs)
    return logs


@pytest.mark.slow
def test_two_processes_match_one(tiny_dir, corpus, one_process, tmp_path):
    out = tmp_path / "emb"
    logs = finish(launch(tiny_dir, corpus[0], out, tmp_path))
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == one_process[2]  # every id once, in input order
    np.testing.assert_allclose(emb, one_process[1], atol=1e-6, rtol=0)
    # the split is k % 2: each process wrote exactly its own shards, each with its own devices' results
    for name, rec in records(out).items():
        assert rec["writer"] == f"process {rec['shard'] % 2} of 2", (name, rec["writer"])
    assert all("tokens/s" in log and "process" in log for log in logs)


KILLABLE = """
import sys, e5lite
from e5lite.shards import embed_per_host
rank, port, model, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
e5lite.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
# engine calls of 64 rows: many commits per process, so that a kill lands between them
enc = e5lite.load(model, chunk_texts=64)
s = embed_per_host(enc, folder, out, id_field="_id", prompt_name="passage", shard_size="6K", show_progress=False)
print(f"process {rank}: {s['skipped']} shards were done already", file=sys.stderr)
"""


def launch_api(model, folder, out, logs: Path) -> list[subprocess.Popen]:
    port, env = free_port(), {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    procs = []
    for rank in range(2):
        log = logs / f"api{rank}-{time.monotonic_ns()}.log"
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-c", KILLABLE, str(rank), str(port), str(model),
                                           str(folder), str(out)], env=env, stdout=subprocess.DEVNULL, stderr=f))
        procs[-1].log = log
    return procs


@pytest.mark.slow
def test_both_killed_and_restarted(tiny_dir, corpus, one_process, tmp_path):
    out = tmp_path / "emb"
    procs = launch_api(tiny_dir, corpus[0], out, tmp_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if out.is_dir() and len(records(out)) >= 6:
            break
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    before = records(out)
    total = len(json.loads((out / "manifest.json").read_text())["plan"])
    assert 6 <= len(before) < total, f"{len(before)} of {total} shards done at the kill: not mid-run"
    with pytest.raises(e5lite.E5LiteError, match=r"unfinished: \d+ of \d+ shards are missing \(shard-\d+"):
        e5lite.read_embeddings(out)

    logs = finish(launch_api(tiny_dir, corpus[0], out, tmp_path))
    assert sum(int(re.search(r"(\d+) shards were done already", log).group(1)) for log in logs) == len(before)
    after = records(out)
    assert {k: after[k] for k in before} == before  # the shards done before the kill were not computed again
    assert not list(out.glob(".*"))  # no temporaries left
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == one_process[2]
    np.testing.assert_allclose(emb, one_process[1], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_bad_input_in_one_process(tiny_dir, tmp_path):
    """A bad line in a shard of process 1: it says so in one line naming the file and line, the other process
    finishes its shards, and both exit (neither waits for the other forever)."""
    rows = [json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(paragraphs()[:60])]
    # the bad line starts in bytes 2048-4095: shard 1 of 2K shards, so process 1's
    bad = next(i for i in range(1, len(rows)) if len("\n".join(rows[:i])) + 1 >= 2048)
    assert 2048 <= len("\n".join(rows[:bad])) + 1 < 4096
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text("\n".join(rows[:bad] + ['{"_id": "bad", "text": '] + rows[bad:]) + "\n")
    out = tmp_path / "emb"
    port, env = free_port(), {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    procs = []
    for rank in range(2):
        cmd = [sys.executable, "-m", "e5lite.cli", *embed_args(tiny_dir, tmp_path / "in", out), "--shard-size", "2K",
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(rank)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 1], errs
    last = errs[1].strip().splitlines()[-1]
    assert re.fullmatch(rf"e5lite: error: \S*/x.jsonl line {bad + 1} \(byte \d+\): not valid JSON \(.*\)", last), last
    n = len(json.loads((out / "manifest.json").read_text())["plan"])
    # process 1 stopped at its first shard; process 0 did all of its own
    assert {r["shard"] for r in records(out).values()} == set(range(0, n, 2))
    assert f"{n // 2} of {n} shards are not done yet" in errs[0], errs[0]


def test_a_rerun_with_another_process_count(tiny_dir, corpus, one_process, tmp_path):
    """Process 1 of 3 runs alone (independent processes, no jax.distributed), then two processes finish: each
    shard is a function of its index only, so nothing is done twice and nothing is lost."""
    enc = e5lite.load(tiny_dir)
    out = tmp_path / "emb"
    kw = dict(settings={"model": str(tiny_dir), "revision": None, "dtype": "float32", "max_length": enc.max_length},
              field="text", id_field="_id", prompt_name="passage", shard_size=SHARD_SIZE, show_progress=False)
    first = embed_per_host(enc, corpus[0], out, process_index=1, process_count=3, **kw)
    assert first["missing"] and {r["shard"] % 3 for r in records(out).values()} == {1}
    before = records(out)
    second = [embed_per_host(enc, corpus[0], out, process_index=i, process_count=2, **kw) for i in range(2)]
    assert second[1]["missing"] == [] and sum(s["skipped"] for s in second) == len(before)
    assert {k: records(out)[k] for k in before} == before
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == one_process[2]
    np.testing.assert_allclose(emb, one_process[1], atol=1e-6, rtol=0)


def test_leftovers_of_a_kill_are_cleaned(tiny_dir, corpus, one_process, tmp_path):
    """What a kill can leave between the steps of a shard's commit: a half-written temporary, data renamed into
    place without its record, a record whose data went missing. Only those shards are computed again."""
    import shutil
    out = Path(shutil.copytree(one_process[0], tmp_path / "emb"))
    (out / ".shard-00003.npy.x1y2.tmp").write_bytes(b"\x93NUMPY half")
    (out / "shard-00004.json").unlink()  # data in place, no record yet
    (out / "shard-00005.npy").unlink()  # a record naming a file that is gone
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*") if not p.name.startswith(("shard-00004.",
                                                                                                 "shard-00005."))}
    with pytest.raises(e5lite.E5LiteError, match=r"2 of \d+ shards are missing \(shard-00004, shard-00005\)"):
        e5lite.read_embeddings(out)
    assert main(embed_args(tiny_dir, corpus[0], out)) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert not list(out.glob(".*"))
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == one_process[2]
    np.testing.assert_allclose(emb, one_process[1], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_changed_input_or_other_layout_refused(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                                            for i, t in enumerate(paragraphs()[:50])))
    out = tmp_path / "emb"
    assert main(embed_args(tiny_dir, folder, out)) == 0
    assert main(embed_args(tiny_dir, folder, out, "--no-normalize")) == 1
    assert "different normalize; pass --overwrite" in capsys.readouterr().err
    with open(folder / "a.jsonl", "a") as f:
        f.write(json.dumps({"_id": "new", "text": "one more row"}) + "\n")
    assert main(embed_args(tiny_dir, folder, out)) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different input a.jsonl size, input a.jsonl modification time" in err, err
    assert main(embed_args(tiny_dir, folder, out, "--overwrite")) == 0
    assert e5lite.read_embeddings(out, with_ids=True)[1][-1] == "new"
    single = tmp_path / "single"
    assert main(["embed", "--model", str(tiny_dir), "--input", str(folder / "a.jsonl"), "--output", str(single),
                 "--rows-per-shard", "20"]) == 0
    capsys.readouterr()
    assert main(embed_args(tiny_dir, folder / "a.jsonl", single)) == 1
    assert "holds a single-process run of one file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ compact vectors per host

def quantized_like(emb, floats, ranges, precision="int8"):
    """``emb`` is ``floats`` quantised with ``ranges``: exactly, except where a value computed in another batch
    (another process's grouping of the shards) moved by an ulp across a bucket edge: one step, rarely."""
    from e5lite.quantize import quantize_embeddings
    want = quantize_embeddings(floats, precision, ranges=np.asarray(ranges, np.float32))
    diff = np.abs(emb.astype(np.int16) - want.astype(np.int16))
    assert emb.dtype == want.dtype and diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


@pytest.mark.slow
def test_two_processes_int8(tiny_dir, corpus, one_process, tmp_path):
    """--precision int8 under jax.distributed: process 0 computes the ranges from the first --calibration texts,
    writes them into the manifest and hands them to process 1; both quantise with them."""
    out = tmp_path / "emb"
    finish(launch(tiny_dir, corpus[0], out, tmp_path, extra=("--precision", "int8", "--calibration", "150")))
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert (run["precision"], run["calibration"]) == ("int8", 150)
    first = one_process[1][:150]
    np.testing.assert_allclose(run["ranges"], np.vstack((first.min(0), first.max(0))), atol=1e-6, rtol=0)
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == one_process[2] and emb.shape == one_process[1].shape
    assert {r["writer"] for r in records(out).values()} == {"process 0 of 2", "process 1 of 2"}
    quantized_like(emb, one_process[1], run["ranges"])


def test_independent_processes_quantized_and_resumed(tiny_dir, corpus, one_process, tmp_path, monkeypatch):
    """Processes without jax.distributed cannot hand ranges over: process 1 before process 0 is refused, naming
    the fix; after process 0 fixed them in the manifest, process 1 uses them. Shards lost to a kill are redone
    with the manifest's ranges (not calibrated again); the others are kept as they were."""
    import shutil

    import e5lite.shards.coordination as coordination  # where the calibration is looked up
    enc = e5lite.load(tiny_dir)
    out = tmp_path / "emb"
    kw = dict(settings={"model": str(tiny_dir), "revision": None, "dtype": "float32", "max_length": enc.max_length},
              field="text", id_field="_id", prompt_name="passage", shard_size=SHARD_SIZE, show_progress=False,
              precision="uint8", calibration=150, truncate_dim=24)
    with pytest.raises(e5lite.E5LiteError, match=r"process 1: the uint8 ranges are not in \S*manifest.json yet; "
                                                 r"without jax.distributed .* run process 0 first"):
        embed_per_host(enc, corpus[0], out, process_index=1, process_count=2, **kw)
    assert not records(out)
    first = embed_per_host(enc, corpus[0], out, process_index=0, process_count=2, **kw)
    assert first["missing"] and json.loads((out / "manifest.json").read_text())["run"]["ranges"] is not None
    assert embed_per_host(enc, corpus[0], out, process_index=1, process_count=2, **kw)["missing"] == []
    want, ids = e5lite.read_embeddings(out, with_ids=True)
    assert want.dtype == np.uint8 and want.shape == (len(ids), 24) and ids == one_process[2]
    ranges = json.loads((out / "manifest.json").read_text())["run"]["ranges"]
    floats = e5lite.load(tiny_dir).encode(corpus[1], prompt_name="passage", truncate_dim=24)
    quantized_like(want, floats, ranges, "uint8")

    cut = Path(shutil.copytree(out, tmp_path / "cut"))
    for k in (2, 3, 17):  # as a kill leaves them: a record gone (its data file stays, to be removed)
        (cut / f"shard-{k:05d}.json").unlink()

    def no_calibration(*a, **k):
        raise AssertionError("a resumed run must take the manifest's ranges, not compute them again")

    monkeypatch.setattr(coordination, "calibration_ranges", no_calibration)
    before = {k: v for k, v in records(cut).items()}
    s = embed_per_host(enc, corpus[0], cut, process_index=0, process_count=1, **kw)
    assert s["embedded"] == 3 and s["missing"] == [] and {k: records(cut)[k] for k in before} == before
    # the 3 shards now share engine calls they did not share before: equal up to an ulp's bucket edge
    quantized_like(e5lite.read_embeddings(cut), floats, ranges, "uint8")
    with pytest.raises(e5lite.E5LiteError, match="holds a run with a different calibration, ranges; pass --overwrite"):
        embed_per_host(enc, corpus[0], cut, process_index=0, process_count=1,
                       **{**kw, "calibration": None, "ranges": np.zeros((2, 24), np.float32)})


# ------------------------------------------------------------------------------------------ inputs and errors

@pytest.mark.parametrize("shard_bytes", [1, 5, 16, 64, 1 << 20])
def test_byte_shards_hold_every_line_once(tmp_path, shard_bytes):
    """Any shard size: the shards together give exactly the rows of the whole file, in order (CRLF, blank
    lines, a line longer than many shards, no final newline)."""
    text = "first line\r\n\nthird, é 東京\n" + "x" * 100 + "\n\n\nlast line without newline"
    (tmp_path / "t.txt").write_bytes(text.encode())
    want = [t for t, _, _ in read_records(open(tmp_path / "t.txt", "rb"), "t.txt")]
    inputs = describe_inputs([tmp_path / "t.txt"], json_records=False, field="text", id_field=None)
    got = [t for s in plan_shards(inputs, shard_bytes)
           for texts, _, _ in read_shard(inputs, s, field="text", id_field=None, chunk_rows=2) for t in texts]
    assert got == want and len(want) == 7


def test_parquet_row_groups_stream_in_chunks(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = paragraphs()[:95]
    pq.write_table(pa.table({"id": list(range(95)), "text": texts}), tmp_path / "p.parquet", row_group_size=40)
    inputs = describe_inputs([tmp_path / "p.parquet"], json_records=False, field="text", id_field="id")
    plan = plan_shards(inputs, 1)
    assert [(s["row_group"], s["rows"]) for s in plan] == [(0, 40), (1, 40), (2, 15)]
    chunks = [c for s in plan for c in read_shard(inputs, s, field="text", id_field="id", chunk_rows=7)]
    assert max(len(c[0]) for c in chunks) == 7
    assert [t for c in chunks for t in c[0]] == texts and [i for c in chunks for i in c[1]] == list(range(95))


def test_folders_and_globs(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "a.txt", "sub/c.parquet", ".hidden.txt", "_SUCCESS", "notes.md"):
        (tmp_path / "in" / name).write_text("")
    assert [p.relative_to(tmp_path / "in").as_posix() for p in resolve_inputs(tmp_path / "in")] == [
        "a.txt", "b.jsonl", "sub/c.parquet"]
    assert [p.name for p in resolve_inputs(f"{tmp_path}/in/*.txt")] == ["a.txt"]
    with pytest.raises(InputError, match=r"matches .*notes.md, which is not a .txt, .jsonl, .parquet file"):
        resolve_inputs(f"{tmp_path}/in/*")
    with pytest.raises(InputError, match="matches no"):
        resolve_inputs(f"{tmp_path}/in/*.csv")
    with pytest.raises(InputError, match="inside the input folder"):
        resolve_inputs(tmp_path / "in", exclude=tmp_path / "in" / "out")


def _bad_inputs(tmp: Path) -> None:
    """Bad rows placed deep in a file, so that their shard starts past byte 0 and the line must be counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(paragraphs()[:60])]
    (tmp / "json").mkdir()
    (tmp / "json" / "bad.jsonl").write_text("\n".join(rows[:41] + ['{"_id": "d41", "text": "unterminated'] + rows[41:])
                                            + "\n")
    (tmp / "nofield").mkdir()
    (tmp / "nofield" / "x.jsonl").write_text("\n".join(rows[:50] + ['{"_id": "d50", "body": "b"}']) + "\n")
    (tmp / "utf8").mkdir()
    (tmp / "utf8" / "x.txt").write_bytes(("\n".join(paragraphs()[:30]) + "\n").encode() + b"caf\xe9\n")
    (tmp / "pq").mkdir()
    pq.write_table(pa.table({"_id": [f"p{i}" for i in range(30)], "text": ["x"] * 23 + [None] + ["y"] * 6}),
                   tmp / "pq" / "x.parquet", row_group_size=10)
    (tmp / "pqcol").mkdir()
    pq.write_table(pa.table({"_id": ["p0"], "body": ["x"]}), tmp / "pqcol" / "x.parquet")
    (tmp / "pqint").mkdir()
    pq.write_table(pa.table({"_id": ["p0"], "text": [3]}), tmp / "pqint" / "x.parquet")


@pytest.mark.parametrize("args, message", [
    (["--input", "{tmp}/json", "--id-field", "_id"], "bad.jsonl line 42 (byte {byte}): not valid JSON"),
    (["--input", "{tmp}/nofield/*.jsonl"], "x.jsonl line 51 (byte {byte}): no field 'text' (set --field)"),
    (["--input", "{tmp}/utf8/x.txt", "--shard-size", "1K"], "x.txt line 31 (byte {byte}): not UTF-8 text"),
    (["--input", "{tmp}/pq", "--id-field", "_id"], "x.parquet row group 2 row 3 (file row 23): text column 'text' "
                                                   "is null"),
    (["--input", "{tmp}/pqcol"], "x.parquet: no column 'text' (set --field); columns: _id, body"),
    (["--input", "{tmp}/pqint"], "x.parquet: column 'text' is int64, expected strings"),
    (["--input", "{tmp}/utf8", "--id-field", "_id"], "x.txt: a .txt line has no id field"),
    (["--input", "{tmp}/missing/*.jsonl"], "matches no .txt, .jsonl, .parquet file"),
    (["--input", "{tmp}/json", "--coordinator", "127.0.0.1:1"], "--coordinator HOST:PORT needs --num-processes"),
    (["--input", "{tmp}/json", "--num-processes", "2", "--process-id", "0"], "need --coordinator HOST:PORT"),
    (["--input", "{tmp}/json", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, 1]"),
    (["--input", "{tmp}/json", "--num-actors", "2"], "--num-actors need --engine ray"),
    (["--input", "{tmp}/json", "--engine", "ray", "--shard-format", "npy"], "writes Parquet shards"),
    (["--input", "{tmp}/json", "--engine", "ray", "--distributed"], "--distributed: per-host flags"),
    (["--input", "{tmp}/json", "--rows-per-shard", "10"], "--rows-per-shard applies to one process"),
    (["--input", "{tmp}/json", "--shard-size", "lots"], "--shard-size 'lots': use bytes or a size"),
])
def test_errors_name_file_and_line(tiny_dir, tmp_path, capsys, args, message):
    _bad_inputs(tmp_path)
    byte = None
    if "line 42" in message:
        byte = len("\n".join([json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(paragraphs()[:41])])) + 1
    args = [a.format(tmp=tmp_path) for a in args]
    argv = ["embed", "--model", str(tiny_dir), "--output", str(tmp_path / "out"), "--shard-size", "2K", *args]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("e5lite: error:"), err
    if "{byte}" in message:
        head, tail = message.split("{byte}")
        assert head in err and tail in err, err
        if byte is not None:
            assert f"(byte {byte})" in err, err
    else:
        assert message in err, err
