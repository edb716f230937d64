#!/usr/bin/env bash
# The evaluation suite of the issue, base vs DSPA on the default model, in one go:
# multiple choice (full ARC-Easy, TruthfulQA MC2 and WinoGrande; 2,000-item stratified HellaSwag and
# MMLU), MT-Bench and AlpacaEval (local judge: the default model itself, unsteered), then the report.
#
#   MAP=/path/to/dspa_map DATA=../shared/data OUT=runs/eval_suite bash benchmarks/eval_suite.sh
#
# Knobs (environment): DEVICE (cuda/cpu; default: what is there), MC_LIMIT (default 2000, the
# HellaSwag/MMLU subset), MC_ALL_LIMIT (a cap for every task, for a smoke run), MT_LIMIT (default: all
# 80), AE_LIMIT (default 100), MAX_NEW (default 512), BATCH (default 32), SEEDS (default "0"),
# JUDGE_MODE (MT-Bench: likelihood, the default here for the small local judge, or generate).
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/eval_suite}
MAP=${MAP:?set MAP to a DSPA map directory}
MC_LIMIT=${MC_LIMIT:-2000}
AE_LIMIT=${AE_LIMIT:-100}
MAX_NEW=${MAX_NEW:-512}
BATCH=${BATCH:-32}
SEEDS=${SEEDS:-0}
JUDGE_MODE=${JUDGE_MODE:-likelihood}
common=(${DEVICE:+--device "$DEVICE"})
mt_limit=(${MT_LIMIT:+--n "$MT_LIMIT"})
all_limit=(${MC_ALL_LIMIT:+--n "$MC_ALL_LIMIT"})
seeds=(); for s in $SEEDS; do seeds+=(--seeds "$s"); done
mkdir -p "$OUT"

mc() {  # mc NAME TASKS... ; runs base, then DSPA paired against it
  local name=$1; shift
  local tasks=(); for t in "$@"; do tasks+=(--tasks "$t"); done
  saealign eval mc "${tasks[@]}" --data "$DATA" --output "$OUT/mc-$name-base" --name base \
    --batch-size "$BATCH" "${limit[@]}" "${common[@]}"
  saealign eval mc "${tasks[@]}" --data "$DATA" --output "$OUT/mc-$name-dspa" --name dspa \
    --intervention "dspa:$MAP" --baseline "$OUT/mc-$name-base/results.json" \
    --batch-size "$BATCH" "${limit[@]}" "${common[@]}"
}
limit=("${all_limit[@]}"); mc full arc_easy truthfulqa_mc2 winogrande
limit=(--n "${MC_ALL_LIMIT:-$MC_LIMIT}"); mc subset hellaswag mmlu

for method in base dspa; do
  steer=(); [ "$method" = dspa ] && steer=(--intervention "dspa:$MAP")
  saealign eval mt-bench --data "$DATA/mt-bench" --output "$OUT/mt-bench-$method" --name "$method" \
    "${steer[@]}" "${seeds[@]}" "${mt_limit[@]}" --max-new-tokens "$MAX_NEW" --batch-size "$BATCH" \
    --judge self --judge-mode "$JUDGE_MODE" --judge-max-tokens 256 --judge-batch-size "$BATCH" "${common[@]}"
  saealign eval alpaca-eval --reference-outputs "$DATA/alpaca-eval/results/gpt4_1106_preview/model_outputs.json" \
    --judge-template "$DATA/alpaca-eval/evaluator_prompts/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt" \
    --output "$OUT/alpaca-eval-$method" --name "$method" "${steer[@]}" "${seeds[@]}" --n "$AE_LIMIT" \
    --max-new-tokens "$MAX_NEW" --batch-size "$BATCH" --judge self --judge-batch-size "$BATCH" "${common[@]}"
done

saealign report "$OUT"/mc-full-base "$OUT"/mc-full-dspa "$OUT"/mc-subset-base "$OUT"/mc-subset-dspa \
  "$OUT"/mt-bench-base "$OUT"/mt-bench-dspa "$OUT"/alpaca-eval-base "$OUT"/alpaca-eval-dspa \
  --output "$OUT/report" --baseline base
