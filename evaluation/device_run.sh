#!/usr/bin/env bash
# The evaluation of the README on a GPU machine, in one go: prepare the five quantized variants of a
# model, then full WikiText-2 test perplexity of the original and of each variant under DecDEC,
# the selection ablation and recall on AWQ 3-bit, and the merged report.
#
# Run from the repository root on a CUDA machine with the package importable:
#
#   MODEL=path/to/SmolLM2-135M-Instruct.Q4_1.gguf DATA=../shared/data bash evaluation/device_run.sh
#   STAGES="prepare ppl_awq3" ... ; then STAGES="ppl_rest ppl_random report" ...   # split over two calls
#
# Prepared models and results accumulate in $WORK (kept while the machine is); JSON, logs and the
# report are copied to $OUT at the end of every call.
#
# Stages: prepare (RTN/AWQ/SqueezeLLM 3-bit, AWQ 3.5-bit, AWQ 4-bit g128; calibration 16 x 512 C4
# tokens; a finished directory is reused), ppl_awq3 (the original, and AWQ 3-bit at k_chunk 0, 8, 16,
# 32, 64 and full, exact/static at 8 and 32, recall), ppl_rest (the other four variants), ppl_random
# (AWQ 3-bit with random sets at k_chunk 8: the draw runs on the CPU for reproducibility, about 4
# minutes on the H100's host), report (evaluation/report.py over every JSON).
#
# Settings (environment): MODEL (required: a .gguf, HF directory or id), DATA (data directory),
# DEVICE (default cuda), WORK (default /tmp/decdec-eval), OUT (default ./device_out), LIMIT_WINDOWS (default: all),
# SEQLEN (window tokens, default 2048), BATCH (windows per forward pass, default 8), GROUP_SIZE (default 128),
# STAGES (default: all five).
# A quick check on CPU: MODEL=stories260k DEVICE=cpu SEQLEN=256 GROUP_SIZE=32 LIMIT_WINDOWS=2 bash ...
set -u
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to the original model (.gguf, HF directory or id)}"
DATA=${DATA:-../shared/data}
WORK=${WORK:-/tmp/decdec-eval}
DEVICE=${DEVICE:-cuda}
SEQLEN=${SEQLEN:-2048}
GROUP_SIZE=${GROUP_SIZE:-128}
OUT=${OUT:-device_out}
STAGES=${STAGES:-prepare ppl_awq3 ppl_rest ppl_random report}
LIMIT=${LIMIT_WINDOWS:+--limit-windows $LIMIT_WINDOWS}
BATCH=${BATCH:-8}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK/json" "$WORK/logs"
VARIANTS="rtn3:rtn:3 awq3:awq:3 sqllm3:squeezellm:3 awq35:awq:3.5 awq4:awq:4"

want() { [[ " $STAGES " == *" $1 "* ]]; }

# step NAME COMMAND...: the command's output in $WORK/logs/NAME.log, a status line, its tail on failure
step() {
  local name=$1 start=$SECONDS; shift
  "$@" >"$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $((SECONDS - start)) s" >&2
  [[ $rc -eq 0 ]] || tail -n 15 "$WORK/logs/$name.log" >&2
}

ppl() {  # ppl NAME ARGS...: full WikiText-2 test perplexity of one variant
  local name=$1; shift
  step "ppl_$name" python evaluation/ppl.py --device "$DEVICE" --data-dir "$DATA" --dataset wikitext2 --seqlen "$SEQLEN" --batch-size "$BATCH" $LIMIT \
    --json "$WORK/json/$name.json" "$@"
}

if want prepare; then
  for v in $VARIANTS; do
    IFS=: read -r name method bits <<<"$v"
    step "prepare_$name" python decdec_setup/prepare.py --model "$MODEL" --method "$method" --bits "$bits" \
      --group-size "$GROUP_SIZE" --device "$DEVICE" --data-dir "$DATA" --calib c4 --nsamples 16 --seqlen 512 --out "$WORK/$name"
  done
fi
if want ppl_awq3; then
  ppl original --model "$MODEL"
  ppl awq3 --model-dir "$WORK/awq3" --mode none decdec full --k-chunk 8 16 32 64 --report-recall
  ppl awq3_ablation --model-dir "$WORK/awq3" --mode exact static --k-chunk 8 32
fi
if want ppl_rest; then
  for name in rtn3 sqllm3 awq35 awq4; do
    ppl "$name" --model-dir "$WORK/$name" --mode none decdec full --k-chunk 8 16 32 64
  done
fi
if want ppl_random; then
  ppl awq3_random --model-dir "$WORK/awq3" --mode random --k-chunk 8
fi
mkdir -p "$OUT" && cp -r "$WORK/json" "$WORK/logs" "$OUT"/
if want report; then
  python evaluation/report.py "$WORK"/json/*.json --out "$OUT/report" && cat "$OUT/report/report.md"
fi
