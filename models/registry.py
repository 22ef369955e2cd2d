"""Model registry: `register_model`, `list_models`, `create_model`, and weight conversion.

Each architecture file registers builder functions with the signature
`builder(num_classes, stem, width, conv_mode, **kwargs) -> nn.Module`, and may name the
reference implementations (torchvision / timm) whose weights map onto it.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn

from .layers import ConvMode

STEMS = ("cifar", "imagenet")
SOURCES = ("torchvision", "timm")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
# name -> {source: reference model name in that library}
REFERENCES: dict[str, dict[str, str]] = {}


def register_model(fn: Callable | None = None, *, references: dict[str, str] | None = None):
    """Register a builder under its function name; `references` maps source library -> model name."""

    def wrap(builder):
        name = builder.__name__
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        REFERENCES[name] = dict(references or {})
        return builder

    return wrap(fn) if fn is not None else wrap


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_BUILDERS)


def _check_name(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _BUILDERS[name]


def create_model(
    name: str,
    num_classes: int = 10,
    stem: str = "cifar",
    width: float = 1.0,
    conv_mode: str = "separable",
    pretrained: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a zoo model.

    name: one of `list_models()` (or, with `pretrained=True`, one of `list_pretrained()`).
    stem: "cifar" keeps 32x32 inputs at full resolution early on; "imagenet" is the paper's network.
    width: channel multiplier, channels rounded to multiples of 8.
    conv_mode: "separable" (as published), "full" or "pointwise_kxk" (see `ConvMode`);
        `pointwise_kernel_size=` sets k for "pointwise_kxk".
    """
    if pretrained:
        from .pretrained import create_pretrained  # imported lazily: only loading needs it

        return create_pretrained(name, num_classes=num_classes, stem=stem, width=width, conv_mode=conv_mode, **kwargs)
    builder = _check_name(name)
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    mode = ConvMode(conv_mode, kwargs.pop("pointwise_kernel_size", 3)) if isinstance(conv_mode, str) else conv_mode
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("num_classes", "stem", "width", "conv_mode")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; valid options: "
            f"num_classes, stem, width, conv_mode, pointwise_kernel_size{', ' if accepted else ''}{', '.join(accepted)}"
        )
    return builder(num_classes=num_classes, stem=stem, width=float(width), conv_mode=mode, **kwargs)


def convert_state_dict(name: str, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Map a torchvision or timm state_dict of the same architecture onto our model's keys.

    Our blocks register their parts in the order the reference runs them, so parameters and
    buffers pair up one to one in order; every pair's shape is checked. The result loads with
    `strict=True` into `create_model(name, stem="imagenet", num_classes=<from the weights>)`.
    """
    _check_name(name)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if source not in REFERENCES[name]:
        known = {n: r for n, r in REFERENCES.items() if r}
        raise ValueError(
            f"model {name!r} has no {source} twin; models with references: "
            + ", ".join(f"{n} ({', '.join(r)})" for n, r in sorted(known.items()))
        )
    theirs = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    classifier = [v for v in theirs.values() if v.dim() == 2]
    if not classifier:
        raise ValueError(f"{source} state_dict for {name!r} has no classifier weight (no 2-D tensor)")
    num_classes = classifier[-1].shape[0]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = create_model(name, num_classes=num_classes, stem="imagenet").state_dict()
    our_keys = [k for k in ours if not k.endswith("num_batches_tracked")]
    if len(our_keys) != len(theirs):
        raise ValueError(
            f"{source} {REFERENCES[name][source]!r} has {len(theirs)} tensors but our {name!r} has {len(our_keys)}: "
            "not the same architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for our_key, (their_key, value) in zip(our_keys, theirs.items()):
        if ours[our_key].shape != value.shape:
            raise ValueError(
                f"shape mismatch converting {source} weights for {name!r}: {their_key} {tuple(value.shape)} "
                f"-> {our_key} {tuple(ours[our_key].shape)}"
            )
        out[our_key] = value
    for key in ours:
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.long)  # a running count, not a weight
    return {k: out[k] for k in ours}
