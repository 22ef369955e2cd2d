"""Model registry: `register_model`, `list_models`, `create_model`, and weight conversion.

Each architecture file registers builder functions with the signature
`builder(num_classes, stem, width, conv_mode, **kwargs) -> nn.Module` (the zoo's also take
`in_chans` and their classifier dropout, `dropout` or `drop_rate`), and may name the reference
implementations (torchvision / timm) whose weights map onto it.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ._base import adapt_input_channels
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


def list_models(
    filter: str | Sequence[str] = "",
    pretrained: bool = False,
    exclude_filters: str | Sequence[str] = "",
    include_tags: bool | None = None,
) -> list[str]:
    """Names accepted by `create_model`, sorted (timm's `list_models`).

    filter: an fnmatch wildcard ("mobilenet*", "*resnet*") or a list of them (a name matching any
        is kept); exclude_filters: wildcards whose matches are dropped.
    pretrained: only names with shipped weights (`list_pretrained()`); their entry names include
        tags ("mobilenet_v2.w0_5") unless `include_tags=False`, which gives the model names.
    """
    if pretrained:
        from .pretrained import list_pretrained, pretrained_meta

        entries = list_pretrained()
        if include_tags is False:
            names = sorted({pretrained_meta(e)["model"] for e in entries})
        else:
            names = entries
    else:
        names = sorted(_BUILDERS)
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p]
    if patterns:
        # an entry "model.tag" also matches a pattern for its model name, as in timm
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n.split(".")[0], p) for p in patterns)]
    excludes = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    for p in (p for p in excludes if p):
        names = [n for n in names if not fnmatch.fnmatchcase(n, p)]
    return names


def _check_name(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _BUILDERS[name]


_API_OPTIONS = (
    "pretrained", "num_classes", "in_chans", "drop_rate", "features_only", "out_indices", "checkpoint_path",
    "stem", "width", "conv_mode", "pointwise_kernel_size",
)  # fmt: skip
_DROP_NAMES = ("drop_rate", "dropout")  # what the families call their classifier-head dropout


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    *,
    stem: str = "cifar",
    width: float = 1.0,
    conv_mode: str | ConvMode = "separable",
    **kwargs,
) -> nn.Module:
    """Build a zoo model, as `timm.create_model` does.

    name: one of `list_models()` (or, with `pretrained=True`, one of `list_pretrained()`).
    pretrained: load the shipped CIFAR-10 weights (`weights=` a path or URL with the same sha256);
        a different `num_classes` gets a fresh classifier, a different `in_chans` an adapted stem.
    num_classes: classifier outputs (10: CIFAR-10).
    in_chans: input channels; the stem's first conv takes them. With pretrained weights the RGB
        filters are adapted as timm's `adapt_input_conv` (1: summed; n: repeated, scaled by 3/n).
    drop_rate: dropout before the classifier, every family (None: the family's default, e.g.
        mobilenet_v2 0.2, xception 0.5, resnets 0; the same as the families' own `dropout=`).
    features_only: return a `FeatureListNet` giving one feature map per stride; `out_indices`
        picks the levels (default all; see `models.features`).
    checkpoint_path: load your own weights after building: safetensors, a torch.save'd
        state_dict, a Lightning checkpoint of train.py (its EMA weights when present), or a
        DataParallel/DDP or torch.compile state_dict (see `models.load_state_dict_file`).
    stem: "cifar" keeps 32x32 inputs at full resolution early on; "imagenet" is the paper's network.
    width: channel multiplier, channels rounded to multiples of 8.
    conv_mode: "separable" (as published), "full" or "pointwise_kxk" (see `ConvMode`);
        `pointwise_kernel_size=` sets k for "pointwise_kxk".
    Other keywords go to the family's builder (e.g. `shortcut="pad"` for the CIFAR ResNets).
    """
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    if drop_rate is not None and not (isinstance(drop_rate, (int, float)) and 0 <= drop_rate < 1):
        raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects feature maps: pass features_only=True with it")
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if pretrained:
        from .pretrained import create_pretrained  # imported lazily: only loading needs it

        model = create_pretrained(name, num_classes=num_classes, stem=stem, width=width, conv_mode=conv_mode, **kwargs)
        if in_chans != 3:
            adapt_input_channels(model, in_chans)
    else:
        model = _build(name, num_classes, stem, width, conv_mode, in_chans, **kwargs)
    if checkpoint_path is not None:
        from ._loader import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    if features_only:
        from .features import FeatureListNet

        model = FeatureListNet(model, out_indices)
    return model


def _build(name: str, num_classes: int, stem: str, width: float, conv_mode, in_chans: int = 3, **kwargs) -> nn.Module:
    """A freshly initialised model: the options checked, then the family's builder."""
    builder = _check_name(name)
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no classifier, pooled features out), got {num_classes!r}")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    mode = ConvMode(conv_mode, kwargs.pop("pointwise_kernel_size", 3)) if isinstance(conv_mode, str) else conv_mode
    params = inspect.signature(builder).parameters
    if "drop_rate" in kwargs and "drop_rate" not in params:  # one name across families
        own = next((p for p in _DROP_NAMES if p in params), None)
        if own is None:
            raise ValueError(f"model {name!r} has no classifier dropout to set with drop_rate")
        drop_rate = kwargs.pop("drop_rate")
        if own in kwargs and kwargs[own] != drop_rate:
            raise ValueError(f"drop_rate={drop_rate!r} and {own}={kwargs[own]!r} set the same dropout of {name!r}; pass one")
        kwargs[own] = drop_rate
    if "in_chans" in params:
        kwargs["in_chans"] = in_chans
    elif in_chans != 3:
        raise ValueError(f"model {name!r} does not take in_chans (its builder has no in_chans parameter)")
    accepted = [p for p in params if p not in ("num_classes", "stem", "width", "conv_mode")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        options = list(_API_OPTIONS) + [p for p in accepted if p not in _API_OPTIONS]
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {', '.join(options)}")
    # num_classes=0 is timm's feature extractor: built with a head, then the head removed, as
    # reset_classifier(0) does on any model, so both ways give the same network
    model = builder(num_classes=num_classes or 1, stem=stem, width=float(width), conv_mode=mode, **kwargs)
    if num_classes == 0:
        model.reset_classifier(0)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        model.pretrained_cfg = {"architecture": name, **cfg}
    return model


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
