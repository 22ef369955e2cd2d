"""The pointwise (1x1) convolution: the primitive every block in the zoo is built from.

A 1x1 convolution mixes channels and leaves space alone. For input x of shape (N, C_in, H, W)
and weight W of shape (C_out, C_in):

    y[n, o, h, w] = b[o] + sum_i W[o, i] * x[n, i, h, w]

so it is one matrix multiply per image: Y_n = W @ X_n with X_n the (C_in, H*W) view of image n.
Whether it runs as that matrix multiply, as F.linear or as the backend's conv is decided per call
by the measured rules in `models.kernels`; `models.kernels.plain()` turns them off.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Which kernel computes the conv is hardware-specific and lives in `kernels` (with its switch).
from .kernels import STRATEGIES, choose, plain_conv_wanted

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
            strategy = choose(input, weight, xs)
            if strategy == "conv":  # the usual pick (and the only one with kernels off): one Python frame fewer
                return F.conv2d(input, weight, bias)
            return STRATEGIES[strategy](input, weight, bias)
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
    return STRATEGIES[choose(input, weight, input.shape)](input, weight, bias)


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
        if self.groups == 1 and self.stride == (1, 1) and not plain_conv_wanted(input):
            return pointwise_conv2d(input, self.weight, self.bias)  # the measured dispatch
        return self._conv_forward(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        stride = self.stride[0] if self.stride[0] == self.stride[1] else self.stride
        s = f"{self.in_channels}, {self.out_channels}, stride={stride}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}"
