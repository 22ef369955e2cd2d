"""Hardware-specific kernel choices, in one place: which kernel computes a pointwise (1x1) conv.

`models.pointwise_conv2d` and `models.PointwiseConv` ask `choose` which strategy to run; every
strategy computes the same unstrided, unpadded, ungrouped 1x1 conv of a 4-D input, so the choice
changes speed, never the result (up to float rounding). Each rule in `choose` sits next to the
measurement that justifies it: `python -m benchmarks.pointwise --strategies` on a 2-core AVX-512
AMD EPYC (KVM guest), MKL + oneDNN, one thread, torch 2.15.0, 2026-11-24 -- docs/speed.md,
section 2, has the tables and the machine. Other machines were not measured.

One switch turns every rule off: `set_enabled(False)`, the `plain()` context manager, or
``POINTWISE_ZOO_PLAIN_KERNELS=1`` in the environment when this module is imported. Every call then
takes the plain `F.conv2d` path, every norm + activation pair its two PyTorch layers instead of
the fused training kernel (`models/norm_act.py`), and every depthwise conv oneDNN's instead of the
zoo's (`models/depthwise.py`) -- a reference to check the rules against, and the
way out if a rule is wrong on other hardware. The switch is process-wide (not per thread).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["choose", "STRATEGIES", "plain_conv_wanted", "enabled", "set_enabled", "plain", "low_precision_autocast",
           "float32_depthwise"]

# Read on every eager pointwise call, so it is one module-level bool (a dict or lock would show
# at batch 1, where a layer takes 3-100 us).
_enabled = os.environ.get("POINTWISE_ZOO_PLAIN_KERNELS", "").strip().lower() not in ("1", "true", "yes", "on")


def enabled() -> bool:
    """True when the measured rules pick the kernels; False when every call is a plain F.conv2d."""
    return _enabled


def set_enabled(value: bool) -> bool:
    """Turn the measured kernel choices on or off for the whole process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(value)
    return previous


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """Within the block every pointwise conv is a plain F.conv2d; the previous setting comes back after."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


# ---- the strategies -------------------------------------------------------------------------


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The backend's 1x1 convolution (oneDNN on CPU): reads NCHW or NHWC, returns the same layout."""
    return F.conv2d(x, weight, bias)


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """NCHW contiguous: each image is a (C_in, H*W) matrix, so the conv is one batched GEMM
    W (C_out, C_in) @ x (N, C_in, H*W); the result is NCHW contiguous."""
    n, c, h, w = x.shape
    y = torch.matmul(weight.reshape(weight.shape[0], c), x.view(n, c, h * w)).view(n, -1, h, w)
    # Under autocast the GEMM returns bf16 while the bias stays fp32; adding it as is would promote
    # the output to fp32, unlike F.conv2d's.
    return y if bias is None else y + bias.to(y.dtype).view(1, -1, 1, 1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Channels-last contiguous (or a 1x1 map): the memory is an (N*H*W, C_in) matrix, so the conv
    is one GEMM against W^T; the result has the input's layout."""
    n, c, h, w = x.shape
    if h == 1 and w == 1:
        return F.linear(x.view(n, c), weight.view(weight.shape[0], c), bias).view(n, -1, 1, 1)
    y = F.linear(x.permute(0, 2, 3, 1), weight.reshape(weight.shape[0], c), bias)
    return y.permute(0, 3, 1, 2)


STRATEGIES = {"conv": _conv, "matmul": _matmul, "linear": _linear}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---- the rules ------------------------------------------------------------------------------


def choose(x: torch.Tensor, weight: torch.Tensor, shape: torch.Size) -> str:
    """The strategy (a key of `STRATEGIES`) for a 1x1 conv of `x` (of `shape`) by `weight`.

    Every number below is a ratio of medians from docs/speed.md, section 2 (machine above).
    """
    if not _enabled or not x.is_cpu:
        # Off: the plain path. Off-CPU: the backend's conv, unmeasured (no GPU on the benchmark machine).
        return "conv"
    n, _, h, w = shape
    hw = h * w
    nchw = x.is_contiguous()
    if hw == 1:
        # A 1x1 map (SE layers, pooled features) with a batch is a plain linear layer.
        return "linear" if n >= 8 and nchw else "conv"
    dtype = x.dtype
    low = dtype in _LOW_PRECISION or (dtype == torch.float32 and low_precision_autocast())
    if nchw:
        if not low:
            # float32: oneDNN's conv runs AVX-512 kernels, MKL's GEMM its AVX2 path on AMD (107 vs
            # 223 GFLOP/s peak), so conv wins almost everywhere -- except oneDNN's NCHW conv on
            # large maps with a batch, which per-image GEMMs beat (matmul/conv2d 0.33-0.84 at 32x32,
            # batch 64). With autograd recording the GEMM's backward (the broadcast weight's
            # gradient is a batch of GEMMs summed) loses: matmul/conv2d median 1.15 at batch 1,
            # 1.81 at batch 64.
            return "matmul" if n > 1 and hw >= 784 and not _records_grad(x, weight) else "conv"
        if _records_grad(x, weight):
            # bfloat16 training: the GEMM wins until large batches of large maps (1.15-1.7x slower
            # beyond N*H*W = 4096; at the boundary, 8x8 at batch 64, 0.87-1.09x shape by shape).
            return "matmul" if n == 1 or n * hw <= 4096 else "conv"
        # bfloat16 inference: oneDNN's bf16 NCHW conv is the slow one (matmul/conv2d median 0.44 at
        # batch 1, 0.59 at batch 64), except where batched bf16 GEMM collapses on tiny per-image
        # matrices (4x4 and 7x7 at batch 64: up to 17x slower).
        return "matmul" if n == 1 or hw >= 64 else "conv"
    if low and n * hw <= 4096 and x.is_contiguous(memory_format=torch.channels_last):
        # bfloat16 channels-last with few rows: F.linear takes 0.40-1.06x (median 0.75-0.80) of the conv's time.
        return "linear"
    return "conv"  # float32 channels-last, bf16 channels-last with many rows: no GEMM beat the conv


def low_precision_autocast() -> bool:
    """True under CPU autocast to bfloat16 or float16 (`train.py`'s default where the CPU computes bf16 natively)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _LOW_PRECISION


def float32_depthwise(stride: int, onednn_slow: bool) -> bool:
    """Under CPU autocast to bf16 while training: whether a depthwise conv (with the norm + act before
    it, where they are fused) computes in float32 on the zoo's kernels, its input cast once (or read
    as bf16 by the fused kernel), instead of in bf16 on oneDNN. Where oneDNN's bf16 conv is slow:
    every strided one (10-45x the float32 layer's time, issue 8's measurement), and the shapes where
    oneDNN is slow in float32 too, `onednn_slow` (`depthwise.kernels_win`: 5x5 filters, 2x2 maps).
    Elsewhere bf16 wins since the norms read and write bf16 maps themselves (`models/norm_act.py`):
    with the stride-1 3x3 convs (and the norm + act fused before them) moved back from the float32
    kernels to the bf16 norm kernel and oneDNN's bf16 conv, mobilenet_v2 went from 1.92-1.95x to
    2.16-2.17x its torchvision twin and xception_small from 1.12-1.14x to 1.17-1.18x its plain
    version (`python -m benchmarks.train_speed --twins`, 2-core Xeon with AMX, batch 128,
    docs/train_speed.md). This rule against all bf16: `--autocast-float32`."""
    return low_precision_autocast() and (stride == 2 or onednn_slow)


def _records_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


_jit_tracing = torch._C._is_tracing  # torch.jit.is_tracing() without its Python frame (eager hot path)
_is_compiling = torch.compiler.is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5


def plain_conv_wanted(x: torch.Tensor) -> bool:
    """True when the layer should be one plain conv call: the switch is off, or a graph is being
    captured rather than run. `x` is then not a plain tensor under torch.fx symbolic tracing
    (torchvision's feature extraction included: a Proxy) and torch.export (fake / functional
    tensors); dynamo (torch.compile, strict export) and torch.jit.trace (legacy ONNX export) say
    so. Captured graphs then hold an ordinary convolution whatever the measured dispatch would pick.
    (Cheapest checks first: this runs on every eager call.)"""
    return not _enabled or type(x) is not torch.Tensor or _jit_tracing() or _is_compiling() or _is_exporting()
