#!/usr/bin/env bash
# One short accelerator check for a GPU machine (H100/H200) with no network and minutes to spare.
#
#   bash scripts/device_check.sh            # GPU: < 9 minutes, prints a table at the end
#   bash scripts/device_check.sh --cpu      # the same stages on CPU with tiny sizes (< 2.5 minutes)
#
# Stages, each under its own `timeout` (shrunk to fit the overall budget; a stage that would start with
# too little time left is skipped and says so):
#   1. versions (python, jax, jaxlib, flax, optax, torch, transformers, GPU name) and the card's bf16
#      matmul rate (8192^3, JAX and PyTorch: the peak for MFU);
#   2. tests on the GPU: the cuDNN/bfloat16 checks of tests/test_accelerator_path.py (-k gpu) and the
#      model parity tests (tests/test_models_parity.py -x);
#   3. benchmarks, jaxalign then PyTorch, on a ~1B Llama-shaped and a SmolLM2-135M-shaped random model in
#      bfloat16: forward, DPO train step, CHES, entanglement (scripts/device_bench.py);
#   4. `jaxalign plan` of the 1B benchmark's train step on this device (scripts/plan_device.py): the
#      predicted step time (roofline, an estimate) beside the one measured in stage 3;
#   5. the table (also written to $OUT/device_check/table.txt when $OUT is set), the plan line below it.
# Partial results still print: every finished task appends a JSON line to results.jsonl.
#
# Nothing is installed from the network. Python wheels the machine lacks (e.g. gguf) can travel in .whl/
# at the repository root: on a connected machine run
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# (pure-Python wheels need no --platform); this script installs them with --no-index into a temporary
# folder on PYTHONPATH. jaxalign itself runs from the checkout (PYTHONPATH=.), never installed.
#
# Environment: PYTHON (default python3, or .venv/bin/python when present), DEVICE_CHECK_BUDGET (seconds,
# default 545 GPU / 145 CPU), OUT (where results, log and table go; default /tmp/device_check).
set -u
cd "$(dirname "$0")/.."

CPU=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu or --help)" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

DIR=${OUT:-/tmp/device_check}
[ -n "${OUT:-}" ] && DIR=$OUT/device_check
mkdir -p "$DIR"
RESULTS=$DIR/results.jsonl
LOG=$DIR/log.txt
: >"$RESULTS"
: >"$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d /tmp/jaxalign_site.XXXX)
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "warning: installing .whl/*.whl failed; continuing without them" | tee -a "$LOG"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxalign_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2

if [ "$CPU" = 1 ]; then
  BUDGET=${DEVICE_CHECK_BUDGET:-145}
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"  # tiny models: compile time rules
  PLATFORM=cpu; FLAG=--cpu
  S=${DEVICE_CHECK_STAGE_SCALE:-1}  # stage limits x S, for a loaded machine (tests use 6)
  T_MATMUL=$((20*S)); T_TESTS=$((30*S)); T_JAX_1B=$((30*S)); T_TORCH_1B=$((15*S)); T_JAX_S=$((30*S))
  T_TORCH_S=$((15*S)); TASK_T=$((20*S)); T_PLAN=$((30*S))
  TESTS=(tests/test_models_parity.py -x -q -p no:cacheprovider -k "test_forward_matches_transformers and gpt2-untied and left")
else
  BUDGET=${DEVICE_CHECK_BUDGET:-545}
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}
  PLATFORM=gpu; FLAG=
  T_MATMUL=50; T_TESTS=100; T_JAX_1B=120; T_TORCH_1B=45; T_JAX_S=90; T_TORCH_S=35; TASK_T=50; T_PLAN=75
  # fp32 parity tolerances (1e-4) need full-precision fp32 matmuls (no TF32) on the GPU.
  TESTS=(tests/test_accelerator_path.py tests/test_models_parity.py -x -q -p no:cacheprovider --skip-slow
         -k "gpu or not test_accelerator_path")
fi

note() { echo "$*" | tee -a "$LOG"; }
record() { $PY scripts/device_bench.py record --out "$RESULTS" --json "$1" >/dev/null 2>&1 || true; }

# stage NAME LIMIT COMMAND... : runs COMMAND under `timeout`, the limit cut to the budget left; sets STATUS.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  : >"$DIR/last.txt"
  if [ "$limit" -lt 10 ]; then
    STATUS=skipped
    note "=== $name: skipped (${left}s of the ${BUDGET}s budget left)"
    record "{\"stage\": \"process\", \"name\": \"$name\", \"status\": \"skipped\", \"wall_s\": 0}"
    return
  fi
  note "=== $name (limit ${limit}s, t=${SECONDS}s)"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" >"$DIR/last.txt" 2>&1
  local rc=$?
  cat "$DIR/last.txt" >>"$LOG"
  STATUS=ok
  [ $rc -ne 0 ] && STATUS="exit $rc"
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && STATUS=timeout
  note "--- $name: $STATUS after $((SECONDS - t0))s"
  record "{\"stage\": \"process\", \"name\": \"$name\", \"status\": \"$STATUS\", \"wall_s\": $((SECONDS - t0))}"
}

note "device_check ($PLATFORM, budget ${BUDGET}s) in $PWD; results in $RESULTS"
stage versions+matmul "$T_MATMUL" $PY scripts/device_bench.py matmul $FLAG --out "$RESULTS"
T0=$SECONDS
stage tests "$T_TESTS" env JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest "${TESTS[@]}"
SUMMARY=$(grep -E "passed|failed|error|no tests ran" "$DIR/last.txt" | tail -n 1 | tr -d '"=' | sed 's/^ *//')
record "{\"stage\": \"tests\", \"name\": \"$PLATFORM\", \"status\": \"$STATUS\", \"wall_s\": $((SECONDS - T0)), \"note\": \"$SUMMARY\"}"
for model in 1b 135m; do
  if [ "$model" = 1b ]; then tj=$T_JAX_1B; tt=$T_TORCH_1B; else tj=$T_JAX_S; tt=$T_TORCH_S; fi
  stage "jax-$model" "$tj" $PY scripts/device_bench.py jax --model $model $FLAG --out "$RESULTS" \
    --task-timeout "$TASK_T"
  stage "torch-$model" "$tt" $PY scripts/device_bench.py torch --model $model $FLAG --out "$RESULTS" \
    --task-timeout "$TASK_T"
done
stage plan-1b "$T_PLAN" $PY scripts/plan_device.py --model 1b $FLAG --results "$RESULTS" \
  --out "$DIR/plan_1b_train.json"

echo
echo "=== log tail"
tail -n 25 "$LOG"
echo
echo "=== device_check table ($PLATFORM, ${SECONDS}s)"
$PY scripts/device_bench.py table "$RESULTS" | tee "$DIR/table.txt"
grep -h "^plan vs measured" "$LOG" | tee -a "$DIR/table.txt"
