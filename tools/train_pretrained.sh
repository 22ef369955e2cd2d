#!/usr/bin/env bash
# Train and export the shipped CIFAR-10 weights, one entry after another, resuming any run that
# was interrupted (its last.ckpt) and skipping finished ones. CPU budget recipe: the project's
# default recipe (SGD + Nesterov, warm-up + cosine, label smoothing 0.1, weight EMA, fast
# uint8 data path), with the epochs tools/recipes.sh gives each entry.
#
#   DATA_ROOT=../shared/data/cifar10 tools/train_pretrained.sh [job ...]   # entries or ablation.* runs
#
# THREADS (default 2) sets torch's CPU threads per run. Run one queue at a time: two heavy
# processes on 2 cores stall each other's OpenMP threads; give the queue THREADS=1 while other
# work needs a core. Logs: run it under nohup with output to a file (docs/recipe.md). EXTRA adds
# overrides to every run (e.g. a smoke run: EXTRA="trainer.limit_train_batches=2").
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${DATA_ROOT:-../shared/data/cifar10}
PY=${PYTHON:-python}
THREADS=${THREADS:-2}
RUNS=${RUNS:-runs}                                            # where run folders go
RESULTS=${RESULTS:-docs/ablation/results.csv}                 # the ablation's results file

# shellcheck source=tools/recipes.sh
. tools/recipes.sh  # RECIPES: entry | train.py overrides (shared with tools/gpu_train.sh)

# Jobs run in the order named (default: every shipped entry); ablation.* jobs (tools/recipes.sh) go
# to runs/ablation/<job> and into docs/ablation/results.csv instead of being exported, and the recipe
# A/Bs (ab.*) to runs/ab/<job>, compared by python -m tools.recipe_ab.
jobs=("$@")
if [ ${#jobs[@]} -eq 0 ]; then for r in "${RECIPES[@]}"; do jobs+=("${r%%|*}"); done; fi
for job in "${jobs[@]}"; do recipe_for "$job" >/dev/null || exit 2; done
for job in "${jobs[@]}"; do
  args=$(recipe_for "$job")
  case "$job" in ablation.*) run=$RUNS/ablation/$job ;; ab.*) run=$RUNS/ab/$job ;; *) run=$RUNS/pretrained/$job ;; esac
  [[ " $args " == *" seed="* ]] || args="$args seed=0"
  resume=()
  if [ -f "$run/summary.json" ]; then
    echo "== $job: trained ($run/summary.json)"
  else
    teacher=$(teacher_of "$job")
    # shellcheck disable=SC2086
    if [ -n "$teacher" ]; then make_teacher "$teacher" "$DATA_ROOT" "$PY" $args ${EXTRA:-} || { echo "== $job: teacher $teacher failed"; continue; }; fi
    [ -f "$run/checkpoints/last.ckpt" ] && resume=("ckpt_path=$run/checkpoints/last.ckpt")
    echo "== $job: training ${resume[*]:-from scratch} ($(date +%H:%M:%S))"
    # shellcheck disable=SC2086
    $PY train.py $args data.root="$DATA_ROOT" cpu_threads="$THREADS" trainer.enable_progress_bar=false \
      hydra.run.dir="$run" ${EXTRA:-} "${resume[@]}" || { echo "== $job: training failed"; continue; }
  fi
  [ -f "$run/summary.json" ] || continue
  case "$job" in
  ab.*) ;;  # a recipe A/B: compared by python -m tools.recipe_ab report runs/ab (docs/recipe.md)
  ablation.*)  # a row of the results file; latency is timed later, on an idle machine
    if [ "$run/summary.json" -nt "$run/.measured" ]; then
      $PY -m tools.ablation measure "$run" --append "$RESULTS" --no-latency && touch "$run/.measured" \
        || echo "== $job: measure failed"
    fi ;;
  *)  # export when the run is newer than the shipped card (a finished run replaces the old entry);
      # finish.<entry> (tools/recipes.sh) exports as <entry>
    entry=${job#finish.}
    if [ "$run/summary.json" -nt "models/weights/$entry.json" ]; then
      $PY -m tools.export_weights "$run" --entry "$entry" --data-root "$DATA_ROOT" || echo "== $job: export failed"
    fi ;;
  esac
done
