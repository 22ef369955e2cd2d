"""Print the README's model table: params and mult-adds of every registered model at both stems,
plus training img/s and the shipped CIFAR-10 weights' validation accuracy where known.

    python -m tools.model_table [--train-speed outputs/bench_train_speed/train_speed.csv]
    python -m tools.model_table --time-to-accuracy   # the shipped entries' budgets against the peers'

Counts come from `models.profile` (FlopCounterMode); CIFAR stem: 10 classes at 32x32;
ImageNet stem: 1000 classes at 224x224 (299x299 for Xception models, as in the paper).
Training img/s comes from the CSV `python -m benchmarks.train_speed --all --out <csv>` writes;
validation accuracy from the cards in models/weights/.
"""

from __future__ import annotations

import argparse
import csv

import torch

import models
from benchmarks.common import md_table


def train_speed(path: str | None) -> dict[str, float]:
    if not path:
        return {}
    with open(path, newline="") as f:
        return {r["model"]: float(r["img_s"]) for r in csv.DictReader(f) if r["table"] == "models"}


def pretrained_cell(name: str) -> str:
    from tools.export_weights import total_budget

    cells = []
    for entry in models.list_pretrained():
        meta = models.pretrained_meta(entry)
        if meta["model"] == name:
            epochs = total_budget(meta["recipe"])[0]  # both stages of a run started from another's weights
            label = f"w{meta['build']['width']:g}: " if meta["build"]["width"] != 1.0 else ""
            cells.append(f"{label}[{meta['val_acc']:.2f}%](docs/model_cards/{entry}.md) ({epochs} ep)")
    return "<br>".join(cells) or "-"


def row(name: str, speed: dict[str, float]) -> list[str]:
    cells = [f"`{name}`"]
    for stem, classes in (("cifar", 10), ("imagenet", 1000)):
        model = models.create_model(name, num_classes=classes, stem=stem)
        size = model.pretrained_cfg["input_size"][-1]  # 32, or the paper's input (Xception: 299)
        cost = models.profile(model, (1, 3, size, size))
        cells += [f"{cost['params'] / 1e6:.3f} M", f"{cost['macs'] / 1e6:,.1f} M @{size}"]
    cells.append(f"{speed[name]:.0f}" if name in speed else "-")
    cells.append(pretrained_cell(name))
    return cells


def time_to_accuracy() -> str:
    """Per shipped entry: the budget its card records (epochs, wall time, hardware) and the
    validation accuracy it bought, next to what the CIFAR model repos publish for the architecture."""
    from tools.export_weights import PUBLISHED, total_budget

    rows = []
    for entry in models.list_pretrained():
        meta = models.pretrained_meta(entry)
        recipe, peer = meta["recipe"], PUBLISHED.get(entry)
        epochs, seconds, hardware = total_budget(recipe)
        rows.append([
            f"`{entry}`", epochs, f"{seconds / 3600:.2f} h", hardware,
            f"{meta['val_acc']:.2f}%", f"{peer.acc} ({peer.epochs} ep; {peer.source})" if peer else "-",
        ])
    return md_table(["entry", "epochs", "wall time", "hardware", "val acc (card)", "published test acc (epochs; source)"],
                    rows, right=[False, True, True, False, True, False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-speed", help="CSV written by python -m benchmarks.train_speed --all --out")
    parser.add_argument("--time-to-accuracy", action="store_true", help="print the shipped entries' budget table instead")
    args = parser.parse_args()
    if args.time_to_accuracy:
        print(time_to_accuracy())
        return
    torch.manual_seed(0)
    speed = train_speed(args.train_speed)
    headers = ["model", "params (cifar, 10 cls)", "mult-adds (cifar)", "params (imagenet, 1000 cls)",
               "mult-adds (imagenet)", "train img/s (cifar)", "CIFAR-10 val acc (shipped)"]
    print(md_table(headers, [row(name, speed) for name in models.list_models()], right=[False, *[True] * 5, False]))


if __name__ == "__main__":
    main()
