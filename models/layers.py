"""Building blocks of the zoo, each composed from the pointwise primitive.

Norm, activation and attention layers are injected (as in timm): `norm_layer` and `act_layer`
are module classes or partials called with no channel argument for activations and with the
channel count for norms; `se_layer` is a callable `se_layer(channels) -> nn.Module`, so SE can
be added to any block. Parts are named for what they are: `conv_pw` (pointwise expand/reduce),
`conv_dw` (depthwise), `se`, `conv_pwl` (linear pointwise projection).

`ConvMode` is the ablation switch (see docs/ablation.md): it decides how every pointwise conv is
built and whether a depthwise-separable pair stays a pair.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pointwise import PointwiseConv

LayerFactory = Callable[..., nn.Module]

__all__ = [
    "make_divisible",
    "init_weights",
    "ConvMode",
    "ConvNormAct",
    "DepthwiseConv",
    "DepthwiseSeparableConv",
    "InvertedResidual",
    "SqueezeExcite",
    "BasicBlock",
    "Bottleneck",
]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping more than 10% (MobileNet rule)."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


class ConvMode:
    """The ablation switch: how pointwise convs and depthwise-separable pairs are built.

    - ``separable``: the network as published.
    - ``full``: each depthwise-separable pair (k x k depthwise, then pointwise) becomes one dense
      k x k convolution with the same channels and stride (MobileNets paper, Table 4).
    - ``pointwise_kxk``: every pointwise 1x1 convolution becomes a dense k x k convolution
      (``pointwise_kernel_size``, 3 by default), to show what the 1x1 buys.
    """

    MODES = ("separable", "full", "pointwise_kxk")

    def __init__(self, name: str = "separable", pointwise_kernel_size: int = 3):
        if name not in self.MODES:
            raise ValueError(f"unknown conv_mode {name!r}; valid conv_mode values: {', '.join(self.MODES)}")
        if pointwise_kernel_size < 1 or pointwise_kernel_size % 2 == 0:
            raise ValueError(f"pointwise_kernel_size must be odd and >= 1, got {pointwise_kernel_size}")
        self.name = name
        self.pointwise_kernel_size = pointwise_kernel_size

    @classmethod
    def of(cls, value: "ConvMode | str") -> "ConvMode":
        return value if isinstance(value, ConvMode) else cls(value)

    @property
    def merges_separable(self) -> bool:
        """True when a depthwise + pointwise pair is built as one dense conv."""
        return self.name == "full"

    def pointwise(self, in_chs: int, out_chs: int, stride: int = 1, bias: bool = False) -> nn.Module:
        """A pointwise conv, or its dense k x k stand-in under ``pointwise_kxk``."""
        if self.name == "pointwise_kxk":
            k = self.pointwise_kernel_size
            return nn.Conv2d(in_chs, out_chs, k, stride, padding=k // 2, bias=bias)
        return PointwiseConv(in_chs, out_chs, stride, bias=bias)

    def __repr__(self) -> str:
        extra = f", pointwise_kernel_size={self.pointwise_kernel_size}" if self.name == "pointwise_kxk" else ""
        return f"ConvMode({self.name!r}{extra})"


def init_weights(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """The reference initialisation of torchvision's CNNs: convs kaiming normal (fan_out) with zero
    bias, norms 1/0, and Linear layers normal(0, `linear_std`) with zero bias (None keeps
    nn.Linear's default, as torchvision's ResNets and timm's Xception do)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


def _act(act_layer: LayerFactory | None) -> nn.Module:
    return act_layer() if act_layer is not None else nn.Identity()


class ConvNormAct(nn.Module):
    """Convolution, then norm, then activation. A 1x1 ungrouped conv is a `PointwiseConv`."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory | None = nn.ReLU,
        conv_mode: ConvMode | str = "separable",
        padding: int | None = None,
        bias: bool | None = None,
    ):
        super().__init__()
        if bias is None:
            bias = norm_layer is None  # a norm right after the conv makes a conv bias redundant
        if kernel_size == 1 and groups == 1:
            self.conv = ConvMode.of(conv_mode).pointwise(in_chs, out_chs, stride, bias=bias)
        else:
            padding = kernel_size // 2 if padding is None else padding
            self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)
        self.bn = norm_layer(out_chs) if norm_layer is not None else nn.Identity()
        self.act = _act(act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseConv(ConvNormAct):
    """A k x k convolution with one filter per channel (groups == channels), then norm and act."""

    def __init__(self, chs: int, kernel_size: int = 3, stride: int = 1, **kwargs):
        super().__init__(chs, chs, kernel_size, stride, groups=chs, **kwargs)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global pool, pointwise reduce, act, pointwise expand, gate.

    The two pointwise convs act on a 1x1 map, so they are the fully connected layers of the paper.
    """

    def __init__(
        self,
        chs: int,
        rd_chs: int | None = None,
        rd_ratio: float = 0.25,
        rd_divisor: int = 8,
        act_layer: LayerFactory = nn.ReLU,
        gate_layer: LayerFactory = nn.Sigmoid,
        norm_layer: LayerFactory | None = None,
        conv_mode: ConvMode | str = "separable",
    ):
        super().__init__()
        conv_mode = ConvMode.of(conv_mode)
        rd_chs = rd_chs or make_divisible(chs * rd_ratio, rd_divisor)
        self.conv_reduce = conv_mode.pointwise(chs, rd_chs, bias=True)
        self.bn = norm_layer(rd_chs) if norm_layer is not None else nn.Identity()
        self.act = act_layer()
        self.conv_expand = conv_mode.pointwise(rd_chs, chs, bias=True)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.conv_expand(self.act(self.bn(self.conv_reduce(scale))))
        return x * self.gate(scale)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise k x k conv, optional SE, then pointwise conv (MobileNetV1, Xception).

    Under ``conv_mode="full"`` the pair is one dense k x k conv with the same channels and stride.
    `pw_act=False` leaves the pointwise output linear; `dw_norm=False` (with `dw_act=False`) leaves
    nothing between depthwise and pointwise, as in Xception's separable convs -- the depthwise conv
    then has no bias either, since the norm after the pointwise conv absorbs it.
    """

    __constants__ = ["merged"]  # a constant to TorchScript: only the branch that exists is compiled

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        se_layer: Callable[[int], nn.Module] | None = None,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory | None = nn.ReLU,
        dw_act: bool = True,
        pw_act: bool = True,
        conv_mode: ConvMode | str = "separable",
        dw_norm: bool = True,
    ):
        super().__init__()
        conv_mode = ConvMode.of(conv_mode)
        self.merged = conv_mode.merges_separable
        pw_act_layer = act_layer if pw_act else None
        if self.merged:
            self.conv = ConvNormAct(in_chs, out_chs, kernel_size, stride, norm_layer=norm_layer, act_layer=pw_act_layer)
            self.se = se_layer(out_chs) if se_layer else nn.Identity()
        else:
            self.conv_dw = DepthwiseConv(
                in_chs,
                kernel_size,
                stride,
                norm_layer=norm_layer if dw_norm else None,
                act_layer=act_layer if dw_act else None,
                bias=False if not dw_norm else None,
            )
            self.se = se_layer(in_chs) if se_layer else nn.Identity()
            self.conv_pw = ConvNormAct(
                in_chs, out_chs, 1, norm_layer=norm_layer, act_layer=pw_act_layer, conv_mode=conv_mode
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.se(self.conv(x))
        return self.conv_pw(self.se(self.conv_dw(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: pointwise expand, depthwise k x k, optional SE, linear pointwise project.

    The expand conv is skipped when `mid_chs == in_chs`; the residual is added when stride is 1 and
    the channels match. Under ``conv_mode="full"`` the depthwise + projection pair becomes one dense
    k x k conv (mid -> out); SE, if any, then gates the expanded features before it, keeping its size.
    """

    __constants__ = ["has_skip", "merged"]  # constants to TorchScript: only the branch that exists is compiled

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        mid_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        se_layer: Callable[[int], nn.Module] | None = None,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory | None = nn.ReLU6,
        conv_mode: ConvMode | str = "separable",
    ):
        super().__init__()
        conv_mode = ConvMode.of(conv_mode)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.merged = conv_mode.merges_separable
        if mid_chs != in_chs:
            self.conv_pw = ConvNormAct(in_chs, mid_chs, 1, norm_layer=norm_layer, act_layer=act_layer, conv_mode=conv_mode)
        else:
            self.conv_pw = nn.Identity()
        if self.merged:
            self.se = se_layer(mid_chs) if se_layer else nn.Identity()
            self.conv = ConvNormAct(mid_chs, out_chs, kernel_size, stride, norm_layer=norm_layer, act_layer=None)
        else:
            self.conv_dw = DepthwiseConv(mid_chs, kernel_size, stride, norm_layer=norm_layer, act_layer=act_layer)
            self.se = se_layer(mid_chs) if se_layer else nn.Identity()
            self.conv_pwl = ConvNormAct(mid_chs, out_chs, 1, norm_layer=norm_layer, act_layer=None, conv_mode=conv_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_pw(x)
        if self.merged:
            y = self.conv(self.se(y))
        else:
            y = self.conv_pwl(self.se(self.conv_dw(y)))
        return x + y if self.has_skip else y


class _PadChannelsShortcut(nn.Module):
    """He et al.'s option A for CIFAR ResNets: subsample and zero-pad the channels, no parameters."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def _shortcut(in_chs, out_chs, stride, kind, norm_layer, conv_mode) -> nn.Module:
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    if kind == "pad":
        return _PadChannelsShortcut(in_chs, out_chs, stride)
    if kind == "projection":  # option B: a strided pointwise conv and a norm
        return ConvNormAct(in_chs, out_chs, 1, stride, norm_layer=norm_layer, act_layer=None, conv_mode=conv_mode)
    raise ValueError(f"unknown shortcut {kind!r}; valid: 'projection', 'pad'")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a shortcut (He et al. 2016)."""

    expansion = 1

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        se_layer: Callable[[int], nn.Module] | None = None,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        shortcut: str = "projection",
        conv_mode: ConvMode | str = "separable",
    ):
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, out_chs, 3, stride, norm_layer=norm_layer, act_layer=act_layer)
        self.conv2 = ConvNormAct(out_chs, out_chs, 3, norm_layer=norm_layer, act_layer=None)
        self.se = se_layer(out_chs) if se_layer else nn.Identity()
        self.shortcut = _shortcut(in_chs, out_chs, stride, shortcut, norm_layer, conv_mode)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.conv2(self.conv1(x))) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck: pointwise reduce, 3x3 (carries the stride), linear pointwise expand, SE, shortcut.

    `out_chs` is the block's output width (4x the 3x3 width in ResNet-50).
    """

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        out_chs: int,
        stride: int = 1,
        se_layer: Callable[[int], nn.Module] | None = None,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
        shortcut: str = "projection",
        conv_mode: ConvMode | str = "separable",
    ):
        super().__init__()
        self.conv_pw = ConvNormAct(in_chs, mid_chs, 1, norm_layer=norm_layer, act_layer=act_layer, conv_mode=conv_mode)
        self.conv_kxk = ConvNormAct(mid_chs, mid_chs, 3, stride, norm_layer=norm_layer, act_layer=act_layer)
        self.conv_pwl = ConvNormAct(mid_chs, out_chs, 1, norm_layer=norm_layer, act_layer=None, conv_mode=conv_mode)
        self.se = se_layer(out_chs) if se_layer else nn.Identity()
        self.shortcut = _shortcut(in_chs, out_chs, stride, shortcut, norm_layer, conv_mode)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.conv_pwl(self.conv_kxk(self.conv_pw(x))))
        return self.act(y + self.shortcut(x))
