"""Checkpoint safety: read a file with clear errors, and check it fits the model before loading."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError

SHOW = 5  # keys listed per kind of mismatch; the rest are counted


def _siblings_hint(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    where = f" Other checkpoints next to it: {', '.join(others)}." if others else ""
    return f" Use another checkpoint of the run (<run>/checkpoints/last.ckpt or best.ckpt).{where}"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)` with a CheckpointError naming the file when it is missing,
    corrupt or truncated. Our checkpoints hold only tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.{_siblings_hint(path)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds Python objects besides tensors and plain data, so it is not loaded "
                "(weights_only=True keeps code in untrusted files from running). Re-save its state_dict."
            ) from err
        reason = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if "WeightsUnpickler" in str(err) else _first_line(err)
        raise CheckpointError(f"{path} is corrupt and cannot be read ({reason}).{_siblings_hint(path)}") from err
    except Exception as err:  # zip/EOF/runtime errors: the file was cut short or overwritten
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read ({_first_line(err)}).{_siblings_hint(path)}") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or state_dict")
    return ckpt


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def model_state_dict(ckpt: Mapping[str, Any], ema: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights: a Lightning checkpoint's weight average (`ema_state_dict`, written by
    the WeightEMA callback) when it has one and `ema` is true, else its `state_dict` without the
    `model.` prefix; or a bare state_dict (the kind pretrained weights ship as)."""
    if ema and isinstance(ckpt.get("ema_state_dict"), Mapping):
        return dict(ckpt["ema_state_dict"])
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        state = ckpt["state_dict"]
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise CheckpointError("the file has neither a `state_dict` entry nor tensors at its top level")


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
    each, with counts) when `found` (the checkpoint's weights) does not fit `expected`."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return

    def part(title: str, keys: list[str]) -> str:
        if not keys:
            return ""
        more = f" ... and {len(keys) - SHOW} more" if len(keys) > SHOW else ""
        return f"\n  {len(keys)} {title}: " + "; ".join(keys[:SHOW]) + more

    who = f" The checkpoint holds {found_desc}; the config builds {expected_desc}." if found_desc and expected_desc else ""
    raise CheckpointError(
        f"{path} does not fit the model (another architecture or settings).{who}"
        + part("missing from the checkpoint", missing)
        + part("unexpected in the checkpoint", unexpected)
        + part("with mismatched shapes", mismatched)
        + "\nPick the model config it was trained with (e.g. model=<name> model.width=...), or omit model= "
        "in eval.py to use the checkpoint's own config."
    )
