"""The expand's norm + activation fused into the depthwise conv (models/norm_act_depthwise.py): it
computes what `conv(act(bn(x)))` computes -- output, the gradients of the input, the conv's
weight and the norm's weight and bias, the running statistics and the batch count -- inverted
residuals use it where it was measured faster, and every other case runs the two layers."""

import pytest
import torch
import torch.nn as nn

import models
from models import kernels, norm_act, norm_act_depthwise
from models.layers import InvertedResidual, separable_chain

pytestmark = [
    pytest.mark.skipif(not norm_act.available(), reason="the C kernels cannot be built here (no C compiler?)"),
    pytest.mark.usefixtures("kernels_on"),
]


def _layers(c, k, s, act, seed=0):
    torch.manual_seed(seed)
    bn, conv = nn.BatchNorm2d(c), nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False)
    with torch.no_grad():  # away from the defaults, so a swapped gamma/beta or mean/var shows
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn, act(), conv.to(memory_format=torch.channels_last)


def _outcomes(path, layers, x, grad):
    bn, act, conv = layers
    x = x.clone().requires_grad_()
    if path == "fused":
        z = norm_act_depthwise._NormActDepthwise.apply(x, bn.weight, bn.bias, conv.weight, bn,
                                                       norm_act.FUSED_ACTIVATIONS[type(act)], conv.stride[0])
    else:
        with kernels.plain():
            z = conv(act(bn(x)))
    z.backward(grad)
    return {"output": z, "input grad": x.grad, "conv weight grad": conv.weight.grad, "norm weight grad": bn.weight.grad,
            "norm bias grad": bn.bias.grad, **dict(bn.named_buffers())}


@pytest.mark.parametrize("act", [nn.ReLU6, nn.ReLU, nn.Hardswish, nn.Identity], ids=lambda a: a.__name__)
@pytest.mark.parametrize("n, c, h, w, k, s", [
    (4, 16, 8, 8, 3, 1), (4, 24, 9, 7, 3, 2), (3, 40, 7, 5, 5, 1), (2, 33, 6, 6, 5, 2),
    (2, 72, 2, 3, 3, 2), (2, 16, 9, 9, 7, 1), (8, 48, 1, 1, 3, 1),
])
def test_one_kernel_is_as_accurate_as_the_two_layers(act, n, c, h, w, k, s):
    """Against float64: within twice the error of PyTorch's float32 layers plus a few ulps (it sums
    in another order), at 3x3, 5x5 and 7x7, strides 1 and 2, odd map sizes, 1x1 maps, and channel
    counts that are not multiples of 16 (the overlapping last block)."""
    x = (torch.randn(n, c, h, w) * 3 + 2).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(5)
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
    grad = torch.randn(n, c, oh, ow)
    fused = _outcomes("fused", _layers(c, k, s, act), x, grad)
    plain = _outcomes("plain", _layers(c, k, s, act), x, grad)
    exact = _outcomes("plain", [m.double() for m in _layers(c, k, s, act)], x.double(), grad.double())
    assert fused["output"].is_contiguous(memory_format=torch.channels_last)
    for key in exact:
        error = (fused[key].double() - exact[key].double()).abs().max().item()
        plain_error = (plain[key].double() - exact[key].double()).abs().max().item()
        rounding = 1e-5 * max(1.0, exact[key].abs().max().item())
        assert error <= 2 * plain_error + rounding, f"{key}: {error:.2e} from float64, float32 two layers {plain_error:.2e}"


def _calls(monkeypatch) -> list:
    calls = []
    real = norm_act_depthwise._NormActDepthwise.apply
    monkeypatch.setattr(norm_act_depthwise._NormActDepthwise, "apply", lambda *a: calls.append(tuple(a[0].shape)) or real(*a))
    return calls


def test_inverted_residuals_use_it_where_it_was_measured_faster(monkeypatch):
    calls = _calls(monkeypatch)
    model = models.create_model("mobilenet_v2", num_classes=10, width=0.5).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    expanded = [b for b in model.modules() if isinstance(b, InvertedResidual) and not isinstance(b.conv_pw, nn.Identity)]
    assert len(expanded) == 16 and [shape[2] for shape in calls] == [32] * 3 + [16] * 3 + [8] * 7 + [4] * 3  # all 3x3
    assert norm_act_depthwise.kernel_wins(5, 16, 16) and not norm_act_depthwise.kernel_wins(5, 8, 8)
    calls.clear()
    model.eval()
    model(x)  # inference: the layers (models.fuse folds them for deployment)
    assert calls == []


@pytest.mark.parametrize("case", ["no_grad", "nchw", "hooked_expand", "hooked_depthwise", "plain_switch", "frozen_conv"])
def test_uncovered_cases_run_the_two_layers(case, monkeypatch):
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    block = InvertedResidual(16, 16, 64, 3, 1)
    twin = InvertedResidual(16, 16, 64, 3, 1)
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 16, 16, 16)
    if case != "nchw":
        block, twin, x = (t.to(memory_format=torch.channels_last) for t in (block, twin, x))
    seen = []
    if case == "hooked_expand":
        block.conv_pw.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    if case == "hooked_depthwise":
        block.conv_dw.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    if case == "frozen_conv":
        block.conv_dw.conv.weight.requires_grad_(False)
    with torch.no_grad() if case == "no_grad" else kernels.plain() if case == "plain_switch" else torch.enable_grad():
        y = block(x)
    with kernels.plain():
        expected = twin(x)
    assert calls == [] and torch.allclose(y, expected, atol=1e-5)
    assert len(seen) == (1 if case.startswith("hooked") else 0)  # the watched layer was called


def test_whole_model_training_step_covers_the_kernel(monkeypatch):
    # tests/test_norm_act.py's whole-model comparison with float64 (mobilenet_v2 and mobilenet_v3_small,
    # width 0.35, 32x32) runs through this kernel too
    calls = _calls(monkeypatch)
    counts = {}
    for name in ("mobilenet_v2", "mobilenet_v3_small"):
        calls.clear()
        model = models.create_model(name, num_classes=10, width=0.35).to(memory_format=torch.channels_last)
        model(torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
        counts[name] = len(calls)
    assert counts["mobilenet_v2"] == 16 and counts["mobilenet_v3_small"] > 0  # v2: every expanded block, as above


def test_mobilenet_v1_runs_each_pointwise_norm_inside_the_next_depthwise_conv(monkeypatch):
    calls = _calls(monkeypatch)
    model = models.create_model("mobilenet_v1", num_classes=10, width=0.5).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert len(calls) == len(model.blocks) == 13  # the stem's into block 0, block i's into block i + 1
    calls.clear()
    seen = []
    model.blocks[4].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    model.blocks[7].conv_pw.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    model(x).sum().backward()
    assert len(seen) == 2 and len(calls) == 13 - 3  # into and out of block 4, out of block 7's pointwise: two layers


def test_separable_chain_computes_what_the_layers_compute():
    torch.manual_seed(0)
    model = models.create_model("mobilenet_v1", num_classes=10, width=0.5).double()
    layers = [model.stem, *model.blocks]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for training in (True, False):  # float64: the layers themselves (the kernels take float32 only)
        model.train(training)
        assert torch.equal(separable_chain(layers, x), torch.nn.Sequential(*layers)(x))


def test_xception_units_run_each_norm_and_relu_inside_the_next_units_depthwise_conv(monkeypatch):
    calls = _calls(monkeypatch)
    model = models.create_model("xception_small", num_classes=10, width=0.5).to(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    blocks = [b for b in model.modules() if type(b).__name__ == "XceptionBlock"]
    units = [sum(1 for u in b.convs if isinstance(u, models.layers.DepthwiseSeparableConv)) for b in blocks]
    assert len(calls) == sum(n - 1 for n in units) > 0  # within a block: the shortcut needs the block's input as is
    for block in blocks[:3]:  # float64: the layers themselves, in the chain's order and in Sequential's
        block.double()
        h = torch.randn(2, block.convs[1].conv_dw.conv.in_channels, 8, 8, dtype=torch.float64)
        assert torch.equal(separable_chain(list(block.convs), h), block.convs(h))
