"""The calls users of timm and torchvision expect, on every zoo model (issue 11):
list_models filters, create_model's in_chans / drop_rate / features_only / checkpoint_path,
forward_features / forward_head / reset_classifier / pretrained_cfg, the shipped weights'
transforms, fx / TorchScript / torch.export / torchvision feature extraction, and torch.hub
with a foreign `models` module imported.

Small widths, batch 1-2, 32x32 (cifar) and 64x64 (imagenet stems) keep this file fast; the
TorchScript + torch.export sweep over every model is `slow` beyond one model per block type.
"""

from __future__ import annotations

import argparse
import ast
import math
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import models
from models import PointwiseConv, create_model, list_models
from models._base import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
INPUT = {"cifar": 32, "imagenet": 64}
NAMES = list_models()
STEMS = ["cifar", "imagenet"]
# one model per family and block type: TorchScript / torch.export of these always run
ALWAYS_COMPILED = {"mobilenet_v3_small", "resnet20", "resnet38_bottleneck", "xception_small"}




def small(name: str, stem: str = "cifar", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, stem=stem, width=0.25, **kwargs).eval()


def image(stem: str = "cifar", n: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, INPUT[stem], INPUT[stem], generator=torch.Generator().manual_seed(1))


# ---- 1. list_models ---------------------------------------------------------------------------


def test_list_models_filters_as_timm():
    assert list_models() == sorted(models.registry._BUILDERS)  # unchanged without arguments
    assert list_models("mobilenet*") == ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
    assert list_models(["xception*", "*resnet20"]) == ["resnet20", "se_resnet20", "xception", "xception_small"]
    assert list_models("resnet*", exclude_filters="*50") == ["resnet20", "resnet38_bottleneck", "resnet56"]
    assert list_models("nothing*") == []
    assert list_models(pretrained=True) == models.list_pretrained()
    assert list_models("mobilenet_v2*", pretrained=True) == ["mobilenet_v2", "mobilenet_v2.w0_5"]
    shipped_models = list_models(pretrained=True, include_tags=False)
    assert "mobilenet_v2.w0_5" not in shipped_models and "mobilenet_v2" in shipped_models
    assert set(shipped_models) < set(list_models())


# ---- 3. the classifier API on every model -----------------------------------------------------


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_head_classifier_and_pretrained_cfg(name, stem):
    model = small(name, stem, num_classes=7)
    x = image(stem)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.dim() == 4
        logits = model(x)
        torch.testing.assert_close(logits, model.forward_head(feats), rtol=0, atol=0)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        assert model.get_classifier() is model.classifier and model.num_classes == 7
        torch.testing.assert_close(model.get_classifier()(pre), logits)

        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
        model.reset_classifier(0)  # timm: an identity head, the model gives pooled features
        assert isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x), pre)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")

    # pretrained_cfg: what timm's resolve_data_config reads
    resolve_data_config = pytest.importorskip("timm.data").resolve_data_config
    cfg = resolve_data_config(model=model)
    if stem == "cifar":
        assert cfg["input_size"] == (3, 32, 32)
        assert cfg["mean"] == CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
        assert cfg["std"] == CIFAR10_STD == (0.2470, 0.2435, 0.2616)
        assert cfg["crop_pct"] == 1.0
    else:
        size = 299 if name.startswith("xception") else 224
        assert cfg["input_size"] == (3, size, size)
        assert (cfg["mean"], cfg["std"]) == (IMAGENET_MEAN, IMAGENET_STD)
        assert 0.8 < cfg["crop_pct"] < 1
    assert cfg["interpolation"] in ("bilinear", "bicubic") and cfg["crop_mode"] == "center"
    assert model.pretrained_cfg["architecture"] == name
    model.get_submodule(model.pretrained_cfg["first_conv"])  # names the stem's first conv


def test_pretrained_cfg_of_shipped_weights_comes_from_the_card():
    resolve_data_config = pytest.importorskip("timm.data").resolve_data_config
    for entry in ("resnet20", "mobilenet_v2.w0_5"):
        meta = models.pretrained_meta(entry)
        model = create_model(entry, pretrained=True)
        cfg = resolve_data_config(model=model)
        assert cfg["input_size"] == tuple(meta["input_size"])
        assert cfg["mean"] == tuple(meta["mean"]) and cfg["std"] == tuple(meta["std"])
        assert cfg["crop_pct"] == 1.0
        assert model.pretrained_cfg["tag"] == entry.partition(".")[2]


# ---- 4. features_only -------------------------------------------------------------------------


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("name", NAMES)
def test_features_only(name, stem):
    model = small(name, stem)
    net = models.FeatureListNet(model)  # what create_model(..., features_only=True) returns
    x = image(stem, n=1)
    info = net.feature_info
    with torch.no_grad():
        feats = net(x)
    assert isinstance(feats, list) and len(feats) == len(info) == len(info.channels()) >= 3
    assert [f.shape[1] for f in feats] == info.channels()
    reductions = info.reduction()
    assert reductions == sorted(set(reductions)) and all(r & (r - 1) == 0 for r in reductions)  # one per stride
    assert reductions[0] == (1 if stem == "cifar" else 2) and reductions[-1] in ((4, 8, 16) if stem == "cifar" else (16, 32))
    for f, r in zip(feats, reductions):  # (Xception's unpadded ImageNet stem leaves sizes a little off)
        assert 2 ** round(math.log2(x.shape[-1] / f.shape[-1])) == r
    # the deepest map is the model's forward_features; the modules are the model's own
    with torch.no_grad():
        torch.testing.assert_close(feats[-1], model.forward_features(x))
    assert set(dict(net.named_parameters()).values()) <= set(model.parameters())

    picked = models.FeatureListNet(model, out_indices=(1, -1))
    assert picked.feature_info.out_indices == (1, len(info) - 1)
    with torch.no_grad():
        two = picked(x)
    assert [f.shape for f in two] == [feats[1].shape, feats[-1].shape]
    assert picked.feature_info.channels() == [info.channels()[1], info.channels()[-1]]


def test_features_only_errors_and_pretrained():
    with pytest.raises(ValueError, match=r"out_indices \(9,\) out of range: this model has 3 feature levels"):
        create_model("resnet20", width=0.25, features_only=True, out_indices=(9,))
    with pytest.raises(ValueError, match="features_only=True"):
        create_model("resnet20", out_indices=(1,))
    net = create_model("resnet20", pretrained=True, features_only=True)
    assert isinstance(net, models.FeatureListNet) and net.feature_info.reduction() == [1, 2, 4]
    assert net.feature_info.channels() == [16, 32, 64] and net.feature_info.module_name() == ["blocks.0", "blocks.1", "blocks.2"]
    model = create_model("resnet20", pretrained=True).eval()
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x)[-1], model.forward_features(x))
    assert net.pretrained_cfg["mean"] == tuple(models.pretrained_meta("resnet20")["mean"])


# ---- 2. create_model: in_chans, drop_rate, checkpoint_path ----------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_in_chans_and_drop_rate(name):
    for chans in (1, 4):
        model = small(name, in_chans=chans)
        assert model.in_chans == chans and model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels == chans
        assert model.pretrained_cfg["input_size"] == (chans, 32, 32) and len(model.pretrained_cfg["mean"]) == chans
        with torch.no_grad():
            assert model(image(chans=chans)).shape == (2, 10)

    # drop_rate is the classifier-head dropout of every family, whatever the family calls it
    model = small(name, drop_rate=0.5)
    assert model.dropout.p == 0.5
    model.train()
    for m in model.modules():  # only the dropout stays random
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        feats = model.forward_features(image())
        a, b = model.forward_head(feats), model.forward_head(feats)
        assert not torch.equal(a, b)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), model.forward_head(feats, pre_logits=True))
        model.dropout.p = 0.0
        torch.testing.assert_close(model.forward_head(feats), model.forward_head(feats))


def test_drop_rate_defaults_and_conflicts():
    assert create_model("mobilenet_v2").dropout.p == 0.2  # None keeps each family's default
    assert create_model("xception_small").dropout.p == 0.2
    assert create_model("resnet20").dropout.p == 0.0
    assert create_model("mobilenet_v2", drop_rate=0.1).dropout.p == 0.1
    assert create_model("mobilenet_v2", dropout=0.3).dropout.p == 0.3  # the family's own name still works
    with pytest.raises(ValueError, match="drop_rate=0.1 and dropout=0.3"):
        create_model("mobilenet_v2", drop_rate=0.1, dropout=0.3)
    with pytest.raises(ValueError, match="drop_rate must be"):
        create_model("resnet20", drop_rate=1.5)
    with pytest.raises(ValueError, match="in_chans must be a positive int"):
        create_model("resnet20", in_chans=0)


@pytest.mark.parametrize("entry, chans", [("resnet20", 1), ("resnet20", 4), ("mobilenet_v2.w0_5", 1), ("xception_small", 4)])
def test_in_chans_with_pretrained_weights_adapts_the_stem(entry, chans):
    rgb = create_model(entry, pretrained=True).eval()
    adapted = create_model(entry, pretrained=True, in_chans=chans).eval()
    name = rgb.pretrained_cfg["first_conv"]
    w_rgb, w = rgb.get_submodule(name).weight, adapted.get_submodule(name).weight
    if chans == 1:
        expected = w_rgb.sum(1, keepdim=True)
    else:
        expected = torch.cat([w_rgb, w_rgb], 1)[:, :chans] * (3 / chans)
    torch.testing.assert_close(w, expected)
    timm_models = pytest.importorskip("timm.models")
    torch.testing.assert_close(w, timm_models.adapt_input_conv(chans, w_rgb.detach().clone()))
    others = {k: v for k, v in adapted.state_dict().items() if not k.startswith(name)}
    for key, value in others.items():  # nothing else changed
        torch.testing.assert_close(value, rgb.state_dict()[key])
    assert adapted.pretrained_cfg["input_size"][0] == chans
    if chans == 1:  # summed filters: a gray image gives what the RGB model gives for it in all three channels
        gray = torch.rand(2, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(adapted(gray), rgb(gray.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def _wrapped_formats(model: nn.Module, ema: dict) -> dict[str, object]:
    state = model.state_dict()
    return {
        "state_dict.pt": state,
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3,
                           "hyper_parameters": {"config": {"model": {"name": "resnet20"}}}},
        "lightning_ema.ckpt": {"state_dict": {f"model.{k}": torch.zeros_like(v) for k, v in state.items()},
                               "ema_state_dict": ema, "epoch": 3},
        "ddp.pt": nn.DataParallel(model).state_dict(),
        "compiled.pt": torch.compile(model).state_dict(),  # never called: nothing is compiled
        "lightning_ddp_compiled.ckpt": {"state_dict": {f"model.module._orig_mod.{k}": v for k, v in state.items()}},
    }


def test_checkpoint_path_reads_every_format(tmp_path):
    from safetensors.torch import save_file

    source = small("resnet20")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    assert set(nn.DataParallel(source).state_dict()) == {f"module.{k}" for k in source.state_dict()}
    assert set(torch.compile(source).state_dict()) == {f"_orig_mod.{k}" for k in source.state_dict()}
    x = image()
    with torch.no_grad():
        expected = source(x)
    files = {}
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    files["w.safetensors"] = tmp_path / "w.safetensors"
    for file, obj in _wrapped_formats(source, ema=source.state_dict()).items():
        torch.save(obj, tmp_path / file)
        files[file] = tmp_path / file
    for file, path in files.items():
        state = models.load_state_dict_file(path)
        assert set(state) == set(source.state_dict()), file
        model = create_model("resnet20", width=0.25, checkpoint_path=path).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, msg=file)
    # a fp16 safetensors file loads into the fp32 model
    save_file({k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}, str(tmp_path / "h.safetensors"))
    half = create_model("resnet20", width=0.25, checkpoint_path=tmp_path / "h.safetensors")
    assert half.stem[0].conv.weight.dtype == torch.float32
    # a checkpoint path with other options: features_only, pretrained first then the checkpoint
    net = create_model("resnet20", width=0.25, checkpoint_path=files["lightning.ckpt"], features_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[-1], source.forward_features(x))


def test_checkpoint_path_errors_name_the_file_and_the_keys(tmp_path):
    with pytest.raises(models.CheckpointLoadError, match=re.escape(str(tmp_path / "nope.pt")) + " does not exist"):
        create_model("resnet20", checkpoint_path=tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save(small("resnet20").state_dict(), good)
    for name, data in (("cut.pt", good.read_bytes()[:500]), ("cut.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(models.CheckpointLoadError, match=re.escape(str(tmp_path / name)) + " is corrupt"):
            create_model("resnet20", checkpoint_path=tmp_path / name)

    # a pickled object (e.g. the argparse.Namespace old training scripts saved) is never unpickled
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "evil.pt")
    with pytest.raises(models.CheckpointLoadError, match="holds Python objects besides tensors"):
        models.load_state_dict_file(tmp_path / "evil.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(models.CheckpointLoadError, match="holds a list"):
        models.load_state_dict_file(tmp_path / "list.pt")

    with pytest.raises(models.CheckpointLoadError) as err:  # another width
        create_model("resnet20", width=1.0, checkpoint_path=good)
    msg = str(err.value)
    assert str(good) in msg and "does not fit the model" in msg
    assert "with mismatched shapes: stem.0.conv.weight: checkpoint (8, 3, 3, 3) vs model (16, 3, 3, 3)" in msg
    with pytest.raises(models.CheckpointLoadError, match=r"(?s)missing from the checkpoint: blocks\.0\.3\..*and \d+ more"):
        create_model("resnet56", width=0.25, checkpoint_path=good)  # another model
    with pytest.raises(models.CheckpointLoadError, match=r"mismatched shapes: stem\.0\.conv\.weight: checkpoint \(8, 3, 3, 3\) vs model \(8, 1, 3, 3\)"):
        create_model("resnet20", width=0.25, in_chans=1, checkpoint_path=good)


def test_training_checkpoints_share_the_loader():
    training_checkpoints = pytest.importorskip("training.checkpoints")
    from training.errors import CheckpointError

    state = small("resnet20").state_dict()
    ckpt = {"state_dict": {f"model.module.{k}": v for k, v in state.items()}, "ema_state_dict": {"a": torch.zeros(1)}}
    assert set(training_checkpoints.model_state_dict(ckpt, ema=False)) == set(state)
    assert set(training_checkpoints.model_state_dict(ckpt)) == {"a"}
    with pytest.raises(CheckpointError, match="Pick the model config"):
        training_checkpoints.check_compatible(state, {"x": torch.zeros(1)}, "run.ckpt")


# ---- 5. the shipped weights' transforms -----------------------------------------------------


def test_pretrained_transforms_from_the_card():
    pytest.importorskip("torchvision")
    meta = models.pretrained_meta("resnet20")
    mean, std = torch.tensor(meta["mean"]).view(3, 1, 1), torch.tensor(meta["std"]).view(3, 1, 1)
    uint8 = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    expected = (uint8.float() / 255 - mean) / std
    for transform in (models.pretrained_transforms("resnet20"), meta.transforms()):
        out = transform(uint8)
        assert type(out) is torch.Tensor and out.dtype == torch.float32
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(transform(uint8.float() / 255), expected)  # float images in [0, 1]
        batch = transform(torch.stack([uint8, uint8]))
        torch.testing.assert_close(batch, torch.stack([expected, expected]))
    from PIL import Image

    pil = Image.fromarray(uint8.permute(1, 2, 0).numpy())
    torch.testing.assert_close(models.pretrained_transforms("resnet20")(pil), expected)
    big = models.pretrained_transforms("resnet20")(torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8))
    assert big.shape == (3, 32, 32)  # other sizes are resized and center-cropped to the card's


def test_models_import_without_torchvision():
    # torchvision is imported inside the functions that need it, never when `models` is imported
    for path in sorted((REPO / "models").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "torchvision" for n in names), f"{path.name} imports torchvision at import time"


# ---- 6. fx, TorchScript, torch.export, torchvision feature extraction ----------------------


def test_pointwise_conv_is_a_conv2d_everywhere():
    pw = PointwiseConv(8, 16, stride=2)
    assert isinstance(pw, nn.Conv2d) and pw.kernel_size == (1, 1) and pw.stride == (2, 2)
    assert set(pw.state_dict()) == {"weight", "bias"} and pw.weight.shape == (16, 8, 1, 1)
    for path in (REPO / "models").glob("*.py"):
        assert "PointwiseConv))" not in path.read_text(), f"{path.name} still tests isinstance(m, (nn.Conv2d, PointwiseConv))"
    x = torch.randn(2, 8, 7, 7)
    for module in (PointwiseConv(8, 16), PointwiseConv(8, 16, stride=2), PointwiseConv(8, 16, groups=4, bias=False)):
        ref = module(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(module)(x), ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(torch.jit.script(module)(x), ref)
            torch.testing.assert_close(torch.jit.trace(module, x)(x), ref)
        torch.testing.assert_close(torch.export.export(module, (x,)).module()(x), ref)
    graph = torch.fx.symbolic_trace(PointwiseConv(8, 16)).graph
    assert any(n.op == "call_function" and n.target is torch.conv2d for n in graph.nodes), "a traced PointwiseConv is one conv"


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("name", NAMES)
def test_symbolic_trace(name, stem):
    model = small(name, stem)
    x = image(stem, n=1)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.parametrize(
    "name", [n if n in ALWAYS_COMPILED else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]
)
def test_torchvision_feature_extractor(name):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = small(name)
    x = image(n=1)
    nodes = get_graph_node_names(model)[1]
    extractor = create_feature_extractor(model, return_nodes={"classifier": "logits", nodes[len(nodes) // 2]: "mid"})
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["logits"], model(x))
    assert out["mid"].dim() == 4


@pytest.mark.parametrize(
    "name", [n if n in ALWAYS_COMPILED else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]
)
def test_torchscript_and_export(name):
    model = small(name)
    x = image(n=1)
    with torch.no_grad():
        ref = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script is deprecated (still asked for)
            scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), ref)


def test_torchscript_of_merged_separable_blocks():
    # conv_mode="full" builds the merged block classes (DenseConv, DenseProjResidual) instead
    for name in ("mobilenet_v1", "mobilenet_v3_small"):
        model = small(name, conv_mode="full")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(torch.jit.script(model)(image(n=1)), model(image(n=1)))


def test_features_net_traces_and_scripts():
    net = small("se_resnet20", features_only=True)
    x = image(n=1)
    with torch.no_grad():
        ref = net(x)
        assert len(ref) >= 3
        for out in (torch.fx.symbolic_trace(net)(x), torch.export.export(net, (x,)).module()(x)):
            torch.testing.assert_close(list(out), list(ref))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(list(torch.jit.script(net)(x)), list(ref))


# ---- 7. torch.hub next to another `models` module -------------------------------------------


def test_hub_load_when_another_models_module_is_imported(monkeypatch):
    foreign = types.ModuleType("models")
    foreign.__file__ = "/somewhere/else/models/__init__.py"
    monkeypatch.setitem(sys.modules, "models", foreign)
    model = torch.hub.load(str(REPO), "resnet20", source="local", width=0.25, num_classes=3, in_chans=1)
    assert sys.modules["models"] is foreign and not hasattr(foreign, "create_model")
    with torch.no_grad():
        assert model.eval()(image(chans=1)).shape == (2, 3)
    shipped = torch.hub.load(str(REPO), "mobilenet_v2", source="local", pretrained=True, tag="w0_5").eval()
    monkeypatch.undo()
    reference = models.create_model("mobilenet_v2.w0_5", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(shipped(image()), reference(image()))
