#!/usr/bin/env bash
# The GPU work of issues #11, #14 and #17 in one go, three jobs side by side on one GPU (the default model is small):
#   1. restricted sweep: DPO and RAHF-SCIT at N = 250 ... full (fp32, as the CPU runs), scored on the helpful-test sample;
#   2. conditional attribute protocol with benign triples (attributes_protocol.py --gpu), then the refusal attribute;
#   3. the SAE suite (`saealign sae suite`, wide SAEs at every layer), then the ablations on job 2's triples.
# Every job resumes; a rerun skips what is done. Logs: W/{sweep,attr,suite}.log; each job's exit status: W/*.status.
#
#   DATA=../shared/data W=runs/gpu bash benchmarks/gpu_runs.sh
#
# Knobs: DEADLINE (seconds to watch before returning; the jobs run on), TINY=1 (tiny settings: checks the wiring on CPU).
# Where a machine ends a command's processes when it returns, start it under `setsid` and read W in a later call.
set -u
DATA=${DATA:-../shared/data}; W=${W:-runs/gpu}; DEADLINE=${DEADLINE:-3600}; PY=${PY:-python3}
for need in hh-rlhf alpaca-eval arc mmlu self-instruct; do  # roles read all of these (test_helpful drops AlpacaEval prompts)
  [ -d "$DATA/$need" ] || { echo "error: $DATA/$need is missing (the data roles need it)"; exit 2; }
done
mkdir -p "$W/sweep_results"
[ -f "$W/sweep_results/restricted_sweep.json" ] || cp benchmarks/results/restricted_sweep.json "$W/sweep_results/"
if [ -n "${TINY:-}" ]; then
  SWEEP=(--ns 16 --methods dpo --n 8); ATTR=(--tiny --gpu)
  SUITE=(--layers 6 --layers 9 --layers 24 --widths 256 --wide-layers 9 --wide-layers 24 --wide-width 512 --k 16
         --generic-n 40 --preference-n 40 --eval-n 4 --epochs 1 --finetune-epochs 1 --batch-size 512)
  ABLATE=(--layers 6 9 24 --width 256 --wide-width 512 --val-n 3 --test-n 3 --tokens 6 --hh-n 12 --hh-eval-n 6 --batch 16)
else
  SWEEP=(--ns 250 500 1000 full --methods dpo rahf-scit); ATTR=(--gpu)
  SUITE=(--wide-layers 3 --wide-layers 6 --wide-layers 9 --wide-layers 12 --wide-layers 18 --wide-layers 24 --wide-layers 27)
  ABLATE=(--batch 128)
fi
run() {  # run NAME CMD...: in the background, exit status to W/NAME.status
  local name=$1; shift
  ( "$@" > "$W/$name.log" 2>&1; echo $? > "$W/$name.status" ) &
}
rm -f "$W"/*.status
run sweep $PY benchmarks/restricted_sweep.py --map "${MAP:-runs/map_full}" "${SWEEP[@]}" --data "$DATA" \
  --workdir "$W/sweep" --save-steps 0 --output "$W/sweep_results/restricted_sweep.json"
run attr $PY benchmarks/attributes_protocol.py "${ATTR[@]}" --attributes conditional refusal --data "$DATA" \
  --output "$W/attr" --results "$W/attr_results"
suite_then_ablations() {
  $PY -m saealign sae suite --data "$DATA" --output "$W/suite" "${SUITE[@]}" || return
  local triples=$W/attr/conditional/triples_fit/triples.jsonl held_out=$W/attr/conditional/triples_validation/triples.jsonl
  while [ ! -s "$held_out" ] && [ ! -f "$W/attr.status" ]; do sleep 10; done  # job 2 writes them early
  [ -s "$held_out" ] || { echo "error: the attribute job ended without validation triples"; return 1; }
  $PY benchmarks/ablations.py --suite "$W/suite" --triples "$triples" --val-triples "$held_out" --data "$DATA" \
    --output "$W/ablations" "${ABLATE[@]}"
}
run suite suite_then_ablations
start=$SECONDS
while [ $((SECONDS - start)) -lt "$DEADLINE" ]; do
  sleep 30
  echo "== $((SECONDS - start)) s"
  for job in sweep attr suite; do
    if [ -f "$W/$job.status" ]; then echo "[$job] ended, exit $(cat "$W/$job.status")"
    else echo "[$job] $(tail -c 1500 "$W/$job.log" | tr '\r' '\n' | grep -av '^\s*$' | tail -n 1 | cut -c1-200)"; fi
  done
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  [ -f "$W/sweep.status" ] && [ -f "$W/attr.status" ] && [ -f "$W/suite.status" ] && break
done
grep -H . "$W"/*.status 2>/dev/null
