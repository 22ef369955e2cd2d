"""Turn a finished training run into a shipped pretrained entry: weights + metadata card.

    python -m tools.export_weights runs/<model>/<date> --data-root ../shared/data/cifar10

Reads the run's final checkpoint (last.ckpt; its weight EMA when the run kept one, never the
epoch that scored best on validation), resolved config, command (.hydra/overrides.yaml) and summary;
stores the weights as safetensors in models/weights/ (fp16 when that moves validation accuracy by
less than 0.1 points, else fp32); then measures the stored file's validation accuracy with the
same code `python eval.py model=<name> pretrained=true trainer.precision=32-true` runs (fp32, so
the number does not depend on bf16 rounding), and writes it into the card with
everything else a user needs: params, mult-adds, split, normalisation, eval transform, recipe,
hardware, file size and sha256. Also writes the model card docs/model_cards/<entry>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

import models
from benchmarks.common import cpu_name
from models.pretrained import WEIGHTS_DIR, sha256_of
from training.callbacks import logged_epoch_seconds
from training.checkpoints import read_checkpoint, model_state_dict
from training.models import build_model
from training.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
CARDS_DIR = REPO / "docs" / "model_cards"
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}  # data.name -> how a card writes it


@dataclass(frozen=True)
class Published:
    """A peer's CIFAR-10 test accuracy for the same architecture, with the epochs it took."""

    acc: str
    epochs: int
    source: str


# What the CIFAR model repos publish (README's time-to-accuracy table, the cards' budget notes).
# chenyaofo/pytorch-cifar-models trains every model 200 epochs on a GPU (its config: max_epochs 200);
# He et al. 2016 stop at 64k iterations of batch 128 on a 45k/5k split, about 182 epochs.
PUBLISHED = {
    "resnet20": Published("92.6%", 200, "chenyaofo/pytorch-cifar-models; He et al. 2016: 91.25%"),
    "resnet56": Published("94.4%", 200, "chenyaofo/pytorch-cifar-models; He et al. 2016: 93.03%"),
    "mobilenet_v2": Published("93.8-93.9%", 200, "chenyaofo/pytorch-cifar-models, 2.24 M params"),
    "mobilenet_v2.w0_5": Published("92.9%", 200, "chenyaofo/pytorch-cifar-models, mobilenetv2_x0_5"),
}


def repo_relative(value):
    """`value` (a run's config) with every path inside this checkout written relative to it: the card
    ships, and the training machine's folders (run_dir, the logger's save_dir, checkpoint dirpaths)
    mean nothing elsewhere."""
    if isinstance(value, dict):
        return {k: repo_relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repo_relative(v) for v in value]
    if isinstance(value, str) and value.startswith("/") and Path(value).resolve().is_relative_to(REPO):
        return str(Path(value).resolve().relative_to(REPO))
    return value


# Defaults of train.py that changed after some cards were trained, with the value they had before: a card's
# command names them, so it trains today what it trained then (docs/recipe.md records each change). The same pins
# are RECIPE_BEFORE in tools/recipes.sh and configs/experiment/ablation.yaml; a test checks the three agree.
CHANGED_DEFAULTS = {"optim.norm_lr_factor": 1.0,  # 1.0 -> 3.0 on 2026-11-28
                    "data.progressive.min_size": None}  # null -> 16 on 2026-11-28


def train_command(overrides: list[str], config: dict) -> str:
    """`python train.py <overrides>`, plus each of CHANGED_DEFAULTS the overrides leave to the default,
    at the value the run's config had (the old default where the config predates the key)."""
    named = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    pins = []
    for key, before in CHANGED_DEFAULTS.items():
        if key not in named:
            node = config
            for part in key.split("."):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            value = before if node == {} else node
            pins.append(f"{key}={'null' if value is None else value}")  # as Hydra reads it back
    return "python train.py " + " ".join(list(overrides) + pins)


def default_entry(model_cfg: dict) -> str:
    tag = [] if float(model_cfg["width"]) == 1.0 else [f"w{model_cfg['width']:g}".replace(".", "_")]
    if model_cfg.get("conv_mode", "separable") != "separable":
        tag.append(model_cfg["conv_mode"])
    return ".".join([model_cfg["name"], "_".join(tag)] if tag else [model_cfg["name"]])


def this_machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs), {gpu}"


def eval_overrides(model_cfg: dict, data_root: str, run_dir: Path, source: list[str]) -> list[str]:
    return [
        f"model={model_cfg['name']}", f"model.width={model_cfg['width']}", f"model.stem={model_cfg['stem']}",
        f"model.conv_mode={model_cfg['conv_mode']}", f"data.root={data_root}", f"run_dir={run_dir}",
        "trainer.precision=32-true", "trainer.enable_progress_bar=false", *source,
    ]  # fmt: skip


def check_exportable(model_cfg: dict, data_cfg: dict) -> None:
    """Refuse, before anything is measured or written, a run a card could not rebuild: an entry is
    built from name, width, stem and conv_mode alone (`models.pretrained`), and its card states the
    normalisation its evaluation uses."""
    if model_cfg.get("kwargs"):
        raise SystemExit(
            f"error: the run was trained with model.kwargs {dict(model_cfg['kwargs'])}, which a shipped entry cannot "
            "carry (an entry is rebuilt from name, width, stem and conv_mode only); evaluate it with "
            "`python eval.py ckpt_path=<run>/checkpoints/last.ckpt` instead, or train without those options")
    missing = [k for k in ("mean", "std") if data_cfg.get(k) is None]
    if missing:
        raise SystemExit(f"error: the run's data.{' and data.'.join(missing)} is null, and a card must state the "
                         "normalisation its weights expect; train with the data set's mean and std (the data config's default)")


def card_eval_command(model_cfg: dict, data_root: str) -> str:
    """The card's `eval.py` command: the entry's build as overrides, so `pretrained=true` resolves to
    this entry (`models.pretrained.resolve_entry`); stem and conv_mode are named where they are not
    the defaults, which keeps the default entries' commands short."""
    build = [f"model={model_cfg['name']}", f"model.width={model_cfg['width']}"]
    for key, default in (("stem", "cifar"), ("conv_mode", "separable")):
        if model_cfg.get(key, default) != default:
            build.append(f"model.{key}={model_cfg[key]}")
    return "python eval.py " + " ".join([*build, "pretrained=true", f"data.root={data_root}", "trainer.precision=32-true"])


def run_eval(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    return evaluate(cfg, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", help="the finished run to export (not with --card-only)")
    parser.add_argument("--entry", help="entry name (default: <model>[.w<width>])")
    parser.add_argument("--data-root", help="data.root for the validation measurement (required to export)")
    parser.add_argument("--hardware", default=this_machine(), help="where the run trained (default: this machine, %(default)s)")
    parser.add_argument("--notes", default="", help="a sentence on what this budget reached")
    parser.add_argument("--init-hardware", default="unknown",
                        help="where the run the weights started from trained (a run with init_weights=<that run's checkpoint>)")
    parser.add_argument("--card-only", action="store_true", help="rewrite docs/model_cards/<entry>.md from the card")
    args = parser.parse_args()
    if args.card_only:  # the card's JSON is the source: nothing is measured, so no run or data is needed
        if not args.entry or not (WEIGHTS_DIR / f"{args.entry}.json").is_file():
            parser.error(f"--card-only rewrites a shipped card: name one with --entry "
                         f"({', '.join(sorted(p.stem for p in WEIGHTS_DIR.glob('*.json')))})")
        card = json.loads((WEIGHTS_DIR / f"{args.entry}.json").read_text())
        (CARDS_DIR / f"{args.entry}.md").write_text(model_card(card))
        return
    if args.run_dir is None or args.data_root is None:
        parser.error("exporting needs the run folder and --data-root (the validation data it is measured on)")

    run = args.run_dir
    config = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    # the command that trained it; a resumed leg's ckpt_path is not part of the recipe
    overrides = [o for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) if not o.startswith("ckpt_path=")]
    model_cfg, data_cfg = config["model"], config["data"]
    check_exportable(model_cfg, data_cfg)
    entry = args.entry or default_entry(model_cfg)
    final = run / "checkpoints" / "last.ckpt"
    state = model_state_dict(read_checkpoint(str(final)))

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = run_eval(eval_overrides(model_cfg, args.data_root, Path(tmp) / "fp32", [f"ckpt_path={final}"]))
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    CARDS_DIR.mkdir(parents=True, exist_ok=True)
    file = WEIGHTS_DIR / f"{entry}.safetensors"
    card_path = WEIGHTS_DIR / f"{entry}.json"
    model = build_model(model_cfg, num_classes=data_cfg["num_classes"])
    model.load_state_dict(state)
    cost = models.profile(model, (1, 3, 32, 32))

    card = {
        "entry": entry,
        "model": model_cfg["name"],
        "file": file.name,
        "build": {"num_classes": data_cfg["num_classes"], "stem": model_cfg["stem"],
                  "width": float(model_cfg["width"]), "conv_mode": model_cfg["conv_mode"]},
        "dataset": data_cfg["name"],
        "classes": data_cfg.get("classes"),
        "params": cost["params"],
        "macs": cost["macs"],
        "input_size": [3, 32, 32],
        "mean": data_cfg["mean"],
        "std": data_cfg["std"],
        "eval_transform": "32x32 RGB uint8 -> float in [0, 1] -> normalize(mean, std); no resize, no crop",
        "val_split": {"size": data_cfg["val_size"], "seed": data_cfg["split_seed"], "stratified": True,
                      "carved_from": f"the {DATASET_NAMES.get(data_cfg['name'], data_cfg['name'])} training split "
                                     "(data.root/train); the test split was not used"},
        "recipe": {
            "command": train_command(overrides, config),
            "config": repo_relative(config),
            "epochs": summary["epochs"],
            "wall_seconds": round(summary["wall_seconds"], 1),
            "train_images_per_second": round(summary["images_per_second"], 1),
            "hardware": args.hardware,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "trained_on": dt.date.today().isoformat(),
        },
        "notes": args.notes,
    }  # fmt: skip
    if config.get("init_weights"):  # a second stage: the card says what the first one was
        card["recipe"]["started_from"] = first_stage(Path(config["init_weights"]), args.init_hardware)
    teacher = ((config.get("distill") or {}).get("teacher") or {}).get("name")
    if teacher:  # distilled from cached teacher logits (train.py distill.logits=...)
        card["teacher"] = teacher

    # fp16 halves the file; keep it only if accuracy moves by less than 0.1 points.
    results = {}
    for dtype in (torch.float16, torch.float32):
        save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(file))
        card.update(sha256=sha256_of(file), file_size=file.stat().st_size, dtype=str(dtype).removeprefix("torch."))
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            results[dtype] = run_eval(eval_overrides(model_cfg, args.data_root, Path(tmp) / "pt", ["pretrained=true"]))
        if abs(results[dtype]["top1"] - fp32["top1"]) * 100 < 0.1:
            break
    report = results[dtype]
    card.update(
        val_acc=round(100 * report["top1"], 2),
        val_top5=round(100 * report["top5"], 2),
        val_loss=round(report["loss"], 4),
        val_acc_checkpoint_fp32=round(100 * fp32["top1"], 2),
        eval_command=card_eval_command(model_cfg, args.data_root),
    )
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    (CARDS_DIR / f"{entry}.md").write_text(model_card(card))
    print(f"{entry}: val top-1 {card['val_acc']}% ({card['dtype']}, {card['file_size'] / 1e6:.2f} MB) -> {file}")


def first_stage(weights: Path, hardware: str) -> dict:
    """What trained the weights a run started from (`init_weights`): their run's command, the epochs it
    finished of the ones it scheduled, and its training seconds (from its metrics: it may have been
    stopped before writing a summary)."""
    run = weights.parents[1]  # <run>/checkpoints/last.ckpt
    config = yaml.safe_load((run / "config.yaml").read_text())
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) if (run / ".hydra" / "overrides.yaml").is_file() else []
    seconds = sum(logged_epoch_seconds(run))
    return {"weights": repo_relative(str(weights)), "command": train_command([repo_relative(o) for o in overrides], config),
            "epochs": int(read_checkpoint(str(weights))["epoch"]) + 1, "scheduled_epochs": config["trainer"]["max_epochs"],
            "train_seconds": round(seconds, 1), "hardware": hardware,
            "precision": config["trainer"].get("precision")}


def total_budget(recipe: dict) -> tuple[str, float, str]:
    """(epochs, seconds, hardware) of the whole training, both stages of a run started from another's weights."""
    first = recipe.get("started_from")
    if not first:
        return str(recipe["epochs"]), recipe["wall_seconds"], recipe["hardware"]
    return (f"{first['epochs']} + {recipe['epochs']}", first["train_seconds"] + recipe["wall_seconds"],
            f"{first['hardware']}, then {recipe['hardware']}")


def budget_note(card: dict) -> str:
    r = card["recipe"]
    first = r.get("started_from")
    if first:
        note = (f"**Budget.** Two stages. First {first['epochs']} of a {first['scheduled_epochs']}-epoch schedule on "
                f"{first['hardware']} ({first['train_seconds'] / 60:.1f} min of training, `{first['command']}`), "
                f"stopped there; its final weights' EMA then started a new {r['epochs']}-epoch cosine on {r['hardware']} "
                f"({r['wall_seconds'] / 3600:.2f} h).")
    else:
        note = (f"**Budget.** {r['epochs']} epochs in {r['wall_seconds'] / 3600:.2f} h on {r['hardware']}: what the recipe in the "
                f"command below (the defaults of its day, docs/recipe.md) reaches in that budget.")
    peer = PUBLISHED.get(card["entry"])
    if peer:
        note += f" For scale, the published CIFAR-10 test accuracy of this architecture is {peer.acc} after {peer.epochs} GPU epochs ({peer.source})."
    return note + (f" {card['notes']}" if card.get("notes") else "")


FLOAT_LAYERS_SAY = {"first": "stem conv in float32", "last": "classifier in float32",
                    "ends": "stem conv and classifier in float32", None: "every layer int8"}
# int8 weights, the default (and what a card without a weight type measured), go unsaid: the pages stay as they were
WEIGHT_TYPE_SAY = {"int8": "", "uint8": "uint8 weights (uint8 x uint8 products), "}


def int8_row(card: dict) -> str:
    """The card's int8 line, when `python -m benchmarks.int8 --update-cards` has measured it."""
    q = card.get("int8")
    if not q:
        return ""
    return (f"| int8 (`models.quantize`) | {q['val_acc']}% validation top-1 against {q['val_acc_float32']}% float32 "
            f"({q['val_acc'] - q['val_acc_float32']:+.2f}); {q['method']} ranges from {q['calibration_images']} training "
            f"images, {WEIGHT_TYPE_SAY[q.get('weight_type', 'int8')]}{FLOAT_LAYERS_SAY[q['float_layers']]}; "
            f"`{q['command']}` |\n")


def model_card(card: dict) -> str:
    r = card["recipe"]
    return f"""# `{card['entry']}`: {card['model']} on {card['dataset']}

| | |
|---|---|
| architecture | `{card['model']}`, stem `{card['build']['stem']}`, width {card['build']['width']}, conv_mode `{card['build']['conv_mode']}` |
| params | {card['params']:,} |
| mult-adds (32x32) | {card['macs']:,} |
| **validation top-1** | **{card['val_acc']}%** (top-5 {card['val_top5']}%, loss {card['val_loss']}) |
| validation split | {card['val_split']['size']:,} images, stratified, seed {card['val_split']['seed']}, {card['val_split']['carved_from']} |
| epochs | {total_budget(r)[0]} |
| wall time | {total_budget(r)[1] / 60:.1f} min on {total_budget(r)[2]} |
| training throughput | {r['train_images_per_second']:.0f} img/s |
{f"| teacher | distilled from {card['teacher']} |{chr(10)}" if card.get('teacher') else ""}| weights | `models/weights/{card['file']}`, {card['dtype']}, {card['file_size'] / 1e6:.2f} MB |
| sha256 | `{card['sha256']}` |
{int8_row(card)}| normalisation | mean {card['mean']}, std {card['std']} |
| eval transform | {card['eval_transform']} |

{budget_note(card)}

Load it:

```python
import models
model = models.create_model("{card['entry']}", pretrained=True).eval()
```

Reproduce the validation accuracy:

```bash
{card['eval_command']}
```

Train it again (trained {r['trained_on']}, torch {r['torch']}):

```bash
{r['command']}
```

No number here comes from the CIFAR-10 test split, which this project holds back.
"""


if __name__ == "__main__":
    main()
