"""MobileNet V1/V2/V3: exact parameter counts and weight interop against torchvision/timm,
mult-adds against the papers, CIFAR variants, and every conv_mode / stem / width working."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import models
from models import create_model, profile

# name -> (params at stem="imagenet", 1000 classes; published mult-adds at 224; where that figure is from)
IMAGENET = {
    "mobilenet_v1": (4_231_976, 569e6, "Howard et al. 2017, Table 8 (1.0 MobileNet-224)"),
    "mobilenet_v2": (3_504_872, 300e6, "Sandler et al. 2018, Table 4"),
    "mobilenet_v3_large": (5_483_032, 217e6, "Howard et al. 2019; torchvision weights meta _ops 0.217"),
    "mobilenet_v3_small": (2_542_856, 57e6, "Howard et al. 2019; torchvision weights meta _ops 0.057"),
}
# (our name, source, reference name): every twin whose weights must load and agree.
TWINS = [
    ("mobilenet_v1", "timm", "mobilenetv1_100"),
    ("mobilenet_v2", "torchvision", "mobilenet_v2"),
    ("mobilenet_v2", "timm", "mobilenetv2_100"),
    ("mobilenet_v3_large", "torchvision", "mobilenet_v3_large"),
    ("mobilenet_v3_small", "torchvision", "mobilenet_v3_small"),
]
NAMES = list(IMAGENET)
MODES = ["separable", "full", "pointwise_kxk"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reference(source: str, name: str, **kwargs) -> nn.Module:
    if source == "timm":
        return timm.create_model(name, pretrained=False, **kwargs)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def test_registered_with_references():
    assert set(NAMES) <= set(models.list_models())
    for name, source, ref in TWINS:
        assert models.REFERENCES[name][source] == ref
    assert models.REFERENCES["mobilenet_v1"] == {"timm": "mobilenetv1_100"}


@pytest.mark.parametrize("name", NAMES)
def test_imagenet_params_and_macs(name):
    params, published_macs, _source = IMAGENET[name]
    for _, source, ref in [t for t in TWINS if t[0] == name]:
        assert n_params(reference(source, ref)) == params
    with torch.device("meta"):  # shapes only: FlopCounterMode counts on meta tensors for free
        model = create_model(name, num_classes=1000, stem="imagenet")
    cost = profile(model, (1, 3, 224, 224))
    assert cost["params"] == params
    # FlopCounterMode counts convs and Linears (classifier included, as the papers do; SE's two
    # tiny pointwise convs included); elementwise ops are not counted by either.
    assert abs(cost["macs"] - published_macs) / published_macs < 0.03, cost


def _randomise(model: nn.Module) -> None:
    """Give every BN layer its own affine and running statistics, so the eval-mode output depends
    on each of them (and on eps), and lift the logits to O(1) (the references initialise Linears at
    std 0.01, which would make a 1e-5 tolerance toothless). The statistics are calibrated on a
    batch, then perturbed: purely random ones make a deep net so ill-conditioned that fp32
    rounding differences between conv kernels grow past any useful tolerance."""
    g = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features**-0.5)
    for m in bns:
        m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        m.reset_running_stats()
        m.momentum, m.saved_momentum = None, m.momentum  # None: running stats = this batch's
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 96, 96, generator=g))
    for m in bns:
        m.momentum = m.saved_momentum
        del m.saved_momentum
        std = m.running_var.sqrt()
        m.running_mean.add_(0.1 * std * torch.randn(std.shape, generator=g))
        m.running_var.mul_(torch.rand(std.shape, generator=g) * 0.4 + 0.8)


@pytest.mark.parametrize("name,source,ref_name", TWINS)
def test_interop(name, source, ref_name):
    torch.manual_seed(0)
    ref = reference(source, ref_name)
    _randomise(ref)
    ref.eval()
    model = create_model(name, num_classes=1000, stem="imagenet")
    model.load_state_dict(models.convert_state_dict(name, ref.state_dict(), source), strict=True)
    model.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected, got = ref(x), model(x)
        assert expected.abs().max() > 0.5  # the comparisons below have teeth
        # float32: our matmul-based pointwise convs round differently from the conv kernels, and
        # the reference's own fp32 output is only ~1e-5 from its fp64 one at this scale.
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        # float64: same architecture and same weights give the same function, to 1e-5 (measured ~1e-13).
        torch.testing.assert_close(model.double()(x.double()), ref.double()(x.double()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,source,ref_name,width",
    [
        ("mobilenet_v1", "timm", "mobilenetv1_125", 1.25),
        ("mobilenet_v2", "torchvision", "mobilenet_v2", 0.5),  # head stays 1280
        ("mobilenet_v2", "torchvision", "mobilenet_v2", 1.4),  # head grows to 1792
        ("mobilenet_v3_large", "torchvision", "mobilenet_v3_large", 0.75),  # head scales too
        ("mobilenet_v3_small", "torchvision", "mobilenet_v3_small", 0.5),
    ],
)
def test_width_follows_reference(name, source, ref_name, width):
    kwargs = {"width_mult": width} if source == "torchvision" else {}
    expected = n_params(reference(source, ref_name, **kwargs))
    with torch.device("meta"):
        assert n_params(create_model(name, num_classes=1000, stem="imagenet", width=width)) == expected


# CIFAR variants, 10 classes: params and the spatial size before pooling.
CIFAR = {
    # chenyaofo/pytorch-cifar-models mobilenetv2_x1_0 (torchvision layout, stem and 24-channel stage at stride 1).
    "mobilenet_v2": (2_236_682, 4),
    # kuangliu/pytorch-cifar MobileNet has this exact layout (stem at stride 1); count computed from it.
    "mobilenet_v1": (3_217_226, 2),
    # No published CIFAR counts for V3: the ImageNet count minus the classifier difference.
    "mobilenet_v3_large": (5_483_032 - 1281 * 990, 4),
    "mobilenet_v3_small": (2_542_856 - 1025 * 990, 4),
}


@pytest.mark.parametrize("name", NAMES)
def test_cifar(name):
    params, final_size = CIFAR[name]
    model = create_model(name, num_classes=10, stem="cifar").eval()
    assert n_params(model) == params
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape[-2:] == (final_size, final_size)
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_every_conv_mode_trains(name, mode):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, stem="cifar", width=0.25, conv_mode=mode)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the switch changed the model (except where it leaves a layer alone)
    if mode != "separable":
        with torch.device("meta"):
            base = create_model(name, num_classes=7, stem="cifar", width=0.25)
        assert n_params(model) > n_params(base)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("width", [0.5, 1.0])
@pytest.mark.parametrize("name", NAMES)
def test_stems_and_widths(name, stem, width):
    model = create_model(name, num_classes=3, stem=stem, width=width).eval()
    size = 32 if stem == "cifar" else 64
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3)


def test_v1_full_conv_matches_mobilenets_table4():
    # MobileNets paper Table 4, "Conv MobileNet" (every depthwise-separable pair a dense 3x3
    # conv): 29.3 M params, 4866 M mult-adds. Counting convs + the FC layer reproduces both.
    with torch.device("meta"):
        model = create_model("mobilenet_v1", num_classes=1000, stem="imagenet", conv_mode="full")
    cost = profile(model, (1, 3, 224, 224))
    assert abs(cost["params"] - 29.3e6) / 29.3e6 < 0.01, cost
    assert abs(cost["macs"] - 4866e6) / 4866e6 < 0.01, cost


def test_dropout_option():
    assert create_model("mobilenet_v1").dropout.p == 0.0  # timm's default
    for name in ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]:
        assert create_model(name).dropout.p == 0.2  # torchvision's default
    assert create_model("mobilenet_v2", dropout=0.5).dropout.p == 0.5
