"""`train(cfg)` and `evaluate(cfg)`: what train.py and eval.py run, callable from tests too."""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import models

from .allocator import keep_freed_memory
from .callbacks import ThroughputMeter, WeightEMA
from .checkpoints import check_compatible, checkpoint_config, describe_model, load_checkpoint, model_state_dict
from .config import cli_overrides, to_plain
from .data import CifarDataModule
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .module import ClassifierModule
from .summary import format_table, write_summary

log = logging.getLogger(__name__)


def _one_copy_of_lightning_logs() -> None:
    """`import lightning` gives its logger a console handler of its own *and* lets records
    propagate; under Hydra (root logger configured: console + <run>/train.log) every line
    would print twice. Keep Hydra's."""
    if logging.getLogger().hasHandlers():
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)


_one_copy_of_lightning_logs()


def _print(text: str) -> None:
    """Results go to stdout (rank 0 only) so they show whatever the logging setup."""
    if rank_zero_only.rank == 0:
        print(text, flush=True)


def native_bf16_cpu() -> bool:
    """Does this CPU do bf16 arithmetic in hardware (AVX512-BF16 or AMX)? Without it oneDNN emulates
    bf16 and a training step runs about 2x *slower* than float32 (resnet20, batch 128, channels-last,
    2 threads on a 2.5 GHz Xeon with AVX-512 but no BF16: 161 img/s bf16 against 320 fp32)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """`trainer.precision=auto`: bf16 autocast where the hardware computes in bf16 (CUDA GPUs that
    support it, CPUs with AVX512-BF16/AMX), otherwise full float32 (or fp16 autocast on older GPUs).
    Any other value is passed to Lightning unchanged."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if native_bf16_cpu() else "32-true"


def make_trainer(config: dict, run_dir: Path, callbacks: list, logger: Any = False) -> L.Trainer:
    """The Trainer from the `trainer` config group; a nested `_target_` (e.g. a DDPStrategy
    with the gloo backend) is instantiated by Hydra."""
    kwargs = {k: v for k, v in config["trainer"].items() if k != "_target_"}
    if "precision" in kwargs:
        kwargs["precision"] = resolve_precision(kwargs["precision"], str(kwargs.get("accelerator", "auto")))
    kwargs = instantiate(kwargs, _convert_="all") if any(isinstance(v, dict) and "_target_" in v for v in kwargs.values()) else kwargs
    return L.Trainer(**kwargs, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir))


def make_loggers(config: dict, run_dir: Path) -> list:
    logger_cfg = config.get("logger") or {}
    loggers: list = []
    if logger_cfg.get("csv", True):
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    if logger_cfg.get("tensorboard", False):
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard"))
    return loggers


def profile_model(model: torch.nn.Module, image_size: int = 32) -> dict[str, int]:
    """Params and mult-adds of a CPU fp32 copy (the training copy may be compiled or on a GPU)."""
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    return models.profile(probe, input_size=(1, 3, image_size, image_size))


def set_cpu_threads(config: dict) -> None:
    if config.get("cpu_threads"):
        torch.set_num_threads(int(config["cpu_threads"]))
    if config.get("keep_freed_memory", True):
        keep_freed_memory()


def _checkpoint_epoch(path: str) -> int | None:
    try:
        return int(load_checkpoint(path).get("epoch"))
    except (CheckpointError, TypeError, ValueError):
        return None


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`, then test the best checkpoint; returns the summary.

    `callbacks` are extra Lightning callbacks (tests use them to inject faults).
    """
    start = time.perf_counter()
    config = to_plain(cfg)
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(config["seed"]), workers=True, verbose=False)
    set_cpu_threads(config)

    # Everything a user can get wrong is checked before the first step: data, model, checkpoint.
    datamodule = CifarDataModule(config["data"], seed=int(config["seed"]))
    datamodule.locate()
    module = ClassifierModule(config)
    cost = profile_model(module.model)
    ckpt_path = config.get("ckpt_path")
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        check_compatible(module.model.state_dict(), model_state_dict(ckpt), ckpt_path,
                         expected_desc=describe_model(config["model"]),
                         found_desc=describe_model((checkpoint_config(ckpt) or {}).get("model")))
        del ckpt

    # Two callbacks, not save_last=True: since Lightning 2.6 that only refreshes last.ckpt in
    # epochs that improve the best score, which would make resuming lose epochs.
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"), filename="best", monitor="val/acc", mode="max",
        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
    )
    last = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="last", monitor=None, save_top_k=1,
                           auto_insert_metric_name=False, enable_version_counter=False)
    meter = ThroughputMeter()
    ema_decay = (config.get("optim") or {}).get("ema_decay")
    try:
        ema = [WeightEMA(float(ema_decay))] if ema_decay else []
    except ValueError as err:
        raise ConfigError(f"optim.ema_decay={ema_decay}: {err}") from None
    trainer = make_trainer(config, run_dir, [meter, *ema, checkpoint, last, *callbacks], make_loggers(config, run_dir))
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))

    try:
        with warnings.catch_warnings():
            if ckpt_path:  # resuming into its own folder is the point, not a mistake
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path or None, weights_only=True)
    except NonFiniteLossError as err:
        last_path = run_dir / "checkpoints" / "last.ckpt"
        kept = (f"The last good checkpoint is kept: {last_path} (end of epoch {_checkpoint_epoch(str(last_path))}); "
                f"resume from it with ckpt_path={last_path} after changing the settings.") if last_path.is_file() \
            else "No epoch finished, so there is no checkpoint to keep."
        raise NonFiniteLossError(f"{err}\n{kept}") from None

    best_path = checkpoint.best_model_path or last.best_model_path
    final_val = trainer.callback_metrics.get("val/acc")
    test_acc = None
    if datamodule.has_test and last.best_model_path:
        # the final weights (their EMA when the run kept one): what export ships, never the best epoch
        module.model.load_state_dict(model_state_dict(load_checkpoint(last.best_model_path)))
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        test_acc = float(results[0]["test/acc"]) if results else None
    best_score = checkpoint.best_model_score
    summary = {
        "model": config["model"]["name"],
        "model_config": config["model"],
        "data": config["data"]["name"],
        "params": cost["params"],
        "macs": cost["macs"],
        "final_val_acc": float(final_val) if final_val is not None else None,
        "ema_decay": float(ema_decay) if ema_decay else None,
        "precision": str(trainer.precision),  # what trainer.precision=auto resolved to
        "best_val_acc": float(best_score) if best_score is not None else None,
        "best_epoch": _checkpoint_epoch(best_path) if best_path else None,
        "test_acc": test_acc,
        "test_split": "test" if datamodule.has_test else None,
        "epochs": trainer.current_epoch,
        # this session (setup, fit, test) plus the fit time of earlier legs of a resumed run
        "wall_seconds": meter.prior_seconds + time.perf_counter() - start,
        "images_per_second": meter.images_per_second,
        "train_images": meter.train_images,
        "best_ckpt": best_path,
        "last_ckpt": last.best_model_path,
        "run_dir": str(run_dir),
    }
    if trainer.is_global_zero:
        table = write_summary(run_dir, summary)
        _print(f"\nRun folder: {run_dir}\n{table}\n")
    return summary


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def _chosen(overrides: Sequence[str], group: str) -> bool:
    """Did the command line pick this config group (`model=x`), not just a key (`model.width=`)?"""
    return any(o.lstrip("+~").split("=", 1)[0] == group for o in overrides)


def _key_overrides(cfg: DictConfig, overrides: Sequence[str], group: str) -> dict:
    """`data.root=...`-style overrides as a nested dict, with the values Hydra already parsed."""
    out = OmegaConf.create({})
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key.startswith(group + "."):
            OmegaConf.update(out, key, OmegaConf.select(cfg, key), force_add=True)
    return OmegaConf.to_container(out, resolve=True).get(group, {})  # type: ignore[union-attr]


def eval_config(cfg: DictConfig, overrides: Sequence[str]) -> tuple[dict, dict | None]:
    """The config to evaluate with, and the checkpoint (or None for `pretrained=true`).

    Model and data come from the checkpoint's own config unless the command line picks them
    (`model=...`, `data=...`); `data.*` keys given on the command line are applied on top. That
    way the validation split eval.py uses is the one the run carved (same size and seed).
    """
    config = to_plain(cfg)
    ckpt_path, pretrained = config.get("ckpt_path"), bool(config.get("pretrained"))
    if bool(ckpt_path) == pretrained:
        raise ConfigError("give exactly one of ckpt_path=<file.ckpt> (a trained run) or pretrained=true model=<name> (shipped weights)")
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
    stored = checkpoint_config(ckpt) if ckpt is not None else None

    if _chosen(overrides, "model") or stored is None:
        if not config.get("model"):
            raise ConfigError("this checkpoint stores no config, so name its model: model=<name> (plus model.width=... if not 1.0)")
        model_cfg = config["model"]
    else:
        model_cfg = stored["model"]
    if _chosen(overrides, "data") or stored is None:
        data_cfg = config["data"]
    else:
        data_cfg = OmegaConf.to_container(OmegaConf.merge(stored["data"], _key_overrides(cfg, overrides, "data")), resolve=True)
    run_cfg = {
        "model": dict(model_cfg), "data": dict(data_cfg), "optim": {}, "pretrained": pretrained,
        "channels_last": bool(config.get("channels_last", False)), "compile": False,
        "cpu_threads": config.get("cpu_threads"), "keep_freed_memory": config.get("keep_freed_memory", True),
        "seed": int(config.get("seed", 0)), "trainer": config["trainer"], "run_dir": config["run_dir"],
        "eval": config.get("eval") or {}, "ckpt_path": ckpt_path,
    }
    run_cfg["model"]["num_classes"] = run_cfg["data"]["num_classes"]
    return run_cfg, ckpt


def evaluate(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (or shipped weights) on the test split, or validation when the data
    has none: top-1, top-5, per-class accuracy, loss, and a confusion-matrix PNG."""
    overrides = cli_overrides() if overrides is None else list(overrides)
    config, ckpt = eval_config(cfg, overrides)
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config["seed"], verbose=False)
    set_cpu_threads(config)

    datamodule = CifarDataModule(config["data"], seed=config["seed"])
    datamodule.locate()
    module = ClassifierModule(config)
    if ckpt is not None:
        state = model_state_dict(ckpt, ema=bool(config["eval"].get("ema", True)))
        check_compatible(module.model.state_dict(), state, config["ckpt_path"],
                         expected_desc=describe_model(config["model"]),
                         found_desc=describe_model((checkpoint_config(ckpt) or {}).get("model")))
        module.model.load_state_dict(state)
    module.tta = bool(config["eval"].get("tta", False))

    split = config["eval"].get("split", "auto")
    if split not in ("auto", "test", "val"):
        raise ConfigError(f"eval.split={split!r}: choose auto, test or val")
    if split == "test" and not datamodule.has_test:
        raise ConfigError(f"eval.split=test but {config['data']['root']} has no test split; use eval.split=auto or val")
    split = ("test" if datamodule.has_test else "val") if split == "auto" else split
    if split == "val":
        datamodule.test_dataloader = datamodule.val_dataloader  # type: ignore[method-assign]

    trainer_cfg = dict(config["trainer"], devices=1, num_nodes=1, strategy="auto")
    trainer = make_trainer({"trainer": trainer_cfg}, run_dir, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    report = dict(module.test_report)
    report.update({
        "split": split,
        "tta": module.tta,
        "model": config["model"],
        "data": config["data"]["name"],
        "data_root": str(config["data"]["root"]),
        "source": config["ckpt_path"] or f"pretrained {config['model']['name']}",
    })
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_confusion(report["confusion"], report["classes"], run_dir / "confusion_matrix.png",
                       title=f"{config['model']['name']} on {config['data']['name']} {split} (top-1 {100 * report['top1']:.2f}%)")
        _print(format_eval_report(report, run_dir))
    return report


def format_eval_report(report: dict, run_dir: Path) -> str:
    split = report["split"] + ("" if report["split"] == "test" else " (no test split: validation reported)")
    rows = [
        ("source", report["source"]),
        ("split", split),
        ("images", str(report["num_images"])),
        ("flip TTA", "on" if report["tta"] else "off"),
        ("top-1", f"{100 * report['top1']:.2f}%"),
        ("top-5", f"{100 * report['top5']:.2f}%"),
        ("loss", f"{report['loss']:.4f}"),
    ]
    per_class = [(name, f"{100 * acc:.2f}%") for name, acc in report["per_class"].items()]
    return (f"\n{format_table(rows)}\n\nper-class accuracy:\n{format_table(per_class, ('class', 'top-1'))}\n\n"
            f"Wrote {run_dir / 'metrics.json'} and {run_dir / 'confusion_matrix.png'}\n")


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    n = len(classes)
    size = max(6.0, 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if n <= 20:  # counts in the cells stay legible up to ~20 classes
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
