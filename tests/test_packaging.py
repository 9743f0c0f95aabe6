"""The wheel: every package (the server too), and kernels/ as e5lite.kernels, never as a top-level `kernels`
module (a PyPI name transformers probes)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_has_no_top_level_kernels(tmp_path):
    code = ("import importlib.util, e5lite.kernels.flash_attention as fa; "
            "print(importlib.util.find_spec('kernels') is None, callable(fa.flash_attention))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_wheel_maps_kernels_into_e5lite(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("e5lite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "e5lite/kernels/flash_attention.py" in names
    assert {"e5lite/serve/app.py", "e5lite/serve/protocol.py", "e5lite/attention.py", "e5lite/engine.py"} <= set(names)
    assert not any(n.startswith("kernels/") for n in names)
