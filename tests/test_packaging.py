"""The wheel: every package (the server too), and kernels/ as e5lite.kernels, never as a top-level `kernels`
module (a PyPI name transformers probes)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_has_no_top_level_kernels(tmp_path):
    """Outside the checkout, e5lite brings no top-level `kernels`: any that imports is somebody else's (transformers
    installs Hugging Face's)."""
    code = ("import importlib.util, e5lite, e5lite.kernels.flash_attention as fa; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(spec is None or not spec.origin.startswith(e5lite.__path__[0].rsplit('e5lite', 1)[0] + 'kernels'), "
            "callable(fa.flash_attention))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.slow
def test_checkout_root_does_not_shadow_kernels():
    """From the repository root (on sys.path as `python -m pytest`, a REPL or `python -c` put it), `import kernels`
    finds the installed Hugging Face package, or nothing; never the checkout's kernels/ folder, and transformers'
    model classes import."""
    code = "import e5lite.kernels.flash_attention, transformers.modeling_utils, kernels; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    found = Path(out.stdout.split()[-1]).resolve()
    assert ROOT / "kernels" not in found.parents, found  # Hugging Face's, installed with transformers
    missing = subprocess.run([sys.executable, "-c", "import sys; sys.modules.pop('kernels', None); "
                              "sys.path = [p for p in sys.path if 'site-packages' not in p]; import kernels"],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'kernels'" in missing.stderr, missing.stderr[-2000:]


def test_wheel_maps_kernels_into_e5lite(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("e5lite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "e5lite/kernels/flash_attention.py" in names
    assert {"e5lite/serve/app.py", "e5lite/serve/protocol.py", "e5lite/attention.py", "e5lite/engine.py"} <= set(names)
    assert not any(n.startswith("kernels/") for n in names)
