"""Multi-scale feature maps from any zoo model: `create_model(..., features_only=True)` (timm's
semantics).

`FeatureListNet(model, out_indices)` keeps the modules that compute the model's
`forward_features` (`model.feature_units()`: the children of its stem, blocks and head, applied in
order) and returns a list of feature maps, one per stride: for each reduction of the input (2, 4,
8, ... as the network downsamples), the output of the last module that works at it. Which modules
those are is read off the model, not written per family: the units are run once on a small zero
image (the model's input size, at most 64x64) and each output's size gives its reduction. `feature_info` says what each map is (channels, reduction, module).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn

__all__ = ["FeatureInfo", "FeatureListNet", "feature_levels"]


class FeatureInfo:
    """What each feature level is, as timm's `FeatureInfo`: `channels()`, `reduction()`,
    `module_name()` for the selected `out_indices` (or `idx=` one or several levels), and the full
    per-level dicts through `len()`, indexing and `get_dicts()`."""

    def __init__(self, info: list[dict], out_indices: Sequence[int]):
        self.info = [dict(i) for i in info]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        indices = self.out_indices if idx is None else (idx if isinstance(idx, (tuple, list)) else [idx])
        dicts = [self.info[i] if keys is None else {k: self.info[i][k] for k in keys} for i in indices]
        return dicts if idx is None or isinstance(idx, (tuple, list)) else dicts[0]

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.info})"


PROBE_SIZE = 64  # big enough for every stride of the zoo's networks (down to 2x2 at stride 32)


@torch.no_grad()
def _unit_shapes(units: list[tuple[str, nn.Module]], input_size: Sequence[int]) -> list[torch.Size]:
    """Output shape of each unit, run in order, in eval mode, on one zero image of `input_size`.
    (A real forward at this size costs a few ms; "meta" tensors measured 10x slower here.)"""
    chain = nn.Sequential(*(module for _, module in units))
    param = next(chain.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    was_training = [m.training for m in chain.modules()]
    chain.eval()  # running statistics are neither used from nor written by the probe
    shapes: list[torch.Size] = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(o.shape)) for m in chain]
    try:
        chain(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(chain.modules(), was_training):
            m.training = mode
    return shapes


def feature_levels(model: nn.Module, input_size: Sequence[int] | None = None) -> list[dict]:
    """One dict per stride of `model` (a zoo model): `module` (the unit's name in the model),
    `num_chs`, `reduction` and `unit` (its position in `model.feature_units()`)."""
    units = model.feature_units()
    if input_size is None:
        chans, h, w = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        input_size = (chans, min(h, PROBE_SIZE), min(w, PROBE_SIZE))
    shapes = _unit_shapes(units, input_size)
    levels: list[dict] = []
    for i, ((name, _), shape) in enumerate(zip(units, shapes)):
        # the unpadded convs of Xception's ImageNet stem leave sizes a little off powers of two
        reduction = 2 ** round(math.log2(input_size[-1] / shape[-1]))
        level = dict(module=name, num_chs=int(shape[1]), reduction=int(reduction), unit=i)
        if levels and levels[-1]["reduction"] == reduction:
            levels[-1] = level  # the last unit at this stride
        else:
            levels.append(level)
    return levels


class FeatureListNet(nn.Module):
    """A zoo model's feature extractor: `forward(x)` returns the list of feature maps at
    `out_indices` (default: every level), shallow to deep; `feature_info` describes them.

    Holds the model's own modules (shared, not copied) as `units`, named as in the model with
    "." replaced by "_" (timm's convention), up to the deepest level asked for; the pooling and
    classifier are left out.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None):
        super().__init__()
        if not hasattr(model, "feature_units"):
            raise ValueError(f"{type(model).__name__} has no feature_units(): not a zoo model")
        levels = feature_levels(model)
        n = len(levels)
        if out_indices is None:
            out_indices = range(n)
        elif isinstance(out_indices, int):
            out_indices = range(n - out_indices, n)  # timm: an int n means the last n levels
        chosen = []
        for i in out_indices:
            if not isinstance(i, int) or not -n <= i < n:
                raise ValueError(
                    f"out_indices {tuple(out_indices)} out of range: this model has {n} feature levels (0..{n - 1}): "
                    + ", ".join(f"{k}: {lv['module']} ({lv['num_chs']} ch, 1/{lv['reduction']})" for k, lv in enumerate(levels))
                )
            chosen.append(i % n)
        self.out_indices = tuple(sorted(set(chosen)))
        self.feature_info = FeatureInfo(levels, self.out_indices)
        units = model.feature_units()[: max(levels[i]["unit"] for i in self.out_indices) + 1]
        self.units = nn.ModuleDict((name.replace(".", "_"), module) for name, module in units)
        self.return_layers = [levels[i]["module"].replace(".", "_") for i in self.out_indices]
        cfg = getattr(model, "pretrained_cfg", None)
        if cfg is not None:
            self.pretrained_cfg = dict(cfg)
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features: List[torch.Tensor] = []
        for name, unit in self.units.items():
            x = unit(x)
            if name in self.return_layers:
                features.append(x)
        return features
