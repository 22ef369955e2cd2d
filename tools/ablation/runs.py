"""Finding the runs of an ablation: folders holding the pipeline's summary.json next to their
resolved config.yaml, and grouping the runs of one architecture (its seeds) together."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import models
from training.config import training_recipe  # one recipe rule, shared with the pipeline's resume check

MODES = models.ConvMode.MODES
# Keys of a run config that may differ between the runs of one ablation: the thing ablated, the
# width (an equal-cost row widens the separable net), where the run lives and the seed; anything
# else differing means the recipes differ.
ABLATED = ("model.conv_mode", "model.kwargs.pointwise_kernel_size", "model.width", "seed", "run_dir", "ckpt_path")


@dataclass
class Run:
    folder: Path
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def model_cfg(self) -> dict[str, Any]:
        return dict(self.config.get("model") or self.summary.get("model_config") or {})

    @property
    def conv_mode(self) -> str:
        return str(self.model_cfg.get("conv_mode", "separable"))

    @property
    def k(self) -> int:
        return int((self.model_cfg.get("kwargs") or {}).get("pointwise_kernel_size", 3))

    @property
    def seed(self) -> Any:
        return self.config.get("seed", "")

    def checkpoint(self) -> Path | None:
        """The weights to time: the best checkpoint, else the last one."""
        for candidate in (self.folder / "checkpoints" / "best.ckpt", self.summary.get("best_ckpt"),
                          self.folder / "checkpoints" / "last.ckpt"):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None


@dataclass
class Group:
    """The runs of one architecture (its seeds): one model to time for all of them."""

    label: str
    model_cfg: dict[str, Any]
    runs: list[Run] = field(default_factory=list)


def _load_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def find_runs(folders: Sequence[Path]) -> list[Run]:
    """Every finished run (a folder with summary.json) under `folders`, sorted by path."""
    runs, unfinished = [], []
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} is not a folder")
        for summary_path in sorted({*folder.rglob("summary.json")}):
            run_dir = summary_path.parent
            summary = json.loads(summary_path.read_text())
            config_path = run_dir / "config.yaml"
            config = _load_yaml(config_path) if config_path.is_file() else {"model": summary.get("model_config") or {}}
            if not config.get("model"):
                print(f"warning: {run_dir} has no model config (config.yaml or summary.json model_config); skipped",
                      file=sys.stderr)
                continue
            runs.append(Run(run_dir, summary, config))
        # a sweep job folder that never got its summary (crashed, or still running)
        for config_path in folder.rglob("config.yaml"):
            if config_path.parent.name != ".hydra" and not (config_path.parent / "summary.json").is_file():
                unfinished.append(config_path.parent)
    for run_dir in sorted(set(unfinished)):
        print(f"warning: {run_dir} has no summary.json (unfinished or failed run); left out", file=sys.stderr)
    if not runs:
        raise SystemExit(f"error: no finished runs (folders with summary.json) under {', '.join(map(str, folders))}")
    return runs


def recipe_differences(runs: Sequence[Run]) -> dict[str, list]:
    """Recipe keys (`training_recipe`, other than the ablated ones) whose values differ between runs of
    one model; the model itself between families is not a difference."""
    diffs: dict[str, set] = {}
    by_model: dict[str, list[Run]] = {}
    for run in runs:
        by_model.setdefault(str(run.model_cfg.get("name")), []).append(run)
    for members in by_model.values():
        flats = [training_recipe(r.config) for r in members]
        for key in sorted(set().union(*flats)):
            if any(key == a or key.startswith(a + ".") for a in ABLATED):
                continue
            values = {repr(f.get(key, "<unset>")) for f in flats}
            if len(values) > 1:
                diffs.setdefault(key, set()).update(values)
    return {k: sorted(v) for k, v in diffs.items()}


def recipe(run: Run) -> str:
    """The training recipe of a run in one line, without the model and seed (the report's rows carry those)."""
    c = run.config
    trainer, data, optim = c.get("trainer") or {}, c.get("data") or {}, c.get("optim") or {}
    limit = trainer.get("limit_train_batches")
    parts = [
        f"data {data.get('name')} (val {data.get('val_size')})",
        f"{trainer.get('max_epochs')} epochs" + (f" x {limit} batches" if limit not in (None, 1.0) else ""),
        f"batch {data.get('batch_size')}", f"{optim.get('name')} lr {optim.get('lr')}",
        f"precision {trainer.get('precision')}",
    ]
    return ", ".join(str(p) for p in parts)


def _arch_key(model_cfg: dict) -> str:
    cfg = dict(model_cfg)
    kwargs = dict(cfg.pop("kwargs", None) or {})
    if cfg.get("conv_mode", "separable") != "pointwise_kxk":
        kwargs.pop("pointwise_kernel_size", None)  # only read by pointwise_kxk
    return json.dumps({**cfg, "kwargs": kwargs}, sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """One group per architecture, in mode order (separable, full, pointwise_kxk) within a model and
    width; labels unique (they name the timed model)."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(_arch_key(run.model_cfg), Group("", run.model_cfg)).runs.append(run)
    out = list(groups.values())
    seen: dict[str, int] = {}
    for g in out:
        cfg, first = g.model_cfg, g.runs[0]
        label = f"{cfg.get('name')} w{cfg.get('width')} {first.conv_mode}"
        if first.conv_mode == "pointwise_kxk" and first.k != 3:
            label += f" (k={first.k})"
        seen[label] = seen.get(label, 0) + 1
        g.label = label if seen[label] == 1 else f"{label} #{seen[label]}"  # differ only in other options
    order = {m: i for i, m in enumerate(MODES)}
    out.sort(key=lambda g: (str(g.model_cfg.get("name")), float(g.model_cfg.get("width", 1.0)),
                            order.get(g.runs[0].conv_mode, 99), g.runs[0].k))
    return out

