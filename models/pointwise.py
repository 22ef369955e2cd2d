"""The pointwise (1x1) convolution: the primitive every block in the zoo is built from.

A 1x1 convolution mixes channels and leaves space alone. For input x of shape (N, C_in, H, W)
and weight W of shape (C_out, C_in):

    y[n, o, h, w] = b[o] + sum_i W[o, i] * x[n, i, h, w]

so it is one matrix multiply per image: Y_n = W @ X_n with X_n the (C_in, H*W) view of image n.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_jit_tracing = torch._C._is_tracing  # torch.jit.is_tracing() without its Python frame (eager hot path)
_is_compiling = torch.compiler.is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5

__all__ = ["pointwise_conv2d", "PointwiseConv"]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"pointwise_conv2d: {name} must be an int or a pair of ints, got {value!r}")


def _check_shapes(input: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Return the weight as (C_out, C_in/groups, 1, 1), or raise a ValueError naming the shapes."""
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    if weight.dim() != 4 or weight.shape[-2:] != (1, 1):
        raise ValueError(
            f"pointwise_conv2d needs a 1x1 kernel: weight of shape (C_out, C_in/groups, 1, 1) or "
            f"(C_out, C_in/groups), got weight shape {tuple(weight.shape)}; use F.conv2d for k x k kernels"
        )
    if input.dim() != 4:
        raise ValueError(f"pointwise_conv2d expects input of shape (N, C, H, W), got {tuple(input.shape)}")
    c_out, c_in_per_group = weight.shape[:2]
    if groups < 1 or input.shape[1] % groups or c_out % groups:
        raise ValueError(
            f"pointwise_conv2d: groups={groups} must divide both input channels {input.shape[1]} "
            f"(input shape {tuple(input.shape)}) and output channels {c_out} (weight shape {tuple(weight.shape)})"
        )
    if input.shape[1] != c_in_per_group * groups:
        raise ValueError(
            f"pointwise_conv2d: input has {input.shape[1]} channels (shape {tuple(input.shape)}) but weight "
            f"{tuple(weight.shape)} with groups={groups} expects {c_in_per_group * groups}"
        )
    return weight


def pointwise_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """1x1 convolution with the signature and results of `torch.nn.functional.conv2d`.

    `stride` subsamples, `padding` pads with zeros (a padded border sees only the bias), `dilation`
    has no effect on a 1x1 kernel, `groups` splits the channels. Accepts an unbatched (C, H, W)
    input as F.conv2d does.
    """
    if stride == 1 and padding == 0 and dilation == 1 and groups == 1:
        # The common call (PointwiseConv's): once these few checks pass, straight to the dispatch.
        # Overhead matters here: at batch 1 a layer takes 3-100 us.
        xs, ws = input.shape, weight.shape
        if len(xs) == 4 and len(ws) == 4 and ws[1] == xs[1] and ws[2] == 1 and ws[3] == 1:
            strategy = _choose(input, weight, xs)
            if strategy == "conv":  # the usual pick: one Python frame fewer
                return F.conv2d(input, weight, bias)
            return _STRATEGIES[strategy](input, weight, bias)
    if input.dim() == 3:  # unbatched, as F.conv2d allows
        return pointwise_conv2d(input[None], weight, bias, stride, padding, dilation, groups)[0]
    weight = _check_shapes(input, weight, groups)
    stride = _pair(stride, "stride")
    _pair(dilation, "dilation")  # validated only: a 1x1 kernel has no taps to spread
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"pointwise_conv2d: padding must be 'same', 'valid' or ints, got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError("pointwise_conv2d: padding='same' is not supported for strided convolutions")
        padding = 0  # a 1x1 kernel needs no padding to keep the size
    padding = _pair(padding, "padding")

    if groups != 1:
        # Grouped 1x1 convs are rare (ShuffleNet-style); the backend's grouped kernel does them well.
        return F.conv2d(input, weight, bias, stride, padding, 1, groups)
    if stride != (1, 1) or padding != (0, 0):
        # oneDNN's 1x1 kernel strides and pads natively, without materialising a subsampled copy.
        return F.conv2d(input, weight, bias, stride, padding)
    return _STRATEGIES[_choose(input, weight, input.shape)](input, weight, bias)


# Each strategy computes an unstrided, unpadded, ungrouped 1x1 conv of a 4-D input; `_choose`
# picks one from the input's layout, compute dtype, shape and whether autograd records the call.
# `python -m benchmarks.pointwise --strategies` times every strategy on mobilenet_v2's shapes
# (docs/speed.md has the tables); the rules below are read off those tables.


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The backend's 1x1 convolution (oneDNN on CPU): reads NCHW or NHWC, returns the same layout."""
    return F.conv2d(x, weight, bias)


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """NCHW contiguous: each image is a (C_in, H*W) matrix, so the conv is one batched GEMM
    W (C_out, C_in) @ x (N, C_in, H*W); the result is NCHW contiguous."""
    n, c, h, w = x.shape
    y = torch.matmul(weight.reshape(weight.shape[0], c), x.view(n, c, h * w)).view(n, -1, h, w)
    return y if bias is None else y + bias.to(y.dtype).view(1, -1, 1, 1)  # autocast: y may be bf16


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Channels-last contiguous (or a 1x1 map): the memory is an (N*H*W, C_in) matrix, so the conv
    is one GEMM against W^T; the result has the input's layout."""
    n, c, h, w = x.shape
    if h == 1 and w == 1:
        return F.linear(x.view(n, c), weight.view(weight.shape[0], c), bias).view(n, -1, 1, 1)
    y = F.linear(x.permute(0, 2, 3, 1), weight.reshape(weight.shape[0], c), bias)
    return y.permute(0, 3, 1, 2)


_STRATEGIES = {"conv": _conv, "matmul": _matmul, "linear": _linear}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _choose(x: torch.Tensor, weight: torch.Tensor, shape: torch.Size) -> str:
    """The strategy for this call. On CPU (measured on a 2-core AVX-512 AMD EPYC, MKL + oneDNN,
    one thread; docs/speed.md):

    - float32: oneDNN's conv runs AVX-512 kernels while MKL's float32 GEMM takes its AVX2 path on
      AMD (measured: about half of oneDNN's peak), so conv is the default. The exception is NCHW
      inference on large maps with a batch (H*W >= 784, N > 1), where oneDNN's NCHW conv is
      2-6x slower than per-image GEMMs. With autograd recording, conv's backward wins everywhere.
    - bfloat16 (a bf16 input, or float32 under CPU autocast): oneDNN's bf16 NCHW conv is 2-3x
      slower than the GEMM, so NCHW goes to the GEMM unless the per-image matrices get tiny with a
      batch (H*W < 64: batched bf16 GEMM collapses, up to 10x slower) or, with autograd recording,
      the batch is large (N*H*W > 4096: the broadcast weight's gradient is then a batch of GEMMs
      summed). Channels-last with few rows (N*H*W <= 4096) goes to F.linear, measured 0.45-0.9x
      the conv's time there.
    - a 1x1 map (SE layers, pooled features) with a batch (N >= 8) is a plain linear layer.
    Other devices use the backend's conv (not measured here: no GPU on the benchmark machine).
    """
    if not x.is_cpu:
        return "conv"
    n, _, h, w = shape
    hw = h * w
    nchw = x.is_contiguous()
    if hw == 1:
        return "linear" if n >= 8 and nchw else "conv"
    dtype = x.dtype
    low = dtype in _LOW_PRECISION or (
        dtype == torch.float32 and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _LOW_PRECISION
    )
    if nchw:
        if not low:
            return "matmul" if n > 1 and hw >= 784 and not _records_grad(x, weight) else "conv"
        if _records_grad(x, weight):
            return "matmul" if n == 1 or n * hw <= 4096 else "conv"
        return "matmul" if n == 1 or hw >= 64 else "conv"
    if low and n * hw <= 4096 and x.is_contiguous(memory_format=torch.channels_last):
        return "linear"
    return "conv"


def _records_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _plain_conv_wanted(x: torch.Tensor) -> bool:
    """True when a graph is being captured rather than run. `x` is then not a plain tensor under
    torch.fx symbolic tracing (torchvision's feature extraction included: a Proxy) and torch.export
    (fake / functional tensors); dynamo (torch.compile, strict export) and torch.jit.trace (legacy
    ONNX export) say so. There the layer is one plain conv call, so captured graphs hold an
    ordinary convolution whatever the measured dispatch would pick. (Cheapest checks first: this
    runs on every eager call.)"""
    return type(x) is not torch.Tensor or _jit_tracing() or _is_compiling() or _is_exporting()


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution layer: an `nn.Conv2d(in, out, 1, stride, groups=groups, bias=bias)`.

    It is a subclass of `nn.Conv2d`, so its state_dict (`weight` of shape (out, in/groups, 1, 1),
    `bias` (out,)), initialisation and attributes are nn.Conv2d's, and tools that look for
    nn.Conv2d (fusers, quantizers, profilers, timm/torchvision utilities) see it. Weights move
    between it, `nn.Conv2d` and torchvision/timm checkpoints unchanged.

    In eager mode an ungrouped, unstrided call goes through `pointwise_conv2d`'s measured kernel
    dispatch; under TorchScript, torch.fx tracing, torch.jit.trace, torch.export and torch.compile
    it is exactly nn.Conv2d's forward (same results), so it scripts, traces and exports as one.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, bias: bool = True):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"PointwiseConv: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        super().__init__(in_channels, out_channels, 1, stride, 0, 1, groups, bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(input, self.weight, self.bias)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.groups == 1 and self.stride == (1, 1) and not _plain_conv_wanted(input):
            return pointwise_conv2d(input, self.weight, self.bias)  # the measured dispatch
        return self._conv_forward(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        stride = self.stride[0] if self.stride[0] == self.stride[1] else self.stride
        s = f"{self.in_channels}, {self.out_channels}, stride={stride}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}"
