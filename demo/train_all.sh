#!/usr/bin/env bash
# Train every stage of the demo model (issue 7) in order, resumably, each stage within its own wall-clock budget.
#
#   demo/train_all.sh [CALL_BUDGET_SECONDS]     (default 540: fits one 10-minute device call with margin)
#
# Stages: demo_train_dense_vae -> demo_train_dense_dit (needs the dense VAE; trains the image encoder the bundle ships)
# -> demo_train_ss_vae -> demo_train_ss_dit (needs the SS-VAE and, frozen, the encoder of the dense DiT run).
# DEMO_STAGES="..." picks a subset. Each stage trains for STAGE_BUDGET seconds in all (summed over calls, kept in
# runs/demo/<stage>/seconds) or until its config's last step; the configs use a constant LR after warm-up + EMA, so
# a stage stopped at step N equals `d3s2 train demo_train_<stage> --stop-at N` (the steps reached are printed and kept
# in runs/demo/<stage>/checkpoints; demo/bundle.py records them in the bundle). A stage that is stopped by a budget gets
# SIGTERM: the trainer writes a checkpoint and exits, and the next call resumes it (`--resume`).
# On the device machine: PYTHONPATH=src PYTHON=python3 demo/train_all.sh 540
set -uo pipefail
BUDGET=${1:-540}
PY=${PYTHON:-python}
STAGES=${DEMO_STAGES:-"dense_vae dense_dit ss_vae ss_dit"}
declare -A STAGE_BUDGET=([dense_vae]=${BUDGET_DENSE_VAE:-80} [dense_dit]=${BUDGET_DENSE_DIT:-240}
                         [ss_vae]=${BUDGET_SS_VAE:-180} [ss_dit]=${BUDGET_SS_DIT:-360})
START=$(date +%s)
final_step() {  # total steps of a training config (max_steps or the sum of its phases)
  "$PY" -m d3s2.cli train "$1" --check 2>/dev/null | tail -1 | "$PY" -c "import json,sys; print(json.load(sys.stdin)['steps'])"
}
newest_step() {  # newest step_* checkpoint in runs/demo/<stage>/checkpoints, 0 when none
  ls -d "runs/demo/$1/checkpoints"/step_* 2>/dev/null | sed 's/.*step_0*//' | sort -n | tail -1 | sed 's/^$/0/'
}
for s in $STAGES; do
  cfg=demo_train_$s
  mkdir -p "runs/demo/$s"
  spent=$(cat "runs/demo/$s/seconds" 2>/dev/null || echo 0)
  total=$(final_step "$cfg"); done_=$(newest_step "$s"); done_=${done_:-0}
  if [ -n "$total" ] && [ "$done_" -ge "$total" ]; then echo "[$s] finished ($done_/$total steps), skipped"; continue; fi
  stage_left=$(( ${STAGE_BUDGET[$s]} - spent ))
  if [ "$stage_left" -lt 10 ]; then echo "[$s] stage budget spent (${spent} s) at step $done_, skipped"; continue; fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 30 ]; then echo "[$s] call budget spent; rerun to continue"; exit 0; fi
  run_for=$(( stage_left < left ? stage_left : left ))
  echo "[$s] from step $done_ of $total, training up to $run_for s (stage: $spent of ${STAGE_BUDGET[$s]} s spent)"
  t0=$(date +%s)
  timeout --foreground -s TERM -k 60 "$run_for" "$PY" -m d3s2.cli train "$cfg" --resume
  rc=$?
  echo $(( spent + $(date +%s) - t0 )) > "runs/demo/$s/seconds"
  if [ "$rc" -eq 124 ]; then
    echo "[$s] stopped by the budget at step $(newest_step "$s")"
    [ "$run_for" -lt "$stage_left" ] && { echo "call budget spent; rerun to continue"; exit 0; }
    continue
  fi
  if [ "$rc" -ne 0 ]; then echo "[$s] failed (exit $rc)"; exit "$rc"; fi
done
echo "all stages finished:"; for s in $STAGES; do echo "  $s: step $(newest_step "$s"), $(cat "runs/demo/$s/seconds" 2>/dev/null) s"; done
