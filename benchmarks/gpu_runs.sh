#!/usr/bin/env bash
# The GPU work of issues #17 and #14 in one go, three jobs side by side on one GPU (the default model is small):
#   suite:      the SAE suite (`saealign sae suite`: generic and preference-domain SAEs at 7 depths), the layer grid
#               of the ablations on the refusal attribute (--grid-only), wide SAEs at the chosen pair alone (a second
#               suite), then the ablations' arms on validation and test;
#   sweep_dpo:  the restricted sweep's DPO at N = 500, 1,000, full (fp32, as on CPU; --batch-scale 4: the same
#               global batch in fewer, larger micro-batches);
#   sweep_rahf: RAHF-SCIT likewise.
# Every job resumes; a rerun skips what is done. Logs: W/<job>.log; each job's exit status: W/<job>.status.
#
#   DATA=../shared/data W=runs/gpu TRIPLES=<refusal fit triples> VAL_TRIPLES=<refusal validation triples> \
#       bash benchmarks/gpu_runs.sh start      # the jobs, detached (setsid): they outlive the command
#   W=runs/gpu DEADLINE=600 bash benchmarks/gpu_runs.sh watch    # progress every 30 s until all end or DEADLINE
#
# TINY=1: tiny settings (checks the wiring on CPU in minutes).
set -u
DATA=${DATA:-../shared/data}; W=${W:-runs/gpu}; DEADLINE=${DEADLINE:-3600}; PY=${PY:-python3}
JOBS=(suite sweep_dpo sweep_rahf)

start() {
  for need in hh-rlhf alpaca-eval arc mmlu self-instruct; do  # the roles read all of these
    [ -d "$DATA/$need" ] || { echo "error: $DATA/$need is missing (the data roles need it)"; exit 2; }
  done
  for f in "${TRIPLES:?the refusal attribute fit triples}" "${VAL_TRIPLES:?its validation triples}"; do
    [ -s "$f" ] || { echo "error: $f is missing or empty"; exit 2; }
  done
  mkdir -p "$W/sweep_results"
  [ -f "$W/sweep_results/restricted_sweep.json" ] || cp benchmarks/results/restricted_sweep.json "$W/sweep_results/"
  if [ -n "${TINY:-}" ]; then
    SUITE=(--layers 6 --layers 9 --layers 24 --widths 256 --k 16 --generic-n 40 --preference-n 40 --eval-n 4
           --epochs 1 --finetune-epochs 1 --batch-size 512)
    WIDE=(--k 16 --generic-n 40 --preference-n 40 --eval-n 4 --epochs 1 --finetune-epochs 1 --batch-size 512)
    ABLATE=(--layers 6 9 24 --width 256 --wide-width 512 --val-n 3 --test-n 3 --tokens 6 --hh-n 12 --hh-eval-n 6
            --batch 16 --anchor-out 24)
    WIDTH=512; SWEEP=(--ns 16 --n 8)
  else
    SUITE=(); WIDE=(); ABLATE=(--val-n 300 --test-n 300 --batch 128 --fit-batch 64); WIDTH=8192; SWEEP=(--ns 500 1000 full)
  fi
  rm -f "$W"/*.status
  run suite suite_then_ablations
  run sweep_dpo sweep dpo
  run sweep_rahf sweep rahf-scit
}

run() {  # run NAME CMD...: detached, exit status to W/NAME.status
  local name=$1; shift
  setsid bash -c "$(declare -p DATA W PY TRIPLES VAL_TRIPLES SUITE WIDE ABLATE WIDTH SWEEP); $(declare -f "$1");
                  $*; echo \$? > '$W/$name.status'" > "$W/$name.log" 2>&1 < /dev/null &
}

sweep() {  # sweep METHOD: the HH restricted sweep's trained METHOD at the sweep's N values
  $PY benchmarks/restricted_sweep.py --map none --methods "$1" "${SWEEP[@]}" --data "$DATA" --workdir "$W/sweep" \
    --batch-scale 4 --save-steps 0 --output "$W/sweep_results/restricted_sweep.json"
}

suite_then_ablations() {
  $PY -m saealign sae suite --data "$DATA" --output "$W/suite" "${SUITE[@]}" || return
  local ablate=(benchmarks/ablations.py --attribute refusal --suite "$W/suite" --triples "$TRIPLES"
                --val-triples "$VAL_TRIPLES" --data "$DATA" --output "$W/ablations" "${ABLATE[@]}")
  $PY "${ablate[@]}" --grid-only || return
  local pair
  pair=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen_pair']['attribute'])" "$W/ablations/ablations.json")
  $PY -m saealign sae suite --data "$DATA" --output "$W/suite_wide" --layers "${pair%_*}" --layers "${pair#*_}" \
    --widths "$WIDTH" --variants generic "${WIDE[@]}" || return
  $PY "${ablate[@]}" --wide-suite "$W/suite_wide" --wide-width "$WIDTH"
}

watch() {
  local begun=$SECONDS
  while [ $((SECONDS - begun)) -lt "$DEADLINE" ]; do
    sleep 30
    echo "== $((SECONDS - begun)) s"
    for job in "${JOBS[@]}"; do
      if [ -f "$W/$job.status" ]; then echo "[$job] ended, exit $(cat "$W/$job.status")"
      else echo "[$job] $(tail -c 1500 "$W/$job.log" 2>/dev/null | tr '\r' '\n' | grep -av '^\s*$' | tail -n 1 | cut -c1-200)"; fi
    done
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    local ended=0
    for job in "${JOBS[@]}"; do [ -f "$W/$job.status" ] && ended=$((ended + 1)); done
    [ "$ended" -eq "${#JOBS[@]}" ] && break
  done
  grep -H . "$W"/*.status 2>/dev/null
}

case "${1:-}" in
  start) start ;;
  watch) watch ;;
  *) echo "usage: bash benchmarks/gpu_runs.sh start|watch"; exit 2 ;;
esac
