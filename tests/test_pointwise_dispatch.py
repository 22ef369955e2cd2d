"""The pointwise primitive's CPU dispatch (models.kernels): every strategy equals F.conv2d (values
and gradients), each is picked where the measured rules say, autocast is honoured, and the switch
that turns the rules off gives exactly the plain F.conv2d path.

(tests/test_pointwise.py checks the public function on random small cases; this file makes sure
each internal strategy is exercised, including those only large shapes or autocast select.)
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from models import PointwiseConv, pointwise_conv2d
from models import kernels

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


pytestmark = pytest.mark.usefixtures("kernels_on")  # the rules are what is tested here


def _input(shape, dtype, channels_last):
    x = torch.randn(shape, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("strategy", sorted(kernels.STRATEGIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (3, 16, 1, 1), (1, 4, 6, 6)])
def test_every_strategy_matches_conv2d(strategy, dtype, channels_last, shape):
    if shape[2] * shape[3] > 1 and (strategy, channels_last) in (("matmul", True), ("linear", False)):
        pytest.skip("matmul reads NCHW memory and linear NHWC memory; the dispatch never crosses them")
    torch.manual_seed(0)
    x = _input(shape, dtype, channels_last).requires_grad_()
    w = torch.randn(6, shape[1], 1, 1, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = kernels.STRATEGIES[strategy](x, w, b)
    ref = F.conv2d(x2, w2, b2)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if shape[2] * shape[3] > 1:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=layout), "a strategy must keep the input's layout"
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for ours, theirs in ((x, x2), (w, w2), (b, b2)):
        scale = theirs.grad.abs().max().item() + 1
        torch.testing.assert_close(ours.grad, theirs.grad, atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"])


def choose(shape, dtype=torch.float32, channels_last=False, grad=False, autocast=False):
    x = _input(shape, dtype, channels_last).requires_grad_(grad)
    w = torch.randn(8, shape[1], 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
        return kernels.choose(x, w, x.shape)


def test_dispatch_rules():
    # float32: oneDNN conv, except NCHW inference on large maps with a batch
    assert choose((1, 32, 32, 32)) == "conv"
    assert choose((64, 32, 32, 32)) == "matmul"
    assert choose((64, 32, 32, 32), grad=True) == "conv"
    assert choose((64, 320, 4, 4)) == "conv"
    assert choose((64, 32, 32, 32), channels_last=True) == "conv"
    # bfloat16, as a dtype or through autocast
    for kw in (dict(dtype=torch.bfloat16), dict(autocast=True)):
        assert choose((1, 320, 4, 4), **kw) == "matmul"
        assert choose((64, 320, 4, 4), **kw) == "conv"
        assert choose((64, 32, 32, 32), **kw) == "matmul"
        assert choose((64, 32, 32, 32), grad=True, **kw) == "conv"
        assert choose((1, 32, 112, 112), grad=True, **kw) == "matmul"
        assert choose((1, 32, 32, 32), channels_last=True, **kw) == "linear"
        assert choose((64, 32, 32, 32), channels_last=True, **kw) == "conv"
    # 1x1 maps with a batch are linear layers
    assert choose((64, 576, 1, 1)) == "linear"
    assert choose((1, 576, 1, 1)) == "conv"


@pytest.mark.parametrize(
    "shape, channels_last, grad",
    [((4, 8, 28, 28), False, False), ((1, 8, 9, 9), True, True), ((16, 24, 1, 1), False, True), ((2, 8, 8, 8), False, True)],
)
def test_autocast_matches_conv2d_under_autocast(shape, channels_last, grad):
    torch.manual_seed(0)
    m = PointwiseConv(shape[1], 12, bias=True)
    conv = torch.nn.Conv2d(shape[1], 12, 1)
    conv.load_state_dict(m.state_dict())
    x = _input(shape, torch.float32, channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        out, ref = m(x), conv(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])
    if grad:
        out.float().sum().backward()
        ref.float().sum().backward()
        torch.testing.assert_close(m.weight.grad, conv.weight.grad, atol=0.5, rtol=5e-2)


def test_fast_path_and_checked_path_agree():
    x, w, b = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 1, 1), torch.randn(4)
    ref = F.conv2d(x, w, b)
    torch.testing.assert_close(pointwise_conv2d(x, w, b), ref)  # fast path
    torch.testing.assert_close(pointwise_conv2d(x, w, b, stride=(1, 1), padding=(0, 0)), ref)  # checked path
    with pytest.raises(ValueError, match="8 channels"):
        pointwise_conv2d(x, torch.randn(4, 7, 1, 1))


# Calls the rules send to matmul or linear: with the switch off each must be F.conv2d's own result.
OFF_PLAIN = [
    dict(shape=(2, 16, 28, 28)),  # fp32 NCHW inference, large maps -> matmul
    dict(shape=(16, 24, 1, 1)),  # a 1x1 map with a batch -> linear
    dict(shape=(1, 16, 8, 8), dtype=torch.bfloat16),  # bf16 NCHW -> matmul
    dict(shape=(1, 16, 8, 8), dtype=torch.bfloat16, channels_last=True),  # bf16 NHWC -> linear
    dict(shape=(2, 16, 8, 8), autocast=True, grad=True),  # fp32 under bf16 autocast, training -> matmul
    dict(shape=(2, 16, 8, 8), autocast=True, grad=True, channels_last=True),  # -> linear
]


@pytest.mark.parametrize("case", OFF_PLAIN, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_switch_off_is_the_plain_conv2d_path(case):
    shape, dtype = case["shape"], case.get("dtype", torch.float32)
    grad, autocast = case.get("grad", False), case.get("autocast", False)
    assert choose(**case) != "conv", "the case must be one the rules send elsewhere"
    torch.manual_seed(0)
    x = _input(shape, dtype, case.get("channels_last", False))
    m = PointwiseConv(shape[1], 12, bias=True).to(dtype)
    ref_m = torch.nn.Conv2d(shape[1], 12, 1).to(dtype)
    ref_m.load_state_dict(m.state_dict())
    inputs = [x.detach().clone().requires_grad_(grad) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
        ref = F.conv2d(inputs[0], ref_m.weight, ref_m.bias)
        with kernels.plain():
            assert not kernels.enabled() and choose(**case) == "conv"
            outs = [pointwise_conv2d(inputs[1], m.weight, m.bias), m(inputs[2])]
    assert kernels.enabled()
    for out in outs:
        assert out.dtype == ref.dtype and out.stride() == ref.stride()
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if grad:
        g = torch.randn_like(ref)
        torch.autograd.backward([ref, *outs], [g, g, g])
        for x_ in inputs[1:]:
            torch.testing.assert_close(x_.grad, inputs[0].grad, rtol=0, atol=0)
        # both calls above used m's parameters: their gradient is twice the reference's
        torch.testing.assert_close(m.weight.grad, 2 * ref_m.weight.grad, rtol=0, atol=0)
        torch.testing.assert_close(m.bias.grad, 2 * ref_m.bias.grad, rtol=0, atol=0)


def test_switch_restores():
    assert kernels.set_enabled(False) is True and not kernels.enabled()
    assert kernels.set_enabled(True) is False and kernels.enabled()
    with pytest.raises(RuntimeError), kernels.plain():
        with kernels.plain():  # nested: the inner block restores "off", not "on"
            pass
        assert not kernels.enabled()
        raise RuntimeError
    assert kernels.enabled()
    assert choose((2, 16, 28, 28)) == "matmul"


def test_switch_from_the_environment(monkeypatch):
    # Re-running the module's code in place is what a fresh import does (the autouse fixture then
    # turns the rules back on); cheaper than a new interpreter.
    monkeypatch.setenv("POINTWISE_ZOO_PLAIN_KERNELS", "1")
    importlib.reload(kernels)
    assert not kernels.enabled() and choose((2, 16, 28, 28)) == "conv"
    monkeypatch.delenv("POINTWISE_ZOO_PLAIN_KERNELS")
    importlib.reload(kernels)
    assert kernels.enabled() and choose((2, 16, 28, 28)) == "matmul"
