"""The depthwise-conv training kernels (models/depthwise.py): output, input and weight gradients
as PyTorch's conv computes them, and every case they do not cover runs the plain conv."""

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import models
from models import depthwise, kernels, native, norm_act_depthwise
from models.layers import DepthwiseConv

MEASURED_RULE = depthwise.kernels_win  # the fixture below replaces it in most tests
pytestmark = pytest.mark.skipif(native.lib() is None, reason="the C kernels cannot be built here (no C compiler?)")


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """The kernels on, and used wherever they cover the case: most 3x3 layers stay oneDNN's by the
    measured rule (`kernels_win`), but the kernels compute them too and must do so correctly."""
    previous = kernels.set_enabled(True)
    monkeypatch.setattr(depthwise, "kernels_win", lambda *shape: True)
    yield
    kernels.set_enabled(previous)


def _conv(chs, k, stride, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(chs, chs, k, stride, k // 2, groups=chs, bias=False, **kw)


def _step(conv, x, grad, fused: bool):
    x = x.clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    with kernels.plain() if not fused else torch.enable_grad():
        y = depthwise.depthwise_conv2d(x, conv)
    y.backward(grad)
    return y.detach(), x.grad, conv.weight.grad


# borders on every side, odd sizes, a 1x1 map, and channel counts that are not multiples of 16
CASES = [(4, 16, 9, 9, 3, 1), (4, 24, 9, 7, 3, 2), (3, 40, 8, 8, 5, 1), (3, 72, 11, 11, 5, 2),
         (2, 32, 5, 5, 7, 1), (2, 48, 32, 32, 3, 2), (2, 33, 6, 6, 3, 1), (8, 64, 1, 1, 3, 1), (2, 16, 2, 3, 5, 2)]  # fmt: skip


@pytest.mark.parametrize("n, c, h, w, k, s", CASES)
def test_the_kernels_are_as_accurate_as_the_plain_conv(n, c, h, w, k, s):
    """Output and both gradients against float64: as close as PyTorch's own float32 conv is (within
    twice its error plus a few ulps of the largest value: the sums run in another order)."""
    conv = _conv(c, k, s)
    torch.manual_seed(1)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(conv(x))
    assert depthwise._fusable(x.requires_grad_(), conv) and depthwise._covered(x, conv)
    fused, plain = _step(conv, x.detach(), grad, True), _step(conv, x.detach(), grad, False)
    exact = _step(_conv(c, k, s).double(), x.detach().double(), grad.double(), False)
    for what, a, b, ref in zip(("output", "input grad", "weight grad"), fused, plain, exact):
        scale = ref.abs().max().item()
        err_fused, err_plain = (a.double() - ref).abs().max().item(), (b.double() - ref).abs().max().item()
        assert err_fused <= 2 * err_plain + 4e-7 * scale, f"{what}: {err_fused:.2e} fused against {err_plain:.2e} plain"
    assert fused[0].is_contiguous(memory_format=torch.channels_last)


def test_a_first_layer_gets_no_input_gradient():
    conv = _conv(32, 3, 1)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)  # no requires_grad
    depthwise.depthwise_conv2d(x, conv).sum().backward()
    reference = conv.weight.grad.clone()
    conv.zero_grad()
    with kernels.plain():
        conv(x).sum().backward()
    torch.testing.assert_close(reference, conv.weight.grad, rtol=1e-5, atol=1e-5)


def _uncovered():
    """(conv, x, context) triples the kernels leave to the plain conv."""
    cl = torch.channels_last
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=cl)
    hooked = _conv(32, 3, 1)
    hooked.register_forward_hook(lambda *a: None)
    frozen = _conv(32, 3, 1)
    frozen.weight.requires_grad_(False)
    return {
        "no_grad": (_conv(32, 3, 1), x, torch.no_grad()),
        "nchw": (_conv(32, 3, 1), x.contiguous(), torch.enable_grad()),
        "bias": (nn.Conv2d(32, 32, 3, 1, 1, groups=32), x, torch.enable_grad()),
        "dilation": (nn.Conv2d(32, 32, 3, 1, 2, dilation=2, groups=32, bias=False), x, torch.enable_grad()),
        "stride 3": (nn.Conv2d(32, 32, 3, 3, 1, groups=32, bias=False), x, torch.enable_grad()),
        "not depthwise": (nn.Conv2d(32, 32, 3, 1, 1, groups=8, bias=False), x, torch.enable_grad()),
        "8 channels": (_conv(8, 3, 1), x[:, :8].contiguous(memory_format=cl), torch.enable_grad()),
        "hooked": (hooked, x, torch.enable_grad()),
        "frozen": (frozen, x, torch.enable_grad()),
        "autocast": (_conv(32, 3, 1), x, torch.autocast("cpu", dtype=torch.bfloat16)),
        "flop counter": (_conv(32, 3, 1), x, FlopCounterMode(display=False)),
        "switched off": (_conv(32, 3, 1), x, kernels.plain()),
    }


@pytest.mark.parametrize("case", list(_uncovered()))
def test_uncovered_cases_run_the_plain_conv(case, monkeypatch):
    conv, x, context = _uncovered()[case]
    monkeypatch.setattr(depthwise._DepthwiseConv, "apply", lambda *a: pytest.fail("the kernel ran"))
    if case == "autocast":  # a stride-1 3x3 conv on an 8x8 map: the measured rule leaves it to bf16 (oneDNN)
        monkeypatch.setattr(depthwise, "kernels_win", MEASURED_RULE)
    with context:  # the plain conv's result in the same context (under autocast: bf16, as oneDNN computes it)
        y = depthwise.depthwise_conv2d(x, conv)
        ref = conv(x)
    assert torch.equal(y, ref) and y.dtype == (torch.bfloat16 if case == "autocast" else torch.float32)


def test_flop_counts_do_not_change_when_training():
    model = models.create_model("mobilenet_v3_small").train()
    x = torch.randn(2, 3, 32, 32)
    counted = []
    for switch in (kernels.plain(), torch.enable_grad()):
        with switch, FlopCounterMode(display=False) as counter:
            model(x)
        counted.append(counter.get_total_flops())
    assert counted[0] == counted[1] > 0


def test_the_measured_rule_gives_the_kernels_the_5x5_layers(monkeypatch):
    monkeypatch.setattr(depthwise, "kernels_win", MEASURED_RULE)
    # every depthwise conv through depthwise_conv2d, none fused with the expand's norm (tests/test_norm_act_depthwise.py)
    monkeypatch.setattr(norm_act_depthwise, "kernel_wins", lambda k, h, w: False)
    calls = []
    real = depthwise._DepthwiseConv.apply
    monkeypatch.setattr(depthwise._DepthwiseConv, "apply", lambda x, w, s: calls.append(w.shape[-1]) or real(x, w, s))
    model = models.create_model("mobilenet_v3_small").to(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    fives = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size == (5, 5)]
    assert calls == [5] * len(fives) and len(fives) == 8  # and none of the 3x3 ones (maps above 2x2)
    assert MEASURED_RULE(3, 2, 2) and not MEASURED_RULE(3, 4, 4) and MEASURED_RULE(5, 32, 32)


def test_depthwise_conv_uses_the_kernel_when_training(monkeypatch):
    calls = []
    real = depthwise._DepthwiseConv.apply
    monkeypatch.setattr(depthwise._DepthwiseConv, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    layer = DepthwiseConv(32, 5, 2, act_layer=nn.Hardswish).to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    layer(x).sum().backward()
    assert calls == [2]
    with torch.no_grad():  # inference: oneDNN's conv
        layer.eval()(x)
    assert calls == [2]


def test_without_a_compiler_the_plain_conv_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_failed", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("POINTWISE_ZOO_CACHE", str(tmp_path / "cache"))
    conv = _conv(32, 3, 1)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with pytest.warns(RuntimeWarning, match="POINTWISE_ZOO_PLAIN_KERNELS=1"):
        y = depthwise.depthwise_conv2d(x, conv)
    assert torch.equal(y, conv(x))
