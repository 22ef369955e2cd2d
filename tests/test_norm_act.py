"""The fused batch-norm + activation training kernel (models/norm_act.py): it computes what
`act(bn(x))` computes -- outputs, the gradients of the input, weight and bias, the running
statistics and the batch count -- and every case it does not cover runs the two plain layers.
"""

import warnings

import pytest
import torch
import torch.nn as nn

import models
from models import kernels, native, norm_act
from models.layers import Bottleneck, ConvNormAct, InvertedResidual

pytestmark = [
    pytest.mark.skipif(not norm_act.available(), reason="the fused kernel cannot be built here (no C compiler?)"),
    pytest.mark.usefixtures("kernels_on"),
]

ACTS = [nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Identity]


def _pair(chs, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(chs)
    with torch.no_grad():  # away from the defaults, so a swapped gamma/beta or mean/var shows
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    twin = nn.BatchNorm2d(chs)
    twin.load_state_dict(bn.state_dict())
    return bn, twin


def _run(bn, act, x, grad, fused: bool):
    x = x.clone().requires_grad_()
    with kernels.plain() if not fused else torch.enable_grad():
        y = norm_act.batch_norm_act(x, bn, act)
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.__name__)
@pytest.mark.parametrize("shape", [(8, 48, 9, 7), (3, 5, 4, 4), (2, 130, 1, 1), (64, 16, 8, 8)])
def test_fused_is_as_accurate_as_the_plain_layers(act, shape):
    """Outputs, gradients and buffers, measured against the plain layers in float64: the kernel is
    about as close to them as PyTorch's float32 layers are (within twice their error plus a few
    ulps: it sums in another order, so the two float32 paths differ by their rounding; with 2
    values per channel both lose digits)."""
    bn, plain32 = _pair(shape[1])
    plain64 = _pair(shape[1])[1].double()
    # a mean far from zero against its spread: the sums must not lose the variance to cancellation
    x = (torch.randn(shape) * 3 + 20).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape)
    assert norm_act._fusable(x, bn, act()) == norm_act.FUSED_ACTIVATIONS[act]
    fused = _run(bn, act(), x, grad, fused=True)
    plain = _run(plain32, act(), x, grad, fused=False)
    exact = _run(plain64, act(), x.double(), grad.double(), fused=False)
    assert fused[0].is_contiguous(memory_format=torch.channels_last)

    def outcomes(bn, run):
        return {"output": run[0], "input grad": run[1], "weight grad": bn.weight.grad, "bias grad": bn.bias.grad,
                **dict(bn.named_buffers())}

    fused, plain, exact = outcomes(bn, fused), outcomes(plain32, plain), outcomes(plain64, exact)
    for key in exact:
        error = (fused[key].double() - exact[key].double()).abs().max().item()
        plain_error = (plain[key].double() - exact[key].double()).abs().max().item()
        rounding = 1e-5 * max(1.0, exact[key].abs().max().item())  # float32 rounding of the largest value, amplified
        assert error <= 2 * plain_error + rounding, f"{key}: {error:.2e} from float64, float32 plain layers {plain_error:.2e}"
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.__name__)
def test_a_nan_goes_through_as_in_the_plain_layers(act):
    """A diverged run must see NaN in its loss (train.py stops on it), not have it clamped away."""
    bn, twin = _pair(6)
    x = torch.randn(4, 6, 3, 3)
    x[1, 2, 0, 0] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    y = norm_act.batch_norm_act(x, bn, act())
    ref = act()(twin(x))
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan()[:, 2].all()
    assert torch.equal(bn.running_mean.isnan(), twin.running_mean.isnan())
    assert torch.equal(bn.running_var.isnan(), twin.running_var.isnan())


def test_threads_do_not_change_the_result():
    bn, twin = _pair(24)
    x = torch.randn(16, 24, 6, 6).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(16, 24, 6, 6)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, dx1 = _run(bn, nn.ReLU6(), x, grad, fused=True)
        torch.set_num_threads(2)
        y2, dx2 = _run(twin, nn.ReLU6(), x, grad, fused=True)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx1, dx2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["eval", "nchw", "bf16", "sigmoid", "hook", "plain_switch", "one_value_per_channel", "no_running_stats", "float16"],
)
def test_uncovered_cases_run_the_plain_layers(case):
    bn, twin = _pair(8)
    act = nn.Sigmoid() if case == "sigmoid" else nn.ReLU()
    shape = (1, 8, 1, 1) if case == "one_value_per_channel" else (4, 8, 5, 5)
    x = torch.randn(shape)
    if case != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "eval":
        bn.eval(), twin.eval()
    if case == "bf16":
        x, bn, twin = x.bfloat16(), bn.bfloat16(), twin.bfloat16()
    if case == "float16":  # a float16 conv's output under autocast (bf16 and float32 maps fuse: tests below)
        x = x.half()
    if case == "no_running_stats":
        bn.track_running_stats = twin.track_running_stats = False
        bn.running_mean = bn.running_var = twin.running_mean = twin.running_var = None
    if case == "hook":
        bn.register_forward_hook(lambda *a: None)
    amp = torch.autocast("cpu", torch.float16, enabled=case == "float16")
    with kernels.plain() if case == "plain_switch" else amp:
        assert norm_act._fusable(x, bn, act) is None
        if case == "one_value_per_channel":  # nn.BatchNorm2d's own error reaches the user
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                norm_act.batch_norm_act(x, bn, act)
            return
        y = norm_act.batch_norm_act(x, bn, act)
    assert torch.equal(y, act(twin(x)))


def _run_add(bn, x, residual, grad, fused: bool, act=nn.ReLU):
    x, residual = x.clone().requires_grad_(), residual.clone().requires_grad_()
    with kernels.plain() if not fused else torch.enable_grad():
        y = norm_act.batch_norm_add_act(x, bn, residual, act())
    y.backward(grad)
    return y, x.grad, residual.grad


@pytest.mark.parametrize("act", [nn.ReLU, nn.Identity], ids=lambda a: a.__name__)
@pytest.mark.parametrize("shape", [(8, 48, 9, 7), (3, 5, 4, 4), (2, 130, 1, 1), (64, 16, 8, 8)])
def test_the_residual_sum_and_relu_inside_the_norm_are_as_accurate(act, shape):
    """relu(bn(x) + r) (a ResNet block's end) and bn(x) + r (an inverted residual's): output, the
    gradients of x, r, weight and bias, and the buffers, against float64, within twice the plain
    float32 layers' error (as the test above)."""
    bn, plain32 = _pair(shape[1])
    plain64 = _pair(shape[1])[1].double()
    x = (torch.randn(shape) * 3 + 20).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(shape).contiguous(memory_format=torch.channels_last)  # about half the sums < 0
    grad = torch.randn(shape)
    fused = _run_add(bn, x, residual, grad, True, act)
    plain = _run_add(plain32, x, residual, grad, False, act)
    exact = _run_add(plain64, x.double(), residual.double(), grad.double(), False, act)
    assert fused[0].is_contiguous(memory_format=torch.channels_last)
    assert (fused[0] == 0).any() == (act is nn.ReLU) and (fused[0] < 0).any() == (act is nn.Identity)

    def outcomes(bn, run):
        return {"output": run[0], "input grad": run[1], "residual grad": run[2], "weight grad": bn.weight.grad,
                "bias grad": bn.bias.grad, **dict(bn.named_buffers())}

    fused, plain, exact = outcomes(bn, fused), outcomes(plain32, plain), outcomes(plain64, exact)
    for key in exact:
        error = (fused[key].double() - exact[key].double()).abs().max().item()
        plain_error = (plain[key].double() - exact[key].double()).abs().max().item()
        rounding = 1e-5 * max(1.0, exact[key].abs().max().item())
        assert error <= 2 * plain_error + rounding, f"{key}: {error:.2e} from float64, float32 plain layers {plain_error:.2e}"
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("case", ["nchw_residual", "other_shape", "relu6", "bf16", "eval", "hooked_act", "plain_switch",
                                  "float32_residual"])
def test_a_residual_end_the_kernel_does_not_cover_runs_the_plain_layers(monkeypatch, case):
    calls = []
    real = norm_act._BatchNormAdd.apply
    monkeypatch.setattr(norm_act._BatchNormAdd, "apply", lambda *a: calls.append(1) or real(*a))
    bn, twin = _pair(8)
    act = nn.ReLU6() if case == "relu6" else nn.ReLU()
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    if case == "nchw_residual":
        residual = residual.contiguous()
    if case == "other_shape":  # broadcasts in the plain sum
        residual = torch.randn(1, 8, 1, 1)
    if case == "bf16":
        x, residual, bn, twin = x.bfloat16(), residual.bfloat16(), bn.bfloat16(), twin.bfloat16()
    if case == "float32_residual":  # a bf16 map with a float32 shortcut: PyTorch's sum promotes to float32
        x = x.bfloat16()
    if case == "eval":
        bn.eval(), twin.eval()
    if case == "hooked_act":
        act.register_forward_hook(lambda *a: None)
    with kernels.plain() if case == "plain_switch" else torch.enable_grad():
        y = norm_act.batch_norm_add_act(x, bn, residual, act)
    assert calls == [] and torch.equal(y, act(twin(x) + residual))
    norm_act.batch_norm_add_act(x.float().contiguous(memory_format=torch.channels_last), _pair(8)[0],
                                torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last), nn.ReLU())
    assert calls == [1]  # the covered case next to it does use the kernel


# ---- bf16 maps (a conv's output under CPU autocast) ------------------------------------------------


def _bf16_map(shape, seed):
    torch.manual_seed(seed)
    return (torch.randn(shape) * 3 + 2).bfloat16().contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.__name__)
@pytest.mark.parametrize("shape", [(8, 48, 9, 7), (3, 5, 4, 4), (64, 16, 8, 8)])
def test_a_bf16_map_is_normalised_as_the_float_kernel_rounds_it(act, shape):
    """The _bf16 functions compute in float32 and round each value they write once: output and
    input gradient (bf16) are bit for bit the float kernel's on the same values, rounded as
    PyTorch rounds; weight and bias gradients and the running statistics (float32) are equal."""
    x, grad = _bf16_map(shape, 1), _bf16_map(shape, 2)
    bn, twin = _pair(shape[1])
    xb = x.clone().requires_grad_()
    y = norm_act.batch_norm_act(xb, bn, act())
    assert y.dtype == torch.bfloat16 and y.grad_fn.name().endswith("_BatchNormActBackward")
    y.backward(grad)
    xf = x.clone().requires_grad_()
    y_ref = norm_act.batch_norm_act(xf.float(), twin, act()).bfloat16()  # the float32 kernel, then a cast
    y_ref.backward(grad)
    assert xb.grad.dtype == torch.bfloat16
    assert torch.equal(y, y_ref) and torch.equal(xb.grad, xf.grad)
    for a, b in [(bn.weight.grad, twin.weight.grad), (bn.bias.grad, twin.bias.grad)] + list(
            zip(bn.buffers(), twin.buffers())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Identity], ids=lambda a: a.__name__)
def test_a_bf16_residual_end_is_the_float_kernel_rounded(act):
    shape = (8, 24, 6, 5)
    x, residual, grad = _bf16_map(shape, 1), _bf16_map(shape, 3), _bf16_map(shape, 2)
    bn, twin = _pair(shape[1])
    xb, rb = x.clone().requires_grad_(), residual.clone().requires_grad_()
    y = norm_act.batch_norm_add_act(xb, bn, rb, act())
    assert y.dtype == torch.bfloat16 and y.grad_fn.name().endswith("_BatchNormAddBackward")
    assert (y == 0).any() == (act is nn.ReLU)
    y.backward(grad)
    xf, rf = x.clone().requires_grad_(), residual.clone().requires_grad_()
    norm_act.batch_norm_add_act(xf.float(), twin, rf.float(), act()).bfloat16().backward(grad)
    for a, b in [(y, norm_act.batch_norm_add_act(x.float(), _pair(shape[1])[0], residual.float(), act()).bfloat16()),
                 (xb.grad, xf.grad), (rb.grad, rf.grad), (bn.weight.grad, twin.weight.grad),
                 (bn.bias.grad, twin.bias.grad)]:
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("act", [nn.ReLU6, nn.Identity], ids=lambda a: a.__name__)
def test_a_bf16_map_under_autocast_is_as_close_as_pytorchs_bf16_layers(act):
    """Against float64 on the same bf16 values: the kernel's output and gradients are no further
    than PyTorch's own bf16 norm and activation under autocast (both round each value to bf16)."""
    shape = (16, 32, 8, 8)
    x, grad = _bf16_map(shape, 1), _bf16_map(shape, 2)
    runs = {}
    for path in ("kernel", "pytorch", "float64"):
        bn = _pair(shape[1])[0]
        xx = (x.double() if path == "float64" else x).clone().requires_grad_()
        if path == "float64":
            bn = bn.double()
        with kernels.plain() if path == "pytorch" else torch.enable_grad(), torch.autocast("cpu", torch.bfloat16):
            y = norm_act.batch_norm_act(xx, bn, act())
        y.backward(grad.to(y.dtype))
        runs[path] = [t.double() for t in (y, xx.grad, bn.weight.grad, bn.bias.grad)]
    for what, k, p, e in zip(("output", "input grad", "weight grad", "bias grad"), runs["kernel"], runs["pytorch"],
                             runs["float64"]):
        kernel_error, pytorch_error = (k - e).abs().max().item(), (p - e).abs().max().item()
        assert kernel_error <= 1.5 * pytorch_error + 1e-6, f"{what}: {kernel_error:.2e} kernel, {pytorch_error:.2e} PyTorch bf16"


def test_a_nan_in_a_bf16_map_goes_through():
    x = _bf16_map((4, 16, 3, 3), 1)
    x[1, 3, 2, 1] = float("nan")
    y = norm_act.batch_norm_act(x, _pair(16)[0], nn.ReLU())
    with kernels.plain():
        y_plain = norm_act.batch_norm_act(x, _pair(16)[0], nn.ReLU())
    assert torch.equal(y.isnan(), y_plain.isnan()) and y[:, 3].isnan().all()


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "xception_small"])
def test_a_model_under_bf16_autocast_normalises_its_bf16_maps_on_the_kernel(monkeypatch, name):
    """A training step under CPU bf16 autocast: every norm that reads a conv's bf16 output runs the
    kernel's bf16 functions, and the logits and the gradient are as close to float64 as with
    PyTorch's bf16 layers (within 1.5x: both round the same maps to bf16, in different places, and
    oneDNN's bf16 convs round differently with the thread count). The kernels' own results are
    pinned bit for bit above.
    The loss is left out: one number, its bf16 error cancels by chance on either path."""
    calls = []
    for fn in (norm_act._BatchNormAct, norm_act._BatchNormAdd):
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, real=real: calls.append(a[0].dtype) or real(*a))
    runs = {}
    for mode in ("kernel", "plain", "float64"):
        runs[mode] = _model_step(name, mode == "float64", plain=mode == "plain", bf16=mode != "float64")[1:3]
        assert (torch.bfloat16 in calls) == (mode == "kernel"), mode
        calls.clear()
    for what, k, p, e in zip(("logits", "gradient"), runs["kernel"], runs["plain"], runs["float64"]):
        kernel_error, plain_error = ((k - e).norm() / e.norm()).item(), ((p - e).norm() / e.norm()).item()
        assert kernel_error <= 1.5 * plain_error, f"{what}: {kernel_error:.2e} kernel, {plain_error:.2e} plain bf16"


def test_resnet_blocks_end_in_the_kernel_unless_se_or_hooks_sit_there(monkeypatch):
    calls = []
    real = norm_act._BatchNormAdd.apply
    monkeypatch.setattr(norm_act._BatchNormAdd, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for name, blocks in [("resnet20", 9), ("resnet38_bottleneck", 12), ("se_resnet20", 0)]:
        calls.clear()
        model = models.create_model(name).to(memory_format=torch.channels_last)
        model(x).sum().backward()
        assert calls == ["relu"] * blocks, name  # SE sits between the norm and the sum: its blocks run the layers
    model = models.create_model("resnet38_bottleneck").to(memory_format=torch.channels_last)
    seen = []
    block = next(m for m in model.modules() if isinstance(m, Bottleneck))
    block.conv_pwl.register_forward_hook(lambda *a: seen.append("pwl"))
    block.act.register_forward_hook(lambda *a: seen.append("act"))
    calls.clear()
    model(x)
    assert len(calls) == 11 and seen == ["pwl", "act"]  # the watched block calls its layers, and the hooks fire
    model.eval()
    calls.clear()
    model(x)
    assert calls == []


def test_inverted_residuals_end_in_the_kernel_unless_hooks_sit_there(monkeypatch):
    """The blocks with a residual (stride 1, equal widths) end in the kernel without an activation:
    mobilenet_v2 has 10 of 17, mobilenet_v3_small 7 of 11 (SE gates before the projection, so
    it does not stand in the way), and conv_mode="full"'s dense projection blocks as many."""
    calls = []
    real = norm_act._BatchNormAdd.apply
    monkeypatch.setattr(norm_act._BatchNormAdd, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for name, kwargs, blocks in [("mobilenet_v2", {}, 10), ("mobilenet_v3_small", {}, 7),
                                 ("mobilenet_v2", {"conv_mode": "full"}, 10)]:
        calls.clear()
        model = models.create_model(name, **kwargs).to(memory_format=torch.channels_last)
        model(x).sum().backward()
        assert calls == ["identity"] * blocks, (name, kwargs)
    model = models.create_model("mobilenet_v2").to(memory_format=torch.channels_last)
    block = next(m for m in model.modules() if isinstance(m, InvertedResidual) and m.has_skip)
    seen = []
    block.conv_pwl.register_forward_hook(lambda *a: seen.append("pwl"))
    calls.clear()
    model(x)
    assert len(calls) == 9 and seen == ["pwl"]  # the watched block calls its projection, and the hook fires
    model.eval()
    calls.clear()
    model(x)
    assert calls == []


def test_xception_blocks_sum_inside_a_norm_and_give_the_layers_result(monkeypatch):
    """Each Xception block's residual sum runs in a norm's kernel when training: the last unit's (the 4
    middle blocks, identity shortcut) or the shortcut's (the 4 blocks that change width, after the pool).
    The logits are the plain layers' (float32 rounding apart); eval runs the layers."""
    calls = []
    real = norm_act._BatchNormAdd.apply
    monkeypatch.setattr(norm_act._BatchNormAdd, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    torch.manual_seed(0)
    model = models.create_model("xception_small", drop_rate=0.0).to(memory_format=torch.channels_last)  # no dropout draw
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    logits = model(x)
    logits.sum().backward()
    assert calls == ["identity"] * 8
    with kernels.plain():
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    calls.clear()
    model.eval()(x)
    assert calls == []


def _model_step(name, float64: bool, plain: bool = False, bf16: bool = False):
    """One training step of `name` at width 0.35, batch 8, from the same weights, images and labels
    whatever the precision: (loss, logits, gradient, buffers), each flattened to float64."""
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10, width=0.35).to(memory_format=torch.channels_last)
    dtype = torch.float64 if float64 else torch.float32
    model.to(dtype)
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32).to(dtype).contiguous(memory_format=torch.channels_last)  # the same draw in both
    with kernels.plain() if plain else torch.enable_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float() if bf16 else logits, torch.randint(0, 10, (8,)))
    loss.backward()
    return (loss.double(), logits.double().flatten(), torch.cat([p.grad.double().flatten() for p in model.parameters()]),
            torch.cat([b.double().flatten() for b in model.buffers()]))


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v1", "xception_small", "resnet20",
                                  "resnet38_bottleneck", "se_resnet20"])
def test_a_model_trains_as_accurately_fused(name):
    """One training step of a small mobilenet_v2 (ReLU6; Identity after the projections) or
    mobilenet_v3_small (Hardswish, SE), measured against the same step in float64: loss, running
    statistics and the whole gradient are as close with the kernel as with PyTorch's float32 layers.
    (A freshly initialised mobilenet_v2 amplifies float32 rounding into gradient differences of
    about 1% on either path, so the two float32 paths are compared through float64, not directly.)"""
    runs = {mode: _model_step(name, mode == "float64", plain=mode == "plain") for mode in ("fused", "plain", "float64")}
    runs = {mode: (loss, grad, buffers) for mode, (loss, _, grad, buffers) in runs.items()}

    def error(mode):
        return [((a - b).norm() / b.norm()).item() for a, b in zip(runs[mode], runs["float64"])]

    for what, fused, plain in zip(("loss", "gradient", "buffers"), error("fused"), error("plain")):
        assert fused <= 2 * plain + 1e-5, f"{what}: relative error {fused:.2e} fused, {plain:.2e} plain float32"


def test_conv_norm_act_uses_the_kernel_when_training(monkeypatch):
    calls = []
    real = norm_act._BatchNormAct.apply
    monkeypatch.setattr(norm_act._BatchNormAct, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    layer = ConvNormAct(4, 8, 3, act_layer=nn.ReLU6).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    layer(x).sum().backward()
    assert calls == ["relu6"]
    layer.eval()
    layer(x)
    assert calls == ["relu6"]  # eval mode: the plain layers (models.fuse folds them for inference)


def test_a_missing_compiler_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_failed", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("POINTWISE_ZOO_CACHE", str(tmp_path / "cache"))
    bn, twin = _pair(8)
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with pytest.warns(RuntimeWarning, match="POINTWISE_ZOO_PLAIN_KERNELS=1"):
        y = norm_act.batch_norm_act(x, bn, nn.ReLU())
    assert torch.equal(y, nn.ReLU()(twin(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: not again on every layer
        norm_act.batch_norm_act(x, bn, nn.ReLU())
    assert not norm_act.available()


def test_the_kernel_compiles_into_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("POINTWISE_ZOO_CACHE", str(tmp_path))
    compiler = native.os.environ.get("CC") or native.shutil.which("cc") or native.shutil.which("gcc")
    first = native._compile(compiler)
    stamp = first.stat().st_mtime_ns
    assert native._compile(compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover temporary folder
