#!/usr/bin/env bash
# Train queue jobs on a lent GPU machine with the same train.py and recipes (tools/recipes.sh) as the
# CPU queue, inside the one call of at most ten minutes a lease allows, and bring the results back in
# files the device tool returns (at most 8 files of 16 MB, 64 MB together). Three steps:
#
#   here:   tools/gpu_train.sh prepare
#             packs ../shared/data/cifar10 (DATA_TREE) as lossless WebP mosaics in two folders,
#             .gpu/p1 and .gpu/p2 (~43 MB each; tools/pack_cifar.py), and downloads the wheels the GPU
#             image lacks (hydra-core, omegaconf, antlr4) into .whl/ (all git-ignored).
#   there:  a call carries at most 64 MiB with the working tree (~21 MB), so the data goes in two
#             calls, back to back (a machine stays warm 30 s after a call and keeps what earlier calls
#             carried): device run "true" carrying [".gpu/p1"], then the training call carrying
#             [".gpu/p2", ".whl"]:
#             BUDGET=460 tools/gpu_train.sh train se_resnet20 resnet56 ablation.mobilenet_v1.w0_5.full.s0 ...
#             It decodes the data into CIFAR batch files (same validation split as the PNG tree),
#             installs the wheels and hands the jobs, in priority order, to tools/gpu_schedule.py:
#             with BUDGET (seconds) it probes every model's speed under load (or plans with
#             EPOCH_SECONDS, measured: ~4.5 at 3 runs at once on an H200), runs LANES (3) jobs at
#             a time, fits each bare entry's epochs (up to the recipe's times STRETCH) into the time left, and kills what is still running
#             at the end, so the call ends in time. Then it keeps each finished run's final weights'
#             EMA with its config, summary and metrics (tools/slim_runs.py, matrices as fp16; an
#             ablation run keeps no weights: its row needs the summary only) and packs them into
#             $OUT/gpu_runs.tar.part00, part01, ... of at most 15 MB.
#   here:   tools/gpu_train.sh unpack <folder holding the parts> [--hardware "NVIDIA H100 80GB"]
#             restores runs/gpu/<entry>/ and exports each run as a shipped entry
#             (python -m tools.export_weights: validation accuracy measured again here, card written);
#             an ablation.* run becomes a row of docs/ablation/results.csv instead, and a recipe A/B
#             (ab.*) stays a run folder for python -m tools.recipe_ab.
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
  rm -rf $GPU_DIR/p1 $GPU_DIR/p2
  $PY -m tools.pack_cifar "$DATA_TREE" $GPU_DIR --webp 2 >/dev/null || exit 1
  # The GPU image has Python 3.12 and lightning/torchmetrics/safetensors, not Hydra.
  mkdir -p .whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d .whl hydra-core==1.3.2 omegaconf==2.3.0 || exit 1
  $PY -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
  du -sh $GPU_DIR/p* .whl
  ;;
train)
  OUT=${OUT:?OUT must be set (the device tool sets it)}
  [ $# -gt 0 ] || { echo "name the entries to train: tools/gpu_train.sh train resnet20 resnet56:100 ..."; exit 2; }
  for spec in "$@"; do recipe_for "${spec%%:*}" >/dev/null || exit 2; done
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ -z "${DATA_ROOT:-}" ]; then  # the mosaics the two calls carried
    DATA_ROOT=$GPU_DIR/data
    $PY -m tools.pack_cifar --from-webp $GPU_DIR/p* --out $DATA_ROOT >/dev/null || exit 2
  fi
  for spec in "$@"; do  # cached teacher logits the distillation jobs read: minutes on a GPU, made first
    teacher=$(teacher_of "${spec%%:*}")
    # shellcheck disable=SC2046,SC2086
    if [ -n "$teacher" ]; then make_teacher "$teacher" "$DATA_ROOT" "$PY" $(recipe_for "${spec%%:*}") ${EXTRA:-} || exit 1; fi
  done
  # cudnn.benchmark: every batch has one shape, so the fastest convolution algorithm is worth finding once
  $PY -m tools.gpu_schedule --runs "$RUNS/gpu" --data-root "$DATA_ROOT" --budget "${BUDGET:-0}" --lanes "${LANES:-3}" --stretch "${STRETCH:-1}" \
    --epoch-seconds "${EPOCH_SECONDS:-0}" \
    --extra "+trainer.benchmark=true ${EXTRA:-}" "$@"
  rm -rf "$RUNS"/gpu/ablation.*/checkpoints "$RUNS"/gpu/ab.*/checkpoints  # rows and A/Bs need the summaries only
  $PY -m tools.slim_runs --half "$RUNS/gpu" || exit 1
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
    ab.*) echo "== $entry: a recipe A/B (python -m tools.recipe_ab report $RUNS/gpu)" ;;
    *) $PY -m tools.export_weights "$run" --entry "$entry" --data-root "$DATA_ROOT" --hardware "$hardware" || echo "== $entry: export failed" ;;
    esac
  done
  ;;
*)
  echo "usage: tools/gpu_train.sh prepare | train <entry[:epochs]> ... | unpack <folder> [--hardware NAME]"; exit 2
  ;;
esac
