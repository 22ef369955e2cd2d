"""Config helpers shared by train.py, eval.py and the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf


def resume_run_dir(ckpt_path: Any, default: str) -> str:
    """Hydra run folder: a resumed run (`ckpt_path=<run>/checkpoints/last.ckpt`) goes back into
    `<run>`, so its logs, best.ckpt and summary continue where they were; otherwise `default`."""
    if ckpt_path in (None, "", "None", "null"):
        return default
    path = Path(str(ckpt_path))
    run = path.parent.parent
    return str(run) if path.parent.name == "checkpoints" and (run / "config.yaml").is_file() else default


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("pz_run_dir", resume_run_dir, replace=True)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts/lists (no `hydra` node): safe to save in checkpoints."""
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)  # type: ignore[return-value]


def cli_overrides() -> list[str]:
    """The command line's overrides (`model=x`, `data.root=y`) when running under @hydra.main."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# Config keys whose effect a run's config.yaml already records elsewhere, so runs written before the key
# existed and after do not differ by it: a run from trained weights has data.progressive.min_size null.
RECORDED_ELSEWHERE = ("data.progressive.from_weights",)
# What a recipe is, for every comparison of runs (tools.ablation's seeds and modes, tools.recipe_ab's
# A/Bs, a resume against the run that wrote its checkpoint): the config keys under these prefixes ...
RECIPE = ("model.", "data.", "optim.", "distill.", "trainer.max_epochs", "trainer.precision",
          "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "pretrained", "init_weights", "qat")
# ... except what does not change what is trained: where files are, how they are read, the teacher's
# identity (distill.logits names it), and optim's Hydra targets (built from its plain keys)
NOT_RECIPE = ("data.root", "data.download", "data.cache_dir", "data.num_workers", "data.eval_batch_size",
              "distill.teacher", "optim.optimizer.", "optim.scheduler.", *RECORDED_ELSEWHERE)


def flatten_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"dotted.key": value}; an empty mapping stays a value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def training_recipe(config: dict) -> dict[str, Any]:
    """The keys of a resolved run config that shape training, flattened (`optim.lr`: 0.2, ...)."""
    flat = {k: v for k, v in flatten_config(config).items()
            if k.startswith(RECIPE) and not k.startswith(NOT_RECIPE) and v != {}}  # model.kwargs: {} sets nothing
    if flat.get("optim.epochs") == flat.get("trainer.max_epochs"):
        flat.pop("optim.epochs", None)  # the schedule's length follows the epochs unless set apart
    return flat


def recipe_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What a resumed run changes of the run that wrote its checkpoint: "key: old -> new" for each
    recipe key (`training_recipe`) and the seed whose value differs. Where the files are, threads and
    progress bars are not changes; a longer `trainer.max_epochs` is one (the usual, meant kind)."""
    old, new = training_recipe(dict(before)), training_recipe(dict(now))
    old["seed"], new["seed"] = before.get("seed"), now.get("seed")
    for side in (old, new):  # the schedule's length where training_recipe left it implied by the epochs
        if ("optim.epochs" in old or "optim.epochs" in new) and "optim.epochs" not in side:
            side["optim.epochs"] = side.get("trainer.max_epochs")
    return [f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
            for key in sorted(set(old) | set(new))
            if old.get(key, "<unset>") != new.get(key, "<unset>")]


register_resolvers()
