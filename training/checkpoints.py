"""Checkpoint safety: read a file with clear errors, and check it fits the model before loading.

The reading, weight extraction and fit check are `models._loader`'s (one implementation, shared
with `models.create_model(checkpoint_path=...)`); here they raise `CheckpointError` (a UserError:
train.py/eval.py print the message) and carry the command-line hints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from models._loader import SHOW, CheckpointLoadError, extract_state_dict  # noqa: F401 (SHOW)
from models._loader import read_checkpoint as _read_checkpoint
from models._loader import check_compatible as _check_compatible
from models._loader import load_state_into as _load_state_into

from .errors import CheckpointError

CONFIG_HINT = (
    "Pick the model config it was trained with (e.g. model=<name> model.width=...), or omit model= "
    "in eval.py to use the checkpoint's own config."
)


def _siblings_hint(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    where = f" Other checkpoints next to it: {', '.join(others)}." if others else ""
    return f" Use another checkpoint of the run (<run>/checkpoints/last.ckpt or best.ckpt).{where}"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)` with a CheckpointError naming the file when it is missing,
    corrupt or truncated. Our checkpoints hold only tensors and plain containers.
    (The reading is `models.read_checkpoint`'s, shared with `models.create_model(checkpoint_path=)`.)"""
    try:
        return _read_checkpoint(path, hint=lambda: _siblings_hint(Path(path)))
    except CheckpointLoadError as err:
        raise CheckpointError(str(err)) from err


def model_state_dict(ckpt: Mapping[str, Any], ema: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights: a Lightning checkpoint's weight average (`ema_state_dict`, written by
    the WeightEMA callback) when it has one and `ema` is true, else its `state_dict` without the
    `model.` prefix; or a bare state_dict (the kind pretrained weights ship as). DataParallel/DDP
    (`module.`) and torch.compile (`_orig_mod.`) prefixes are removed (`models.extract_state_dict`)."""
    try:
        return extract_state_dict(ckpt, ema)
    except CheckpointLoadError as err:
        raise CheckpointError(str(err)) from err


def checkpoint_config(ckpt: Mapping[str, Any]) -> dict | None:
    """The resolved run config our ClassifierModule stores in `hyper_parameters`."""
    hparams = ckpt.get("hyper_parameters") or {}
    config = hparams.get("config") if isinstance(hparams, Mapping) else None
    return dict(config) if isinstance(config, Mapping) else None


def describe_model(model_cfg: Mapping[str, Any] | None) -> str:
    if not model_cfg:
        return "an unknown model"
    extras = ", ".join(f"{k}={model_cfg[k]}" for k in ("width", "conv_mode", "stem") if k in model_cfg)
    return f"model={model_cfg.get('name')} ({extras})"


def check_compatible(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    path: str | Path,
    expected_desc: str = "",
    found_desc: str = "",
) -> None:
    """Raise CheckpointError naming missing, unexpected and shape-mismatched keys (first few of
    each, with counts) when `found` (the checkpoint's weights) does not fit `expected`
    (`models.check_compatible`, with the command-line hint)."""
    try:
        _check_compatible(expected, found, path, expected_desc, found_desc, hint=CONFIG_HINT)
    except CheckpointLoadError as err:
        raise CheckpointError(str(err)) from err


def load_state_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | Path,
                    expected_desc: str = "", found_desc: str = "") -> torch.nn.Module:
    """`models`' one way weights go into a model (check, cast to the model's dtype, load), raising
    CheckpointError with the command-line hint when they do not fit."""
    try:
        return _load_state_into(model, state, path, expected_desc, found_desc, hint=CONFIG_HINT)
    except CheckpointLoadError as err:
        raise CheckpointError(str(err)) from err
