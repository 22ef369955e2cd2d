"""Every registered model: builds, runs forward and backward at both stems and several widths;
bad names and options fail clearly; costs are counted, not guessed."""

import pytest
import torch
import torch.nn as nn

import models
from models import create_model, list_models, profile

REQUIRED = {
    "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "xception", "resnet50",
    "se_resnet50", "resnet20", "resnet56",
}  # fmt: skip
INPUT = {"cifar": 32, "imagenet": 64}  # imagenet stems at a reduced size keep the suite fast


def test_registry_has_the_required_models():
    assert REQUIRED <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("width", [0.25, 0.5])
def test_forward_backward(name, stem, width):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, stem=stem, width=width)
    x = torch.randn(2, 3, INPUT[stem], INPUT[stem])
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters that got no gradient: {missing[:5]}"


@pytest.mark.parametrize("name", list_models())
def test_width_one_cifar_channels_last(name):
    model = create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)  # NCHW weights and input: the reference
        model = model.to(memory_format=torch.channels_last)
        outs = [model(x), model(x.to(memory_format=torch.channels_last))]
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list_models())
def test_width_scales_params_down(name):
    with torch.device("meta"):
        full = sum(p.numel() for p in create_model(name).parameters())
        half = sum(p.numel() for p in create_model(name, width=0.5).parameters())
    assert half < full


def test_every_model_has_a_linear_classifier():
    for name in list_models():
        model = create_model(name, num_classes=13, stem="cifar", width=0.25)
        assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 13, name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="mobilenet_v9"), r"unknown model 'mobilenet_v9'; valid models: .*mobilenet_v2.*resnet20"),
        (dict(name="resnet20", stem="tiny"), r"unknown stem 'tiny'; valid stems: cifar, imagenet"),
        (dict(name="resnet20", conv_mode="dense"), r"unknown conv_mode 'dense'; valid conv_mode values: separable, full"),
        (dict(name="resnet20", width=0), r"width must be a positive number"),
        (dict(name="resnet20", num_classes=-1), r"num_classes must be an int >= 0"),
        (dict(name="resnet20", colour="red"), r"unknown option\(s\) \['colour'\] for model 'resnet20'; valid options"),
    ],
)
def test_bad_names_and_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(**kwargs)


def test_profile_counts_a_pointwise_conv_by_formula():
    # A 1x1 conv on an HxW map costs H*W*C_in*C_out mult-adds: counted, then checked by formula.
    net = nn.Sequential(models.PointwiseConv(16, 32, bias=False))
    cost = profile(net, (1, 16, 8, 8))
    assert cost == {"params": 16 * 32, "macs": 8 * 8 * 16 * 32}
    # channels-last input takes the other code path; the count must not change
    net = net.to(memory_format=torch.channels_last)
    assert profile(net, (1, 16, 8, 8))["macs"] == 8 * 8 * 16 * 32


def test_layer_table_sums_to_profile():
    model = create_model("resnet20")
    rows = models.layer_table(model, (1, 3, 32, 32))
    cost = profile(model, (1, 3, 32, 32))
    assert sum(r["macs"] for r in rows) == cost["macs"]
    assert sum(r["params"] for r in rows) == cost["params"]
    assert "| **total** |" in models.format_layer_table(rows)


def test_convert_state_dict_rejects_bad_source_and_name():
    with pytest.raises(ValueError, match="unknown source 'keras'; valid sources: torchvision, timm"):
        models.convert_state_dict("mobilenet_v2", {}, "keras")
    with pytest.raises(ValueError, match="unknown model"):
        models.convert_state_dict("nope", {}, "timm")
    with pytest.raises(ValueError, match="has no .* twin"):
        models.convert_state_dict("resnet20", {}, "torchvision")


@pytest.mark.parametrize("name", models.list_models())
def test_num_classes_zero_is_a_feature_extractor(name):
    # timm's create_model(name, num_classes=0): no classifier, the pooled features come out; the same
    # network as a model built with a head whose reset_classifier(0) took it off
    torch.manual_seed(0)
    plain = create_model(name, num_classes=0, width=0.25)
    torch.manual_seed(0)
    headless = create_model(name, num_classes=1, width=0.25)
    headless.reset_classifier(0)
    assert isinstance(plain.get_classifier(), nn.Identity) and plain.num_classes == 0
    assert plain.pretrained_cfg["num_classes"] == 0
    x = torch.randn(2, 3, 32, 32)
    out = plain.eval()(x)
    assert out.shape == (2, plain.num_features)
    torch.testing.assert_close(out, headless.eval()(x), rtol=0, atol=0)
