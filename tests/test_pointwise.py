"""The pointwise primitive against F.conv2d: values, gradients, dtypes, memory formats and errors."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import PointwiseConv, pointwise_conv2d

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def random_case(rng: random.Random):
    groups = rng.choice([1, 1, 1, 2, 4])
    c_in = groups * rng.randint(1, 12)
    c_out = groups * rng.randint(1, 12)
    stride = rng.choice([1, 2, 3, (1, 2), (2, 1)])
    padding = rng.choice([0, 1, 2, (0, 1), (2, 0)])
    dilation = rng.choice([1, 2, (1, 3)])
    shape = (rng.randint(1, 3), c_in, rng.randint(1, 11), rng.randint(1, 11))
    return shape, c_out, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_matches_conv2d_forward_and_backward(seed, channels_last, dtype):
    rng = random.Random(seed)
    shape, c_out, kw = random_case(rng)
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c_out, shape[1] // kw["groups"], 1, 1, dtype=dtype)
    bias = torch.randn(c_out, dtype=dtype) if seed % 2 else None

    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = pointwise_conv2d(leaves[0], leaves[1], leaves[2] if bias is not None else None, **kw)
    ref = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias is not None else None, **kw)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])

    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for ours, theirs in zip(leaves, ref_leaves):
        # bf16 gradients sum many rounded products: compare relative to the gradient's scale
        scale = theirs.grad.abs().max().item() + 1
        tol = dict(atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"])
        torch.testing.assert_close(ours.grad, theirs.grad, **tol)


def test_keywords_match_conv2d_signature():
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 1, 1)
    out = pointwise_conv2d(input=x, weight=w, bias=None, stride=2, padding=1, dilation=1, groups=1)
    torch.testing.assert_close(out, F.conv2d(x, w, stride=2, padding=1))


def test_string_padding_and_2d_weight_and_unbatched():
    x, w = torch.randn(2, 8, 5, 5), torch.randn(4, 8)
    ref = F.conv2d(x, w[:, :, None, None])
    for padding in ("same", "valid"):
        torch.testing.assert_close(pointwise_conv2d(x, w, padding=padding), ref)
    torch.testing.assert_close(pointwise_conv2d(x[0], w), ref[0])


def test_output_keeps_channels_last():
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    out = pointwise_conv2d(x, torch.randn(16, 8, 1, 1))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "x_shape, w_shape, groups, match",
    [
        ((1, 8, 4, 4), (4, 8, 3, 3), 1, r"1x1 kernel.*\(4, 8, 3, 3\)"),
        ((1, 8, 4, 4), (4, 7, 1, 1), 1, r"8 channels.*\(4, 7, 1, 1\)"),
        ((1, 8, 4, 4), (6, 2, 1, 1), 4, r"groups=4"),
        ((8, 4, 4), (4, 8, 1, 1, 1), 1, r"1x1 kernel"),
    ],
)
def test_bad_shapes_raise_value_error_naming_them(x_shape, w_shape, groups, match):
    with pytest.raises(ValueError, match=match):
        pointwise_conv2d(torch.randn(x_shape), torch.randn(w_shape), groups=groups)


def test_module_state_dict_interchanges_with_conv2d():
    conv = nn.Conv2d(8, 16, 1, stride=2)
    pw = PointwiseConv(8, 16, stride=2)
    assert {k: v.shape for k, v in pw.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}
    pw.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(pw(x), conv(x))
    conv.load_state_dict(PointwiseConv(8, 16, bias=True).state_dict())  # and back


def test_module_without_bias_and_grouped():
    pw = PointwiseConv(8, 12, groups=4, bias=False)
    conv = nn.Conv2d(8, 12, 1, groups=4, bias=False)
    conv.load_state_dict(pw.state_dict())
    x = torch.randn(1, 8, 3, 3)
    torch.testing.assert_close(pw(x), conv(x))
    with pytest.raises(ValueError, match="groups=3"):
        PointwiseConv(8, 12, groups=3)
