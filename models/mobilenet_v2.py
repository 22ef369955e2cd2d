"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
arXiv:1801.04381).

A 3x3 stem conv, 17 inverted residual blocks (pointwise expand by t, 3x3 depthwise, *linear*
pointwise projection; a residual between the thin ends when shapes allow), a 1x1 head conv to 1280
channels, global average pool, dropout and the classifier. Activation ReLU6.

Reference: torchvision `mobilenet_v2` (3,504,872 params) and timm `mobilenetv2_100`; both sets of
weights load onto this model as is.

stem="cifar": the stem conv and the first stride-2 stage (24 channels) keep stride 1, so
32x32 -> 4x4 before pooling (chenyaofo/pytorch-cifar-models; 2,236,682 params for 10 classes).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ._base import ClassifierMixin
from .layers import init_weights, ConvMode, ConvNormAct, make_divisible
from .registry import register_model

__all__ = ["MobileNetV2"]

# (expansion t, output channels c, repeats n, stride s of the first block), paper Table 2.
STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV2(ClassifierMixin, nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        conv_mode: ConvMode | str = "separable",
        dropout: float = 0.2,
        in_chans: int = 3,
    ):
        super().__init__()
        conv_mode = ConvMode.of(conv_mode)
        ch = partial(make_divisible, divisor=8)
        act = nn.ReLU6
        in_chs = ch(32 * width)
        self.stem = ConvNormAct(in_chans, in_chs, 3, stride=2 if stem == "imagenet" else 1, act_layer=act)
        blocks, first_stride2 = [], True
        for t, c, n, s in STAGES:
            if stem == "cifar" and s == 2 and first_stride2:  # keep 32x32 a while longer
                s, first_stride2 = 1, False
            out_chs = ch(c * width)
            for i in range(n):
                mid_chs = int(round(in_chs * t))
                stride = s if i == 0 else 1
                blocks.append(conv_mode.inverted_residual(in_chs, out_chs, mid_chs, 3, stride, act_layer=act))
                in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        # The head is never thinned below 1280 (the paper: width < 1 keeps the last layer).
        self.num_features = ch(1280 * max(1.0, width))
        self.head = ConvNormAct(in_chs, self.num_features, 1, act_layer=act, conv_mode=conv_mode)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.reset_parameters()
        self._init_classifier_api(num_classes, stem, in_chans, first_conv="stem.conv")

    def reset_parameters(self) -> None:
        init_weights(self, linear_std=0.01)  # as torchvision: classifier normal(0, 0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model(references={"torchvision": "mobilenet_v2", "timm": "mobilenetv2_100"})
def mobilenet_v2(num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), dropout=0.2, in_chans=3):
    """MobileNetV2 1.0-224 (3.5 M params, 300 M mult-adds at 224, paper Table 4)."""
    return MobileNetV2(num_classes, stem, width, conv_mode, dropout, in_chans=in_chans)
