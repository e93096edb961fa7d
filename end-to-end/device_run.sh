#!/usr/bin/env bash
# GPU checks and benchmarks of the autotuner and end-to-end stages, in one go; tables last.
#
# Run from the repository root on a CUDA machine with the package installed
# (pip install --no-build-isolation -e decdec_extension, which builds decdec._C):
#
#   bash end-to-end/device_run.sh                 # everything (about 8-10 minutes on an H100)
#   STAGES="tests build tune" bash end-to-end/device_run.sh   # a subset, e.g. to split it over two calls:
#   STAGES="bench report" bash end-to-end/device_run.sh       # ... the second one (same machine, still warm)
#
# Results (JSON, logs, plot) accumulate in $RES, which outlives one call, and are copied to $OUT
# at the end of every call; the report covers everything in $RES.
#
# Stages (in order):
#   tests   pytest -m gpu of the tune/e2e tests (CUDA-graph decode vs eager, DecDEC off and on)
#   build   a synthetic 3-bit model of Llama-3-8B's shape in $SYN (random weights + residuals; reused)
#   tune    autotuner/tune.py on it: measured at 2.5 % (writes $SYN/decdec_config.json and a plot),
#           then 5 % and 10 % from the same measured table, 2.5 % of the whole decode step (--of step
#           --verify 3: the step timed, and the configs found timed in it), and a dry run with the
#           measured bandwidths
#   bench   generate.py --bench: DecDEC off vs the four tuned configs, alternating runs, roofline from
#           the memory bandwidth measured in the run, fp16 random model (this loop + HF generate()),
#           memory growth over $MEM_TOKENS decode steps, decode steps at the context lengths
#           $CONTEXTS (SDPA and the decode-attention kernel, each with windows and over the whole
#           cache), and a profile of $PROFILE_STEPS decode steps per setting (GPU time by kernel kind)
#   bench_compiled  the same benchmark, DecDEC off vs the 2.5 % config, with the decode step
#           torch.compile'd before capture (fuses the small element-wise kernels; about 3 minutes)
#   report  the tuning and benchmark tables
# Without the compiled extension it runs in reference mode: tests and tuning are skipped and the
# benchmark times the CUDA-graph loop with DecDEC off only.
#
# Settings (environment): OUT (where results are copied, default ./device_out), RES (working
# results, default /tmp/decdec-device-results), SYN (synthetic model dir), SHAPE (llama-3-8b),
# BITS (3), NEW_TOKENS (256), MEM_TOKENS (10000), CONTEXTS (1000,4000,8000), PROFILE_STEPS (20), STAGES.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
RES=${RES:-/tmp/decdec-device-results}
SHAPE=${SHAPE:-llama-3-8b}
BITS=${BITS:-3}
SYN=${SYN:-/tmp/decdec-synthetic/$SHAPE-${BITS}bit}
NEW_TOKENS=${NEW_TOKENS:-256}
MEM_TOKENS=${MEM_TOKENS:-10000}
CONTEXTS=${CONTEXTS:-1000,4000,8000}
PROFILE_STEPS=${PROFILE_STEPS:-20}
STAGES=${STAGES:-tests build tune bench bench_compiled report}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RES/logs"
declare -a SUMMARY=()

want() { [[ " $STAGES " == *" $1 "* ]]; }

# run_stage NAME COMMAND...: output to $RES/logs/NAME.log; one status line; the log tail on failure
run_stage() {
  local name=$1; shift
  local start=$SECONDS
  echo "[$(date -u +%H:%M:%S)] $name: $*" >&2
  "$@" >"$RES/logs/$name.log" 2>&1
  local rc=$?
  local line="$name: rc=$rc, $((SECONDS - start)) s"
  SUMMARY+=("$line")
  echo "  -> $line" >&2
  if [[ $rc -ne 0 ]]; then
    echo "----- tail of $RES/logs/$name.log -----" >&2
    tail -n 25 "$RES/logs/$name.log" | tr '\r' '\n' | tail -n 25 >&2
  fi
  return $rc
}

if ! python -c "import decdec" 2>/dev/null; then
  run_stage install pip install --no-build-isolation -e decdec_extension || exit 1
fi
nvidia-smi -L >&2 || true
if python -c "import sys, decdec; sys.exit(0 if decdec.cuda_available() else 1)"; then
  EXT=1
else
  EXT=0
  echo "decdec._C is not available: reference mode (no tests, no tuning, DecDEC off only)" >&2
fi

if want tests && [[ $EXT == 1 ]]; then
  run_stage tests python -m pytest -q -m gpu tests/test_e2e_generation.py
fi

if want build; then
  run_stage build python -c "
from decdec.synthetic import ensure_synthetic_model
print(ensure_synthetic_model('$SYN', '$SHAPE', $BITS, device='cuda'))"
fi

if want tune && [[ $EXT == 1 ]]; then
  rm -f "$RES"/tune_*.json
  if run_stage tune_2.5 python autotuner/tune.py --model-dir "$SYN" --target-slowdown 2.5 \
      --plot "$RES/tune_${SHAPE}_${BITS}bit.png" --json "$RES/tune_2.5.json"; then
    for target in 5 10; do
      run_stage "tune_$target" python autotuner/tune.py --model-dir "$SYN" --target-slowdown "$target" \
        --table "$SYN/decdec_config.json" --no-write --json "$RES/tune_$target.json"
    done
    # 2.5 % of the whole decode step (the step timed with DecDEC off, the table reused), the configs
    # found timed in the step and searched again until one fits
    run_stage tune_step_2.5 python autotuner/tune.py --model-dir "$SYN" --target-slowdown 2.5 --of step \
      --verify 3 --table "$SYN/decdec_config.json" --no-write --json "$RES/tune_step_2.5.json"
    # the analytic model with this GPU's measured bandwidths, for comparison with the measurement
    read -r MEM PCIE SMS < <(python -c "
import json, torch
d = json.load(open('$RES/tune_2.5.json'))
print(d['bandwidth_GBps']['memory'], d['bandwidth_GBps']['pcie'], torch.cuda.get_device_properties(0).multi_processor_count)")
    run_stage tune_dry python autotuner/tune.py --model-dir "$SYN" --target-slowdown 2.5 --dry-run \
      --mem-bw "$MEM" --pcie-bw "$PCIE" --sms "$SMS" --no-write --json "$RES/tune_dry_2.5.json"
  fi
fi

if want bench; then
  BENCH=(python end-to-end/generate.py --model-dir "$SYN" --bench --fp16-contrast --memory-check "$MEM_TOKENS"
         --contexts "$CONTEXTS" --profile "$PROFILE_STEPS" --max-new-tokens "$NEW_TOKENS" --json "$RES/bench.json")
  if [[ $EXT == 1 ]]; then
    TUNED=$(ls "$RES"/tune_2.5.json "$RES"/tune_step_2.5.json "$RES"/tune_5.json "$RES"/tune_10.json 2>/dev/null | tr '\n' ' ')
    if [[ -n "$TUNED" ]]; then
      # shellcheck disable=SC2086
      run_stage bench "${BENCH[@]}" --tuned $TUNED
    else
      run_stage bench "${BENCH[@]}" --k-chunk 8
    fi
  else
    run_stage bench "${BENCH[@]}" --no-decdec
  fi
fi

if want bench_compiled; then
  if [[ -f "$RES/tune_2.5.json" ]]; then
    run_stage bench_compiled python end-to-end/generate.py --model-dir "$SYN" --bench --tuned "$RES/tune_2.5.json" \
      --compile --profile "$PROFILE_STEPS" --max-new-tokens "$NEW_TOKENS" --json "$RES/bench_compiled.json"
  else
    run_stage bench_compiled python end-to-end/generate.py --model-dir "$SYN" --bench --no-decdec --compile \
      --profile "$PROFILE_STEPS" --max-new-tokens "$NEW_TOKENS" --json "$RES/bench_compiled.json"
  fi
fi

echo
echo "===== stages ====="
printf '%s\n' ${SUMMARY[@]+"${SUMMARY[@]}"}
mkdir -p "$OUT" && cp -r "$RES"/. "$OUT"/
if want report; then
  echo "===== results (JSON, logs and plot also in $OUT) ====="
  python end-to-end/report.py "$RES"/tune_*.json "$RES"/bench*.json 2>/dev/null \
    || echo "(no results to report)"
fi
