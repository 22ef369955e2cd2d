"""Building blocks of the zoo, each composed from the pointwise primitive.

Norm, activation and attention layers are injected (as in timm): `norm_layer` and `act_layer`
are module classes or partials called with no channel argument for activations and with the
channel count for norms; `se_layer` is a callable `se_layer(channels) -> nn.Module`, so SE can
be added to any block. Parts are named for what they are: `conv_pw` (pointwise expand/reduce),
`conv_dw` (depthwise), `se`, `conv_pwl` (linear pointwise projection).

`ConvMode` is the ablation switch (see docs/ablation.md): it decides how every pointwise conv is
built and whether a depthwise-separable pair stays a pair. That choice is made once, when the
network is built: `conv_mode.separable_block(...)` and `conv_mode.inverted_residual(...)` return
the separable block or its merged counterpart (`DenseConv`, `DenseProjResidual`), separate classes
as timm's `EdgeResidual` is from its `InvertedResidual`, so no block's forward branches on the mode.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .depthwise import depthwise_conv2d
from .norm_act import FUSED_ACTIVATIONS, batch_norm_act, batch_norm_add_act
from .norm_act_depthwise import act_depthwise, norm_act_depthwise
from .pointwise import PointwiseConv

LayerFactory = Callable[..., nn.Module]

__all__ = [
    "make_divisible",
    "init_weights",
    "ConvMode",
    "ConvNormAct",
    "DepthwiseConv",
    "DepthwiseSeparableConv",
    "DenseConv",
    "InvertedResidual",
    "DenseProjResidual",
    "SqueezeExcite",
    "BasicBlock",
    "Bottleneck",
]


def _hooked(module: nn.Module) -> bool:
    """True when hooks watch `module`'s own calls (a path that skips the call would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


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

    def separable_block(
        self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, *,
        pw_act: bool = True, dw_act: bool = True, dw_norm: bool = True, **layers,
    ) -> nn.Module:  # fmt: skip
        """A `DepthwiseSeparableConv`, or under ``full`` the `DenseConv` that replaces the pair.

        `layers` (`se_layer`, `norm_layer`, `act_layer`) go to either block. The merged conv keeps
        the pair's output activation (`pw_act`); `dw_act` and `dw_norm` describe the depthwise
        half, which it does not have.
        """
        if self.merges_separable:
            if not pw_act:
                layers["act_layer"] = None
            return DenseConv(in_chs, out_chs, kernel_size, stride, **layers)
        return DepthwiseSeparableConv(
            in_chs, out_chs, kernel_size, stride, dw_act=dw_act, pw_act=pw_act, conv_mode=self, dw_norm=dw_norm, **layers
        )

    def inverted_residual(self, *args, **kwargs) -> nn.Module:
        """`InvertedResidual(*args, **kwargs)`, or under ``full`` the `DenseProjResidual` (same
        arguments) whose dense conv replaces the depthwise + projection pair."""
        block = DenseProjResidual if self.merges_separable else InvertedResidual
        return block(*args, conv_mode=self, **kwargs)

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
        if torch.jit.is_scripting():
            return self.act(self.bn(self.conv(x)))
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_act(self.conv(x), self.bn, self.act)  # act(bn(conv(x))), one kernel when training on CPU


class DepthwiseConv(ConvNormAct):
    """A k x k convolution with one filter per channel (groups == channels), then norm and act."""

    def __init__(self, chs: int, kernel_size: int = 3, stride: int = 1, **kwargs):
        super().__init__(chs, chs, kernel_size, stride, groups=chs, **kwargs)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        # the conv on the zoo's C kernels when training on CPU (models/depthwise.py), then as ConvNormAct
        return batch_norm_act(depthwise_conv2d(x, self.conv), self.bn, self.act)


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

    `pw_act=False` leaves the pointwise output linear; `dw_norm=False` (with `dw_act=False`) leaves
    nothing between depthwise and pointwise, as in Xception's separable convs -- the depthwise conv
    then has no bias either, since the norm after the pointwise conv absorbs it. Under
    ``conv_mode="full"`` the pair is a `DenseConv` instead: build through
    `ConvMode.separable_block`.
    """

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
        conv_mode = _unmerged(conv_mode, type(self).__name__, "separable_block")
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
            in_chs, out_chs, 1, norm_layer=norm_layer, act_layer=act_layer if pw_act else None, conv_mode=conv_mode
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.se(self.conv_dw(x)))


def separable_chain(layers: list[nn.Module], x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`x` through `layers` in order, as nn.Sequential runs them; where one ends in a `ConvNormAct`
    (itself, or a `DepthwiseSeparableConv`'s pointwise) and the next is a `DepthwiseSeparableConv`,
    the first's norm + act run inside the second's depthwise conv kernel when training on CPU
    (models/norm_act_depthwise.py), as in an inverted residual: MobileNetV1's stem and blocks, the
    units of an Xception block. An activation layer right before a `DepthwiseSeparableConv` (an
    Xception block's opening ReLU) runs inside its depthwise conv the same way. Identity layers
    (Xception's ReLU slots) pass through. With `residual`, returns `residual + chain(x)`, the sum in
    the last norm's kernel where the chain ends in a linear `ConvNormAct` (`linear_residual_end`)."""
    layers = [m for m in layers if type(m) is not nn.Identity or _hooked(m)]
    pre, pending = None, None  # `pending`'s conv has run (giving `pre`); its norm + act wait for the next layer
    for i, layer in enumerate(layers):
        following = layers[i + 1] if i + 1 < len(layers) else None
        if pending is not None:  # `layer` is a DepthwiseSeparableConv: checked before deferring
            dw = layer.conv_dw
            if type(pending) is ConvNormAct:
                h = norm_act_depthwise(pre, pending.bn, pending.act, dw.conv)
            else:  # an activation layer
                h = act_depthwise(x, pending, dw.conv)
            last, h = layer.conv_pw, layer.se(batch_norm_act(h, dw.bn, dw.act))
        elif type(layer) is DepthwiseSeparableConv and not _hooked(layer):
            last, h = layer.conv_pw, layer.se(layer.conv_dw(x))
        elif type(layer) is ConvNormAct:
            last, h = layer, x
        else:
            deferred = type(layer) in FUSED_ACTIVATIONS and not _hooked(layer) and _plain_separable(following)
            x, pending = (x, layer) if deferred else (layer(x), None)
            continue
        if type(last) is ConvNormAct and not _hooked(last) and _plain_separable(following):
            pre, pending = last.conv(h), last
        elif residual is not None and following is None:
            return linear_residual_end(last, h, residual)
        else:
            x, pending = last(h), None
    return x if residual is None else residual + x


def _plain_separable(layer: nn.Module | None) -> bool:
    """A `DepthwiseSeparableConv` whose depthwise conv can take the layer before's norm + act (or act)."""
    return (type(layer) is DepthwiseSeparableConv and type(layer.conv_dw) is DepthwiseConv
            and not (_hooked(layer) or _hooked(layer.conv_dw)))


class DenseConv(nn.Module):
    """Dense k x k conv, norm, act, then optional SE: a depthwise-separable pair merged into the
    standard convolution it factorises (MobileNets, Howard et al. 2017, Table 4: "Conv MobileNet").

    Same channels, stride and output activation as the pair it stands in for; the depthwise norm
    and activation have nothing left to act on, so they go. SE gates the output (`out_chs`).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        se_layer: Callable[[int], nn.Module] | None = None,
        norm_layer: LayerFactory | None = nn.BatchNorm2d,
        act_layer: LayerFactory | None = nn.ReLU,
    ):
        super().__init__()
        self.conv = ConvNormAct(in_chs, out_chs, kernel_size, stride, norm_layer=norm_layer, act_layer=act_layer)
        self.se = se_layer(out_chs) if se_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))


class _ExpandResidual(nn.Module):
    """What `InvertedResidual` and `DenseProjResidual` share, so that `ConvMode.inverted_residual`
    can build either from the same arguments: the pointwise expand (skipped when `mid_chs ==
    in_chs`, as in MobileNetV2's first block) and the residual (stride 1 and matching channels).
    A subclass builds the rest in `_build` and reads top to bottom in its own `forward`."""

    __constants__ = ["has_skip"]  # a constant to TorchScript: only the branch that exists is compiled

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
        if mid_chs == in_chs:
            self.conv_pw = nn.Identity()
        else:
            self.conv_pw = ConvNormAct(in_chs, mid_chs, 1, norm_layer=norm_layer, act_layer=act_layer, conv_mode=conv_mode)
        self._build(mid_chs, out_chs, kernel_size, stride, se_layer, norm_layer, act_layer, conv_mode)

    def _build(self, mid_chs, out_chs, kernel_size, stride, se_layer, norm_layer, act_layer, conv_mode: ConvMode) -> None:
        raise NotImplementedError


class InvertedResidual(_ExpandResidual):
    """MobileNetV2/V3 block: pointwise expand, depthwise k x k, optional SE, linear pointwise project,
    residual (arguments: `_ExpandResidual`).

    Under ``conv_mode="full"`` the block is a `DenseProjResidual` instead: build through
    `ConvMode.inverted_residual`.
    """

    def _build(self, mid_chs, out_chs, kernel_size, stride, se_layer, norm_layer, act_layer, conv_mode: ConvMode) -> None:
        conv_mode = _unmerged(conv_mode, type(self).__name__, "inverted_residual")
        self.conv_dw = DepthwiseConv(mid_chs, kernel_size, stride, norm_layer=norm_layer, act_layer=act_layer)
        self.se = se_layer(mid_chs) if se_layer else nn.Identity()
        self.conv_pwl = ConvNormAct(mid_chs, out_chs, 1, norm_layer=norm_layer, act_layer=None, conv_mode=conv_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            y = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
            return x + y if self.has_skip else y
        h = self.se(self._expand_depthwise(x))
        return linear_residual_end(self.conv_pwl, h, x) if self.has_skip else self.conv_pwl(h)

    @torch.jit.unused
    def _expand_depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """conv_dw(conv_pw(x)), with the expand's norm + act inside the depthwise conv's kernel when
        training on CPU (models/norm_act_depthwise.py): the expanded map is the block's largest."""
        pw, dw = self.conv_pw, self.conv_dw
        if type(pw) is not ConvNormAct or type(dw) is not DepthwiseConv or _hooked(pw) or _hooked(dw):
            return dw(pw(x))  # no expand (the first block), other layers, or someone watches them: call them
        h = norm_act_depthwise(pw.conv(x), pw.bn, pw.act, dw.conv)
        return batch_norm_act(h, dw.bn, dw.act)


class DenseProjResidual(_ExpandResidual):
    """Pointwise expand, optional SE, dense k x k linear projection (mid -> out), residual: an
    `InvertedResidual` whose depthwise + projection pair is merged into one dense conv (MobileNets,
    Howard et al. 2017, Table 4, applied to the MobileNetV2 block; arguments: `_ExpandResidual`).

    SE gates the expanded features right before the dense conv, so it keeps its size (`mid_chs`).
    """

    def _build(self, mid_chs, out_chs, kernel_size, stride, se_layer, norm_layer, act_layer, conv_mode: ConvMode) -> None:
        self.se = se_layer(mid_chs) if se_layer else nn.Identity()
        self.conv = ConvNormAct(mid_chs, out_chs, kernel_size, stride, norm_layer=norm_layer, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.se(self.conv_pw(x))
        if not self.has_skip:
            return self.conv(h)
        if torch.jit.is_scripting():
            return x + self.conv(h)
        return linear_residual_end(self.conv, h, x)


def _unmerged(conv_mode: ConvMode | str, block: str, factory: str) -> ConvMode:
    # A separable block asked for "full" would quietly stay separable: the merge is a different class.
    conv_mode = ConvMode.of(conv_mode)
    if conv_mode.merges_separable:
        raise ValueError(f"{block} is the separable block; for conv_mode={conv_mode.name!r} use conv_mode.{factory}(...)")
    return conv_mode


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


@torch.jit.unused
def residual_end(block: nn.Module, last: nn.Module, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ResNet block's end, `block.act(block.se(last(h)) + block.shortcut(x))`. Without SE, `last`'s
    norm, the sum and the activation are one kernel when training on CPU (models/norm_act.py,
    `batch_norm_add_act`); a hooked layer is called as itself."""
    if (type(last) is ConvNormAct and type(last.act) is nn.Identity and type(block.se) is nn.Identity
            and not (_hooked(last) or _hooked(last.act) or _hooked(block.se))):
        return batch_norm_add_act(last.conv(h), last.bn, block.shortcut(x), block.act)
    return block.act(block.se(last(h)) + block.shortcut(x))


@torch.jit.unused
def linear_residual_end(last: nn.Module, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An inverted residual's end, `x + last(h)` with `last` a linear conv + norm: the norm and the sum
    are one kernel when training on CPU (models/norm_act.py, `batch_norm_add_act` with no
    activation); a hooked layer is called as itself."""
    if type(last) is ConvNormAct and type(last.act) is nn.Identity and not (_hooked(last) or _hooked(last.act)):
        return batch_norm_add_act(last.conv(h), last.bn, x, last.act)
    return x + last(h)


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
        if torch.jit.is_scripting():
            return self.act(self.se(self.conv2(self.conv1(x))) + self.shortcut(x))
        return residual_end(self, self.conv2, self.conv1(x), x)


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
        if torch.jit.is_scripting():
            return self.act(self.se(self.conv_pwl(self.conv_kxk(self.conv_pw(x)))) + self.shortcut(x))
        return residual_end(self, self.conv_pwl, self.conv_kxk(self.conv_pw(x)), x)
