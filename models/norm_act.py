"""Batch norm and its activation as one training-time kernel (issue 8): same function, less memory traffic.

`batch_norm_act(x, bn, act)` returns `act(bn(x))`. When training a float32 channels-last map on a
CPU, with `bn` an `nn.BatchNorm2d` and `act` one of ReLU, ReLU6, Hardswish or Identity, it runs
`csrc/norm_act.c` instead: statistics, normalisation and activation in two passes over the map,
the backward in two more, and only the norm's input kept for the backward (PyTorch's two layers
make six passes and keep two maps; the C file's header counts them). A bf16 map (a conv's output
under CPU autocast) runs the kernel's `_bf16` functions: read and written in bf16, as PyTorch's
layers would, computed in float32 (nn.BatchNorm2d's statistics are float32 there too). A float32
map under bf16 autocast stays float32 (nn.BatchNorm2d computes it in float32). Everything else --
eval mode, NCHW, float16 maps, other norms and activations, hooks on the layers, graph capture, no
C compiler -- takes the two plain layers, so results never depend on which path ran beyond float
rounding.

`batch_norm_add_act(x, bn, residual, act)` returns `act(bn(x) + residual)`, a residual block's end
(ResNet basic and bottleneck blocks without SE; an inverted residual's linear projection and its
sum): with a ReLU or no activation, the sum and the activation run inside the norm's kernel, under
the same conditions.

The kernel compiles on first use with the zoo's other C kernels (`models/native.py`); where that
fails, a warning says why and the plain layers run. `models.kernels.plain()`
and ``POINTWISE_ZOO_PLAIN_KERNELS=1`` turn it off with the rest of the measured kernels.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from . import kernels, native

__all__ = ["batch_norm_act", "batch_norm_add_act", "available", "FUSED_ACTIVATIONS"]

# The activation classes the kernel computes, by the suffix of their C functions.
FUSED_ACTIVATIONS = {nn.Identity: "identity", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}
_ptr = native.ptr


def available() -> bool:
    """True when the fused kernel is built and the measured kernels are switched on."""
    return kernels.enabled() and native.lib() is not None


def _suffix(x: torch.Tensor) -> str:
    """The C functions for x's element type: float32, or bf16 (`_bf16`)."""
    return "_bf16" if x.dtype == torch.bfloat16 else ""


def _batch_stats(x, weight, bias, bn: nn.BatchNorm2d):
    """The batch's per-channel mean, 1/std and scale a = gamma/std (y = (x - mean) * a + beta), with
    bn's running averages and batch count updated as nn.BatchNorm2d does in training."""
    c = x.shape[1]
    gamma, beta = weight.detach().contiguous(), bias.detach().contiguous()
    mean, invstd, a = torch.empty(c), torch.empty(c), torch.empty(c)
    getattr(native.lib(), f"norm_act_stats{_suffix(x)}")(
        _ptr(x), ctypes.c_int64(x.numel() // c), ctypes.c_int64(c), _ptr(gamma), ctypes.c_double(bn.eps),
        ctypes.c_double(bn.momentum), _ptr(bn.running_mean), _ptr(bn.running_var), _ptr(mean), _ptr(invstd),
        _ptr(a), ctypes.c_int(torch.get_num_threads()),
    )  # fmt: skip
    bn.num_batches_tracked.add_(1)  # as nn.BatchNorm2d counts its training batches
    return gamma, beta, mean, invstd, a


class _BatchNormAct(torch.autograd.Function):
    """act(batch_norm(x)) in training mode; x float32 or bf16 channels-last, CPU (the output and both
    gradients of x's type). Updates the running stats."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn: nn.BatchNorm2d, act: str):
        n, c, h, w = x.shape
        gamma, beta, mean, invstd, a = _batch_stats(x, weight, bias, bn)
        z = torch.empty_like(x)  # channels-last, as x
        act += _suffix(x)
        getattr(native.lib(), f"norm_act_forward_{act}")(
            _ptr(x), _ptr(z), ctypes.c_int64(n * h * w), ctypes.c_int64(c), _ptr(mean), _ptr(a), _ptr(beta),
            ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        ctx.save_for_backward(x, gamma, beta, mean, invstd, a)
        ctx.act = act
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        x, gamma, beta, mean, invstd, a = ctx.saved_tensors
        n, c, h, w = x.shape
        dz = dz.contiguous(memory_format=torch.channels_last)
        dx, dgamma, dbeta = torch.empty_like(x), torch.empty(c), torch.empty(c)
        getattr(native.lib(), f"norm_act_backward_{ctx.act}")(
            _ptr(dz), _ptr(x), _ptr(dx), ctypes.c_int64(n * h * w), ctypes.c_int64(c), _ptr(gamma), _ptr(mean),
            _ptr(invstd), _ptr(a), _ptr(beta), _ptr(dgamma), _ptr(dbeta), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        return dx, dgamma, dbeta, None, None


def _fusable(x: torch.Tensor, bn: nn.Module, act: nn.Module, cast: bool = False) -> str | None:
    """The kernel's activation name when `act(bn(x))` can run fused, else None: x float32 or bf16.
    `cast`: x will be cast to float32 first, so a float16 map counts too (models/norm_act_depthwise.py)."""
    if not bn.training or type(bn) is not nn.BatchNorm2d or type(act) not in FUSED_ACTIVATIONS:
        return None
    if kernels.plain_conv_wanted(x):
        return None  # switched off, or a graph being captured (x may be a tracer's proxy: checked first)
    dtype_ok = x.dtype in (torch.float32, torch.bfloat16) or (cast and x.dtype == torch.float16)
    if not x.is_cpu or not dtype_ok or x.dim() != 4:
        return None  # a case the kernel does not cover
    if not (bn.affine and bn.track_running_stats and bn.momentum is not None):
        return None
    if bn._forward_hooks or bn._forward_pre_hooks or act._forward_hooks or act._forward_pre_hooks:
        return None  # someone watches these layers: call them
    n, _, h, w = x.shape
    if n * h * w < 2 or not x.is_contiguous(memory_format=torch.channels_last) or bn.weight.dtype != torch.float32:
        return None  # (one value per channel: nn.BatchNorm2d raises the error)
    # Under autocast a float32 map is normalised in float32 by nn.BatchNorm2d as well, so the kernel
    # computes the same (such maps come from the float32 depthwise convs, models/depthwise.py); a
    # bf16 map's statistics are float32 in both, and both write bf16.
    return FUSED_ACTIVATIONS[type(act)] if native.lib() is not None else None


def batch_norm_act(x: torch.Tensor, bn: nn.Module, act: nn.Module) -> torch.Tensor:
    """`act(bn(x))`, fused where the kernel covers the case (module docstring)."""
    name = _fusable(x, bn, act)
    if name is None:
        return act(bn(x))
    return _BatchNormAct.apply(x, bn.weight, bn.bias, bn, name)


class _BatchNormAdd(torch.autograd.Function):
    """act(batch_norm(x) + residual) in training mode, act ReLU or Identity; x and residual float32
    (or both bf16) channels-last, CPU. With the ReLU it keeps x and the output (which the next layer keeps anyway),
    not the sum; without, x alone, and the residual's gradient is the output's."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, bn: nn.BatchNorm2d, act: str):
        n, c, h, w = x.shape
        gamma, beta, mean, invstd, a = _batch_stats(x, weight, bias, bn)
        z = torch.empty_like(x)
        getattr(native.lib(), f"norm_add_{act}_forward{_suffix(x)}")(
            _ptr(x), _ptr(residual), _ptr(z), ctypes.c_int64(n * h * w), ctypes.c_int64(c), _ptr(mean), _ptr(a),
            _ptr(beta), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        kept = (z,) if act == "relu" else ()  # the ReLU's backward masks by the output
        ctx.save_for_backward(x, gamma, beta, mean, invstd, a, *kept)
        ctx.act = act
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        x, gamma, beta, mean, invstd, a, *kept = ctx.saved_tensors
        n, c, h, w = x.shape
        m, c64, threads = ctypes.c_int64(n * h * w), ctypes.c_int64(c), ctypes.c_int(torch.get_num_threads())
        dz = dz.contiguous(memory_format=torch.channels_last)
        dx, dgamma, dbeta = torch.empty_like(x), torch.empty(c), torch.empty(c)
        lib, sfx = native.lib(), _suffix(x)
        if ctx.act == "identity":  # the sum passes dz to both sides; the norm's backward is the plain one's
            getattr(lib, f"norm_act_backward_identity{sfx}")(
                _ptr(dz), _ptr(x), _ptr(dx), m, c64, _ptr(gamma), _ptr(mean), _ptr(invstd), _ptr(a), _ptr(beta),
                _ptr(dgamma), _ptr(dbeta), threads,
            )  # fmt: skip
            return dx, dz, dgamma, dbeta, None, None
        dr = torch.empty_like(x)
        getattr(lib, f"norm_add_relu_backward{sfx}")(
            _ptr(dz), _ptr(kept[0]), _ptr(x), _ptr(dx), _ptr(dr), m, c64, _ptr(gamma), _ptr(mean), _ptr(invstd),
            _ptr(dgamma), _ptr(dbeta), threads,
        )  # fmt: skip
        return dx, dr, dgamma, dbeta, None, None


def batch_norm_add_act(x: torch.Tensor, bn: nn.Module, residual: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """`act(bn(x) + residual)`: a residual block's last norm, its sum and its activation. One kernel
    when `act(bn(x))` could run fused with a ReLU (a ResNet block) or no activation (an inverted
    residual's linear end) and the residual is a float32 channels-last map of x's shape (the C file's
    `norm_add_*`: the sum and the ReLU cost no pass of their own); else the plain layers. A bf16 x
    (under autocast) needs a bf16 residual: PyTorch's sum of the two is bf16 too."""
    name = _fusable(x, bn, act)
    if (name not in ("relu", "identity") or type(residual) is not torch.Tensor or residual.shape != x.shape
            or residual.dtype != x.dtype or not residual.is_contiguous(memory_format=torch.channels_last)):
        return act(bn(x) + residual)
    return _BatchNormAdd.apply(x, residual, bn.weight, bn.bias, bn, name)
