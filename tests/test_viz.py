"""viz.py and ``e5lite attention``: heat maps (PNG), the numbers (JSON), layer-by-layer similarity."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import e5lite
from e5lite import viz
from e5lite.cli import main

TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.mark.slow
def test_png_has_one_panel_per_head(minilm_dir, tmp_path, capsys):
    out = tmp_path / "attn.png"
    assert main(["attention", "--model", str(minilm_dir), "--text", TEXT, "--output", str(out)]) == 0
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 1000 and height > 1000  # 12 heads: a 4 x 3 grid of labelled panels
    assert "wrote layer 5's attention (12 heads, 11 tokens)" in capsys.readouterr().err
    one = tmp_path / "head.png"
    assert main(["attention", "--model", str(minilm_dir), "--text", TEXT, "--layer", "0", "--head", "3",
                 "--output", str(one)]) == 0
    assert one.stat().st_size < out.stat().st_size


def test_json_is_the_forward_pass_probabilities(minilm_dir, tmp_path):
    out = tmp_path / "attn.json"
    assert main(["attention", "--model", str(minilm_dir), "--text", TEXT, "--layer", "-2", "--head", "7",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tokens"][0] == "[CLS]" and report["tokens"][-1] == "[SEP]" and "fox" in report["tokens"]
    assert report["layer"] == 4 and report["heads"] == [7]
    enc = e5lite.load(minilm_dir)
    tokens, probs = viz.attention_maps(enc, TEXT)
    np.testing.assert_allclose(np.array(report["attentions"][0]), probs[4, 7], atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_compare_layer_by_layer(minilm_dir, tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["attention", "--model", str(minilm_dir), "--text", "how do I catch an exception",
                 "--compare", "The try statement specifies exception handlers", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["layer"] for r in rows] == list(range(7))
    assert rows[0]["cosine_cls"] == pytest.approx(1.0, abs=1e-6)  # before attention, [CLS] is the same vector
    enc = e5lite.load(minilm_dir)
    e = enc.encode(["how do I catch an exception", "The try statement specifies exception handlers"], prompt="")
    assert rows[-1]["cosine_mean"] == pytest.approx(float(e[0] @ e[1]), abs=1e-5)  # the last layer is encode()
    out_text, err = capsys.readouterr()
    assert "| embeddings |" in out_text and "| layer 5 |" in out_text and "| layer 6 |" not in out_text  # as --layer
    assert f"wrote the similarity after each of 6 layers to {out}" in err
    assert main(["attention", "--model", str(minilm_dir), "--text", "a", "--compare", "b", "--output",
                 str(tmp_path / "sim.png")]) == 0
    assert (tmp_path / "sim.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--layer", "6"], "--layer 6: this model has layers 0..5"),
    (["--head", "12"], "--head 12: this model has heads 0..11"),
    (["--output", "a.svg"], "use a .png or .json suffix"),
])
def test_bad_arguments(minilm_dir, capsys, args, message):
    assert main(["attention", "--model", str(minilm_dir), "--text", TEXT, *args]) == 1
    assert message in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(minilm_dir, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from e5lite.cli import main; "
            f"sys.exit(main(['attention', '--model', {str(minilm_dir)!r}, '--text', 'x', '--output', "
            f"{str(tmp_path / 'a.png')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "pip install 'e5lite[viz]'" in out.stderr
