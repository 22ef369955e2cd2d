#!/usr/bin/env bash
# Train shipped entries on a lent GPU machine with the same train.py and recipes (tools/recipes.sh)
# as the CPU queue, and bring the results back in files the device tool returns (at most 8 files of
# 16 MB). Three steps:
#
#   here:   tools/gpu_train.sh prepare
#             packs ../shared/data/cifar10 (DATA_TREE) as torchvision's CIFAR batch files, one per
#             folder .gpu/b1 ... .gpu/b5 (30.7 MB each; same validation split as the PNG tree), and
#             downloads the wheels the GPU image lacks (hydra-core, omegaconf, antlr4) into .whl/
#             (both git-ignored).
#   there:  a call carries at most 64 MiB with the working tree (~15 MB), so the data goes one
#             folder a call, back to back (a machine stays warm 30 s after a call, and keeps what
#             earlier calls carried): device run "true" carrying [".gpu/b1"], then [".gpu/b2"], ...
#             [".gpu/b5", ".whl"]; then the training call, carrying nothing:
#             tools/gpu_train.sh train resnet20 resnet56:100 ...   (entry[:epochs], default: the recipe's;
#             ablation.* runs of tools/recipes.sh too)
#             It installs the wheels, trains every entry at once (one process each: a CIFAR model
#             leaves most of a GPU idle), keeps each run's final weights' EMA with its config,
#             summary and metrics (no optimizer state, so it fits), and packs them into
#             $OUT/gpu_runs.tar.part00, part01, ... of at most 15 MB.
#   here:   tools/gpu_train.sh unpack <folder holding the parts> [--hardware "NVIDIA H100 80GB"]
#             restores runs/gpu/<entry>/ and exports each run as a shipped entry
#             (python -m tools.export_weights: validation accuracy measured again here, card written);
#             an ablation.* run becomes a row of docs/ablation/results.csv instead.
#
# EXTRA (train) adds overrides to every run, e.g. EXTRA="trainer.limit_train_batches=2" for a smoke run;
# RUNS (default runs) is where run folders go, GPU_DIR (default .gpu) where the data parts are; NO_EXPORT=1 (unpack) restores the runs without exporting.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tools/recipes.sh
. tools/recipes.sh
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs}
GPU_DIR=${GPU_DIR:-.gpu}
mode=${1:-}; shift || true

case "$mode" in
prepare)
  DATA_TREE=${DATA_TREE:-../shared/data/cifar10}
  $PY -m tools.pack_cifar "$DATA_TREE" $GPU_DIR/data || exit 1
  for i in 1 2 3 4 5; do
    mkdir -p $GPU_DIR/b$i && mv $GPU_DIR/data/cifar-10-batches-py/data_batch_$i $GPU_DIR/b$i/
  done
  mv $GPU_DIR/data/cifar-10-batches-py/batches.meta $GPU_DIR/b1/ && rm -r $GPU_DIR/data
  # The GPU image has Python 3.12 and lightning/torchmetrics/safetensors, not Hydra.
  mkdir -p .whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d .whl hydra-core==1.3.2 omegaconf==2.3.0 || exit 1
  $PY -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
  du -sh $GPU_DIR/b* .whl
  ;;
train)
  OUT=${OUT:?OUT must be set (the device tool sets it)}
  [ $# -gt 0 ] || { echo "name the entries to train: tools/gpu_train.sh train resnet20 resnet56:100 ..."; exit 2; }
  for spec in "$@"; do recipe_for "${spec%%:*}" >/dev/null || exit 2; done
  if [ -z "${DATA_ROOT:-}" ]; then  # the batch files the data calls carried, one folder each
    DATA_ROOT=$GPU_DIR/data
    mkdir -p $DATA_ROOT/cifar-10-batches-py && { cp -l $GPU_DIR/b*/* $DATA_ROOT/cifar-10-batches-py/ 2>/dev/null || cp $GPU_DIR/b*/* $DATA_ROOT/cifar-10-batches-py/ 2>/dev/null; }
    n=$(ls $DATA_ROOT/cifar-10-batches-py | wc -l)
    [ "$n" -eq 6 ] || { echo "found $n of the 6 CIFAR files under .gpu/b1..b5: carry each folder first"; exit 2; }
  fi
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  pids=()
  for spec in "$@"; do
    entry=${spec%%:*}
    args=$(recipe_for "$entry") || exit 2
    [ "$spec" != "$entry" ] && args="$args trainer.max_epochs=${spec#*:}"
    [[ " $args " == *" seed="* ]] || args="$args seed=0"
    run=$RUNS/gpu/$entry
    mkdir -p "$run"
    # shellcheck disable=SC2086
    $PY train.py $args data.root="$DATA_ROOT" cpu_threads=2 trainer.enable_progress_bar=false hydra.run.dir="$run" ${EXTRA:-} \
      > "$run/stdout.log" 2>&1 &
    pids+=($!)
    echo "== $entry: training ($args) pid $!"
  done
  for pid in "${pids[@]}"; do wait "$pid" || echo "== pid $pid failed"; done
  $PY -m tools.slim_runs "$RUNS/gpu" || exit 1
  (cd "$RUNS" && tar czf - gpu) | split -b 15m -d - "$OUT/gpu_runs.tar.part"
  ls -la "$OUT"
  ;;
unpack)
  parts=${1:?name the folder holding gpu_runs.tar.part*}; shift
  hardware="a lent GPU"
  [ "${1:-}" = "--hardware" ] && hardware=$2
  mkdir -p "$RUNS"
  cat "$parts"/gpu_runs.tar.part* | (cd "$RUNS" && tar xzf -) || exit 1
  [ "${NO_EXPORT:-0}" = 1 ] && { ls "$RUNS"/gpu; exit 0; }
  DATA_ROOT=${DATA_ROOT:-../shared/data/cifar10}
  for run in "$RUNS"/gpu/*/; do
    entry=$(basename "$run")
    [ -f "$run/summary.json" ] || { echo "== $entry: did not finish (no summary.json)"; continue; }
    case "$entry" in
    ablation.*) $PY -m tools.ablation measure "$run" --append docs/ablation/results.csv --no-latency || echo "== $entry: measure failed" ;;
    *) $PY -m tools.export_weights "$run" --entry "$entry" --data-root "$DATA_ROOT" --hardware "$hardware" || echo "== $entry: export failed" ;;
    esac
  done
  ;;
*)
  echo "usage: tools/gpu_train.sh prepare | train <entry[:epochs]> ... | unpack <folder> [--hardware NAME]"; exit 2
  ;;
esac
