"""MobileNetV1 (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications", arXiv:1704.04861).

A 3x3 stem conv, then 13 depthwise-separable blocks (3x3 depthwise, then the pointwise 1x1 that
does all the channel mixing and ~95% of the mult-adds, paper Table 2), global average pool and one
fully connected layer. No residuals, no head conv.

Reference: timm `mobilenetv1_100` (4,231,976 params), whose weights load onto this model as is.
Like timm and the authors' TF-slim release, the activation is ReLU6 (the paper's text says ReLU;
ReLU6 is what the released network was trained with).

stem="cifar": the stem conv has stride 1 and every block keeps its stride (as in the widely used
kuangliu/pytorch-cifar MobileNet), so 32x32 -> 2x2 before pooling.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn

from ._base import ClassifierMixin
from .layers import ConvMode, ConvNormAct, make_divisible, separable_chain
from .registry import register_model

__all__ = ["MobileNetV1"]

# (output channels, stride) of each depthwise-separable block, paper Table 1.
BLOCKS = [
    (64, 1),
    (128, 2), (128, 1),
    (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
]


class MobileNetV1(ClassifierMixin, nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        conv_mode: ConvMode | str = "separable",
        dropout: float = 0.0,
        act_layer=nn.ReLU6,
        in_chans: int = 3,
    ):
        super().__init__()
        conv_mode = ConvMode.of(conv_mode)
        ch = partial(make_divisible, divisor=8)  # the width multiplier alpha scales every layer
        in_chs = ch(32 * width)
        self.stem = ConvNormAct(in_chans, in_chs, 3, stride=2 if stem == "imagenet" else 1, act_layer=act_layer)
        blocks = []
        for out, stride in BLOCKS:
            out_chs = ch(out * width)
            blocks.append(conv_mode.separable_block(in_chs, out_chs, 3, stride, act_layer=act_layer))
            in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.num_features = in_chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_chs, num_classes)
        self.reset_parameters()
        self._init_classifier_api(num_classes, stem, in_chans, first_conv="stem.conv")

    def reset_parameters(self) -> None:
        # timm's TF-style init for this model: convs normal(0, sqrt(2 / fan_out)) with fan_out
        # counted per group, the classifier uniform(+-1/sqrt(num_classes)), zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.weight[0, 0].numel() * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.blocks(self.stem(x))
        return self._eager_features(x)

    @torch.jit.unused
    def _eager_features(self, x: torch.Tensor) -> torch.Tensor:
        # the same layers; each pointwise's norm + act inside the next depthwise conv's kernel when training on CPU
        return separable_chain([self.stem, *self.blocks], x)


@register_model(references={"timm": "mobilenetv1_100"})
def mobilenet_v1(num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), dropout=0.0, in_chans=3):
    """MobileNetV1 1.0-224 (4.2 M params, 569 M mult-adds at 224, paper Table 8)."""
    return MobileNetV1(num_classes, stem, width, conv_mode, dropout, in_chans=in_chans)
