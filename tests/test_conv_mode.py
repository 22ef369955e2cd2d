"""The ablation switch on every family: shapes unchanged, parameter changes equal to the formula.

- "full": each depthwise k x k + pointwise pair -> one dense k x k conv (C_in*C_out*k^2 weights),
  losing the depthwise conv (and its norm) and the pointwise weights.
- "pointwise_kxk": each pointwise conv's C_in*C_out weights become C_in*C_out*k^2.
"""

import pytest
import torch
import torch.nn as nn

from models import ConvMode, PointwiseConv, create_model, list_models
from models.layers import DenseConv, DenseProjResidual, DepthwiseSeparableConv, InvertedResidual

# At least one model of every family; CIFAR stem, width 0.5 keeps it cheap.
FAMILIES = [m for m in ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "xception_small", "resnet20",
                        "resnet38_bottleneck", "se_resnet20", "se_resnet50"] if m in list_models()]  # fmt: skip


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name, mode, **kw):
    torch.manual_seed(0)
    return create_model(name, width=0.5, conv_mode=mode, **kw)


def separable_pairs(model):
    """(depthwise part, pointwise conv) of every depthwise-separable pair in a separable model."""
    for m in model.modules():
        if isinstance(m, DepthwiseSeparableConv):
            yield m.conv_dw, m.conv_pw.conv
        elif isinstance(m, InvertedResidual):
            yield m.conv_dw, m.conv_pwl.conv


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("k", [3, 5])
def test_pointwise_kxk_multiplies_pointwise_weights_by_k_squared(name, k):
    sep = build(name, "separable")
    kxk = build(name, "pointwise_kxk", pointwise_kernel_size=k)
    pointwise = [m for m in sep.modules() if isinstance(m, PointwiseConv)]
    assert pointwise, f"{name} has no pointwise convs"
    extra = sum((k * k - 1) * m.weight.numel() for m in pointwise)
    assert n_params(kxk) == n_params(sep) + extra
    assert not any(isinstance(m, PointwiseConv) for m in kxk.modules())
    dense = [m for m in kxk.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (k, k) and m.groups == 1]
    assert len(dense) >= len(pointwise)
    x = torch.randn(2, 3, 32, 32)
    assert kxk(x).shape == sep(x).shape == (2, 10)


@pytest.mark.parametrize("name", FAMILIES)
def test_full_replaces_each_separable_pair_by_a_dense_conv(name):
    sep = build(name, "separable")
    full = build(name, "full")
    pairs = list(separable_pairs(sep))
    delta = 0
    for dw, pw in pairs:
        k = dw.conv.kernel_size[0]
        delta += pw.in_channels * pw.out_channels * k * k - n_params(dw) - pw.weight.numel()
    assert n_params(full) == n_params(sep) + delta
    if not pairs:  # ResNets: nothing separable, nothing changes
        assert n_params(full) == n_params(sep)
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in full.modules()), "a depthwise conv survived"
    x = torch.randn(2, 3, 32, 32)
    assert full(x).shape == (2, 10)


def test_mobilenet_v1_block_by_hand():
    # Block 1 of MobileNetV1 at width 1, CIFAR stem: 64 -> 128 channels, 3x3, stride 2.
    c_in, c_out = 64, 128
    sep = create_model("mobilenet_v1").blocks[1]
    full = create_model("mobilenet_v1", conv_mode="full").blocks[1]
    kxk = create_model("mobilenet_v1", conv_mode="pointwise_kxk").blocks[1]
    bn = 2  # weight and bias per channel
    assert n_params(sep) == c_in * 9 + bn * c_in + c_in * c_out + bn * c_out
    assert n_params(full) == c_in * c_out * 9 + bn * c_out
    assert n_params(kxk) == c_in * 9 + bn * c_in + c_in * c_out * 9 + bn * c_out
    x = torch.randn(1, c_in, 16, 16)
    assert sep(x).shape == full(x).shape == kxk(x).shape == (1, c_out, 8, 8)


@pytest.mark.parametrize("mode", ConvMode.MODES)
def test_conv_mode_picks_the_block_class_at_build_time(mode):
    cm = ConvMode(mode)
    merged = mode == "full"
    block = cm.separable_block(8, 16, 3, 2, pw_act=False)
    assert type(block) is (DenseConv if merged else DepthwiseSeparableConv)
    ir = cm.inverted_residual(8, 8, 16, 3, 1)
    assert type(ir) is (DenseProjResidual if merged else InvertedResidual) and ir.has_skip
    x = torch.randn(2, 8, 8, 8)
    assert block(x).shape == (2, 16, 4, 4) and ir(x).shape == x.shape
    # every model's blocks come from the factory: no separable block survives "full", none is merged otherwise
    for name in ("mobilenet_v1", "mobilenet_v3_small", "xception_small"):
        kinds = {type(m) for m in build(name, mode).modules()}
        assert bool(kinds & {DenseConv, DenseProjResidual}) == merged
        assert bool(kinds & {DepthwiseSeparableConv, InvertedResidual}) != merged


def test_separable_blocks_refuse_full():
    # built directly with "full" they would silently stay separable; the factory is the way
    with pytest.raises(ValueError, match="separable_block"):
        DepthwiseSeparableConv(8, 16, conv_mode="full")
    with pytest.raises(ValueError, match="inverted_residual"):
        InvertedResidual(8, 8, 16, conv_mode="full")
