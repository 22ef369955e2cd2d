# The shipped entries and the train.py overrides that train them: the project's default recipe
# (docs/recipe.md), only the epochs differ. Sourced by tools/train_pretrained.sh (CPU queue) and
# tools/gpu_train.sh (a lent GPU), so both train the same thing.
# shellcheck disable=SC2034
RECIPES=(
  "resnet20|model=resnet20 trainer.max_epochs=80"
  "se_resnet20|model=se_resnet20 trainer.max_epochs=80"
  "resnet38_bottleneck|model=resnet38_bottleneck trainer.max_epochs=80"
  "mobilenet_v2.w0_5|model=mobilenet_v2 model.width=0.5 trainer.max_epochs=60"
  "mobilenet_v1|model=mobilenet_v1 trainer.max_epochs=60"
  "xception_small|model=xception_small trainer.max_epochs=60"
  "resnet56|model=resnet56 trainer.max_epochs=120"
  "mobilenet_v2|model=mobilenet_v2 trainer.max_epochs=60"
  "mobilenet_v3_small|model=mobilenet_v3_small trainer.max_epochs=60"
  "mobilenet_v3_large|model=mobilenet_v3_large trainer.max_epochs=60"
)

# recipe_for <entry>: prints that entry's overrides; fails for an unknown entry.
recipe_for() {
  local r
  for r in "${RECIPES[@]}"; do
    if [ "${r%%|*}" = "$1" ]; then echo "${r#*|}"; return 0; fi
  done
  echo "unknown entry '$1'; entries: $(for r in "${RECIPES[@]}"; do printf '%s ' "${r%%|*}"; done)" >&2
  return 1
}
