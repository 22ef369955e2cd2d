"""Config helpers shared by train.py, eval.py and the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


register_resolvers()
