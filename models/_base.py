"""The classifier API every zoo model shares, in timm's terms (`ClassifierMixin`), and the data
config (`pretrained_cfg`) that `timm.data.resolve_data_config(model=m)` reads.

A family's model class derives from `ClassifierMixin, nn.Module`, builds `stem`, `blocks` (and
`head` where it has one), `pool`, `dropout` and `classifier`, sets `num_features` (the width
`classifier` reads), defines `forward_features`, and calls `_init_classifier_api` at the end of
its `__init__`. The mixin then gives it:

- `forward(x) == forward_head(forward_features(x))`;
- `forward_head(x, pre_logits=False)`: global pool, flatten, the family's pre-logits layers
  (MobileNetV3's head_fc + hard-swish), then dropout and the classifier; `pre_logits=True` stops
  before dropout and returns `num_features` values per image;
- `get_classifier()`, `reset_classifier(num_classes)` (0: an `nn.Identity` head, so the model
  returns its pooled features);
- `num_classes`, `in_chans`, `num_features` and `pretrained_cfg`;
- `feature_units()`: the modules that, applied in order, compute `forward_features` (the
  children of `stem`, `blocks` and `head`); `models.features.FeatureListNet` builds on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = [
    "ClassifierMixin",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "default_pretrained_cfg",
    "cfg_for_channels",
    "adapt_input_conv",
    "adapt_input_channels",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _per_channel(values, in_chans: int) -> tuple[float, ...]:
    """Per-channel statistics for `in_chans` inputs, matching `adapt_input_conv`'s weights: the
    mean for one channel (the RGB filters are summed), the RGB values repeated cyclically otherwise."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def cfg_for_channels(cfg: dict, in_chans: int) -> dict:
    """A copy of `cfg` whose input_size, mean and std are for `in_chans` input channels."""
    cfg = dict(cfg)
    _, h, w = cfg["input_size"]
    cfg["input_size"] = (in_chans, int(h), int(w))
    cfg["mean"] = _per_channel(cfg["mean"], in_chans)
    cfg["std"] = _per_channel(cfg["std"], in_chans)
    return cfg


def default_pretrained_cfg(
    stem: str,
    num_classes: int,
    in_chans: int = 3,
    first_conv: str = "stem.conv",
    imagenet_input_size: int = 224,
    imagenet_crop_pct: float = 0.875,
    imagenet_interpolation: str = "bilinear",
) -> dict:
    """The data config of a zoo model in timm's `pretrained_cfg` keys.

    cifar stem: 32x32 inputs, CIFAR-10's mean/std, no crop (crop_pct 1.0). imagenet stem: ImageNet
    mean/std at the paper's input size (resize to size / crop_pct, then center crop)."""
    if stem == "cifar":
        cfg = dict(
            input_size=(3, 32, 32), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
            mean=CIFAR10_MEAN, std=CIFAR10_STD,
        )  # fmt: skip
    else:
        size = imagenet_input_size
        cfg = dict(
            input_size=(3, size, size), interpolation=imagenet_interpolation, crop_pct=imagenet_crop_pct,
            crop_mode="center", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )  # fmt: skip
    cfg.update(num_classes=num_classes, first_conv=first_conv, classifier="classifier", stem=stem)
    return cfg_for_channels(cfg, in_chans)


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """An RGB first-conv weight (out, 3, k, k) adapted to `in_chans` inputs, as timm's
    `adapt_input_conv`: one channel sums the RGB filters; other counts repeat them cyclically and
    scale by 3 / in_chans, so a constant image gives the same response."""
    dtype = conv_weight.dtype
    weight = conv_weight.float()
    out_chs, chs, kh, kw = weight.shape
    if in_chans == 1:
        if chs > 3:
            if chs % 3:
                raise ValueError(f"cannot adapt a first conv with {chs} input channels to 1")
            weight = weight.reshape(out_chs, chs // 3, 3, kh, kw).sum(dim=2)
        else:
            weight = weight.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        if chs != 3:
            raise ValueError(f"cannot adapt a first conv with {chs} input channels to {in_chans}; it needs 3 (RGB)")
        repeat = int(math.ceil(in_chans / 3))
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans, :, :] * (3 / float(in_chans))
    return weight.to(dtype)


@torch.no_grad()
def adapt_input_channels(model: nn.Module, in_chans: int) -> nn.Module:
    """Adapt a built (e.g. pretrained) RGB model to `in_chans` input channels in place: its first
    conv (`pretrained_cfg["first_conv"]`) gets `adapt_input_conv`'s weights, and `in_chans` and
    `pretrained_cfg` follow."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if not name:
        raise ValueError(f"{type(model).__name__} names no first conv (pretrained_cfg['first_conv']) to adapt to in_chans")
    conv = model.get_submodule(name)
    if conv.in_channels == in_chans:
        return model
    if conv.groups != 1:
        raise ValueError(f"cannot adapt the grouped first conv {name!r} to in_chans={in_chans}")
    conv.weight = nn.Parameter(adapt_input_conv(in_chans, conv.weight.detach()), requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_chans
    model.in_chans = in_chans
    model.pretrained_cfg = cfg_for_channels(cfg, in_chans)
    return model


class ClassifierMixin:
    """timm's classifier API for a zoo model (see the module docstring for what a family provides)."""

    _feature_roots = ("stem", "blocks", "head")

    def _init_classifier_api(self, num_classes: int, stem: str, in_chans: int, first_conv: str, **cfg) -> None:
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.pretrained_cfg = default_pretrained_cfg(stem, num_classes, in_chans, first_conv, **cfg)

    def _pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Layers between the pooled features and dropout + classifier (none by default)."""
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self._pre_logits(self.pool(x).flatten(1))
        if pre_logits:
            return x
        return self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for `num_classes` (nn.Linear's default init); 0 gives an `nn.Identity`
        head, so `forward` returns the pooled (pre-logits) features. Only average pooling exists."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported; zoo models use average pooling ('avg')")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        if num_classes > 0:
            ref = self.classifier.weight if isinstance(self.classifier, nn.Linear) else next(self.parameters())
            self.classifier = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        else:
            self.classifier = nn.Identity()
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def feature_units(self) -> list[tuple[str, nn.Module]]:
        """(name, module) pairs that, applied in order, compute `forward_features`: the children of
        `stem`, `blocks` and `head` (each one module when it is not an nn.Sequential)."""
        units = []
        for root in self._feature_roots:
            module = getattr(self, root, None)
            if module is None:
                continue
            if isinstance(module, nn.Sequential):
                units += [(f"{root}.{name}", child) for name, child in module.named_children()]
            else:
                units.append((root, module))
        return units
