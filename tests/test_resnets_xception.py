"""ResNet, SE-ResNet and Xception families: exact sizes, costs, weight interop, and every option."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import models
from models import convert_state_dict, create_model, list_models, profile
from models.layers import BasicBlock, Bottleneck, DepthwiseSeparableConv
from models.pointwise import PointwiseConv
from models.resnet import ResNet

MODELS = [
    "resnet50",
    "se_resnet50",
    "xception",
    "resnet20",
    "resnet56",
    "resnet38_bottleneck",
    "se_resnet20",
    "xception_small",
]
MODES = ["separable", "full", "pointwise_kxk"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny at test sizes: one thread is as fast, and on a shared, busy machine
    it avoids OpenMP threads waiting on each other (which made this file 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | PointwiseConv)]


def test_registered_with_references():
    assert set(MODELS) <= set(list_models())
    assert models.REFERENCES["resnet50"] == {"torchvision": "resnet50", "timm": "resnet50"}
    assert models.REFERENCES["se_resnet50"] == {"timm": "seresnet50"}
    assert models.REFERENCES["xception"] == {"timm": "legacy_xception"}
    for name in ["resnet20", "resnet56", "resnet38_bottleneck", "se_resnet20", "xception_small"]:
        assert models.REFERENCES[name] == {}


# name: (reference, exact params, published mult-adds, input side)
# - resnet50: torchvision's docs, 4.09 GFLOPS (counted as mult-adds, fc included).
# - se_resnet50: timm's benchmark tables list 4.1 GMACs for seresnet50 at 224; Hu et al. (Table 2)
#   count +0.26% for SE over ResNet-50 (3.86 -> 3.87 GFLOPs in their count).
# - xception: 8.36 G at 299 as counted for timm's legacy_xception (the test also asserts our count
#   equals the reference's exactly); Chollet 2017 gives the parameter count (22,855,952, Table 3)
#   but no mult-adds.
# FlopCounterMode also counts the classifier (2.05 M mult-adds, 0.05%); 3% still catches a wrong
# stage or a missing stride (either changes the count by far more).
IMAGENET = {
    "resnet50": (lambda: torchvision.models.get_model("resnet50"), 25_557_032, 4.09e9, 224),
    "se_resnet50": (lambda: timm.create_model("seresnet50", pretrained=False), 28_088_024, 4.09e9, 224),
    "xception": (lambda: timm.create_model("legacy_xception", pretrained=False), 22_855_952, 8.36e9, 299),
}


@pytest.mark.parametrize("name", list(IMAGENET))
def test_imagenet_params_and_macs_match_reference(name):
    make_ref, params, published_macs, side = IMAGENET[name]
    with torch.device("meta"):  # shapes only: FlopCounterMode counts meta tensors too
        ours = create_model(name, num_classes=1000, stem="imagenet")
        ref = make_ref()
    size = (1, 3, side, side)
    got, theirs = profile(ours, size), profile(ref, size)
    assert got["params"] == theirs["params"] == params
    assert got["macs"] == theirs["macs"]  # the same layers, stride for stride
    assert abs(got["macs"] - published_macs) / published_macs < 0.03


def test_se_overhead_is_small():
    with torch.device("meta"):
        plain = profile(create_model("resnet50", num_classes=1000, stem="imagenet"), (1, 3, 224, 224))
        se = profile(create_model("se_resnet50", num_classes=1000, stem="imagenet"), (1, 3, 224, 224))
    assert 0 < se["macs"] / plain["macs"] - 1 < 0.005  # Hu et al.: +0.26%
    assert se["params"] - plain["params"] == 2_530_992  # 10% more params, all in the SE fc layers


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Random BN affine and running stats, so a wrong pairing of weights shows in the outputs.

    (timm zero-initialises the last BN of each residual branch, which would hide a wrong branch.)
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) * 0.5 + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean = torch.randn(c, generator=gen) * 0.1
            m.running_var = torch.rand(c, generator=gen) + 0.5


INTEROP = [
    ("resnet50", "torchvision", lambda: torchvision.models.get_model("resnet50", weights=None), 64),
    ("resnet50", "timm", lambda: timm.create_model("resnet50", pretrained=False), 64),
    ("se_resnet50", "timm", lambda: timm.create_model("seresnet50", pretrained=False), 64),
    # 64x64 still leaves xception's unpadded stem and four max-pools a 2x2 map
    ("xception", "timm", lambda: timm.create_model("legacy_xception", pretrained=False), 64),
]


@pytest.mark.parametrize("name,source,make_ref,side", INTEROP, ids=[f"{n}-{s}" for n, s, _, _ in INTEROP])
def test_reference_weights_give_same_outputs(name, source, make_ref, side):
    torch.manual_seed(0)
    ref = make_ref()
    _randomise_bn(ref)
    ref.eval()
    ours = create_model(name, num_classes=1000, stem="imagenet")
    ours.load_state_dict(convert_state_dict(name, ref.state_dict(), source), strict=True)
    ours.eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert expected.abs().max() > 1e-2  # a meaningful comparison, not two near-zero outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_conversion_rejects_the_wrong_architecture():
    with torch.device("meta"):
        plain = timm.create_model("resnet50", pretrained=False).state_dict()
    with pytest.raises(ValueError, match="not the same architecture"):
        convert_state_dict("se_resnet50", plain, "timm")
    with pytest.raises(ValueError, match="no torchvision twin"):
        convert_state_dict("xception", plain, "torchvision")


# CIFAR stem, 10 classes.
CIFAR_PARAMS = {
    "resnet20": 272_474,  # option B projections where the shape changes (the CIFAR model repos' count)
    "resnet56": 855_770,
    "resnet38_bottleneck": 405_850,  # counted by hand: 464 stem + 18,560 + 77,568 + 306,688 + 2,570 fc
    "se_resnet20": 281_354,  # resnet20 + 3 x (280 + 552 + 2,128) SE units at 8/8/16 reduced channels
    "resnet50": 23_520_842,  # kuangliu/pytorch-cifar's ResNet50 (3x3 stem, 10 classes)
    "se_resnet50": 26_051_834,
    "xception": 20_827_442,  # 22,855,952 less the 1000-class classifier, plus a 10-class one
    "xception_small": 1_748_922,  # our design: 3.5 MB as fp16
}


@pytest.mark.parametrize("name", MODELS)
def test_cifar_param_counts(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=10, stem="cifar")
    assert sum(p.numel() for p in model.parameters()) == CIFAR_PARAMS[name]


@pytest.mark.parametrize("name,params", [("resnet20", 269_722), ("resnet56", 853_018)])
def test_cifar_resnets_with_pad_shortcuts(name, params):
    # He et al. 2016 Table 6 (0.27M, 0.85M): option A shortcuts have no parameters, so the
    # projections' 512 + 64 and 2,048 + 128 params go.
    with torch.device("meta"):
        model = create_model(name, num_classes=10, stem="cifar", shortcut="pad")
    assert sum(p.numel() for p in model.parameters()) == params


def _depth(model: nn.Module) -> int:
    """Weighted layers on the main path: convs outside the shortcuts, plus the classifier."""
    shortcut_convs = {id(c) for m in model.modules() if hasattr(m, "shortcut") for c in _convs(m.shortcut)}
    return sum(id(c) not in shortcut_convs for c in _convs(model)) + 1


@pytest.mark.parametrize(
    "name,depth", [("resnet20", 20), ("resnet56", 56), ("resnet38_bottleneck", 38), ("resnet50", 50), ("se_resnet20", 20)]
)
def test_resnet_depths(name, depth):
    with torch.device("meta"):
        model = create_model(name)
    # SE's two pointwise convs are not counted as layers (Hu et al. call SE-ResNet-50 50 layers)
    se_convs = sum(len(_convs(m)) for m in model.modules() if isinstance(m, models.layers.SqueezeExcite))
    assert _depth(model) - se_convs == depth


def test_bottleneck_cifar_design_matches_resnet164():
    # He et al. 2016b ("Identity mappings", Table 2): the 9n+2 bottleneck design at n=18 is
    # ResNet-164 with 1.7M params; resnet38_bottleneck is the same design at n=4.
    with torch.device("meta"):
        model = ResNet(Bottleneck, (18, 18, 18), (16, 32, 64), 16, "projection")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 1.7
    assert _depth(model) == 164


# final feature map: (stem, input side) -> side
FEATURE_SIDE = {
    "resnet50": {"cifar": 4, "imagenet": 7},
    "se_resnet50": {"cifar": 4, "imagenet": 7},
    "xception": {"cifar": 4, "imagenet": 10},  # imagenet side: 299
    "xception_small": {"cifar": 4, "imagenet": 10},
    "resnet20": {"cifar": 8, "imagenet": 14},  # the paper's CIFAR ResNets end at 8x8
    "resnet56": {"cifar": 8, "imagenet": 14},
    "resnet38_bottleneck": {"cifar": 8, "imagenet": 14},
    "se_resnet20": {"cifar": 8, "imagenet": 14},
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_feature_map_sizes(name, stem):
    side = 32 if stem == "cifar" else (299 if "xception" in name else 224)
    with torch.device("meta"):
        model = create_model(name, num_classes=10, stem=stem)
        features = model.forward_features(torch.empty(1, 3, side, side))
    assert features.shape[-2:] == (FEATURE_SIDE[name][stem],) * 2
    assert features.shape[1] == model.num_features


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_forward_backward_channels_last(name, mode, stem):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, stem=stem, width=0.25, conv_mode=mode).eval()  # eval: no dropout
    x = torch.randn(2, 3, 32, 32)  # the imagenet stems still leave a 1x1 map at 32x32
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 7)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), y, atol=1e-4, rtol=1e-4)
    y_cl = model.train()(x.to(memory_format=torch.channels_last))
    assert y_cl.shape == (2, 7)
    y_cl.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("width", [0.5, 1.0])
def test_widths_forward_backward(name, width):
    model = create_model(name, num_classes=10, stem="cifar", width=width)
    y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_width_scales_channels_by_multiples_of_8():
    for name in MODELS:
        with torch.device("meta"):
            half = create_model(name, width=0.5)
            full = create_model(name, width=1.0)
        assert half.num_features % 8 == 0
        assert half.num_features == math.ceil(full.num_features / 2 / 8) * 8


@pytest.mark.parametrize("name", MODELS)
def test_conv_mode_reaches_every_block(name):
    with torch.device("meta"):
        built = {mode: create_model(name, conv_mode=mode) for mode in MODES}
    params = {mode: sum(p.numel() for p in m.parameters()) for mode, m in built.items()}
    pointwise = [m for m in built["separable"].modules() if isinstance(m, PointwiseConv)]
    # no pointwise conv survives pointwise_kxk (SE and shortcuts included)
    assert not any(isinstance(m, PointwiseConv) for m in built["pointwise_kxk"].modules())
    if pointwise:
        assert params["pointwise_kxk"] > params["separable"]
    else:
        raise AssertionError(f"{name} has no pointwise conv")
    depthwise = [c for c in _convs(built["separable"]) if c.groups > 1]
    if "xception" in name:
        assert depthwise  # separable as published...
        assert all(c.groups == 1 for c in _convs(built["full"]))  # ...and each pair merged under "full"
        assert params["full"] > params["separable"]
    else:  # ResNets have no separable pairs
        assert not depthwise and params["full"] == params["separable"]


@pytest.mark.parametrize("name", ["resnet50", "se_resnet50", "resnet20", "resnet38_bottleneck", "se_resnet20"])
def test_zero_init_residual(name):
    def last_bn_weights(model):
        for m in model.modules():
            if isinstance(m, Bottleneck):
                yield m.conv_pwl.bn.weight
            elif isinstance(m, BasicBlock):
                yield m.conv2.bn.weight

    width = 0.25
    assert all((w == 1).all() for w in last_bn_weights(create_model(name, width=width)))
    zeroed = create_model(name, width=width, zero_init_residual=True)
    weights = list(last_bn_weights(zeroed))
    assert weights and all((w == 0).all() for w in weights)


def test_zero_init_residual_makes_blocks_identity():
    model = create_model("resnet20", zero_init_residual=True).eval()
    block = model.blocks[0][1]  # 16 -> 16, stride 1, identity shortcut
    x = torch.randn(2, 16, 8, 8).relu()
    torch.testing.assert_close(block(x), x)


def test_kaiming_fan_out_init():
    torch.manual_seed(0)
    model = create_model("resnet56")
    conv = model.blocks[2][3].conv1.conv  # 64 -> 64, 3x3
    expected = math.sqrt(2 / (64 * 9))
    assert abs(conv.weight.std().item() / expected - 1) < 0.05
    pw = create_model("xception_small").blocks[4].convs[1].conv_pw.conv  # 256 -> 256 pointwise
    assert isinstance(pw, PointwiseConv)
    assert abs(pw.weight.std().item() / math.sqrt(2 / 256) - 1) < 0.05


def test_separable_conv_without_dw_norm():
    plain = DepthwiseSeparableConv(8, 16)
    assert isinstance(plain.conv_dw.bn, nn.BatchNorm2d)  # the default is unchanged (MobileNet)
    xc = DepthwiseSeparableConv(8, 16, act_layer=None, dw_norm=False)
    assert isinstance(xc.conv_dw.bn, nn.Identity) and xc.conv_dw.conv.bias is None
    assert isinstance(xc.conv_dw.act, nn.Identity) and isinstance(xc.conv_pw.act, nn.Identity)
    assert isinstance(xc.conv_pw.bn, nn.BatchNorm2d)


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown option"):
        create_model("xception", zero_init_residual=True)
    with pytest.raises(ValueError, match="unknown option"):
        create_model("resnet50", shortcut="pad")
    with pytest.raises(ValueError, match="unknown shortcut"):
        create_model("resnet20", shortcut="nope")
    assert create_model("xception").dropout.p == 0.5  # Chollet 2017, Sec. 4.3
    assert create_model("xception_small", drop_rate=0.0).dropout.p == 0.0
