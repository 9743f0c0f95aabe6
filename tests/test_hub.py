"""Hub resolution without network: a hand-built hub cache, offline mode, and an unreachable endpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import e5lite
from e5lite import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_cache(cache: Path, repo: str, src: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    shutil.copytree(src, snap)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def test_allow_patterns_skip_other_formats():
    import fnmatch
    ok = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "1_Pooling/config.json",
          "tokenizer.json", "model.safetensors.index.json"]
    never = ["onnx/model.onnx", "openvino/openvino_model.bin", "pytorch_model.bin", "onnx/model.safetensors"]
    match = lambda f: any(fnmatch.fnmatch(f, p) for p in hub.ALLOW_PATTERNS)  # noqa: E731
    assert all(match(f) for f in ok)
    assert not any(match(f) for f in never)


def test_offline_cache(tmp_path, tiny_dir, monkeypatch):
    snap = build_cache(tmp_path, "intfloat/e5-tiny", tiny_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve("intfloat/e5-tiny", cache_dir=tmp_path) == snap
    assert hub.resolve("intfloat/e5-tiny", cache_dir=tmp_path, revision=COMMIT) == snap
    enc = e5lite.load("intfloat/e5-tiny", cache_dir=tmp_path)
    np.testing.assert_array_equal(enc.encode(["x"]), e5lite.load(tiny_dir).encode(["x"]))
    with pytest.raises(e5lite.ModelNotFoundError, match="offline mode.*not in the hub cache.*local folder"):
        e5lite.load("intfloat/e5-absent", cache_dir=tmp_path)


def test_unreachable_hub_uses_cache_then_errors(tmp_path, tiny_dir):
    """With the network on but the endpoint dead: cached models load, others fail with a clear message."""
    build_cache(tmp_path, "intfloat/e5-tiny", tiny_dir)
    script = textwrap.dedent(f"""
        import e5lite
        print(e5lite.load("intfloat/e5-tiny", cache_dir={str(tmp_path)!r}).dim)
        try:
            e5lite.load("intfloat/e5-absent", cache_dir={str(tmp_path)!r})
        except e5lite.ModelNotFoundError as e:
            print("ERROR", e)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "32"
    assert lines[1].startswith("ERROR") and "unreachable" in lines[1] and "local folder" in lines[1]


def test_hub_id_vs_path():
    assert not hub._looks_like_path("intfloat/e5-base-v2")
    assert not hub._looks_like_path("bert-base-uncased")
    assert hub._looks_like_path("./models/e5")
    assert hub._looks_like_path("/abs/e5")
    assert hub._looks_like_path("a/b/c")
