"""Quantization-aware fine-tuning: models.prepare_qat simulates models.quantize's int8 grid, leaves
the model's keys alone, and train.py's qat=true fine-tunes, checkpoints, resumes and evaluates."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn as nn

import models
from conftest import compose_config, eval_overrides, model_with_bn_statistics, tiny_overrides
from models.layers import ConvNormAct
from models.qat import ActivationFakeQuant, fake_quantize_weight
from training.checkpoints import read_checkpoint, model_state_dict
from training.errors import ConfigError
from training.evaluate import evaluate
from training.pipeline import train


def signed_bn_model() -> nn.Module:
    """resnet20 at width 0.25 with BN statistics and scales of both signs: folding them scales each
    output channel by a number k_c of either sign."""
    model = model_with_bn_statistics("resnet20")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
    return model


def test_fake_quant_of_the_raw_weight_is_the_grid_of_the_bn_folded_one():
    model = signed_bn_model()
    fused = models.fuse(model, onednn=False)
    checked = 0
    for name, block in model.named_modules():
        if isinstance(block, ConvNormAct) and isinstance(block.bn, nn.BatchNorm2d):
            bn = block.bn
            k = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().view(-1, 1, 1, 1)
            folded = fused.get_submodule(name).conv.weight.detach()
            raw = block.conv.weight.detach()
            assert torch.allclose(folded, raw * k, atol=1e-6)
            assert torch.allclose(fake_quantize_weight(raw) * k, fake_quantize_weight(folded), atol=1e-6)
            checked += 1
    assert checked == 21  # every conv of resnet20 (stem, 18 in the blocks, 2 shortcuts)


def test_weights_land_on_onnxruntimes_grid_and_only_the_stem_stays_float():
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    model = signed_bn_model()
    q = models.quantize(model, torch.randn(16, 3, 32, 32), method="minmax", short_names=False)
    stored = {t.name: numpy_helper.to_array(t).copy() for t in onnx.load_from_string(q.onnx_bytes).graph.initializer}
    int8 = {k[: -len(".weight_quantized")]: k for k in stored if k.endswith(".weight_quantized")}

    sim = models.prepare_qat(model)  # float_layers="first", as quantize
    layers = sim.quantized_layers(model, torch.randn(1, 3, 32, 32))
    assert sim.float_names(model, None) == ["stem.0.conv"]
    assert set(layers) == set(int8) and "classifier" in layers  # the same layers int8, the stem float32
    folded = dict(models.fuse(model, onednn=False).named_parameters())
    for name, key in int8.items():
        scale = torch.from_numpy(stored[name + ".weight_scale"])
        onnx_weight = torch.from_numpy(stored[key]).float() * scale.view(-1, *[1] * (stored[key].ndim - 1))
        ours = fake_quantize_weight(folded[name + ".weight"].detach())
        assert torch.allclose(ours, onnx_weight, rtol=0, atol=1e-3 * scale.min().item()), name


def test_float_layers_pick_the_first_and_last_layers_called():
    model = models.create_model("mobilenet_v2", width=0.25)
    x = torch.randn(1, 3, 32, 32)
    ends = models.prepare_qat(model, float_layers="ends")
    first, last = ends.float_names(model, x)
    assert isinstance(model.get_submodule(first), nn.Conv2d) and first.startswith("stem")
    assert isinstance(model.get_submodule(last), nn.Linear)
    assert models.prepare_qat(model, float_layers=None).float_names(model, x) == []
    with pytest.raises(ValueError, match="float_layers='stem'"):
        models.prepare_qat(model, float_layers="stem")


def test_gradients_pass_straight_through():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    q = fake_quantize_weight(w)
    assert not torch.equal(q, w) and (q - w).abs().max() <= w.abs().amax((1, 2, 3)).max() / 127 / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))

    act = ActivationFakeQuant().train()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    act(x).sum().backward()  # the first batch sets the range: all of it inside
    assert torch.equal(x.grad, torch.ones_like(x))
    lo, hi = act.min_val.item(), act.max_val.item()
    assert (lo, hi) == (x.min().item(), x.max().item())
    act.eval()
    y = (10 * x).detach().requires_grad_()
    act(y).sum().backward()
    assert (act.min_val.item(), act.max_val.item()) == (lo, hi)  # frozen in eval mode
    step = (hi - lo) / 255
    inside, outside = (y > lo) & (y < hi), (y < lo - step) | (y > hi + step)
    assert inside.any() and outside.any()
    assert (y.grad[inside] == 1).all() and (y.grad[outside] == 0).all()  # clipped values get no gradient


def test_the_model_keeps_its_keys_and_hooks_and_trains_in_channels_last_and_bf16():
    model = models.create_model("resnet20", width=0.25).to(memory_format=torch.channels_last)
    keys = list(model.state_dict())
    sim = models.prepare_qat(model)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sim(model.train(), x)
    out.float().sum().backward()
    assert list(model.state_dict()) == keys
    assert all(not m._forward_pre_hooks for m in model.modules())  # the hooks live for one call
    assert all(k.startswith("act.") for k in sim.state_dict()) and not any("weight" in k for k in sim.state_dict())
    assert model.classifier.weight.grad is not None and torch.isfinite(model.classifier.weight.grad).all()
    # the simulation changes the output, but not by much (train mode: BN normalises with the batch's
    # statistics, as when the ranges were observed; this fresh model's running statistics are not real)
    with torch.no_grad():
        ref, simulated = model(x), sim(model, x)
    assert 0 < ((simulated - ref).norm() / ref.norm()).item() < 0.2


def test_bad_qat_settings_name_the_fix(compose_train):
    with pytest.raises(ConfigError, match="qat=true .* compile=true: set compile=false"):
        train(compose_train("qat=true", "compile=true"))
    with pytest.raises(ConfigError, match="qat='yes': choose qat=true"):
        train(compose_train("qat=yes"))


def test_qat_fine_tune_from_trained_weights_then_int8_eval_and_resume(trained_run, tmp_path, cifar_root, monkeypatch):
    real = models.create_model
    start = trained_run / "checkpoints" / "last.ckpt"

    def shipped(name, pretrained=False, **kwargs):  # "pretrained=true": the tiny trained run's weights
        return real(name, checkpoint_path=start if pretrained else None, **kwargs)

    monkeypatch.setattr(models, "create_model", shipped)
    run = tmp_path / "qat"
    # the docs' fine-tuning settings; a schedule of 2 epochs, stopped after 1, then resumed
    options = ["pretrained=true", "qat=true", "optim.lr=0.01", "optim.warmup_epochs=0", "optim.epochs=2"]
    base = [*tiny_overrides(cifar_root, run, tmp_path / "cache"), *options]
    summary = train(compose_config("train", [*base, "trainer.max_epochs=1"]))
    assert summary["qat"] and summary["test_acc"] is not None and "qat: true" in (run / "config.yaml").read_text()
    assert "simulated int8" in (run / "summary.md").read_text()

    last = run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    observers = {k for k in ckpt["state_dict"] if k.startswith("qat.")}
    observed = {k for k in observers if k.endswith(".observed") and ckpt["state_dict"][k].item()}
    unused = {k for k in observers if k.endswith(".observed")} - observed
    assert observed and unused == {"qat.act.stem-0-conv.observed"}  # the stem runs in float32
    assert set(model_state_dict(ckpt)) == set(real("resnet20", width=0.25).state_dict())  # the model's keys, no more
    assert ckpt["hyper_parameters"]["config"]["qat"] is True

    if importlib.util.find_spec("onnxruntime"):  # eval.int8 needs it; the rest of the test does not
        overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), f"ckpt_path={last}", "eval.int8=true",
                     "eval.int8_calibration_images=16"]
        report = evaluate(compose_config("eval", overrides), overrides=overrides)
        assert report["int8"] and report["num_images"] == 40 and 0 <= report["top1"] <= 1

    with pytest.raises(ConfigError, match="trained with qat=true .* resume it with qat=true"):
        train(compose_config("train", [*tiny_overrides(cifar_root, run, tmp_path / "cache"), f"ckpt_path={last}"]))
    resumed = train(compose_config("train", [*base, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    assert resumed["epochs"] == 2 and resumed["qat"]
    after = read_checkpoint(last)["state_dict"]
    assert any(not torch.equal(after[k], ckpt["state_dict"][k]) for k in observers if k.endswith("min_val"))
    assert json.loads((run / "summary.json").read_text())["qat"] is True

    # resumed exactly: the same weights and ranges as two epochs in one go
    straight = tmp_path / "straight"
    train(compose_config("train", [*tiny_overrides(cifar_root, straight, tmp_path / "cache"), *options, "trainer.max_epochs=2"]))
    a, b = (read_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (straight, run))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_qat_continues_a_float_run_from_its_checkpoint(trained_run, tmp_path, cifar_root):
    # a run trained without qat, resumed with qat=true for one more epoch: fresh activation ranges
    summary = train(compose_config("train", [*tiny_overrides(cifar_root, tmp_path / "run", tmp_path / "cache"), "qat=true",
                                             "trainer.max_epochs=3", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}"]))
    assert summary["epochs"] == 3 and summary["qat"]
    assert any(k.startswith("qat.") for k in read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"])
