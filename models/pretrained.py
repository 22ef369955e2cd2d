"""Pretrained CIFAR weights: shipped safetensors files, each with a metadata card.

Each entry is two files in `models/weights/`: `<entry>.safetensors` (the state_dict) and
`<entry>.json` (the card: how the model is built, its params, mult-adds, validation accuracy
and split, normalisation, eval transform, recipe, size and sha256). The card is the trust
anchor: a file loaded from anywhere else (a path or a URL) must have the card's sha256.
Loading never runs code from a file: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

from ._loader import CheckpointLoadError, load_state_dict_file, load_state_into
from .int8 import DEFAULT_WEIGHT_TYPE

__all__ = [
    "list_pretrained", "pretrained_meta", "pretrained_transforms", "PretrainedMeta",
    "resolve_entry", "create_pretrained", "load_weights_file", "load_into", "sha256_of", "WEIGHTS_DIR",
]  # fmt: skip


class PretrainedError(ValueError):
    """A pretrained entry or weights file that cannot be used, with the reason and the fix."""


class PretrainedMeta(dict):
    """An entry's card (a dict: params, macs, val_acc, mean, std, input_size, sha256, recipe, ...)
    that also builds the entry's preprocessing, as torchvision's `Weights.transforms()`."""

    def transforms(self):
        """The card's eval transform (see `pretrained_transforms`)."""
        return _transforms(self)


def list_pretrained() -> list[str]:
    """Entry names with shipped weights: `<model>` or `<model>.<tag>`."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))


def pretrained_meta(entry: str) -> PretrainedMeta:
    """The metadata card of an entry (a fresh dict: params, macs, val_acc, mean, std, sha256, recipe,
    ...); its `.transforms()` is the entry's preprocessing."""
    path = WEIGHTS_DIR / f"{entry}.json"
    if not path.is_file():
        available = ", ".join(list_pretrained()) or "none shipped yet"
        raise PretrainedError(f"no pretrained weights for {entry!r}; available entries: {available}")
    return PretrainedMeta(json.loads(path.read_text()))


def _cfg_from_card(meta: dict) -> dict:
    build = meta.get("build", {})
    size = tuple(int(v) for v in meta.get("input_size", (3, 32, 32)))
    crop_pct = float(meta.get("crop_pct", 1.0))
    return {
        "architecture": meta.get("model"),
        "tag": meta.get("entry", "").partition(".")[2],
        "input_size": size,
        "interpolation": meta.get("interpolation", "bilinear"),
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "mean": tuple(float(v) for v in meta["mean"]),
        "std": tuple(float(v) for v in meta["std"]),
        "num_classes": build.get("num_classes"),
        "stem": build.get("stem"),
        "dataset": meta.get("dataset"),
        # how models.quantize calibrates and stores these weights when not told (the card's measured
        # choice, docs/int8.md; a card without a weight type was measured with int8 weights)
        **({"int8_method": meta["int8"]["method"], "int8_weight_type": meta["int8"].get("weight_type", DEFAULT_WEIGHT_TYPE)}
           if meta.get("int8") else {}),
    }


def pretrained_transforms(entry: str):
    """The preprocessing an entry was evaluated with, from its card (mean, std, input size), as a
    torchvision transforms v2 pipeline: a PIL image, or a uint8 (in [0, 255]) or float (in [0, 1])
    tensor of shape (C, H, W) or (N, C, H, W), becomes a normalised float32 tensor. It resizes the
    short side to input_size / crop_pct and center-crops input_size, so a 32x32 CIFAR image only
    goes to float and gets normalised (the cards' "no resize, no crop")."""
    return _transforms(pretrained_meta(entry))


def _transforms(meta: dict):
    from torchvision.transforms import v2  # imported here only: models/ does not need torchvision

    cfg = _cfg_from_card(meta)
    _, h, w = cfg["input_size"]
    interpolation = v2.InterpolationMode(cfg["interpolation"])
    resize = int(h / cfg["crop_pct"]) if (h, w) == (w, h) else (int(h / cfg["crop_pct"]), int(w / cfg["crop_pct"]))
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, interpolation=interpolation, antialias=True),
            v2.CenterCrop((h, w)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
            v2.ToPureTensor(),
        ]
    )


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, sha256: str) -> Path:
    """Download `url` into the hub cache once; the file is kept only if its sha256 matches."""
    cache = Path(torch.hub.get_dir()) / "pointwise_zoo"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{sha256[:16]}-{Path(urllib.parse.urlparse(url).path).name or 'weights'}"
    if target.is_file() and sha256_of(target) == sha256:
        return target
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
        except OSError as err:
            os.unlink(tmp.name)
            raise PretrainedError(f"could not download weights from {url}: {err}") from err
    got = sha256_of(tmp.name)
    if got != sha256:
        os.unlink(tmp.name)
        raise PretrainedError(f"refusing weights from {url}: sha256 {got} does not match the card's {sha256}")
    os.replace(tmp.name, target)
    return target


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict without running code (`models.load_state_dict_file`: safetensors, or a
    torch file with weights_only=True), raising PretrainedError."""
    try:
        return load_state_dict_file(path, hint=" Download it again.")
    except CheckpointLoadError as err:
        raise PretrainedError(str(err)) from err


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` strictly (`models._loader.load_state_into`), or raise PretrainedError naming the
    missing, unexpected and mis-shaped keys."""
    try:
        load_state_into(model, state, source)
    except CheckpointLoadError as err:
        raise PretrainedError(str(err)) from err


def _conflicts(build: dict, stem: str, width: float, conv_mode: str) -> list[str]:
    """The requested options (other than their defaults) that differ from a card's build."""
    asked = {"stem": (stem, "cifar"), "width": (float(width), 1.0), "conv_mode": (str(conv_mode), "separable")}
    return [f"{k}={build[k]!r}" for k, (value, default) in asked.items() if value != default and value != build[k]]


def resolve_entry(name: str, stem: str = "cifar", width: float = 1.0, conv_mode: str = "separable") -> str:
    """The entry for `name`: the entry of that name, or the one of that model built with the
    requested width/stem/conv_mode (so `mobilenet_v2` at width 0.5 finds `mobilenet_v2.w0_5`)."""
    entries = list_pretrained()
    if name in entries and not _conflicts(pretrained_meta(name)["build"], stem, width, conv_mode):
        return name
    model = name.split(".")[0]
    wanted = {"stem": stem, "width": float(width), "conv_mode": str(conv_mode)}
    same_model = [e for e in entries if pretrained_meta(e)["model"] == model]
    matches = [e for e in same_model if all(pretrained_meta(e)["build"][k] == v for k, v in wanted.items())]
    if len(matches) == 1:
        return matches[0]
    if name not in entries and not same_model:
        pretrained_meta(name)  # raises: no such entry, lists what exists
    def describe(e: str) -> str:
        build = pretrained_meta(e)["build"]
        return f"{e} (" + ", ".join(f"{k}={build[k]!r}" for k in wanted) + ")"

    builds = "; ".join(describe(e) for e in same_model)
    raise PretrainedError(
        f"no pretrained {model!r} is built with {', '.join(f'{k}={v!r}' for k, v in wanted.items())}; "
        f"shipped: {builds}"
    )


def create_pretrained(
    entry: str,
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    conv_mode: str = "separable",
    weights: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build the entry's model and load its weights (from `models/weights`, or `weights`: a path or URL).

    `entry` is an entry name, or a model name plus the width/stem/conv_mode of one of its entries.
    A different `num_classes` keeps the backbone and starts a fresh classifier, for fine-tuning.
    """
    from .registry import create_model

    entry = resolve_entry(entry, stem, width, getattr(conv_mode, "name", conv_mode))
    meta = pretrained_meta(entry)
    build = dict(meta["build"])
    model = create_model(
        meta["model"], num_classes=build["num_classes"], stem=build["stem"], width=build["width"],
        conv_mode=build["conv_mode"], **kwargs,
    )  # fmt: skip
    if weights is None:
        path = WEIGHTS_DIR / meta["file"]
        if not path.is_file():
            raise PretrainedError(f"weights file {path} for {entry!r} is missing from this install")
    elif urllib.parse.urlparse(str(weights)).scheme in ("http", "https", "file"):
        path = _fetch(str(weights), meta["sha256"])
    else:
        path = Path(weights)
    if not path.is_file():
        raise PretrainedError(f"weights file {path} does not exist")
    got = sha256_of(path)
    if got != meta["sha256"]:
        raise PretrainedError(
            f"refusing {path}: its sha256 {got} does not match {entry!r}'s card ({meta['sha256']}); "
            "the file is damaged or belongs to another entry"
        )
    load_into(model, load_weights_file(path), str(path))
    if hasattr(model, "pretrained_cfg"):  # the card's data config, for timm's resolve_data_config
        model.pretrained_cfg = {**model.pretrained_cfg, **_cfg_from_card(meta)}
    if num_classes != build["num_classes"]:
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(num_classes)
        else:
            model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model
