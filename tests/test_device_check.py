"""tools/device_check.sh, the one-command device check, in its dry mode on this CPU (tiny shapes, no installs), so
that it cannot rot before a GPU or TPU is lent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_dry_run_writes_the_table(tmp_path):
    out = tmp_path / "device_check.md"
    p = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh"), "--cpu", "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    lines = out.read_text().splitlines()
    head = next(ln for ln in lines if ln.startswith("| check"))
    assert [c.strip() for c in head.strip("|").split("|")] == [
        "check", "model", "run", "real tokens/s", "MFU", "host feed tokens/s", "step ms", "result"]
    rows = [ln for ln in lines if ln.startswith("| ") and ln is not head]
    by_check = {c: [r for r in rows if r.startswith(f"| {c} |")] for c in ("parity tests", "forward", "train step")}
    assert " passed" in by_check["parity tests"][0] and " failed" not in by_check["parity tests"][0]
    forward = [r for r in by_check["forward"] if "| e5lite" in r]
    assert forward and all("not run" not in r and "skipped" not in r for r in forward)
    assert float(forward[0].split("|")[4].strip().replace(",", "")) > 0  # real tokens/s
    assert float(forward[0].split("|")[6].strip().replace(",", "")) > 0  # host feed tokens/s
    steps = {r.split("|")[3].strip(): r for r in by_check["train step"]}
    assert {"e5lite", "st"} <= set(steps)
    assert all(float(r.split("|")[7].strip().replace(",", "")) > 0 for r in steps.values())  # step ms
    assert (tmp_path / "device_check.logs" / "tests.log").is_file()
