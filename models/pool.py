"""Max pooling for training on CPU: the zoo's C kernel (issue 8).

`max_pool2d(x, pool)` returns `pool(x)` for an `nn.MaxPool2d`. When a float32 or bf16 channels-last
map of 16 channels or more is trained on a CPU (gradients wanted), it runs `csrc/max_pool.c`: the
same maxima and gradients as PyTorch's (ties and NaNs resolved alike; a bf16 gradient summed in
float and rounded once; the C file says how), with a one-byte window index kept for the backward
instead of an int64 one, and an input gradient gathered and written once instead of zero-filled
and scattered into: 1.95-2.21x PyTorch's pool on xception_small's three (`python -m
benchmarks.train_speed --max-pool`, docs/train_speed.md). Everything else -- eval or no_grad,
NCHW, fewer channels, dilation, ceil mode, returned indices, hooks on the pool, graph capture, a
dispatch mode such as FlopCounterMode, no C compiler -- calls `pool(x)`. `models.kernels.plain()`
turns it off with the other measured kernels.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from . import kernels, native

__all__ = ["max_pool2d"]

_I = ctypes.c_int64


class _MaxPool(torch.autograd.Function):
    """max_pool2d(x, k, s, p) on a float32 or bf16 channels-last CPU map; keeps a uint8 index."""

    @staticmethod
    def forward(ctx, x, k: int, s: int, p: int):
        n, c, h, w = x.shape
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        suffix = "_bf16" if x.dtype == torch.bfloat16 else ""
        y = torch.empty((n, c, oh, ow), dtype=x.dtype, memory_format=torch.channels_last)
        idx = torch.empty((n, c, oh, ow), dtype=torch.uint8, memory_format=torch.channels_last)
        getattr(native.lib(), f"max_pool_forward{suffix}")(
            native.ptr(x), native.ptr(y), native.ptr(idx), _I(n), _I(h), _I(w), _I(c), _I(oh), _I(ow),
            ctypes.c_int(k), ctypes.c_int(s), ctypes.c_int(p), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        ctx.save_for_backward(idx)
        ctx.geometry, ctx.in_shape, ctx.suffix = (k, s, p), x.shape, suffix
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.in_shape
        k, s, p = ctx.geometry
        oh, ow = dy.shape[-2:]
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = torch.empty(ctx.in_shape, dtype=dy.dtype, memory_format=torch.channels_last)
        getattr(native.lib(), f"max_pool_backward{ctx.suffix}")(
            native.ptr(dy), native.ptr(idx), native.ptr(dx), _I(n), _I(h), _I(w), _I(c), _I(oh), _I(ow),
            ctypes.c_int(k), ctypes.c_int(s), ctypes.c_int(p), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        return dx, None, None, None


def _square(v) -> int | None:
    """An nn.MaxPool2d argument as one int, or None where its two sides differ."""
    if isinstance(v, int):
        return v
    return v[0] if len(v) == 2 and v[0] == v[1] else None


def _covered(x: torch.Tensor, pool: nn.Module) -> tuple[int, int, int] | None:
    """(k, s, p) when the kernel computes `pool(x)`, else None."""
    if kernels.plain_conv_wanted(x) or torch._C._len_torch_dispatch_stack() > 0:
        return None  # switched off, a graph being captured (first: x may be a tracer's proxy), or FLOP counting
    if type(pool) is not nn.MaxPool2d or pool._forward_hooks or pool._forward_pre_hooks:
        return None
    if not (torch.is_grad_enabled() and x.requires_grad) or not x.is_cpu or x.dim() != 4 or x.shape[1] < 16:
        return None  # only training needs the backward's index (inference stays PyTorch's); channels 16 at a time
    if x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    k, s, p = _square(pool.kernel_size), _square(pool.stride), _square(pool.padding)
    if None in (k, s, p) or _square(pool.dilation) != 1 or pool.ceil_mode or pool.return_indices:
        return None
    if not (0 < k * k <= 255 and s > 0 and 0 <= p <= k // 2) or x.shape[2] + 2 * p < k or x.shape[3] + 2 * p < k:
        return None  # (PyTorch's own errors for a bad geometry)
    return (k, s, p) if native.lib() is not None else None


def max_pool2d(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """`pool(x)` for an nn.MaxPool2d, on the C kernel where it covers the case (module docstring)."""
    geometry = _covered(x, pool)
    return pool(x) if geometry is None else _MaxPool.apply(x, *geometry)
