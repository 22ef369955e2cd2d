"""Under CPU autocast to bf16 (train.py's default where the CPU computes bf16 natively), the depthwise
convs that `models.kernels.float32_depthwise` picks -- the strided ones and those where oneDNN is slow
(5x5, 2x2 maps), with the norm + act before them where they are fused -- compute in float32 on the
zoo's kernels: the same function as the float32 layers, float32 out, gradients back to the bf16
input; the rest of the network stays bf16, and every case the rule or the kernels do not cover runs
the layers as autocast runs them."""

import pytest
import torch
import torch.nn as nn

import models
from models import depthwise, kernels, norm_act, norm_act_depthwise

pytestmark = [
    pytest.mark.skipif(not norm_act.available(), reason="the C kernels cannot be built here (no C compiler?)"),
    pytest.mark.usefixtures("kernels_on"),
]
CL = torch.channels_last


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _dw(c, k, s, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False).to(memory_format=CL)


def _bn(c, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _bf16_input(shape, seed=1):
    torch.manual_seed(seed)
    return torch.randn(shape).contiguous(memory_format=CL).bfloat16().requires_grad_()


def test_the_rule():
    assert not kernels.float32_depthwise(2, onednn_slow=True)  # no autocast: nothing to decide
    with bf16_autocast():
        assert kernels.float32_depthwise(2, onednn_slow=False) and kernels.float32_depthwise(1, onednn_slow=True)
        assert not kernels.float32_depthwise(1, onednn_slow=False)  # stride-1 3x3 convs on maps above 2x2
    with torch.autocast("cpu", dtype=torch.float16):
        assert kernels.float32_depthwise(2, onednn_slow=False)


@pytest.mark.parametrize("k, hw", [(5, 8), (3, 2)])
def test_a_stride_1_depthwise_conv_where_onednn_is_slow_computes_in_float32(k, hw):
    conv, x = _dw(32, k, 1), _bf16_input((4, 32, hw, hw))
    with bf16_autocast():
        y = depthwise.depthwise_conv2d(x, conv)
    assert y.dtype == torch.float32 and y.grad_fn.name().endswith("_DepthwiseConvBackward")
    torch.testing.assert_close(y, _dw(32, k, 1)(x.detach().float()), atol=1e-5, rtol=1e-5)


def test_a_strided_depthwise_conv_computes_in_float32():
    conv, x = _dw(32, 3, 2), _bf16_input((4, 32, 8, 8))
    grad = torch.randn(4, 32, 4, 4)
    with bf16_autocast():
        y = depthwise.depthwise_conv2d(x, conv)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16
    # what the float32 layer computes on the same (bf16-valued) input
    ref_x = x.detach().float().requires_grad_()
    ref_conv = _dw(32, 3, 2)
    ref = ref_conv(ref_x)
    ref.backward(grad)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.weight.grad, ref_conv.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad.bfloat16())


def test_a_stride_1_depthwise_conv_stays_as_autocast_runs_it(monkeypatch):
    monkeypatch.setattr(depthwise._DepthwiseConv, "apply", lambda *a: pytest.fail("the kernel ran"))
    conv, x = _dw(32, 3, 1), _bf16_input((4, 32, 8, 8))
    with bf16_autocast():
        y = depthwise.depthwise_conv2d(x, conv)
        assert y.dtype == torch.bfloat16 and torch.equal(y, conv(x))


@pytest.mark.parametrize("act", [nn.ReLU6, nn.Hardswish], ids=lambda a: a.__name__)
@pytest.mark.parametrize("k, s", [(5, 1), (3, 2), (5, 2)])
def test_the_fused_norm_and_depthwise_conv_compute_in_float32(act, k, s, monkeypatch):
    """Under autocast: the float32 kernel's own result on x cast to float32, bit for bit, running
    statistics included, though the kernel reads the bf16 map as it is; the input's gradient comes
    back in bf16, rounded as PyTorch rounds the float32 one."""
    shape, grad_seed = (4, 32, 16, 16), 2
    outs, read = [], []
    real = norm_act_depthwise._NormActDepthwise.apply
    monkeypatch.setattr(norm_act_depthwise._NormActDepthwise, "apply", lambda x, *a: read.append(x.dtype) or real(x, *a))
    for autocast in (True, False):
        bn, conv, x = _bn(32), _dw(32, k, s), _bf16_input(shape)
        x_in = x if autocast else x.detach().float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = norm_act_depthwise.norm_act_depthwise(x_in, bn, act(), conv)
        torch.manual_seed(grad_seed)
        z.backward(torch.randn_like(z))
        outs.append((z, x_in.grad, conv.weight.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var))
    (z, dx, *rest), (z32, dx32, *rest32) = outs
    assert read == [torch.bfloat16, torch.float32]  # under autocast the kernel reads the bf16 map itself
    assert z.dtype == torch.float32 and dx.dtype == torch.bfloat16
    assert torch.equal(z, z32) and torch.equal(dx, dx32.bfloat16())
    for a, b in zip(rest, rest32):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.Hardswish], ids=lambda a: a.__name__)
@pytest.mark.parametrize("hw", [8, 11])
def test_a_stride_1_3x3_norm_act_and_depthwise_conv_run_on_one_bf16_kernel(act, hw, monkeypatch):
    """Where the conv stays bf16 and the one kernel wins (`bf16_kernel_wins`: 3x3 on maps of 8x8 and
    more), it reads x and writes z in bf16: z is the float32 kernel's z on x cast to float32, rounded
    once as PyTorch rounds it; the weight, gamma and beta gradients and the running statistics are the
    float32 kernel's given the same (bf16) output gradient. x's gradient is formed from a bf16 copy of
    the activation's gradient (the two bf16 layers hand the norm a bf16 gradient too): no further from
    float64 than those layers' (PyTorch's, under autocast), and within bf16 rounding of the float32 kernel's."""
    calls = _spy(monkeypatch)
    shape, outs = (4, 48, hw, hw), {}  # 48 channels: three blocks of 16, the last not overlapping; 11: rows of odd length
    for mode in ("kernel", "float32", "plain", "float64"):
        bn, conv, x = _bn(48), _dw(48, 3, 1), _bf16_input(shape)
        if mode == "float64":
            bn, conv = bn.double(), conv.double()
        x_in = x.detach().to(torch.float64 if mode == "float64" else torch.float32).requires_grad_() if mode in ("float32", "float64") else x
        with kernels.plain() if mode == "plain" else torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode in ("kernel", "plain")):
                z = norm_act_depthwise.norm_act_depthwise(x_in, bn, act(), conv)
            torch.manual_seed(2)
            z.backward(torch.randn(z.shape).contiguous(memory_format=CL).bfloat16().to(z.dtype))
        outs[mode] = (z, x_in.grad, conv.weight.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
    (z, dx, *rest), (z32, dx32, *rest32) = outs["kernel"], outs["float32"]
    assert calls["bf16"] == 1 and calls["fused"] == 1  # the bf16 kernel under autocast, the float32 one outside
    assert z.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16 and z32.dtype == torch.float32
    assert torch.equal(z, z32.bfloat16())
    for a, b in zip(rest, rest32):
        assert torch.equal(a, b)
    dx64, dx_plain = outs["float64"][1], outs["plain"][1]
    error = lambda d: ((d.double() - dx64).norm() / dx64.norm()).item()  # noqa: E731
    assert error(dx) <= 1.5 * error(dx_plain), (error(dx), error(dx_plain))
    torch.testing.assert_close(dx.float(), dx32, atol=0.02 * dx32.abs().max().item(), rtol=0.02)


def test_an_activation_alone_runs_inside_the_bf16_depthwise_kernel(monkeypatch):
    """conv(act(x)) with no norm between (an Xception block's opening ReLU): the one kernel with the
    identity in the norm's place, bf16 in and out -- its float32 functions' result on the same values,
    rounded once, and as close to float64 as bf16 allows; the layers wherever the kernel does not apply."""
    calls = _spy(monkeypatch)
    conv, x = _dw(48, 3, 1), _bf16_input((4, 48, 8, 8))
    with bf16_autocast():
        z = norm_act_depthwise.act_depthwise(x, nn.ReLU(), conv)
    torch.manual_seed(2)
    g = torch.randn(z.shape).contiguous(memory_format=CL).bfloat16()
    z.backward(g)
    assert calls["bf16"] == 1 and z.dtype == x.grad.dtype == torch.bfloat16
    conv32, x32 = _dw(48, 3, 1), x.detach().float().requires_grad_()
    z32 = norm_act_depthwise._NormActDepthwise.apply(x32, None, None, conv32.weight, None, "relu", 1)
    z32.backward(g.float())
    assert torch.equal(z, z32.bfloat16()) and torch.equal(x.grad, x32.grad.bfloat16())
    assert torch.equal(conv.weight.grad, conv32.weight.grad)
    conv64, x64 = _dw(48, 3, 1).double(), x.detach().double().requires_grad_()
    z64 = conv64(torch.relu(x64))
    z64.backward(g.double())
    torch.testing.assert_close(z.double(), z64, atol=0.05, rtol=0.01)  # bf16's rounding of z
    torch.testing.assert_close(z32.double(), z64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv32.weight.grad.double(), conv64.weight.grad, atol=1e-4, rtol=1e-5)
    calls["bf16"] = calls["fused"] = 0  # (the float32 reference above was a call too)
    with bf16_autocast():
        norm_act_depthwise.act_depthwise(x.detach().clone().requires_grad_() * 1, nn.ReLU(inplace=True), conv)  # layers
        norm_act_depthwise.act_depthwise(_bf16_input((4, 48, 4, 4)), nn.ReLU(), conv)  # a 4x4 map: layers
    norm_act_depthwise.act_depthwise(x.detach().float().requires_grad_(), nn.ReLU(), conv)  # float32: layers
    assert calls["bf16"] == 0 and calls["fused"] == 0


def test_a_stride_1_3x3_norm_act_and_depthwise_conv_on_a_small_map_run_as_two_bf16_layers(monkeypatch):
    """Where the one kernel does not win (4x4 maps), the norm + act run on the norm kernel's bf16
    functions and the conv as autocast runs it: what the two layers give under autocast with the norm fused."""
    monkeypatch.setattr(norm_act_depthwise._NormActDepthwise, "apply", lambda *a: pytest.fail("the one kernel ran"))
    x = _bf16_input((4, 32, 4, 4))
    bn, conv = _bn(32), _dw(32, 3, 1)
    with bf16_autocast():
        z = norm_act_depthwise.norm_act_depthwise(x, bn, nn.ReLU6(), conv)
        assert z.dtype == torch.bfloat16 and torch.equal(z, conv(norm_act.batch_norm_act(x, _bn(32), nn.ReLU6())))
    z.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_norms_fuse_float32_and_bf16_maps_under_autocast_each_in_its_own_type(monkeypatch):
    calls = []
    real = norm_act._BatchNormAct.apply
    monkeypatch.setattr(norm_act._BatchNormAct, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))
    bn, act = _bn(16), nn.ReLU()
    x32 = torch.randn(4, 16, 6, 6).contiguous(memory_format=CL)
    with bf16_autocast():
        y32 = norm_act.batch_norm_act(x32, bn, act)
        y16 = norm_act.batch_norm_act(x32.bfloat16(), bn, act)
    # a float32 map (from a float32 depthwise conv) stays float32; a bf16 one (a bf16 conv's) is read
    # and written in bf16 (the kernel's _bf16 functions, tests/test_norm_act.py)
    assert calls == [torch.float32, torch.bfloat16] and y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    twin = _bn(16)
    torch.testing.assert_close(y32, act(twin(x32)), atol=1e-5, rtol=1e-5)


def _training_step(name, mode: str):
    """A forward + backward of `name` at init, batch 8: "rule" (bf16 autocast, the zoo's kernels on),
    "plain" (bf16 autocast, kernels off) or "float32"; returns the model and its logits."""
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10).to(memory_format=CL)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=CL)
    with kernels.plain() if mode == "plain" else torch.enable_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32"):
            logits = model(x).float()
        nn.functional.cross_entropy(logits, torch.arange(8) % 10).backward()
    return model, logits.detach()


def _spy(monkeypatch):
    """Counts the one kernel's calls with a float32 output ("fused") and with a bf16 one ("bf16"), and
    the depthwise kernel's strides."""
    calls = {"fused": 0, "bf16": 0, "depthwise": []}
    fused, dw = norm_act_depthwise._NormActDepthwise.apply, depthwise._DepthwiseConv.apply

    def count(*a):
        key = "bf16" if len(a) > 7 and a[7] else "fused"
        calls[key] += 1
        return fused(*a)

    monkeypatch.setattr(norm_act_depthwise._NormActDepthwise, "apply", count)
    monkeypatch.setattr(depthwise._DepthwiseConv, "apply", lambda *a: calls["depthwise"].append(a[-1]) or dw(*a))
    return calls


# depthwise convs on the zoo's float32 kernels in one training step: the strided ones, the 5x5 ones and
# those on 2x2 maps (kernels.float32_depthwise); the stride-1 3x3 ones on larger maps stay bf16.
# v2: its 3 strided blocks; v1: its 4 strided convs and the last one (2x2 map); v3_small: its 8 5x5 convs
# and the stride-2 3x3 after an expand (the second block).
ON_KERNELS = {"mobilenet_v2": (3, 17), "mobilenet_v1": (5, 13), "mobilenet_v3_small": (9, 11)}


@pytest.mark.parametrize("name", list(ON_KERNELS))
def test_mobilenets_train_their_slow_depthwise_convs_in_float32(name, monkeypatch):
    calls = _spy(monkeypatch)
    model, logits = _training_step(name, "rule")
    fused_calls, depthwise_calls = calls["fused"], len(calls["depthwise"])
    _, plain = _training_step(name, "plain")
    assert calls["fused"] == fused_calls  # the plain switch ran no kernel
    _, exact = _training_step(name, "float32")
    depthwise_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    # fused with the norm + act before them, or (mobilenet_v3_small's 5x5 convs on small maps, where the one
    # kernel was not measured faster) after the norm's kernel on the depthwise kernels, all in float32
    assert (fused_calls + depthwise_calls, len(depthwise_convs)) == ON_KERNELS[name] and fused_calls > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    # the same function: no further from float32 than all-bf16 is (mobilenet_v1 at init amplifies bf16
    # rounding to about a quarter of its logits' size, either way)
    assert (logits - exact).abs().max() <= 1.5 * (plain - exact).abs().max() + 1e-3


def test_xception_trains_its_depthwise_convs_in_bf16(monkeypatch):
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    model = models.create_model("xception_small", num_classes=10).to(memory_format=CL)
    with bf16_autocast():
        model(torch.randn(4, 3, 32, 32).contiguous(memory_format=CL)).float().sum().backward()
    # every depthwise conv is a stride-1 3x3 on a map of 4x4 or more: all bf16. Those after a unit's norm + ReLU
    # or a block's opening ReLU, on maps of 8x8 or more, run on the one bf16 kernel: every unit of every block
    # (the first block's first unit has no ReLU before it) -- 2 units at 32x32 in block 1, 2 + 2 in blocks 2
    # and 3, 3 in each of the 4 middle blocks and 2 in the exit block; the head's are 4x4
    assert calls["depthwise"] == [] and calls["fused"] == 0 and calls["bf16"] == 1 + 2 + 2 + 4 * 3 + 2


def test_eval_under_autocast_runs_no_kernel(monkeypatch):
    calls = _spy(monkeypatch)
    model = models.create_model("mobilenet_v2", num_classes=10).eval().to(memory_format=CL)
    with torch.no_grad(), bf16_autocast():
        y = model(torch.randn(2, 3, 32, 32).contiguous(memory_format=CL))
    assert calls["fused"] == 0 and calls["depthwise"] == [] and y.dtype == torch.bfloat16


@pytest.mark.parametrize("stride, hw", [(1, 5), (1, 8), (2, 5)])
def test_a_nan_in_the_bf16_map_spreads_as_through_pytorchs_layers(stride, hw):
    """A diverged run must show NaN: it fills its channel (the batch statistics), forward and backward,
    and no other (the float_to_bf16 rounding keeps NaN a NaN); stride 1 runs as two bf16 layers on a
    5x5 map and on the one bf16 kernel on an 8x8 one, stride 2 in float32."""
    bn, conv = _bn(16), _dw(16, 3, stride)
    x = _bf16_input((2, 16, hw, hw))
    with torch.no_grad():
        x[0, 0, 0, 0] = float("nan")
    with bf16_autocast():
        z = norm_act_depthwise.norm_act_depthwise(x, bn, nn.ReLU6(), conv)
    assert torch.isnan(z[0, 0]).any() and not torch.isnan(z[0, 1:]).any()  # the NaN's channel, as PyTorch's layers give
    z.backward(torch.ones_like(z))
    assert torch.isnan(x.grad[:, 0]).all() and not torch.isnan(x.grad[:, 1:]).any()
