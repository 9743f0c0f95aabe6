"""tools/walkthrough.py: the guided tour runs, and every intermediate matches transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import walkthrough  # noqa: E402


@pytest.mark.slow
def test_the_tour_passes(capsys):
    assert walkthrough.main() == 0
    out = capsys.readouterr().out
    for title in ("1. Tokenisation", "2. Embeddings", "3. One layer opened up", "4. All 6 layers", "5. Pooling",
                  "6. E5's prompts"):
        assert title in out
    assert out.count("(ok,") == 14 and "MISMATCH" not in out and "0 checks failed" in out


def test_a_mismatch_fails_the_tour(capsys):
    walkthrough.FAILURES.clear()
    walkthrough.check("something", np.zeros(3), np.ones(3), 1e-5)
    assert walkthrough.FAILURES == ["something"] and "MISMATCH" in capsys.readouterr().out
    walkthrough.FAILURES.clear()
