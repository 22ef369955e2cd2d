#!/usr/bin/env bash
# Train and export the shipped CIFAR-10 weights, one entry after another, resuming any run that
# was interrupted (its last.ckpt) and skipping finished ones. CPU budget recipe: the project's
# default recipe (SGD + Nesterov, warm-up + cosine, label smoothing 0.1, weight EMA, fast
# uint8 data path), with the epochs tools/recipes.sh gives each entry.
#
#   DATA_ROOT=../shared/data/cifar10 tools/train_pretrained.sh [entry ...]
#
# THREADS (default 2) sets torch's CPU threads per run. Run one queue at a time: two heavy
# processes on 2 cores stall each other's OpenMP threads; give the queue THREADS=1 while other
# work needs a core. Logs: run it under nohup with output to a file (docs/recipe.md).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${DATA_ROOT:-../shared/data/cifar10}
PY=${PYTHON:-python}
THREADS=${THREADS:-2}

# shellcheck source=tools/recipes.sh
. tools/recipes.sh  # RECIPES: entry | train.py overrides (shared with tools/gpu_train.sh)

wanted=("$@")
for recipe in "${RECIPES[@]}"; do
  entry=${recipe%%|*}
  args=${recipe#*|}
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " =~ " ${entry} " ]]; then continue; fi
  run=runs/pretrained/$entry
  resume=()
  if [ -f "$run/summary.json" ]; then
    echo "== $entry: trained ($run/summary.json)"
  else
    [ -f "$run/checkpoints/last.ckpt" ] && resume=("ckpt_path=$run/checkpoints/last.ckpt")
    echo "== $entry: training ${resume[*]:-from scratch} ($(date +%H:%M:%S))"
    # shellcheck disable=SC2086
    $PY train.py $args data.root="$DATA_ROOT" seed=0 cpu_threads="$THREADS" trainer.enable_progress_bar=false \
      hydra.run.dir="$run" "${resume[@]}" || { echo "== $entry: training failed"; continue; }
  fi
  # export when the run is newer than the shipped card (a finished run replaces the old entry)
  if [ -f "$run/summary.json" ] && [ "$run/summary.json" -nt "models/weights/$entry.json" ]; then
    $PY -m tools.export_weights "$run" --entry "$entry" --data-root "$DATA_ROOT" || echo "== $entry: export failed"
  fi
done
