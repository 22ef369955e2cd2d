"""MobileNetV3-Large and -Small (Howard et al. 2019, "Searching for MobileNetV3", arXiv:1905.02244).

MobileNetV2's inverted residual blocks, found by architecture search: 3x3 or 5x5 depthwise convs,
squeeze-and-excitation in some blocks (reduce to expanded/4, ReLU, hard-sigmoid gate), ReLU early
and hard-swish later. The head is efficient (paper Sec. 5.3): a 1x1 conv to 6x the last block's
channels, global pool, then a fully connected layer with hard-swish (no norm), dropout and the
classifier. BatchNorm with eps 1e-3 and momentum 0.01, as in the TF release.

Reference: torchvision `mobilenet_v3_large` (5,483,032 params) and `mobilenet_v3_small`
(2,542,856); their weights load onto these models as is.

stem="cifar": the stem conv and the first stride-2 block keep stride 1, so 32x32 -> 4x4 before
pooling (as for MobileNetV2).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ._base import ClassifierMixin
from .layers import init_weights, ConvMode, ConvNormAct, SqueezeExcite, make_divisible
from .registry import register_model

__all__ = ["MobileNetV3"]

RE, HS = nn.ReLU, nn.Hardswish

# (kernel, expanded channels, output channels, SE, activation, stride), paper Tables 1 and 2.
LARGE = [
    (3, 16, 16, False, RE, 1),
    (3, 64, 24, False, RE, 2),
    (3, 72, 24, False, RE, 1),
    (5, 72, 40, True, RE, 2),
    (5, 120, 40, True, RE, 1),
    (5, 120, 40, True, RE, 1),
    (3, 240, 80, False, HS, 2),
    (3, 200, 80, False, HS, 1),
    (3, 184, 80, False, HS, 1),
    (3, 184, 80, False, HS, 1),
    (3, 480, 112, True, HS, 1),
    (3, 672, 112, True, HS, 1),
    (5, 672, 160, True, HS, 2),
    (5, 960, 160, True, HS, 1),
    (5, 960, 160, True, HS, 1),
]
SMALL = [
    (3, 16, 16, True, RE, 2),
    (3, 72, 24, False, RE, 2),
    (3, 88, 24, False, RE, 1),
    (5, 96, 40, True, HS, 2),
    (5, 240, 40, True, HS, 1),
    (5, 240, 40, True, HS, 1),
    (5, 120, 48, True, HS, 1),
    (5, 144, 48, True, HS, 1),
    (5, 288, 96, True, HS, 2),
    (5, 576, 96, True, HS, 1),
    (5, 576, 96, True, HS, 1),
]


class MobileNetV3(ClassifierMixin, nn.Module):
    def __init__(
        self,
        config: list[tuple],
        last_channels: int,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        conv_mode: ConvMode | str = "separable",
        dropout: float = 0.2,
        in_chans: int = 3,
    ):
        super().__init__()
        conv_mode = ConvMode.of(conv_mode)
        ch = partial(make_divisible, divisor=8)  # width scales every layer, the head included
        norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
        # Squeeze to expanded/4 (expanded channels are multiples of 8, so this is torchvision's
        # make_divisible(expanded // 4, 8)); the SE convs are pointwise and follow conv_mode.
        se_layer = partial(
            SqueezeExcite, rd_ratio=0.25, act_layer=nn.ReLU, gate_layer=nn.Hardsigmoid, conv_mode=conv_mode
        )

        in_chs = ch(16 * width)
        self.stem = ConvNormAct(in_chans, in_chs, 3, stride=2 if stem == "imagenet" else 1, norm_layer=norm, act_layer=HS)
        blocks, first_stride2 = [], True
        for k, exp, out, use_se, act, s in config:
            if stem == "cifar" and s == 2 and first_stride2:  # keep 32x32 a while longer
                s, first_stride2 = 1, False
            blocks.append(
                conv_mode.inverted_residual(
                    in_chs, ch(out * width), ch(exp * width), k, s,
                    se_layer=se_layer if use_se else None, norm_layer=norm, act_layer=act,
                )
            )
            in_chs = ch(out * width)
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvNormAct(in_chs, 6 * in_chs, 1, norm_layer=norm, act_layer=HS, conv_mode=conv_mode)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # After pooling: the paper's "conv2d 1x1, NBN" to 1280 (1024 for Small), a Linear on 1x1 maps.
        self.num_features = ch(last_channels * width)
        self.head_fc = nn.Linear(6 * in_chs, self.num_features)
        self.head_act = HS()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.reset_parameters()
        self._init_classifier_api(num_classes, stem, in_chans, first_conv="stem.conv")

    def reset_parameters(self) -> None:
        init_weights(self, linear_std=0.01)  # as torchvision: classifier normal(0, 0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def _pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        # the efficient last stage: pooled features -> fully connected + hard-swish (num_features wide)
        return self.head_act(self.head_fc(x))


@register_model(references={"torchvision": "mobilenet_v3_large"})
def mobilenet_v3_large(num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), dropout=0.2, in_chans=3):
    """MobileNetV3-Large 1.0 (5.5 M params, 217 M mult-adds at 224)."""
    return MobileNetV3(LARGE, 1280, num_classes, stem, width, conv_mode, dropout, in_chans=in_chans)


@register_model(references={"torchvision": "mobilenet_v3_small"})
def mobilenet_v3_small(num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), dropout=0.2, in_chans=3):
    """MobileNetV3-Small 1.0 (2.5 M params, 57 M mult-adds at 224)."""
    return MobileNetV3(SMALL, 1024, num_classes, stem, width, conv_mode, dropout, in_chans=in_chans)
