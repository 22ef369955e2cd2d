"""Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions",
arXiv:1610.02357, Fig. 5): 36 convolutions, all but the two stem convs depthwise separable, in
residual blocks -- an entry flow that downsamples, a middle flow repeated 8 times at 728 channels,
and an exit flow.

Each separable conv is a 3x3 depthwise conv followed directly by a pointwise conv (no norm or
activation between them, unlike MobileNet), then BN. Inside a block a ReLU comes *before* each
separable conv; a strided block downsamples with a 3x3 max-pool and its shortcut is a strided
pointwise conv + BN. The layout and registration order follow timm's `legacy_xception` (the Keras
port), whose weights pair up with ours: in each block the shortcut is registered before the convs.

Stems. "imagenet": the paper's 299x299 network (stride-2 then stride-1 unpadded 3x3 convs; 10x10
final map at 299). "cifar": both stem convs stride 1 and padded, and the first entry-flow block
does not downsample, so a 32x32 image ends at 4x4 (overall stride 8, as ResNet-50 on CIFAR).

xception_small is our CIFAR-sized member (not from the paper): 16/32 stem, entry flow to
64/128/256, 4 middle-flow blocks at 256, exit flow 384 -> 512 -> 512; 1.75M params (10 classes),
so its fp16 weights are about 3.5 MB, and 144M mult-adds on a 32x32 image.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._base import ClassifierMixin
from .layers import init_weights, ConvMode, ConvNormAct, linear_residual_end, make_divisible, separable_chain
from .pool import max_pool2d
from .registry import register_model

__all__ = ["Xception", "XceptionBlock"]

# stem widths; blocks as (out channels, separable convs, stride, grow_first); the exit-flow head's
# two separable convs (each followed by BN and ReLU).
CONFIGS = {
    "xception": {
        "stem": (32, 64),
        "blocks": [(128, 2, 2, True), (256, 2, 2, True), (728, 2, 2, True)]  # entry flow
        + [(728, 3, 1, True)] * 8  # middle flow
        + [(1024, 2, 2, False)],  # exit flow: 728 -> 728 -> 1024
        "head": (1536, 2048),
    },
    "xception_small": {
        "stem": (16, 32),
        "blocks": [(64, 2, 2, True), (128, 2, 2, True), (256, 2, 2, True)]
        + [(256, 3, 1, True)] * 4
        + [(384, 2, 2, False)],
        "head": (512, 512),
    },
}


class XceptionBlock(nn.Module):
    """`reps` units of (ReLU, separable conv, BN), a max-pool when strided, and a shortcut.

    The channel change happens in the first unit (`grow_first`, entry flow) or in the last (exit
    flow). The first block of the network has no leading ReLU (`start_with_act=False`): its input
    has just been through one in the stem.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        reps: int,
        stride: int = 1,
        start_with_act: bool = True,
        grow_first: bool = True,
        norm_layer=nn.BatchNorm2d,
        act_layer=nn.ReLU,
        conv_mode: ConvMode | str = "separable",
    ):
        super().__init__()
        conv_mode = ConvMode.of(conv_mode)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = ConvNormAct(in_chs, out_chs, 1, stride, norm_layer=norm_layer, act_layer=None, conv_mode=conv_mode)
        else:
            self.shortcut = nn.Identity()
        chs = [in_chs] + ([out_chs] * reps if grow_first else [in_chs] * (reps - 1) + [out_chs])
        units = []
        for i in range(reps):
            # Unit i is (ReLU, separable conv + BN), and the ReLU opening unit i+1 is computed by
            # unit i's norm layer instead: its ConvNormAct then runs BN and ReLU as one kernel when
            # training (models/norm_act.py), one pass less over the map each way. Same function, and
            # the same state_dict keys, since a ReLU holds no weights: its slot stays, as an Identity.
            # The block's first ReLU stays a layer (not in place: the shortcut still needs the input); when
            # training under bf16 autocast it runs inside the first unit's depthwise kernel (models/layers.py).
            units.append(act_layer() if i == 0 and start_with_act else nn.Identity())
            act_after = act_layer if i < reps - 1 else None  # the last unit's BN feeds the sum
            units.append(
                conv_mode.separable_block(
                    chs[i], chs[i + 1], 3, norm_layer=norm_layer, act_layer=act_after, dw_norm=False, dw_act=False
                )
            )
        self.convs = nn.Sequential(*units)
        self.pool = nn.MaxPool2d(3, stride, 1) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.pool(self.convs(x)) + self.shortcut(x)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same units, and the same sum; when training on CPU each unit's norm + ReLU runs inside the next
        # unit's depthwise kernel, the pool on the zoo's max-pool kernel (models/pool.py), and the sum inside
        # the norm before it: the last unit's (an identity shortcut) or the shortcut's.
        if type(self.shortcut) is nn.Identity and type(self.pool) is nn.Identity:
            return separable_chain(list(self.convs), x, residual=x)
        pooled = max_pool2d(separable_chain(list(self.convs), x), self.pool)
        return linear_residual_end(self.shortcut, x, pooled) if type(self.shortcut) is ConvNormAct else pooled + self.shortcut(x)


class Xception(ClassifierMixin, nn.Module):
    def __init__(
        self,
        cfg: dict,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        conv_mode: ConvMode | str = "separable",
        drop_rate: float = 0.0,
        norm_layer=nn.BatchNorm2d,
        act_layer=nn.ReLU,
        in_chans: int = 3,
    ):
        super().__init__()
        conv_mode = ConvMode.of(conv_mode)
        ch = lambda c: make_divisible(c * width, 8)  # noqa: E731
        cifar = stem == "cifar"
        stem1, stem2 = ch(cfg["stem"][0]), ch(cfg["stem"][1])
        pad = 1 if cifar else 0  # the paper's stem convs are unpadded (299 -> 149 -> 147)
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, stem1, 3, 1 if cifar else 2, padding=pad, norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(stem1, stem2, 3, 1, padding=pad, norm_layer=norm_layer, act_layer=act_layer),
        )

        # blocks[:3] entry flow, then the middle flow, and the exit-flow block
        in_chs, blocks = stem2, []
        for i, (out_chs, reps, stride, grow_first) in enumerate(cfg["blocks"]):
            if cifar and i == 0:
                stride = 1  # keep 32x32 at full resolution through the first block
            blocks.append(
                XceptionBlock(
                    in_chs, ch(out_chs), reps, stride, start_with_act=i > 0, grow_first=grow_first,
                    norm_layer=norm_layer, act_layer=act_layer, conv_mode=conv_mode,
                )
            )
            in_chs = ch(out_chs)
        self.blocks = nn.Sequential(*blocks)

        head = []  # the exit flow ends with two separable convs, each followed by BN and ReLU
        for out_chs in cfg["head"]:
            head.append(
                conv_mode.separable_block(
                    in_chs, ch(out_chs), 3, norm_layer=norm_layer, act_layer=act_layer, dw_norm=False, dw_act=False
                )
            )
            in_chs = ch(out_chs)
        self.head = nn.Sequential(*head)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_chs
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(in_chs, num_classes)

        init_weights(self, linear_std=None)  # as timm's legacy_xception: nn.Linear's default for the classifier
        # the paper's 299x299 input; resize and crop as timm's legacy_xception
        self._init_classifier_api(
            num_classes, stem, in_chans, first_conv="stem.0.conv",
            imagenet_input_size=299, imagenet_crop_pct=0.8975, imagenet_interpolation="bicubic",
        )  # fmt: skip

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model(references={"timm": "legacy_xception"})
def xception(num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), drop_rate=0.5, in_chans=3):
    # Chollet 2017, Sec. 4.3: dropout 0.5 before the logistic regression layer on ImageNet.
    return Xception(CONFIGS["xception"], num_classes, stem, width, conv_mode, drop_rate, in_chans=in_chans)


@register_model
def xception_small(num_classes=10, stem="cifar", width=1.0, conv_mode=ConvMode("separable"), drop_rate=0.2, in_chans=3):
    # a lighter dropout than the paper's 0.5 for the 10x smaller network (our choice, untuned)
    return Xception(CONFIGS["xception_small"], num_classes, stem, width, conv_mode, drop_rate, in_chans=in_chans)
