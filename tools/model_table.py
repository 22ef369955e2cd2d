"""Print the README's model table: params and mult-adds of every registered model at both stems.

    python tools/model_table.py

Counts come from `models.profile` (FlopCounterMode); CIFAR stem: 10 classes at 32x32;
ImageNet stem: 1000 classes at 224x224 (299x299 for Xception models, as in the paper).
"""

import torch

import models


def imagenet_size(name: str) -> int:
    return 299 if name.startswith("xception") else 224  # Xception is specified at 299x299


def row(name: str) -> str:
    cells = [f"`{name}`"]
    for stem, classes in (("cifar", 10), ("imagenet", 1000)):
        size = 32 if stem == "cifar" else imagenet_size(name)
        model = models.create_model(name, num_classes=classes, stem=stem)
        cost = models.profile(model, (1, 3, size, size))
        cells += [f"{cost['params'] / 1e6:.3f} M", f"{cost['macs'] / 1e6:,.1f} M @{size}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    torch.manual_seed(0)
    print("| model | params (cifar, 10 cls) | mult-adds (cifar) | params (imagenet, 1000 cls) | mult-adds (imagenet) |")
    print("|---|---:|---:|---:|---:|")
    for name in models.list_models():
        print(row(name))


if __name__ == "__main__":
    main()
