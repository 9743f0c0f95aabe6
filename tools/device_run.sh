#!/usr/bin/env bash
# GPU runs on a lent device machine (no network; JAX CUDA, torch, transformers and sentence-transformers
# preinstalled). Run from the repo root with the MiniLM copy carried in .gpu-assets/minilm:
#     bash tools/device_run.sh tests attn bench-smoke      # stages in order; logs land in $OUT (or /tmp/out)
# Stages: tests (Pallas kernel + attention_impl tests compiled for the GPU), attn (tools/bench_attention.py),
# bench-smoke (small e5-base run), bench-base / bench-large (the recorded GPU benchmark; env vars
# BASE_TEXTS, BASE_PEERS, LARGE_TEXTS, LARGE_PEERS, PEER_TIMEOUT override the defaults), bench-train
# (tools/bench_train.py at the e5-base shape: e5lite bf16 against sentence-transformers fp16; the trainer needs
# accelerate in the image).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 E5LITE_MINILM_DIR=$PWD/.gpu-assets/minilm HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
# e5lite itself, without dependencies (the image has them); -P keeps the source tree's e5lite/ (which lacks the
# e5lite.kernels mapping of the installed package) off sys.path.
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/tools
PY="python3 -P"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
$PY -c "import jax, torch, transformers, sentence_transformers as st; print('jax', jax.__version__, jax.devices(), \
'| torch', torch.__version__, '| transformers', transformers.__version__, '| sentence-transformers', st.__version__)"
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests) $PY -m pytest -q -p no:cacheprovider tests/test_flash_attention.py tests/test_attention.py 2>&1 \
             | tee "$OUT/tests.log" | tail -25 ;;
    attn) $PY tools/bench_attention.py --batch "${ATTN_BATCH:-32}" 2>&1 | tee "$OUT/attn.log" ;;
    bench-smoke) $PY tools/bench.py --sequential --models e5-base --texts 20000 --repeats 2 --json "$OUT/smoke.json" \
             --peers e5lite-bf16,e5lite-bf16:xla,e5lite-bf16:pallas,e5lite-bf16:cudnn,st-fp16 2>&1 \
             | tee "$OUT/smoke.log" ;;
    bench-base) $PY tools/bench.py --sequential --models e5-base --texts "${BASE_TEXTS:-20000}" --repeats 2 \
             --peer-timeout "${PEER_TIMEOUT:-100}" --json "$OUT/base.json" \
             --peers "${BASE_PEERS:-e5lite-bf16:cudnn,e5lite-bf16:pallas,e5lite-bf16:xla,st-fp16,torch-fp16}" 2>&1 | tee "$OUT/base.log" ;;
    bench-large) $PY tools/bench.py --sequential --models e5-large --texts "${LARGE_TEXTS:-10000}" --repeats 2 \
             --peer-timeout "${PEER_TIMEOUT:-100}" --json "$OUT/large.json" \
             --peers "${LARGE_PEERS:-e5lite-bf16:cudnn,e5lite-bf16:pallas,st-fp16}" 2>&1 | tee "$OUT/large.log" ;;
    bench-train) $PY tools/bench_train.py --model e5-base --batch-size "${TRAIN_BATCH:-64}" --steps 10 \
             --peers "${TRAIN_PEERS:-e5lite-bf16,e5lite-bf16-cached,st-fp16,st-fp16-cached}" --json "$OUT/train.json" \
             2>&1 | tee "$OUT/train.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
