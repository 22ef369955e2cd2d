"""`evaluate(cfg)`: what eval.py runs -- a checkpoint or shipped weights on the test split (or
validation), with top-1/top-5/per-class accuracy, loss, a metrics.json and a confusion-matrix PNG.

`eval_config` decides what is evaluated (model and data from the checkpoint's own config unless the
command line picks them); `evaluate_model` does the evaluation, with TTA, the split and int8
(`models.quantize`, calibrated on training images) as arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from .checkpoints import checkpoint_config, describe_model, load_state_into, model_state_dict, read_checkpoint
from .config import cli_overrides, to_plain
from .data import CifarDataModule, DeviceBatchLoader, PerImageDataset, per_image_transform
from .errors import ConfigError
from .module import ClassifierModule
from .pipeline import make_trainer, print_rank_zero, set_cpu_threads
from .summary import format_table

SPLITS = ("auto", "test", "val")


def eval_config(cfg: DictConfig, overrides: Sequence[str]) -> tuple[dict, dict | None]:
    """The config to evaluate with, and the checkpoint (or None for `pretrained=true`).

    Model and data come from the checkpoint's own config unless the command line picks their config
    group (`model=...`, `data=...`); `data.*` keys given on the command line are merged on top (a
    `~data.x` removes the key). That way the validation split eval.py uses is the one the run carved
    (same size and seed). `overrides` are the command line's, as Hydra's parser reads them.
    """
    config = to_plain(cfg)
    ckpt_path, pretrained = config.get("ckpt_path"), bool(config.get("pretrained"))
    if bool(ckpt_path) == pretrained:
        raise ConfigError("give exactly one of ckpt_path=<file.ckpt> (a trained run) or pretrained=true model=<name> (shipped weights)")
    ckpt = read_checkpoint(ckpt_path) if ckpt_path else None
    stored = checkpoint_config(ckpt) if ckpt is not None else None

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    chosen = {o.key_or_group for o in parsed}  # a group choice is the group's bare name: `model`, `data`
    if "model" in chosen or stored is None:
        if not config.get("model"):
            raise ConfigError("this checkpoint stores no config, so name its model: model=<name> (plus model.width=... if not 1.0)")
        model_cfg = config["model"]
    else:
        model_cfg = stored["model"]
    if "data" in chosen or stored is None:
        data_cfg = config["data"]
    else:
        data = OmegaConf.create(stored["data"])
        for o in parsed:
            if o.key_or_group.startswith("data."):  # the value as Hydra composed it into cfg
                key = o.key_or_group[len("data."):]
                if o.is_delete():
                    parent, _, leaf = key.rpartition(".")
                    node = OmegaConf.select(data, parent) if parent else data
                    if isinstance(node, DictConfig) and leaf in node:
                        node.pop(leaf)
                else:
                    OmegaConf.update(data, key, OmegaConf.select(cfg, o.key_or_group), force_add=True)
        data_cfg = OmegaConf.to_container(data, resolve=True)
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
    """eval.py: evaluate a checkpoint (or shipped weights) as `cfg` and the command line say;
    `overrides` default to the running Hydra app's."""
    overrides = cli_overrides() if overrides is None else list(overrides)
    config, ckpt = eval_config(cfg, overrides)
    options = config["eval"]
    return evaluate_model(config, ckpt, tta=bool(options.get("tta", False)), split=options.get("split", "auto"),
                          ema=bool(options.get("ema", True)), int8=bool(options.get("int8", False)),
                          int8_calibration_images=int(options.get("int8_calibration_images", 1024)),
                          int8_method=options.get("int8_method"), int8_weight_type=options.get("int8_weight_type"))


def evaluate_model(config: dict, ckpt: dict | None, *, tta: bool = False, split: str = "auto", ema: bool = True,
                   int8: bool = False, int8_calibration_images: int = 1024, int8_method: str | None = None,
                   int8_weight_type: str | None = None) -> dict[str, Any]:
    """Evaluate the model of `config` with the weights of `ckpt` (its weight EMA unless `ema` is
    false; None: whatever `config` builds, e.g. `pretrained=true`) on `split`: "test", "val", or
    "auto" (test when the data has one, else validation). `tta` averages each image's prediction with
    its mirror's. `int8` evaluates `models.quantize` of those weights (onnxruntime on the CPU),
    calibrated with `int8_method` (None: `models.quantize`'s default, which for shipped weights is
    the method their card names) on the first
    `int8_calibration_images` images of the training split, with `int8_weight_type` weights ("int8"
    or "uint8"; None: likewise their card's, else int8). Writes metrics.json and
    confusion_matrix.png to `config["run_dir"]`; returns the report."""
    if split not in SPLITS:
        raise ConfigError(f"eval.split={split!r}: choose auto, test or val")
    if int8:
        check_int8_available()
        if int8_calibration_images < 1:
            raise ConfigError(f"eval.int8_calibration_images={int8_calibration_images}: give at least 1 training image")
    if ckpt is None and config.get("pretrained"):
        check_pretrained_fits_data(config["model"], config["data"])
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config["seed"], verbose=False)
    set_cpu_threads(config)

    datamodule = CifarDataModule(config["data"], seed=config["seed"], test_split=split)
    datamodule.locate()
    if split == "test" and not datamodule.has_test:
        raise ConfigError(f"eval.split=test but {config['data']['root']} has no test split; use eval.split=auto or val")
    module = ClassifierModule(config, tta=tta)
    if ckpt is not None:
        load_state_into(module.model, model_state_dict(ckpt, ema=ema), config["ckpt_path"],
                        expected_desc=describe_model(config["model"]),
                        found_desc=describe_model((checkpoint_config(ckpt) or {}).get("model")))
    if int8:
        from models.int8 import default_method, default_weight_type

        int8_method = int8_method or default_method(module.model)  # shipped weights: their card's method
        int8_weight_type = int8_weight_type or default_weight_type(module.model)  # and weight type
        module.model = quantize_for_eval(module.model, datamodule, int8_calibration_images, int8_method, int8_weight_type)

    trainer_cfg = dict(config["trainer"], devices=1, num_nodes=1, strategy="auto")
    if int8:  # onnxruntime runs the int8 graph on the CPU; float32 in and out, so no autocast either
        trainer_cfg.update(accelerator="cpu", precision="32-true")
    trainer = make_trainer({"trainer": trainer_cfg}, run_dir, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    report = dict(module.test_report)
    report.update({
        "split": datamodule.eval_split,
        "tta": tta,
        "int8": int8,
        **({"int8_method": int8_method, "int8_weight_type": int8_weight_type,
            "int8_calibration_images": int8_calibration_images} if int8 else {}),
        "model": config["model"],
        "data": config["data"]["name"],
        "data_root": str(config["data"]["root"]),
        "source": config.get("ckpt_path") or f"pretrained {config['model']['name']}",
    })
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_confusion(report["confusion"], report["classes"], run_dir / "confusion_matrix.png",
                       title=f"{config['model']['name']}{' int8' if int8 else ''} on {config['data']['name']} {report['split']} (top-1 {100 * report['top1']:.2f}%)")
        print_rank_zero(format_eval_report(report, run_dir))
    return report


def check_pretrained_fits_data(model_cfg: dict, data_cfg: dict) -> None:
    """Shipped weights scored on data with another number of classes would get a fresh, random
    classifier (`create_pretrained` starts one for fine-tuning, which train.py wants) and score about
    chance, silently: for eval.py that is a ConfigError naming both data sets and the fix."""
    from models.pretrained import PretrainedError, pretrained_meta, resolve_entry

    name = model_cfg.get("name")
    try:
        entry = resolve_entry(name, model_cfg.get("stem", "cifar"), model_cfg.get("width", 1.0), model_cfg.get("conv_mode", "separable"))
    except PretrainedError:
        return  # no such entry: building the model says so, with the entries there are
    meta = pretrained_meta(entry)
    trained, wanted = int(meta["build"]["num_classes"]), int(data_cfg["num_classes"])
    if trained != wanted:
        names = list(meta.get("classes") or [])
        classes = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise ConfigError(
            f"pretrained {entry!r} was trained on {meta.get('dataset')} ({trained} classes: {classes}), but "
            f"data={data_cfg.get('name')} has {wanted} classes: its classifier would be replaced by a random one and "
            f"score about chance. Evaluate it on {meta.get('dataset')} (data={meta.get('dataset')}), or fine-tune it first "
            f"(python train.py model={name} pretrained=true data={data_cfg.get('name')}) and evaluate that run's "
            f"checkpoints/last.ckpt")


def check_int8_available() -> None:
    """eval.int8=true needs onnxruntime (the `int8` extra): say so before any data is read."""
    import importlib

    try:
        importlib.import_module("onnxruntime.quantization")
    except ImportError as err:
        raise ConfigError(f"eval.int8=true needs onnxruntime, which is not installed ({err}): pip install -e '.[int8]'") from err


def quantize_for_eval(model: torch.nn.Module, datamodule: CifarDataModule, images: int, method: str,
                      weight_type: str | None = None) -> torch.nn.Module:
    """`models.quantize(model)` calibrated on the first `images` images of the training split,
    unaugmented and normalised as the evaluated images are. Never the validation or test split: the
    activation ranges would then have seen the images they are scored on."""
    import models

    datamodule.setup()
    items, labels = datamodule.splits["train"]
    items, labels = items[:images], labels[:images]
    if isinstance(items, torch.Tensor) and datamodule.loader == "fast":
        batches = DeviceBatchLoader(items.cpu(), labels.cpu(), 32, datamodule.mean, datamodule.std, train=False)
        # 32 a batch: the calibrator holds every intermediate tensor of a batch at once
    else:  # the torchvision loader: files (ImageFolder) or a uint8 array, one image at a time
        size = int(items.shape[-1]) if isinstance(items, torch.Tensor) else 32
        transform = per_image_transform(datamodule.mean, datamodule.std, False, 0, False, size)
        batches = torch.utils.data.DataLoader(PerImageDataset(items, labels, transform), batch_size=32)
    try:
        return models.quantize(model.float().eval(), batches, method=method, max_images=images, weight_type=weight_type)
    except ValueError as err:  # an unknown method or weight type, no training images
        raise ConfigError(f"eval.int8: {err}") from err


def format_eval_report(report: dict, run_dir: Path) -> str:
    split = report["split"] + ("" if report["split"] == "test" else " (no test split: validation reported)")
    rows = [
        ("source", report["source"]),
        ("split", split),
        ("images", str(report["num_images"])),
        ("flip TTA", "on" if report["tta"] else "off"),
        ("int8", (f"on (onnxruntime; {report['int8_method']} ranges from the first "
                  f"{report['int8_calibration_images']} training images, {report.get('int8_weight_type', 'int8')} weights)")
                 if report.get("int8") else "off"),
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
