"""The max-pool kernel (models/pool.py): PyTorch's maxima and gradients, ties and NaNs included, and
where it runs."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models import kernels, native, pool

pytestmark = [
    pytest.mark.skipif(native.lib() is None, reason="the C kernels cannot be built here (no C compiler?)"),
    pytest.mark.usefixtures("kernels_on"),
]
CL = torch.channels_last


def _tied_map(shape, dtype, seed=0):
    """Small integers (many ties in every window) and a few NaNs, one of them beside another."""
    torch.manual_seed(seed)
    x = torch.randint(-3, 3, shape).to(dtype).contiguous(memory_format=CL)
    x[0, 0, 1, 1] = x[-1, -1, 2, 3] = x[-1, -1, 2, 4] = float("nan")
    return x


def _pool_both(x, k, s, p, grad_dtype=None):
    """(PyTorch's output and input gradient, the kernel's), the same output gradient for both."""
    outs = []
    for kernel in (False, True):
        xi = x.clone().requires_grad_()
        y = pool._MaxPool.apply(xi, k, s, p) if kernel else F.max_pool2d(xi, k, s, p)
        torch.manual_seed(1)
        g = torch.randn(y.shape).contiguous(memory_format=CL).to(grad_dtype or x.dtype)
        y.backward(g.to(y.dtype))
        outs.append((y, xi.grad))
    return outs


GEOMETRIES = [(3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 2, 2), (3, 3, 0)]


@pytest.mark.parametrize("k, s, p", GEOMETRIES)
@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (3, 48, 8, 8), (2, 33, 12, 11)])  # 33: a last block overlapping
def test_float32_maxima_and_gradients_are_pytorchs_bit_for_bit(k, s, p, shape):
    (y, dx), (y_k, dx_k) = _pool_both(_tied_map(shape, torch.float32), k, s, p)
    assert y_k.is_contiguous(memory_format=CL) and dx_k.is_contiguous(memory_format=CL)
    assert torch.equal(y.isnan(), y_k.isnan()) and torch.equal(y.nan_to_num(), y_k.nan_to_num())
    assert torch.equal(dx, dx_k)  # which value of a tie (the first; a NaN: the last) gets the gradient


@pytest.mark.parametrize("k, s, p", GEOMETRIES)
def test_bf16_maxima_are_pytorchs_and_gradients_its_float32_ones_rounded_once(k, s, p):
    """PyTorch's bf16 backward adds a value's gradients from overlapping windows in bf16; the kernel adds
    them in float32, in the same order, and rounds once: the float32 gradient rounded."""
    x = _tied_map((2, 33, 12, 11), torch.bfloat16)
    (y, _), (y_k, dx_k) = _pool_both(x, k, s, p)
    (_, dx32), _ = _pool_both(x.float(), k, s, p, grad_dtype=torch.bfloat16)
    assert y_k.dtype == dx_k.dtype == torch.bfloat16
    assert torch.equal(y.isnan(), y_k.isnan()) and torch.equal(y.nan_to_num(), y_k.nan_to_num())
    assert torch.equal(dx_k, dx32.bfloat16())


def _spy(monkeypatch):
    calls = []
    real = pool._MaxPool.apply
    monkeypatch.setattr(pool._MaxPool, "apply", lambda x, *g: calls.append((tuple(x.shape), g)) or real(x, *g))
    return calls


def test_a_training_map_takes_the_kernel_and_everything_else_the_layer(monkeypatch):
    calls = _spy(monkeypatch)
    layer = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL)
    assert torch.equal(pool.max_pool2d(x.requires_grad_(), layer), layer(x)) and calls == [((2, 16, 8, 8), (3, 2, 1))]
    calls.clear()
    with torch.no_grad():
        pool.max_pool2d(x, layer)  # inference: no index to keep
    pool.max_pool2d(x.detach(), layer)  # no gradient wanted
    pool.max_pool2d(x.contiguous(), layer)  # NCHW
    pool.max_pool2d(x.half(), layer)
    pool.max_pool2d(x[:, :15].contiguous(memory_format=CL), layer)  # fewer than 16 channels
    for other in (nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 2, 1, dilation=2), nn.MaxPool2d((3, 2), 2),
                  nn.MaxPool2d(3, 2, 1, return_indices=True), nn.AvgPool2d(3, 2, 1), nn.Identity()):
        pool.max_pool2d(x, other)
    hooked = nn.MaxPool2d(3, 2, 1)
    hooked.register_forward_hook(lambda *a: None)
    pool.max_pool2d(x, hooked)
    with kernels.plain():
        pool.max_pool2d(x, layer)
    assert calls == []


def test_xception_small_trains_its_three_strided_pools_on_the_kernel(monkeypatch):
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    model = models.create_model("xception_small", num_classes=10).to(memory_format=CL)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    model(x).sum().backward()
    assert [shape for shape, _ in calls] == [(2, 128, 32, 32), (2, 256, 16, 16), (2, 384, 8, 8)]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    calls.clear()
    with torch.no_grad():
        model.eval()(x)
    assert calls == []  # inference: PyTorch's pool
