"""Params and mult-adds of a model, counted by PyTorch's FlopCounterMode (never by hand).

Mult-adds (MACs) are FLOPs / 2: FlopCounterMode counts a multiply-add as two FLOPs. Only
convolutions and matrix multiplies are counted (norms, activations and pooling are not), which
is the convention of the papers the zoo cites.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["profile", "layer_table", "format_layer_table"]


def _example_input(model: nn.Module, input_size) -> torch.Tensor:
    size = tuple(input_size)
    if len(size) == 3:
        size = (1, *size)
    if len(size) != 4:
        raise ValueError(f"input_size must be (C, H, W) or (N, C, H, W), got {input_size!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(size, device=device, dtype=dtype)


def _count(model: nn.Module, input_size) -> FlopCounterMode:
    x = _example_input(model, input_size)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter


def profile(model: nn.Module, input_size=(1, 3, 32, 32)) -> dict[str, int]:
    """Return {"params": parameter count, "macs": mult-adds of one forward pass at `input_size`}."""
    counter = _count(model, input_size)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": counter.get_total_flops() // 2,
    }


def layer_table(model: nn.Module, input_size=(1, 3, 32, 32)) -> list[dict]:
    """One row per leaf module that has parameters or mult-adds: name, type, output shape, params, macs."""
    shapes: dict[str, tuple] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
        for name, module in model.named_modules()
        if not list(module.children())
    ]
    try:
        counter = _count(model, input_size)
    finally:
        for hook in hooks:
            hook.remove()
    root = type(model).__name__
    flops = {}
    for key, by_op in counter.get_flop_counts().items():
        name = key[len(root) + 1 :] if key.startswith(root + ".") else key
        flops[name] = sum(by_op.values())
    rows = []
    for name, module in model.named_modules():
        if list(module.children()) or name not in shapes:
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        macs = flops.get(name, 0) // 2
        if params or macs:
            rows.append({"name": name, "type": type(module).__name__, "output": shapes[name], "params": params, "macs": macs})
    return rows


def format_layer_table(rows: list[dict]) -> str:
    """A markdown table of `layer_table` rows with a total line."""
    lines = ["| layer | type | output | params | mult-adds |", "|---|---|---|---:|---:|"]
    for r in rows:
        out = "x".join(map(str, r["output"]))
        lines.append(f"| {r['name']} | {r['type']} | {out} | {r['params']:,} | {r['macs']:,} |")
    lines.append(f"| **total** | | | {sum(r['params'] for r in rows):,} | {sum(r['macs'] for r in rows):,} |")
    return "\n".join(lines)
