"""Depthwise convolution for training on CPU: the zoo's C kernels where they beat oneDNN's.

`depthwise_conv2d(x, conv)` returns `conv(x)` for an `nn.Conv2d` with one filter per channel.
When a float32 channels-last map is trained on a CPU (gradients wanted), it runs
`csrc/depthwise.c` instead where it was measured faster than oneDNN (`kernels_win`: 5x5 filters,
and 3x3 ones on maps of at most 2x2): the forward, the weight gradient, and the input gradient at
stride 1; the input gradient at stride 2 stays oneDNN's. Under CPU autocast to bf16, a strided
depthwise conv, and one where `kernels_win`, computes in float32 (its input cast once, autocast off
around it: oneDNN's bf16 depthwise conv is the slow path there, `kernels.float32_depthwise`) and
returns float32. Everything else
-- other 3x3 layers, eval or no_grad, NCHW, a bf16 map outside autocast, a bias, dilation, fewer than
16 channels, hooks on the conv, graph capture, a dispatch mode such as FlopCounterMode, no C
compiler -- calls `conv(x)`, so results never depend on which path ran beyond float rounding.
`models.kernels.plain()` turns it off with the other measured kernels.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from . import kernels, native

__all__ = ["depthwise_conv2d"]

_I = ctypes.c_int64


class _DepthwiseConv(torch.autograd.Function):
    """conv2d(x, weight, stride, padding k // 2, groups = channels); x float32 channels-last, CPU."""

    @staticmethod
    def forward(ctx, x, weight, stride: int):
        n, c, h, w = x.shape
        k = weight.shape[-1]
        p = k // 2
        oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
        taps = weight.detach().reshape(c, k * k).t().contiguous()  # [k*k][C]: a tap's channels side by side
        y = torch.empty((n, c, oh, ow), memory_format=torch.channels_last)
        native.lib().depthwise_forward(
            native.ptr(x), native.ptr(taps), native.ptr(y), _I(n), _I(h), _I(w), _I(c), _I(oh), _I(ow),
            ctypes.c_int(k), ctypes.c_int(stride), ctypes.c_int(p), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        k, s = weight.shape[-1], ctx.stride
        p = k // 2
        oh, ow = dy.shape[-2:]
        dy = dy.contiguous(memory_format=torch.channels_last)
        threads = ctypes.c_int(torch.get_num_threads())
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if s == 1:
                flipped = weight.detach().flip(2, 3).reshape(c, k * k).t().contiguous()
                dx = torch.empty_like(x)
                native.lib().depthwise_backward_input(
                    native.ptr(dy), native.ptr(flipped), native.ptr(dx), _I(n), _I(h), _I(w), _I(c), _I(oh), _I(ow),
                    ctypes.c_int(k), ctypes.c_int(p), threads,
                )  # fmt: skip
            else:  # oneDNN's strided input gradient measured as fast as a direct one
                dx = torch.ops.aten.convolution_backward(
                    dy, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], c, [True, False, False]
                )[0]
        if ctx.needs_input_grad[1]:
            taps = torch.empty(k * k, c)
            native.lib().depthwise_backward_weight(
                native.ptr(dy), native.ptr(x), native.ptr(taps), _I(n), _I(h), _I(w), _I(c), _I(oh), _I(ow),
                ctypes.c_int(k), ctypes.c_int(s), ctypes.c_int(p), threads,
            )  # fmt: skip
            dw = taps.t().reshape(weight.shape)
        return dx, dw, None


def _covered(x: torch.Tensor, conv: nn.Module) -> bool:
    """True when the C kernels compute `conv(x)` (whether they are faster is `kernels_win`'s call)."""
    if kernels.plain_conv_wanted(x) or torch._C._len_torch_dispatch_stack() > 0:
        return False  # switched off, a graph being captured (first: x may be a tracer's proxy), or FLOP counting
    if type(conv) is not nn.Conv2d or not torch.is_grad_enabled() or not conv.weight.requires_grad:
        return False  # only training needs a backward; inference stays oneDNN's
    if not x.is_cpu or x.dim() != 4 or not kernel_dtype(x):
        return False
    c = x.shape[1]
    k = conv.kernel_size[0]
    if not (conv.groups == c == conv.in_channels == conv.out_channels and c >= 16 and conv.bias is None):
        return False
    if conv.kernel_size != (k, k) or k % 2 == 0 or k > 7 or conv.padding != (k // 2, k // 2):
        return False
    if conv.stride not in ((1, 1), (2, 2)) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return False
    if conv._forward_hooks or conv._forward_pre_hooks or conv.weight.dtype != torch.float32:
        return False  # someone watches the layer: call it
    return x.is_contiguous(memory_format=torch.channels_last)


def kernel_dtype(x: torch.Tensor) -> bool:
    """Whether x's dtype suits the float32 kernels: float32 outside autocast; under CPU autocast to
    bf16/fp16, float32 or that low precision, which the caller casts to float32 before it turns
    autocast off (where `kernels.float32_depthwise` says float32 is faster)."""
    if kernels.low_precision_autocast():
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _fusable(x: torch.Tensor, conv: nn.Module) -> bool:
    """True when `conv(x)` runs on the C kernels: covered, measured faster, and built here."""
    return _covered(x, conv) and kernels_win(conv.kernel_size[0], x.shape[2], x.shape[3]) and native.lib() is not None


def kernels_win(k: int, h: int, w: int) -> bool:
    """Where the C kernels beat oneDNN's depthwise conv (forward + backward, float32 channels-last,
    batch 128, 2 threads; `python -m benchmarks.train_speed --depthwise`, docs/train_speed.md): every
    5x5 layer of the MobileNetV3s, 1.8-3.9x (oneDNN's 5x5 weight gradient is slow), and a 3x3 filter
    on a 2x2 map, 5.3x. On the other 3x3 layers of the zoo the two tie (0.83-1.09x), so they stay
    oneDNN's."""
    return k >= 5 or h * w <= 4


def float32_under_autocast(x: torch.Tensor, conv: nn.Module) -> bool:
    """Under CPU autocast to bf16: whether `conv(x)` (with the norm + act before it, where they are
    fused) computes in float32 on the zoo's kernels, by `kernels.float32_depthwise`."""
    # (_covered first: it checks that conv is an nn.Conv2d, with a kernel_size)
    return _covered(x, conv) and kernels.float32_depthwise(conv.stride[0], kernels_win(conv.kernel_size[0], *x.shape[2:]))


def depthwise_conv2d(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """`conv(x)` for a depthwise conv, on the C kernels where they cover the case (module docstring)."""
    if kernels.low_precision_autocast():
        if not float32_under_autocast(x, conv):
            return conv(x)
        with torch.autocast("cpu", enabled=False):  # in float32, where bf16 is slower (kernels.float32_depthwise)
            return depthwise_conv2d(x.float(), conv)
    if not _fusable(x, conv):
        return conv(x)
    return _DepthwiseConv.apply(x, conv.weight, conv.stride[0])
