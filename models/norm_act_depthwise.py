"""The expand's norm + activation inside the depthwise conv that follows it (issue 8).

`norm_act_depthwise(x, bn, act, conv)` returns `conv(act(bn(x)))`. In an inverted residual, x is
the expanded map, the block's largest: when training a float32 channels-last map on a CPU it runs
`csrc/norm_act_depthwise.c`, which never writes act(bn(x)) to memory (it is rebuilt in cache, a
tile at a time, by the forward and again by the backward) -- the C file's header counts the
passes saved. The batch statistics and running averages come from the fused norm kernel's own
function, so the norm behaves exactly as `batch_norm_act` makes it behave. Every case the kernel
does not cover, and maps where it was not measured faster (`kernel_wins`), run the two layers
as before: `depthwise_conv2d(batch_norm_act(x, bn, act), conv)`. Under CPU autocast to bf16, where
oneDNN's bf16 depthwise conv is slow (strided, 5x5, 2x2 maps: `kernels.float32_depthwise`) the
whole of it computes in float32 with autocast off around it, and returns float32; the one kernel
reads a bf16 x as it is (its `_bf16` C functions) and writes x's gradient in bf16, and where the
two layers run instead, x is cast to float32 first. Elsewhere (stride-1 3x3 convs) the one kernel
reads and writes bf16 where that was measured faster (`bf16_kernel_wins`: maps of 8x8 and more), and
the two layers run in bf16 on smaller maps (the norm on its bf16 kernel).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from . import kernels, native
from .depthwise import _covered, depthwise_conv2d, float32_under_autocast
from .norm_act import FUSED_ACTIVATIONS, batch_norm_act
from .norm_act import _fusable as _norm_fusable

__all__ = ["act_depthwise", "norm_act_depthwise"]

_I = ctypes.c_int64
_ptr = native.ptr


class _NormActDepthwise(torch.autograd.Function):
    """dwconv(act(batch_norm(x))) in training mode; x float32 or bf16 channels-last, CPU (a bf16 x is
    read as it is and its gradient written in bf16). The output is float32, or bf16 with `bf16_out`
    (x bf16 only; its gradient is then read as bf16 too). Updates the running stats. With `bn` None
    (and gamma, beta None): dwconv(act(x)), the norm's place held by the identity."""

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bn: nn.BatchNorm2d, act: str, stride: int, bf16_out: bool = False):
        n, c, h, w = x.shape
        bf16 = "_bf16" if x.dtype == torch.bfloat16 else ""  # the C functions that read a bf16 map
        k = weight.shape[-1]
        p = k // 2
        oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
        threads = ctypes.c_int(torch.get_num_threads())
        if bn is None:  # (x - 0) * 1 + 0: the kernel's normalisation gives x back exactly
            gamma, invstd, a, mean, beta = torch.ones(c), torch.ones(c), torch.ones(c), torch.zeros(c), torch.zeros(c)
        else:
            gamma, beta = gamma.detach().contiguous(), beta.detach().contiguous()
            mean, invstd, a = torch.empty(c), torch.empty(c), torch.empty(c)
            getattr(native.lib(), f"norm_act_stats{bf16}")(
                _ptr(x), _I(n * h * w), _I(c), _ptr(gamma), ctypes.c_double(bn.eps), ctypes.c_double(bn.momentum),
                _ptr(bn.running_mean), _ptr(bn.running_var), _ptr(mean), _ptr(invstd), _ptr(a), threads,
            )  # fmt: skip
            bn.num_batches_tracked.add_(1)  # as nn.BatchNorm2d counts its training batches
        taps = weight.detach().reshape(c, k * k).t().contiguous()  # [k*k][C], as depthwise.c takes them
        if bf16_out:
            bf16 = "_bf16z"  # ... and write a bf16 z (and read its gradient as bf16)
        z = torch.empty((n, c, oh, ow), memory_format=torch.channels_last, dtype=torch.bfloat16 if bf16_out else torch.float32)
        getattr(native.lib(), f"norm_act_dw_forward_{act}{bf16}")(
            _ptr(x), _ptr(mean), _ptr(a), _ptr(beta), _ptr(taps), _ptr(z), _I(n), _I(h), _I(w), _I(c), _I(oh), _I(ow),
            ctypes.c_int(k), ctypes.c_int(stride), threads,
        )  # fmt: skip
        ctx.save_for_backward(x, gamma, beta, mean, invstd, a, taps)
        ctx.act, ctx.stride, ctx.weight_shape, ctx.z_dtype = act + bf16, stride, weight.shape, z.dtype
        ctx.norm = bn is not None
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        x, gamma, beta, mean, invstd, a, taps = ctx.saved_tensors
        n, c, h, w = x.shape
        k = ctx.weight_shape[-1]
        oh, ow = dz.shape[-2:]
        dz = dz.to(ctx.z_dtype).contiguous(memory_format=torch.channels_last)  # the C function reads z's type
        dx, dtaps, dgamma, dbeta = torch.empty_like(x), torch.empty(k * k, c), torch.empty(c), torch.empty(c)
        getattr(native.lib(), f"norm_act_dw_backward_{ctx.act}")(
            _ptr(x), _ptr(mean), _ptr(a), _ptr(beta), _ptr(invstd), _ptr(gamma), _ptr(taps), _ptr(dz), _ptr(dx),
            _ptr(dtaps), _ptr(dgamma), _ptr(dbeta), _I(n), _I(h), _I(w), _I(c), _I(oh), _I(ow), ctypes.c_int(k),
            ctypes.c_int(ctx.stride), ctypes.c_int(ctx.norm), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        if not ctx.norm:
            dgamma = dbeta = None
        return dx, dgamma, dbeta, dtaps.t().reshape(ctx.weight_shape), None, None, None, None


def kernel_wins(k: int, h: int, w: int) -> bool:
    """Where the one kernel beats the two layers (`python -m benchmarks.train_speed
    --norm-act-depthwise`, docs/train_speed.md: each expanded map alone, and whole training steps
    under this rule and others): every 3x3 layer, and 5x5 layers on maps of 16x16 and more. On the
    MobileNetV3s' 8x8 and 4x4 maps the 5x5 layers split both ways (0.83-1.34x), and whole steps with
    them on one kernel were no faster."""
    return k == 3 or h * w >= 256


def bf16_kernel_wins(k: int, h: int, w: int) -> bool:
    """Under CPU autocast to bf16, for the convs that stay in bf16 (stride 1, 3x3: `kernels.float32_depthwise`):
    where the one kernel reading and writing bf16 beats the two layers in bf16 (the norm's bf16 kernel,
    then oneDNN's bf16 conv). `python -m benchmarks.train_speed --norm-act-depthwise-bf16`
    (docs/train_speed.md) measured every such layer of the MobileNets and xception_small, once the
    kernel kept the activation's gradient in bf16: 1.20-1.67x on maps of 8x8 and more, 1.00x and 0.91x
    on 4x4 maps; with no norm before the activation (`act_depthwise`), 1.10-1.31x on xception_small's
    32x32, 16x16 and 8x8 maps in two runs."""
    return k == 3 and h * w >= 64


def act_depthwise(x: torch.Tensor, act: nn.Module, conv: nn.Module) -> torch.Tensor:
    """`conv(act(x))`, with `conv` a depthwise conv and no norm between (an Xception block's opening
    ReLU): under CPU autocast to bf16, the one kernel reading and writing bf16 where `bf16_kernel_wins`,
    the norm's place held by the identity; elsewhere the two layers."""
    name = FUSED_ACTIVATIONS.get(type(act))
    if (name is not None and kernels.low_precision_autocast() and x.dtype == torch.bfloat16 and _covered(x, conv)
            and conv.stride[0] == 1 and bf16_kernel_wins(conv.kernel_size[0], x.shape[2], x.shape[3])
            and not (act._forward_hooks or act._forward_pre_hooks or getattr(act, "inplace", False))
            and native.lib() is not None):  # (an in-place act would also have overwritten x)
        return _NormActDepthwise.apply(x, None, None, conv.weight, None, name, 1, True)
    return depthwise_conv2d(act(x), conv)


def norm_act_depthwise(x: torch.Tensor, bn: nn.Module, act: nn.Module, conv: nn.Module) -> torch.Tensor:
    """`conv(act(bn(x)))`, with `conv` a depthwise conv: one kernel where it covers the case (module docstring)."""
    if kernels.low_precision_autocast():
        if float32_under_autocast(x, conv):
            name = _norm_fusable(x, bn, act, cast=True)
            if name is None:
                return depthwise_conv2d(batch_norm_act(x, bn, act), conv)
            with torch.autocast("cpu", enabled=False):  # in float32, where bf16 is slower (kernels.float32_depthwise)
                if x.dtype == torch.bfloat16 and kernel_wins(conv.kernel_size[0], x.shape[2], x.shape[3]):
                    # the kernel reads the bf16 map as it is and writes its gradient in bf16: no cast pass either way
                    return _NormActDepthwise.apply(x, bn.weight, bn.bias, conv.weight, bn, name, conv.stride[0])
                return norm_act_depthwise(x.float(), bn, act, conv)
        name = _norm_fusable(x, bn, act) if x.dtype == torch.bfloat16 and _covered(x, conv) else None
        if name is not None and conv.stride[0] == 1 and bf16_kernel_wins(conv.kernel_size[0], x.shape[2], x.shape[3]):
            # bf16 in and out, as the layers around it: the kernel's bf16 z is its float z rounded once
            return _NormActDepthwise.apply(x, bn.weight, bn.bias, conv.weight, bn, name, 1, True)
        return depthwise_conv2d(batch_norm_act(x, bn, act), conv)
    name = _norm_fusable(x, bn, act)
    if name is None or not _covered(x, conv) or not kernel_wins(conv.kernel_size[0], x.shape[2], x.shape[3]):
        return depthwise_conv2d(batch_norm_act(x, bn, act), conv)
    return _NormActDepthwise.apply(x, bn.weight, bn.bias, conv.weight, bn, name, conv.stride[0])
