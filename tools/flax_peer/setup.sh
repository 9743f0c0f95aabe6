#!/usr/bin/env bash
# Create the venv for the Flax throughput peer (tools/flax_peer/worker.py).
#
#   bash tools/flax_peer/setup.sh [VENV_DIR]     # default: .bench-venvs/flax under the repo root
#
# transformers 5 dropped Flax, so the peer lives in its own venv with the last 4.x line (4.57), whose
# FlaxBertModel runs on current flax/jax; jax/jaxlib match the main venv's 0.10.2 (CPU), so both peers use
# the same XLA. No torch: the worker reads PyTorch-format model.safetensors with safetensors' numpy API.
# Needs Python >= 3.11 (jax 0.10, flax 0.12); pick one with PYTHON=... . About 1 min and 0.9 GB.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$root/.bench-venvs/flax}"

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check \
    "transformers==4.57.6" "flax==0.12.8" "jax==0.10.2" "jaxlib==0.10.2" \
    "numpy==2.4.6" "tokenizers==0.22.2" "safetensors==0.8.0" "huggingface-hub==0.36.2"
"$venv/bin/python" - <<'PY'
import importlib.util, jax, flax, transformers
from transformers import FlaxBertModel  # noqa: F401  (fails here if Flax support is broken)
assert importlib.util.find_spec("torch") is None, "torch was pulled in; the peer must not need it"
print(f"flax peer venv ready: transformers {transformers.__version__}, flax {flax.__version__}, "
      f"jax {jax.__version__}, devices {jax.devices()}")
PY
