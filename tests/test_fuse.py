"""`models.fuse`: an inference copy whose outputs equal the original's, for every registered model.

Batch-norm statistics are randomised first, so folding has something to fold (a fresh BN is the
identity in eval mode). Tolerance: 1e-4, relative to the output's scale (deep random-init nets
such as resnet56 reach outputs in the thousands, where float32 rounding alone exceeds 1e-4).
"""

import copy
import inspect

import pytest
import torch
import torch.nn as nn

import models
from models import PointwiseConv, create_model, fuse, list_models
from models.fuse import OneDNNConv
from models.layers import ConvNormAct

INPUT = {"cifar": 32, "imagenet": 64}


@pytest.fixture(autouse=True)
def one_thread():
    """Correctness only, on tiny inputs: one thread is as fast, and on a shared machine it avoids
    OpenMP stalls that made this file 2-3x slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


def assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, atol=tol * scale, rtol=tol)


def test_fuse_is_exported():
    # the function (not the submodule of the same name) is what `models.fuse` names
    assert inspect.isfunction(models.fuse) and models.fuse.__module__ == "models.fuse" and "fuse" in models.__all__


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_fused_outputs_match_every_model(name, stem):
    torch.manual_seed(0)
    model = randomize_norms(create_model(name, num_classes=7, stem=stem, width=0.25)).eval()
    before = copy.deepcopy(model.state_dict())
    fused = fuse(model)
    x = torch.randn(2, 3, INPUT[stem], INPUT[stem])
    with torch.no_grad():
        ref = model(x)
        out = fused(x)
    assert_close_to_scale(out, ref)
    # every BatchNorm2d of these models sits right after a conv: all are folded
    assert not [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert fused.fuse_stats["bn_folded"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())
    assert type(fused) is type(model)
    # the original is untouched and still in the mode it was in
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fused_model_runs_channels_last_and_any_input_size():
    model = randomize_norms(create_model("mobilenet_v2", num_classes=5, width=0.25)).eval()
    fused = fuse(model)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fused.parameters() if p.dim() == 4)
    for size, batch in [(32, 3), (48, 1)]:
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            assert_close_to_scale(fused(x), model(x))
            features = fused.forward_features(x)
        assert features.is_contiguous(memory_format=torch.channels_last)


def test_options_off_still_match():
    model = randomize_norms(create_model("resnet20", num_classes=5, width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    for kwargs in (dict(channels_last=False), dict(inplace_acts=False), dict(channels_last=False, inplace_acts=False)):
        fused = fuse(model, **kwargs)
        with torch.no_grad():
            assert_close_to_scale(fused(x), model(x))


def test_training_mode_model_is_fused_from_running_stats():
    model = randomize_norms(create_model("mobilenet_v1", num_classes=5, width=0.25))
    assert model.training
    fused = fuse(model)
    assert model.training  # the copy is put in eval mode, not the original
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_to_scale(fused(x), model.eval()(x))


def test_folds_pointwise_and_sequential_pairs_and_traced_pairs():
    class Custom(nn.Module):  # conv -> bn inside a custom forward: found by data flow
        def __init__(self):
            super().__init__()
            self.pw = PointwiseConv(8, 16, bias=True)
            self.norm = nn.BatchNorm2d(16)
            self.seq = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.cna = ConvNormAct(16, 8, 1, act_layer=nn.ReLU6)

        def forward(self, x):
            return self.cna(self.seq(torch.relu(self.norm(self.pw(x)))))

    model = randomize_norms(Custom()).eval()
    fused = fuse(model, channels_last=False)
    assert fused.fuse_stats["bn_folded"] == 3
    assert isinstance(fused.cna.conv, PointwiseConv) and fused.cna.conv.bias is not None
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert_close_to_scale(fused(x), model(x))


def test_unsafe_pairs_are_left_alone():
    class Branchy(nn.Module):  # the conv output is also read by the skip: folding would change it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.act(self.bn(y)) + y

    class SharedInput(nn.Module):  # the activation's input also feeds the skip: must stay out of place
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = x * 2
            return self.conv(self.act(y)) + y

    for cls, stats in ((Branchy, dict(bn_folded=0, inplace_acts=1)), (SharedInput, dict(bn_folded=0, inplace_acts=0))):
        model = randomize_norms(cls()).eval()
        fused = fuse(model)
        assert {k: fused.fuse_stats[k] for k in stats} == stats, cls.__name__
        x = torch.randn(2, 4, 5, 5)
        with torch.no_grad():
            assert_close_to_scale(fused(x), model(x))


def test_onednn_convs_copy_pickle_autocast_and_fallback():
    import io

    model = randomize_norms(create_model("mobilenet_v3_small", num_classes=5, width=0.25)).eval()
    fused = fuse(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), fused(x)  # the forward packs the weights
    assert_close_to_scale(out, ref)
    if fused.fuse_stats["onednn_convs"] == 0:
        pytest.skip("this PyTorch build has no oneDNN fused conv op")
    onednn = [m for m in fused.modules() if isinstance(m, OneDNNConv)]
    assert onednn and all(m._packed for m in onednn)
    # copies and pickles drop the opaque packed weight and repack on use
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    for clone in (copy.deepcopy(fused), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        with torch.no_grad():
            assert_close_to_scale(clone(x), ref)
    # the fallback path (taken under autograd, tracing, autocast) computes the same function
    with torch.enable_grad():
        assert_close_to_scale(fused(x.requires_grad_()).detach(), ref)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused(x)
    torch.testing.assert_close(low.float(), ref, atol=0.05 * max(1.0, ref.abs().max().item()), rtol=0.05)
