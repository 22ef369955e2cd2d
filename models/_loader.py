"""Reading a state_dict from a user's file, and checking it fits a model: the one implementation.

`load_state_dict_file(path)` reads any of the files a zoo model's weights come in, never running
code from the file (safetensors, or `torch.load(weights_only=True)`):

- a safetensors file (the shipped weights' format);
- a plain state_dict saved with `torch.save(model.state_dict(), path)`;
- a Lightning checkpoint of this project's `train.py` (a dict with `state_dict` whose keys start
  with `model.`); its weight average `ema_state_dict` is preferred when present;
- a `{"model": state_dict, ...}` dict (torchvision's reference training scripts);
- any of these from a model wrapped in DataParallel / DistributedDataParallel (keys prefixed
  `module.`) or compiled with torch.compile (keys prefixed `_orig_mod.`): the prefixes are removed.

`check_compatible` names the first few missing, unexpected and mis-shaped keys when a state_dict
belongs to another architecture, width, stem or number of classes; `load_checkpoint(model, path)`
does both and loads. `training/checkpoints.py` uses these functions (with its own error type and
hints), so `train.py`, `eval.py` and `models.create_model(checkpoint_path=...)` read files alike.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

__all__ = [
    "CheckpointLoadError",
    "read_checkpoint",
    "extract_state_dict",
    "strip_wrapper_prefixes",
    "load_state_dict_file",
    "state_dict_mismatches",
    "check_compatible",
    "load_state_into",
    "load_checkpoint",
]

SHOW = 5  # keys listed per kind of mismatch; the rest are counted
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
MODEL_HINT = (
    "Build the model with the name and options it was trained with "
    "(width, stem, conv_mode, num_classes, in_chans)."
)

Hint = str | Callable[[], str]


class CheckpointLoadError(ValueError):
    """A weights/checkpoint file that is missing, unreadable, or does not fit the model."""


def _hint(hint: Hint) -> str:
    return hint() if callable(hint) else hint


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def read_checkpoint(path: str | os.PathLike, hint: Hint = "") -> dict[str, Any]:
    """`torch.load(path, weights_only=True)` on the CPU, with a CheckpointLoadError naming the file
    when it is missing, corrupt, truncated, holds Python objects besides tensors and plain data,
    or is not a dict. `hint` (a string, or a function giving one) ends the missing/corrupt messages."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint {path} does not exist.{_hint(hint)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointLoadError(
                f"{path} holds Python objects besides tensors and plain data, so it is not loaded "
                "(weights_only=True keeps code in untrusted files from running). Re-save its state_dict."
            ) from err
        reason = (
            str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            if "WeightsUnpickler" in str(err)
            else _first_line(err)
        )
        raise CheckpointLoadError(f"{path} is corrupt and cannot be read ({reason}).{_hint(hint)}") from err
    except Exception as err:  # zip/EOF/runtime errors: the file was cut short or overwritten
        raise CheckpointLoadError(
            f"{path} is corrupt or truncated and cannot be read ({_first_line(err)}).{_hint(hint)}"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or state_dict")
    return ckpt


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) from the keys, in any
    nesting, when every key carries the prefix."""
    state = dict(state)
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def extract_state_dict(ckpt: Mapping[str, Any], ema: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights in a loaded checkpoint: a Lightning checkpoint's weight average
    (`ema_state_dict`) when it has one and `ema` is true, else its `state_dict` without the
    `model.` prefix (its other entries, if any, are not the model's); `{"model": state_dict}`; or a
    bare state_dict. DataParallel/DDP and torch.compile prefixes are removed."""
    if ema and isinstance(ckpt.get("ema_state_dict"), Mapping):
        return strip_wrapper_prefixes(ckpt["ema_state_dict"])
    if isinstance(ckpt.get("state_dict"), Mapping):
        state = ckpt["state_dict"]
        if any(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return strip_wrapper_prefixes(state)
    if isinstance(ckpt.get("model"), Mapping) and not isinstance(ckpt.get("model"), torch.Tensor):
        return strip_wrapper_prefixes(ckpt["model"])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_wrapper_prefixes(ckpt)
    raise CheckpointLoadError("the file has neither a `state_dict` entry nor tensors at its top level")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:  # 8-byte little-endian header size, then the JSON header
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def load_state_dict_file(path: str | os.PathLike, ema: bool = True, hint: Hint = "") -> dict[str, torch.Tensor]:
    """The state_dict in `path` (safetensors, torch.save'd state_dict, Lightning checkpoint,
    DataParallel/DDP or torch.compile keys; see the module docstring), on the CPU. Nothing is
    unpickled beyond tensors and plain containers. Raises CheckpointLoadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint {path} does not exist.{_hint(hint)}")
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file

            return strip_wrapper_prefixes(load_file(str(path)))
        except Exception as err:  # safetensors raises several types for damaged files
            raise CheckpointLoadError(
                f"{path} is corrupt or truncated and cannot be read ({_first_line(err)}).{_hint(hint)}"
            ) from err
    try:
        return extract_state_dict(read_checkpoint(path, hint), ema)
    except CheckpointLoadError as err:
        if str(path) in str(err):
            raise
        raise CheckpointLoadError(f"{path}: {err}") from err


def state_dict_mismatches(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, "key: checkpoint (shape) vs model (shape)" for mis-shaped
    keys), each in `expected`'s / `found`'s order."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def check_compatible(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    expected_desc: str = "",
    found_desc: str = "",
    hint: str = MODEL_HINT,
    strict: bool = True,
) -> None:
    """Raise CheckpointLoadError naming missing, unexpected and shape-mismatched keys (the first
    few of each, with counts) when `found` (the file's weights) does not fit `expected` (the
    model's state_dict). `strict=False` lets missing and unexpected keys pass (shapes still count)."""
    missing, unexpected, mismatched = state_dict_mismatches(expected, found)
    if not strict:
        missing, unexpected = [], []
    if not (missing or unexpected or mismatched):
        return

    def part(title: str, keys: list[str]) -> str:
        if not keys:
            return ""
        more = f" ... and {len(keys) - SHOW} more" if len(keys) > SHOW else ""
        return f"\n  {len(keys)} {title}: " + "; ".join(keys[:SHOW]) + more

    who = f" The checkpoint holds {found_desc}; the config builds {expected_desc}." if found_desc and expected_desc else ""
    raise CheckpointLoadError(
        f"{path} does not fit the model (another architecture or settings).{who}"
        + part("missing from the checkpoint", missing)
        + part("unexpected in the checkpoint", unexpected)
        + part("with mismatched shapes", mismatched)
        + (f"\n{hint}" if hint else "")
    )


def cast_like(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors of `state` in the dtype of the model's (fp16 files load into fp32 models)."""
    dtype = next((v.dtype for v in own.values() if v.is_floating_point()), torch.float32)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def load_state_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    expected_desc: str = "",
    found_desc: str = "",
    hint: str = MODEL_HINT,
    strict: bool = True,
) -> nn.Module:
    """The one way weights go into a model: check they fit (`check_compatible`, which names what does
    not), cast them to the model's dtype (`cast_like`), load. `path` and the descriptions only
    word the error. Returns the model."""
    own = model.state_dict()
    check_compatible(own, state, path, expected_desc, found_desc, hint=hint, strict=strict)
    model.load_state_dict(cast_like(own, state), strict=strict)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = True, strict: bool = True) -> nn.Module:
    """Load the weights in `path` (any format `load_state_dict_file` reads; no sha256 pin: the
    file is the caller's) into `model`, after checking they fit. Returns the model."""
    return load_state_into(model, load_state_dict_file(path, ema=use_ema), path, strict=strict)
