#!/usr/bin/env bash
# Train every stage of the demo model (issue 7) in order, resumably, within a time budget per call.
#
#   demo/train_all.sh [BUDGET_SECONDS]      (default 540: fits one 10-minute device call with margin)
#
# Stages: demo_train_ss_vae -> demo_train_ss_dit (needs the SS-VAE; trains the image encoder the bundle ships) ->
# demo_train_dense_vae -> demo_train_dense_dit (needs the dense VAE). DEMO_STAGES="..." picks a subset.
# A stage whose newest checkpoint has reached its final step is skipped; an unfinished one resumes
# (`--resume`) and is stopped with SIGTERM when the budget runs out: the trainer then writes a checkpoint and exits, so
# the next call continues where this one stopped. Data: runs/demo/data (demo/prepare.sh); checkpoints under runs/demo/.
# On the device machine: PYTHONPATH=src PYTHON=python3 demo/train_all.sh 540
set -uo pipefail
BUDGET=${1:-540}
PY=${PYTHON:-python}
STAGES=${DEMO_STAGES:-"ss_vae ss_dit dense_vae dense_dit"}
START=$(date +%s)
final_step() {  # total steps of a training config (max_steps or the sum of its phases)
  "$PY" -m d3s2.cli train "$1" --check 2>/dev/null | tail -1 | "$PY" -c "import json,sys; print(json.load(sys.stdin)['steps'])"
}
newest_step() {  # newest step_* checkpoint in runs/demo/<stage>/checkpoints, 0 when none
  ls -d "runs/demo/$1/checkpoints"/step_* 2>/dev/null | sed 's/.*step_0*//' | sort -n | tail -1 | sed 's/^$/0/'
}
for s in $STAGES; do
  cfg=demo_train_$s
  total=$(final_step "$cfg"); done_=$(newest_step "$s"); done_=${done_:-0}
  if [ -n "$total" ] && [ "$done_" -ge "$total" ]; then echo "[$s] finished ($done_/$total steps), skipped"; continue; fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 30 ]; then echo "[$s] budget spent; rerun to continue"; exit 0; fi
  echo "[$s] from step $done_ of $total, $left s left"
  timeout -s TERM -k 60 "$left" "$PY" -m d3s2.cli train "$cfg" --resume
  rc=$?
  if [ "$rc" -eq 124 ]; then echo "[$s] stopped by the budget at step $(newest_step "$s"); rerun to continue"; exit 0; fi
  if [ "$rc" -ne 0 ]; then echo "[$s] failed (exit $rc)"; exit "$rc"; fi
done
echo "all stages finished"
