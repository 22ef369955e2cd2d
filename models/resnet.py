"""ResNets and SE-ResNets.

- He et al. 2016, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385): ResNet-50
  (Table 1) and the CIFAR ResNets of Section 4.2 -- 6n+2 layers, 3 stages of n basic blocks at
  16/32/64 channels: ResNet-20 (n=3) and ResNet-56 (n=9). By default the two shortcuts that change
  shape are option B projections (a strided pointwise conv + BN): 272,474 and 855,770 params with
  10 classes, the counts the CIFAR model repos publish (e.g. chenyaofo/pytorch-cifar-models).
  `shortcut="pad"` gives the paper's option A (subsample + zero-pad, no parameters): 269,722 and
  853,018.
- He et al. 2016, "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027): the CIFAR
  bottleneck design, 9n+2 layers with 3x3 widths 16/32/64 and outputs 4x that. Our
  resnet38_bottleneck (n=4) keeps the original post-activation block of the first paper.
- Hu et al. 2018, "Squeeze-and-Excitation Networks" (arXiv:1709.01507): SE on each block's residual
  branch, before the addition.

The pointwise convs are the bottleneck's reduce/expand pair and the projection shortcuts; a
ResNet-20 with `shortcut="pad"` has none, so the conv_mode ablation leaves it unchanged.

resnet50 follows torchvision's "v1.5" (the stride sits on the 3x3 conv, not on the first 1x1 as in
the paper); its weights and timm's pair up with ours in order (see `convert_state_dict`).

Stems. "imagenet": 7x7 stride-2 conv and a 3x3 stride-2 max-pool at the stem width. "cifar": one
3x3 stride-1 conv, no max-pool (as in the CIFAR section of the paper, and kuangliu/pytorch-cifar
for ResNet-50), so 32x32 inputs end at 4x4 for resnet50 / se_resnet50 and at 8x8 (as in the paper)
for the three-stage CIFAR ResNets.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ._base import ClassifierMixin
from .layers import init_weights, BasicBlock, Bottleneck, ConvMode, ConvNormAct, SqueezeExcite, make_divisible
from .registry import register_model

__all__ = ["ResNet"]

# (block, blocks per stage, 3x3 width per stage, stem width, shortcut)
# A bottleneck stage outputs 4x its 3x3 width; the first stage keeps the resolution, the others halve it.
CONFIGS = {
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 64, "projection"),
    "resnet20": (BasicBlock, (3, 3, 3), (16, 32, 64), 16, "pad"),
    "resnet56": (BasicBlock, (9, 9, 9), (16, 32, 64), 16, "pad"),
    "resnet38_bottleneck": (Bottleneck, (4, 4, 4), (16, 32, 64), 16, "projection"),
}


class ResNet(ClassifierMixin, nn.Module):
    def __init__(
        self,
        block: type[nn.Module],
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        stem_chs: int,
        shortcut: str = "projection",
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        conv_mode: ConvMode = ConvMode("separable"),
        se_layer=None,
        zero_init_residual: bool = False,
        norm_layer=nn.BatchNorm2d,
        act_layer=nn.ReLU,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        stem_chs = make_divisible(stem_chs * width, 8)
        if stem == "imagenet":
            self.stem = nn.Sequential(
                ConvNormAct(in_chans, stem_chs, 7, 2, norm_layer=norm_layer, act_layer=act_layer),
                nn.MaxPool2d(3, 2, 1),
            )
        else:  # a 32x32 image is too small to downsample 4x before the first block
            self.stem = nn.Sequential(ConvNormAct(in_chans, stem_chs, 3, 1, norm_layer=norm_layer, act_layer=act_layer))

        layer = partial(
            block, se_layer=se_layer, norm_layer=norm_layer, act_layer=act_layer, shortcut=shortcut, conv_mode=conv_mode
        )
        in_chs, stages = stem_chs, []
        for i, (depth, w) in enumerate(zip(depths, widths)):
            mid_chs = make_divisible(w * width, 8)
            out_chs = mid_chs * block.expansion
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                if block is Bottleneck:
                    blocks.append(layer(in_chs, mid_chs, out_chs, stride))
                else:
                    blocks.append(layer(in_chs, out_chs, stride))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_chs
        self.dropout = nn.Dropout(drop_rate)  # none by default, as in the papers
        self.classifier = nn.Linear(in_chs, num_classes)
        self._init_weights(zero_init_residual)
        self._init_classifier_api(num_classes, stem, in_chans, first_conv="stem.0.conv")

    def _init_weights(self, zero_init_residual: bool) -> None:
        # As torchvision (and He et al. 2015 "Delving deep"); the classifier keeps nn.Linear's default.
        init_weights(self, linear_std=None)
        if zero_init_residual:  # each residual branch starts as zero, so each block as identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.conv_pwl.bn.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.conv2.bn.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def _resnet(name: str, se_layer=None, shortcut: str | None = None, **kwargs) -> ResNet:
    block, depths, widths, stem_chs, default_shortcut = CONFIGS[name]
    return ResNet(block, depths, widths, stem_chs, shortcut or default_shortcut, se_layer=se_layer, **kwargs)


@register_model(references={"torchvision": "resnet50", "timm": "resnet50"})
def resnet50(num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), zero_init_residual=False, drop_rate=0.0, in_chans=3):
    return _resnet(
        "resnet50", num_classes=num_classes, stem=stem, width=width, conv_mode=conv_mode,
        zero_init_residual=zero_init_residual, drop_rate=drop_rate, in_chans=in_chans,
    )


@register_model(references={"timm": "seresnet50"})
def se_resnet50(num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), zero_init_residual=False, drop_rate=0.0, in_chans=3):
    # Hu et al.'s reduction ratio r=16 (rounded to a multiple of 8, as timm's seresnet50).
    se_layer = partial(SqueezeExcite, rd_ratio=1 / 16, rd_divisor=8, conv_mode=conv_mode)
    return _resnet(
        "resnet50", se_layer=se_layer, num_classes=num_classes, stem=stem, width=width, conv_mode=conv_mode,
        zero_init_residual=zero_init_residual, drop_rate=drop_rate, in_chans=in_chans,
    )


@register_model
def resnet20(
    num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), zero_init_residual=False, shortcut="projection",
    drop_rate=0.0, in_chans=3,
):
    return _resnet(
        "resnet20", num_classes=num_classes, stem=stem, width=width, conv_mode=conv_mode,
        zero_init_residual=zero_init_residual, shortcut=shortcut, drop_rate=drop_rate, in_chans=in_chans,
    )


@register_model
def resnet56(
    num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), zero_init_residual=False, shortcut="projection",
    drop_rate=0.0, in_chans=3,
):
    return _resnet(
        "resnet56", num_classes=num_classes, stem=stem, width=width, conv_mode=conv_mode,
        zero_init_residual=zero_init_residual, shortcut=shortcut, drop_rate=drop_rate, in_chans=in_chans,
    )


@register_model
def resnet38_bottleneck(
    num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), zero_init_residual=False, drop_rate=0.0, in_chans=3
):
    return _resnet(
        "resnet38_bottleneck", num_classes=num_classes, stem=stem, width=width, conv_mode=conv_mode,
        zero_init_residual=zero_init_residual, drop_rate=drop_rate, in_chans=in_chans,
    )


@register_model
def se_resnet20(
    num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), zero_init_residual=False, shortcut="projection",
    drop_rate=0.0, in_chans=3,
):
    # Hu et al.'s r=16 would squeeze 16/32/64 channels to 1/2/4 units; we use r=4 (as MobileNetV3's
    # SE) rounded to multiples of 8: 8/8/16 units.
    se_layer = partial(SqueezeExcite, rd_ratio=1 / 4, rd_divisor=8, conv_mode=conv_mode)
    return _resnet(
        "resnet20", se_layer=se_layer, num_classes=num_classes, stem=stem, width=width, conv_mode=conv_mode,
        zero_init_residual=zero_init_residual, shortcut=shortcut, drop_rate=drop_rate, in_chans=in_chans,
    )
