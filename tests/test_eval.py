"""eval.py's evaluation (training/evaluate.py) through Hydra's compose API: checkpoints, TTA, splits, pretrained, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from conftest import compose_config, eval_overrides
from training.errors import CheckpointError, ConfigError
from training.evaluate import eval_config, evaluate, evaluate_model


def run_eval(tmp_path: Path, *overrides: str) -> dict:
    """Evaluate with the given command-line overrides (they also decide what is taken from the
    checkpoint, exactly as on the command line)."""
    overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), *overrides]
    return evaluate(compose_config("eval", overrides), overrides=overrides)


def test_eval_reports_test_split_metrics_and_writes_the_confusion_matrix(trained_run, tmp_path, capsys):
    report = run_eval(tmp_path, f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}")
    assert report["split"] == "test" and report["num_images"] == 40  # the test_batch, not validation
    assert 0 <= report["top1"] <= report["top5"] <= 1 and report["loss"] > 0
    assert set(report["per_class"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    confusion = torch.tensor(report["confusion"])
    assert confusion.sum() == 40 and confusion.sum(1).tolist() == [4] * 10
    assert report["top1"] == pytest.approx(confusion.diag().sum().item() / 40)
    png = tmp_path / "eval" / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["top1"] == report["top1"]
    out = capsys.readouterr().out
    for label in ("top-1", "top-5", "loss", "per-class accuracy", "truck"):
        assert label in out

    # The number train.py reported for the final weights (their EMA) is the one eval.py finds.
    summary = json.loads((trained_run / "summary.json").read_text())
    assert report["top1"] == pytest.approx(summary["test_acc"])


def test_eval_tta_averages_the_mirror(trained_run, tmp_path):
    from training.checkpoints import model_state_dict
    from training.data import CifarDataModule
    from training.module import ClassifierModule

    ckpt = f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}"
    plain = run_eval(tmp_path, ckpt, "trainer.precision=32-true")
    tta = run_eval(tmp_path, ckpt, "trainer.precision=32-true", "eval.tta=true")
    assert tta["tta"] and not plain["tta"]
    # the same numbers by hand: each test image's class probabilities averaged with its mirror's
    overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), ckpt]
    config, checkpoint = eval_config(compose_config("eval", overrides), overrides)
    module = ClassifierModule(config).eval()
    module.model.load_state_dict(model_state_dict(checkpoint))
    data = CifarDataModule(config["data"], seed=config["seed"], test_split="test")
    data.setup("test")
    with torch.no_grad():
        pairs = [((module(x).softmax(-1) + module(x.flip(-1)).softmax(-1)) / 2, y) for x, y in data.test_dataloader()]
    probs, labels = torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])
    assert len(labels) == tta["num_images"] == 40
    assert tta["loss"] == pytest.approx(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item(), rel=1e-4)
    assert tta["top1"] == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
    assert tta["loss"] != pytest.approx(plain["loss"], rel=1e-4)  # the mirrored views change the predictions


def test_eval_uses_the_runs_validation_split_when_there_is_no_test(compose_train, tmp_path):
    from training.pipeline import train

    summary = train(compose_train("trainer.max_epochs=1"))
    report = run_eval(tmp_path, f"ckpt_path={summary['best_ckpt']}")
    assert report["split"] == "val" and report["num_images"] == 20  # data.val_size from the checkpoint
    assert report["top1"] == pytest.approx(summary["best_val_acc"])


def test_evaluate_model_takes_tta_and_split_as_arguments(trained_run, tmp_path):
    from training.module import ClassifierModule

    overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}"]
    config, ckpt = eval_config(compose_config("eval", overrides), overrides)
    val = evaluate_model(config, ckpt, split="val")
    assert val["split"] == "val" and val["num_images"] == 20 and not val["tta"]
    test_tta = evaluate_model(config, ckpt, tta=True)
    assert test_tta["split"] == "test" and test_tta["tta"] and test_tta["num_images"] == 40
    assert test_tta["loss"] != evaluate_model(config, ckpt)["loss"]
    with pytest.raises(ConfigError, match="choose auto, test or val"):
        evaluate_model(config, ckpt, split="train")
    # TTA is how a module evaluates, not part of the run config it saves in checkpoints
    module = ClassifierModule(config, tta=True)
    assert module.tta and set(module.hparams) == {"config"} and not ClassifierModule(config).tta


def test_eval_config_takes_model_and_data_from_the_checkpoint_unless_the_command_line_picks_them(trained_run, tmp_path):
    ckpt = f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}"

    def config_for(*extra):
        overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), ckpt, *extra]
        return eval_config(compose_config("eval", overrides), overrides)[0]

    stored = config_for()
    assert stored["model"]["width"] == 0.25 and stored["data"]["val_size"] == 20  # the run's, not the defaults
    edited = config_for("data.val_size=30", "data.augment.flip=false", "~data.mean")
    assert edited["data"]["val_size"] == 30 and edited["data"]["augment"] == {"crop_padding": 4, "crop_step": 1, "flip": False}
    assert "mean" not in edited["data"] and edited["data"]["root"] == stored["data"]["root"]
    picked = config_for("data=cifar100", "model=resnet20")
    assert picked["data"]["name"] == "cifar100" and picked["data"]["val_size"] == 5000 and picked["model"]["width"] == 1.0
    assert picked["model"]["num_classes"] == 100


def test_eval_data_key_overrides_apply_on_top_of_the_checkpoint(trained_run, tmp_path):
    report = run_eval(tmp_path, f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", "eval.split=val", "data.val_size=30")
    assert report["split"] == "val" and report["num_images"] == 30


def test_eval_with_the_wrong_model_names_the_mismatched_keys(trained_run, tmp_path):
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        run_eval(tmp_path, f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}", "model=mobilenet_v2")


def test_eval_of_a_truncated_checkpoint_is_a_clear_error(trained_run, tmp_path):
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes((trained_run / "checkpoints" / "best.ckpt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run_eval(tmp_path, f"ckpt_path={bad}")


def test_eval_needs_a_checkpoint_or_pretrained(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=<file.ckpt>.*pretrained=true"):
        run_eval(tmp_path)


def test_pretrained_without_shipped_weights_passes_the_zoo_message_through(tmp_path, monkeypatch, cifar_root):
    def no_weights(name, pretrained=False, **kwargs):
        assert pretrained
        raise KeyError(f"no pretrained weights for {name!r}; available entries: none shipped yet")

    monkeypatch.setattr(models, "create_model", no_weights)
    with pytest.raises(ConfigError, match="cannot build model 'mobilenet_v2': no pretrained weights for 'mobilenet_v2'"):
        run_eval(tmp_path, "model=mobilenet_v2", "pretrained=true", f"data.root={cifar_root}")


def test_pretrained_weights_are_evaluated_when_the_zoo_has_them(tmp_path, monkeypatch, cifar_root):
    real = models.create_model
    calls = []

    def shipped(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs["width"]))
        return real(name, **kwargs)  # stands in for weights the zoo would load

    monkeypatch.setattr(models, "create_model", shipped)
    report = run_eval(tmp_path, "model=resnet20", "model.width=0.25", "pretrained=true", f"data.root={cifar_root}",
                      "data.val_size=20")
    assert calls == [("resnet20", True, 0.25)] and report["split"] == "test" and report["source"] == "pretrained resnet20"


def test_pretrained_weights_on_data_with_other_classes_are_refused(tmp_path, cifar_root):
    # resnet20's CIFAR-10 weights on CIFAR-100 would get a random 100-class head (what fine-tuning
    # starts from) and score ~1% top-1 without a word: eval.py names both data sets and the fix
    from conftest import make_cifar_files

    cifar100 = make_cifar_files(tmp_path / "c100", name="cifar100")
    with pytest.raises(ConfigError, match=r"'resnet20' was trained on cifar10 \(10 classes: airplane.*data=cifar100 has 100 "
                                          r"classes.*data=cifar10\).*train.py model=resnet20 pretrained=true data=cifar100"):
        run_eval(tmp_path, "model=resnet20", "pretrained=true", "data=cifar100", f"data.root={cifar100}", "data.val_size=20")
    # the shipped weights on their own data set's classes evaluate
    report = run_eval(tmp_path, "model=resnet20", "pretrained=true", f"data.root={cifar_root}", "data.val_size=20")
    assert report["source"] == "pretrained resnet20" and report["num_images"] == 40


def test_eval_int8_quantizes_after_loading_and_calibrates_on_training_images_only(trained_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from training.data import CifarDataModule

    seen = []
    real = models.quantize

    def spy(model, calibration, **kwargs):
        batches = [x for x, _ in calibration]
        seen.append(torch.cat(batches))
        return real(model, batches, **kwargs)

    monkeypatch.setattr(models, "quantize", spy)
    ckpt = f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}"
    float_report = run_eval(tmp_path, ckpt)
    report = run_eval(tmp_path, ckpt, "eval.int8=true", "eval.int8_calibration_images=24")
    assert report["int8"] and not float_report["int8"] and report["int8_calibration_images"] == 24
    assert report["int8_method"] == models.int8.DEFAULT_METHOD and report["split"] == "test" and report["num_images"] == 40
    assert report["int8_weight_type"] == models.int8.DEFAULT_WEIGHT_TYPE == "int8"
    # the tiny model's int8 predictions mostly agree with its float ones (40 images: a loose bound)
    assert abs(report["top1"] - float_report["top1"]) <= 0.15
    assert "on (onnxruntime" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["int8"] is True

    # The calibration images are the first 24 of the run's training split, unaugmented, normalised.
    overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), ckpt]
    dm = CifarDataModule(eval_config(compose_config("eval", overrides), overrides)[0]["data"])
    dm.setup()
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    (calibration,) = seen
    assert torch.equal(((calibration * std + mean) * 255).round().to(torch.uint8), dm.splits["train"][0][:24])


def test_eval_int8_of_pretrained_weights(tmp_path, monkeypatch, cifar_root, capsys):
    pytest.importorskip("onnxruntime")
    real = models.create_model
    monkeypatch.setattr(models, "create_model", lambda name, pretrained=False, **kwargs: real(name, **kwargs))
    asked, quantize = [], models.quantize

    def spy(model, calibration, **options):
        asked.append(options)
        return quantize(model, calibration, **options)

    monkeypatch.setattr(models, "quantize", spy)
    options = ("model=resnet20", "model.width=0.25", "pretrained=true", f"data.root={cifar_root}", "data.val_size=20",
               "eval.int8=true", "eval.int8_calibration_images=16", "eval.int8_method=percentile")
    report = run_eval(tmp_path, *options, "eval.int8_weight_type=uint8")
    assert report["int8"] and report["int8_method"] == "percentile" and report["source"] == "pretrained resnet20"
    assert report["int8_weight_type"] == "uint8" and asked[0]["weight_type"] == "uint8"
    assert "percentile ranges from the first 16 training images, uint8 weights)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="eval.int8: unknown weight type 'int4'; valid weight types: int8, uint8"):
        run_eval(tmp_path, *options, "eval.int8_weight_type=int4")


def test_eval_int8_of_pretrained_weights_uses_their_cards_method_and_weight_type(tmp_path, monkeypatch, cifar_root):
    pytest.importorskip("onnxruntime")
    real = models.create_model

    def shipped(name, pretrained=False, **kwargs):  # a tiny model whose card names minmax ranges and uint8 weights
        model = real(name, **kwargs)
        model.pretrained_cfg = {**model.pretrained_cfg, "int8_method": "minmax", "int8_weight_type": "uint8"}
        return model

    monkeypatch.setattr(models, "create_model", shipped)
    report = run_eval(tmp_path, "model=resnet20", "model.width=0.25", "pretrained=true", f"data.root={cifar_root}",
                      "data.val_size=20", "eval.int8=true", "eval.int8_calibration_images=16")
    assert report["int8_method"] == "minmax" and report["int8_weight_type"] == "uint8"


def test_eval_int8_without_onnxruntime_names_the_fix(trained_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"eval.int8=true needs onnxruntime.*pip install -e '\.\[int8\]'"):
        run_eval(tmp_path, f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "eval.int8=true")
