# The training queue's jobs and the train.py overrides that train them, sourced by
# tools/train_pretrained.sh (CPU queue) and tools/gpu_train.sh (a lent GPU), so both train the same thing.
# RECIPES: the shipped entries, the project's default recipe (docs/recipe.md); only the epochs differ.
# mobilenet_v2.w0_5 gets 30: the ablation's identical GPU run reached 90.98% (floor 90.0) in 30 epochs,
# and 30 more would cost this CPU about 1.5 hours (docs/recipe.md). mobilenet_v1 gets 60: its width-0.5
# ablation runs at 30 epochs reached 90.76% as `full` but 86.90% as `separable` (the entry's mode), so
# the 40 a width-0.5 `full` run suggested would likely stop short of the 90.0 floor. resnet38_bottleneck and
# resnet56 keep the epochs set before progressive resizing became the default (it costs them about 3/4 of the time).
# ABLATION: the conv_mode ablation's runs (docs/ablation.md), named ablation.<model>.<width>.<mode>.s<seed>;
# the same recipe at the ablation's width and 30 epochs, measured into docs/ablation/results.csv.
# shellcheck disable=SC2034
RECIPES=(
  "resnet20|model=resnet20 trainer.max_epochs=80"
  "se_resnet20|model=se_resnet20 trainer.max_epochs=80"
  "resnet38_bottleneck|model=resnet38_bottleneck trainer.max_epochs=80"
  "mobilenet_v2.w0_5|model=mobilenet_v2 model.width=0.5 trainer.max_epochs=30"
  "mobilenet_v1|model=mobilenet_v1 trainer.max_epochs=60"
  "xception_small|model=xception_small trainer.max_epochs=60"
  "resnet56|model=resnet56 trainer.max_epochs=120"
  "mobilenet_v2|model=mobilenet_v2 trainer.max_epochs=60"
  "mobilenet_v3_small|model=mobilenet_v3_small trainer.max_epochs=60"
  "mobilenet_v3_large|model=mobilenet_v3_large trainer.max_epochs=60"
)

# RECIPE_BEFORE: the default recipe's changes since the ablation and the recipe A/Bs began, undone
# (optim.norm_lr_factor 1 -> 3 and data.progressive.min_size null -> 16, both adopted 2026-11-28 from the
# A/Bs below: docs/recipe.md). Both families and the finishing runs pin it, so every run of a family trains
# one recipe, whichever day it runs; the entries take the default.
RECIPE_BEFORE="optim.norm_lr_factor=1.0 data.progressive.min_size=null"

ABLATION=()
_ablation() {  # _ablation <model> <width> <epochs> <seeds> <modes...>
  local model=$1 width=$2 epochs=$3 seeds=$4 seed mode; shift 4
  for seed in $seeds; do
    for mode in "$@"; do
      ABLATION+=("ablation.$model.w${width/./_}.$mode.s$seed|$RECIPE_BEFORE model=$model model.width=$width model.conv_mode=$mode trainer.max_epochs=$epochs seed=$seed")
    done
  done
}
# MobileNetV1 at width 0.5 (full is 8x the mult-adds), three seeds; the equal-cost row: separable
# widened to full's mult-adds (python -m tools.ablation match-width mobilenet_v1 --mode full --width 0.5).
_ablation mobilenet_v1 0.5 30 "0 1 2" separable full pointwise_kxk
_ablation mobilenet_v1 1.4756 30 0 separable
# ResNets have no depthwise-separable pairs, so `full` builds the separable network again: two modes.
_ablation se_resnet20 1.0 30 0 separable pointwise_kxk
# The bottleneck ResNet, where pointwise_kxk turns its 1x1 convs into 3x3, with seeds 1 and 2 after seed 0
# (about an hour each mode on the AMX Xeon) to say whether a gap between modes is larger than seed noise.
_ablation resnet38_bottleneck 1.0 30 "0 1 2" separable pointwise_kxk
_ablation mobilenet_v2 0.5 30 0 separable full pointwise_kxk

# Distillation jobs read a shipped entry's cached logits, distill.logits=$TEACHER_DIR/<entry>.pt; both
# queues make that file (python -m tools.teacher_logits, resumable) before the first job that reads it.
TEACHER_DIR=${TEACHER_DIR:-data_cache/teacher_logits}

# AB: the recipe A/Bs (docs/recipe.md, "Measured"), named ab.<model>.e<epochs>.<variant>[.s<seed>]: the recipe
# they began from ("base": the default recipe with RECIPE_BEFORE) against one change each, at the same short schedule. They go to runs/ab/<job>;
# python -m tools.recipe_ab report runs/ab compares them.
AB=()
_ab() {  # _ab <model> <epochs> <variant>|<overrides> ...
  local model=$1 epochs=$2 v; shift 2
  for v in "$@"; do AB+=("ab.$model.e$epochs.${v%%|*}|$RECIPE_BEFORE model=$model trainer.max_epochs=$epochs ${v#*|}"); done
}
# prog16: progressive resizing from 16x16 (about two thirds of base's compute at 15 epochs); prog16_e22 spends
# base's compute on it instead (22 epochs; Hydra applies overrides in order, so its max_epochs wins).
_ab resnet20 15 "base|" "linear|optim/scheduler=linear" "ls0_2|optim.label_smoothing=0.2" \
  "zero_gamma|+model.kwargs.zero_init_residual=true" "norm_lr3|optim.norm_lr_factor=3" "bs128|data.batch_size=128 optim.lr=0.1" \
  "prog16|data.progressive.min_size=16" "prog16_e22|data.progressive.min_size=16 trainer.max_epochs=22" \
  "grid2|data.augment.crop_step=2" "kd_r20|data.augment.crop_step=2 distill.logits=$TEACHER_DIR/resnet20.pt"
# kd_r20: distilled from the shipped resnet20's cached logits (docs/recipe.md); its student draws crops on
# the teacher file's 2-pixel grid (crop_step=2 says so; the file sets it anyway), so grid2 (the same grid,
# no teacher) is its control, not base: tools/recipe_ab sets a run against the variant whose change its own contains.
# More seeds, named <job>.s<seed>: the same overrides at another seed. base's three seeds span 0.74 points,
# as much as the leads, so a change is adopted only when it leads at every seed (norm_lr3 did; ls0_2 did not);
# tools/recipe_ab averages a variant's seeds.
_ab_seed() {  # _ab_seed <seed> <job> ...
  local seed=$1 job r; shift
  for job in "$@"; do for r in "${AB[@]}"; do [ "${r%%|*}" = "$job" ] && AB+=("$job.s$seed|${r#*|} seed=$seed"); done; done
}
_ab_seed 1 ab.resnet20.e15.base ab.resnet20.e15.ls0_2 ab.resnet20.e15.norm_lr3
_ab_seed 2 ab.resnet20.e15.base ab.resnet20.e15.ls0_2 ab.resnet20.e15.norm_lr3
# prog16_e22 led base by 1.54 at seed 0 for about base's time: its second seed decides the default
_ab_seed 1 ab.resnet20.e15.prog16 ab.resnet20.e15.prog16_e22

# FINISH: entries whose GPU run (tools/gpu_train.sh) was stopped by its call's deadline with its EMA
# weights kept but not its optimizer state: a new, short cosine from the learning rate the stopped
# schedule had reached (lr(t) of warm-up + cosine at the epoch it stopped) down to zero, from those
# weights. Named finish.<entry>; they export as
# <entry> (the card's notes say what ran where).
FINISH=(
  "finish.xception_small|$RECIPE_BEFORE model=xception_small init_weights=runs/gpu/xception_small/checkpoints/last.ckpt optim.lr=0.05 optim.warmup_epochs=0 trainer.max_epochs=4"
  "finish.mobilenet_v3_small|$RECIPE_BEFORE model=mobilenet_v3_small init_weights=runs/gpu/mobilenet_v3_small/checkpoints/last.ckpt optim.lr=0.058 optim.warmup_epochs=0 trainer.max_epochs=4"
  "finish.mobilenet_v2|$RECIPE_BEFORE model=mobilenet_v2 init_weights=runs/gpu/mobilenet_v2/checkpoints/last.ckpt optim.lr=0.075 optim.warmup_epochs=0 trainer.max_epochs=4"
  "finish.mobilenet_v3_large|$RECIPE_BEFORE model=mobilenet_v3_large init_weights=runs/gpu/mobilenet_v3_large/checkpoints/last.ckpt optim.lr=0.14 optim.warmup_epochs=0 trainer.max_epochs=6"
)

# teacher_of <job>: the shipped entry whose cached logits the job reads (nothing when it distills nothing).
teacher_of() {
  local a
  for a in $(recipe_for "$1"); do
    case "$a" in "distill.logits=$TEACHER_DIR/"*.pt) a=${a#"distill.logits=$TEACHER_DIR/"}; echo "${a%.pt}" ;; esac
  done
}

# make_teacher <entry> <data root> <python> [override ...]: caches <entry>'s logits unless they are there
# (resumes a killed run); the data.* overrides among the rest (the job's and EXTRA's) say which split.
make_teacher() {
  local entry=$1 root=$2 py=$3 a data=(); shift 3
  [ -f "$TEACHER_DIR/$entry.pt" ] && return 0
  for a in "$@"; do case "$a" in data.root=*) ;; data.*) data+=("$a") ;; esac; done
  echo "== teacher $entry: caching its logits in $TEACHER_DIR/$entry.pt ($(date +%H:%M:%S))"
  "$py" -m tools.teacher_logits --teacher "$entry" --data-root "$root" --out "$TEACHER_DIR/$entry.pt" "${data[@]}"
}

# recipe_for <job>: prints that job's overrides; fails for an unknown one.
recipe_for() {
  local r
  for r in "${RECIPES[@]}" "${ABLATION[@]}" "${AB[@]}" "${FINISH[@]}"; do
    if [ "${r%%|*}" = "$1" ]; then echo "${r#*|}"; return 0; fi
  done
  echo "unknown job '$1'; entries: $(for r in "${RECIPES[@]}"; do printf '%s ' "${r%%|*}"; done)" \
    "ablation runs: $(for r in "${ABLATION[@]}"; do printf '%s ' "${r%%|*}"; done)" \
    "recipe A/Bs: $(for r in "${AB[@]}"; do printf '%s ' "${r%%|*}"; done)" \
    "finishing runs: $(for r in "${FINISH[@]}"; do printf '%s ' "${r%%|*}"; done)" >&2
  return 1
}
