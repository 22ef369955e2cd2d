"""Model config -> zoo model: the one place a `model` config section (configs/model/) becomes a
`models.create_model` call. The LightningModule, eval.py and the tools (weight export, ablation
report) all build through `build_model`, so a run's stored config rebuilds exactly the model it trained."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn

import models

from .errors import ConfigError


def build_model(model_cfg: Mapping[str, Any], num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """`models.create_model(name, num_classes=..., pretrained=..., <the other keys>, **kwargs)` from a
    model config section (`name`, `width`, `stem`, `conv_mode`, `kwargs`, ...). `num_classes` defaults
    to the section's own (a run's config stores the data set's). A ValueError/KeyError from the zoo
    (unknown name, option or pretrained entry) becomes a ConfigError that keeps its message."""
    cfg = dict(model_cfg)
    name = cfg.pop("name", None)
    kwargs = dict(cfg.pop("kwargs", None) or {})
    stored_classes = cfg.pop("num_classes", None)
    classes = num_classes if num_classes is not None else stored_classes
    if classes is not None:
        cfg["num_classes"] = int(classes)
    try:
        return models.create_model(name, pretrained=bool(pretrained), **cfg, **kwargs)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ConfigError(f"cannot build model {name!r}: {msg}") from err
