"""train.py's pipeline through Hydra's compose API on tiny data: configs, run folder, resume,
NaN guard, config switches and every bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import yaml
import torch
from hydra.errors import MissingConfigException

import models
from conftest import CONFIGS, compose_config, make_imagefolder, tiny_overrides
from training.checkpoints import read_checkpoint, model_state_dict
from training.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from training.module import ClassifierModule
from training.pipeline import train


def metrics_rows(run_dir: Path, version: int = 0) -> list[dict]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


# -- configs ------------------------------------------------------------------------------------


def test_every_registered_model_has_a_config_and_every_config_a_model():
    configs = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml") if not p.stem.startswith("_"))  # _base: shared keys
    assert configs == models.list_models()


@pytest.mark.parametrize("name", models.list_models())
def test_each_model_config_builds_its_model(name, tmp_path, imagefolder_root):
    cfg = compose_config("train", [*tiny_overrides(imagefolder_root, tmp_path, tmp_path), f"model={name}"])
    assert cfg.model.name == name and cfg.model.num_classes == 10
    module = ClassifierModule({"model": dict(cfg.model), "data": dict(cfg.data)})
    assert module.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_model_overrides_and_data_group_reach_create_model(monkeypatch, tmp_path, imagefolder_root):
    seen = {}

    def fake_create_model(name, **kwargs):
        seen.update(kwargs, name=name)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(kwargs["num_classes"]))

    monkeypatch.setattr(models, "create_model", fake_create_model)
    cfg = compose_config("train", [*tiny_overrides(imagefolder_root, tmp_path, tmp_path), "model=mobilenet_v2",
                                   "data=cifar100", "model.width=0.5", "model.conv_mode=full", "model.stem=imagenet"])
    ClassifierModule({"model": dict(cfg.model), "data": dict(cfg.data)})
    assert seen == {"name": "mobilenet_v2", "num_classes": 100, "width": 0.5, "conv_mode": "full",
                    "stem": "imagenet", "pretrained": False}
    assert len(cfg.data.classes) == 100 and cfg.data.mean != compose_config("train", []).data.mean


def test_default_recipe_is_the_documented_one():
    cfg = compose_config("train", [])
    assert cfg.optim.name == "sgd" and cfg.optim.nesterov and cfg.optim.momentum == 0.9
    assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_epochs > 0 and cfg.optim.label_smoothing > 0
    assert cfg.optim.norm_lr_factor == 3.0 and cfg.data.progressive.min_size == 16  # the A/B winners (docs/recipe.md)
    # OneCycleLR sets one lr for all groups, so choosing it sets the factor back to 1 rather than failing
    assert compose_config("train", ["optim/scheduler=onecycle"]).optim.norm_lr_factor == 1.0
    assert cfg.data.augment.crop_padding == 4 and cfg.data.augment.flip and cfg.data.val_size == 5000
    assert list(cfg.data.mean) == [0.4914, 0.4822, 0.4465]


def test_norms_and_biases_get_no_weight_decay():
    from training.module import param_groups

    model = models.create_model("resnet20", width=0.25)
    decay, no_decay = param_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(1 for p in no_decay["params"] if "bn" in names[id(p)] or "norm" in names[id(p)]) >= 2


# -- a whole run --------------------------------------------------------------------------------


def test_train_writes_one_run_folder_with_everything(compose_train, tmp_path, capsys):
    summary = train(compose_train())
    run = tmp_path / "run"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    config_text = (run / "config.yaml").read_text()
    assert "${" not in config_text and "name: resnet20" in config_text  # resolved
    rows = metrics_rows(run)
    assert any(r["lr"] for r in rows) and any(r["val/acc"] for r in rows) and any(r["train/loss"] for r in rows)
    lrs = [float(r["lr"]) for r in rows if r["lr"]]
    assert lrs[0] < max(lrs)  # warm-up: the learning rate rises first

    saved = json.loads((run / "summary.json").read_text())
    assert saved["params"] == summary["params"] == models.profile(models.create_model("resnet20", width=0.25))["params"]
    assert saved["macs"] > 0 and saved["images_per_second"] > 0 and saved["wall_seconds"] > 0
    assert saved["test_acc"] is None and 0 <= saved["best_val_acc"] <= 1  # no test split here
    out = capsys.readouterr().out
    for label in ("params", "mult-adds", "best val acc", "test acc", "wall time", "img/s"):
        assert label in out and label in (run / "summary.md").read_text()
    assert "n/a -- no test split; validation reported" in out

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # plain data only
    assert ckpt["epoch"] == 1 and ckpt["hyper_parameters"]["config"]["model"]["name"] == "resnet20"
    decay, no_decay = ckpt["optimizer_states"][0]["param_groups"]  # the optimizer that actually ran
    assert decay["nesterov"] and decay["momentum"] == 0.9
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0


def test_train_on_cifar_files_tests_the_final_weights(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test_split"] == "test" and 0 <= summary["test_acc"] <= 1
    assert Path(summary["best_ckpt"]).name == "best.ckpt" and Path(summary["last_ckpt"]).name == "last.ckpt"


# -- weight EMA ---------------------------------------------------------------------------------


class RecordWeights(L.Callback):
    """The model's state before training and after every optimizer step (after WeightEMA's update)."""

    def __init__(self):
        self.states = []

    def _record(self, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    def on_train_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(pl_module)


def test_weight_ema_averages_weights_and_bn_buffers_and_is_what_validation_sees(compose_train, tmp_path):
    from conftest import eval_overrides
    from training.evaluate import evaluate

    record = RecordWeights()
    summary = train(compose_train("optim.ema_decay=0.9"), callbacks=[record])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    ema, raw = ckpt["ema_state_dict"], model_state_dict(ckpt, ema=False)
    assert model_state_dict(ckpt) is not raw and ema.keys() == raw.keys() and ckpt["ema_decay"] == 0.9

    # the same average by hand: it starts at the initial weights; after optimizer step t (1, 2, ...)
    # the decay is min(decay, (1 + t) / (10 + t))
    expected = record.states[0]
    for step, state in enumerate(record.states[1:], start=1):
        d = min(0.9, (1 + step) / (10 + step))
        expected = {k: expected[k] * d + v * (1 - d) if v.is_floating_point() else v for k, v in state.items()}
    for k in raw:
        assert torch.allclose(ema[k], expected[k], atol=1e-6), k
    assert not torch.equal(ema["classifier.weight"], raw["classifier.weight"])
    assert any("running_var" in k and not torch.equal(ema[k], raw[k]) for k in raw)  # BN buffers averaged too

    # validation ran on the average, and eval.py evaluates the average unless told eval.ema=false
    def run_eval(*extra):
        overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), f"ckpt_path={last}", *extra]
        return evaluate(compose_config("eval", overrides), overrides=overrides)

    final_val_loss = float([r for r in metrics_rows(tmp_path / "run") if r["val/loss"]][-1]["val/loss"])
    assert run_eval()["loss"] == pytest.approx(final_val_loss, rel=1e-4)
    assert run_eval("eval.ema=false")["loss"] != pytest.approx(final_val_loss, rel=1e-4)
    assert summary["final_val_acc"] == pytest.approx(run_eval()["top1"]) and summary["ema_decay"] == 0.9


def test_weight_ema_takes_one_step_per_optimizer_step_when_accumulating_gradients(compose_train, tmp_path):
    class RecordSteps(RecordWeights):  # the model after each optimizer step, not each batch
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == len(self.states):
                self._record(pl_module)

    # 4 batches an epoch, 2 per optimizer step: 4 steps in 2 epochs
    record = RecordSteps()
    train(compose_train("optim.ema_decay=0.9", "trainer.accumulate_grad_batches=2"), callbacks=[record])
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and len(record.states) == 5
    expected = record.states[0]
    for step, state in enumerate(record.states[1:], start=1):
        d = min(0.9, (1 + step) / (10 + step))
        expected = {k: expected[k] * d + v * (1 - d) if v.is_floating_point() else v for k, v in state.items()}
    ema = ckpt["ema_state_dict"]
    for k in ema:
        assert torch.allclose(ema[k], expected[k], atol=1e-6), k


def test_validating_every_n_epochs_still_saves_every_epoch_and_reports_the_final_weights(compose_train, tmp_path):
    # the third of 3 epochs is not validated (trainer.check_val_every_n_epoch=2): last.ckpt still holds
    # it, and final_val_acc is its EMA's accuracy (what export ships), also when a resume had nothing to train
    from conftest import eval_overrides
    from training.evaluate import evaluate

    common = ["trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"]
    summary = train(compose_train(*common))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["epoch"] == 2
    overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), f"ckpt_path={last}"]
    report = evaluate(compose_config("eval", overrides), overrides=overrides)
    final_val_loss = float([r for r in metrics_rows(tmp_path / "run") if r["val/loss"]][-1]["val/loss"])
    assert report["split"] == "val" and report["loss"] == pytest.approx(final_val_loss, rel=1e-4)  # validated at the end
    assert summary["final_val_acc"] == pytest.approx(report["top1"])
    resumed = train(compose_train(*common, f"ckpt_path={last}"))
    assert resumed["final_val_acc"] == pytest.approx(report["top1"])


def test_ema_off_and_bad_decay(compose_train, tmp_path):
    train(compose_train("optim.ema_decay=null", "trainer.max_epochs=1"))
    assert "ema_state_dict" not in read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"optim.ema_decay=1.5.*\(0, 1\)"):
        train(compose_train("optim.ema_decay=1.5"))


def test_the_per_image_torchvision_loader_trains_too(compose_train):
    # it cannot resize progressively (the default): refused with both ways out, then trained at full size
    with pytest.raises(ConfigError, match=r"data.progressive.min_size=16 \(progressive resizing is on by default\) but data.loader=torchvision"
                                          r".*use data.loader=fast, or add data.progressive.min_size=null"):
        train(compose_train("data.loader=torchvision", "data.num_workers=0", "trainer.max_epochs=1"))
    summary = train(compose_train("data.loader=torchvision", "data.num_workers=0", "trainer.max_epochs=1",
                                  "data.progressive.min_size=null"))
    assert summary["train_images"] == 60 and 0 <= summary["best_val_acc"] <= 1


def test_onecycle_schedule_runs_its_course(compose_train, tmp_path):
    train(compose_train("optim/scheduler=onecycle", "trainer.max_epochs=2"))
    lrs = [float(r["lr"]) for r in metrics_rows(tmp_path / "run") if r["lr"]]
    assert len(lrs) == 8 and max(lrs) == pytest.approx(0.2, rel=0.05) and lrs[-1] < lrs[0] < max(lrs)


def test_linear_schedule_warms_up_then_falls_in_a_straight_line(compose_train, tmp_path):
    from training.module import warmup_linear

    assert [warmup_linear(s, 10, 2, 0.1, 0.0) for s in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.1, 0.55, 1.0, 0.5, 0.0, 0.0])
    train(compose_train("optim/scheduler=linear", "trainer.max_epochs=2"))
    lrs = [float(r["lr"]) for r in metrics_rows(tmp_path / "run") if r["lr"]]
    falls = [a - b for a, b in zip(lrs[4:], lrs[5:])]  # from the peak the 1-epoch (4-step) warm-up reaches
    assert len(lrs) == 8 and lrs[4] == max(lrs) == pytest.approx(0.2, rel=1e-5)
    assert max(falls) == pytest.approx(min(falls), rel=1e-4) and min(falls) > 0  # equal steps down


def test_norm_lr_factor_scales_the_norms_and_biases_rate_all_run_long(compose_train, tmp_path):
    train(compose_train("trainer.max_epochs=1"))  # the default recipe's factor, 3
    groups = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"]
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0
    assert groups[1]["lr"] == pytest.approx(3 * groups[0]["lr"]) and groups[0]["lr"] > 0
    assert groups[1]["initial_lr"] == pytest.approx(3 * 0.2)
    with pytest.raises(ConfigError, match=r"optim.norm_lr_factor=0.0: give a positive factor"):
        train(compose_train("optim.norm_lr_factor=0"))
    with pytest.raises(ConfigError, match=r"norm_lr_factor=2.0 needs a schedule .*one_cycle_schedule sets one lr"):
        train(compose_train("optim.norm_lr_factor=2", "optim/scheduler=onecycle"))


def test_progressive_resizing_trains_small_first_and_logs_each_epochs_side(compose_train, tmp_path):
    train(compose_train("data.progressive.end=0.5", "trainer.max_epochs=3"))  # from 16, the default
    sides = [float(r["train/image_size"]) for r in metrics_rows(tmp_path / "run") if r.get("train/image_size")]
    assert sides == [16.0, 24.0, 32.0]  # epoch 1 is halfway up the ramp
    # validated at full size: eval.py (which never resizes) finds the accuracy and loss the run reported
    from conftest import eval_overrides
    from training.evaluate import evaluate

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"]
    report = evaluate(compose_config("eval", overrides), overrides=overrides)
    final_val_loss = float([r for r in metrics_rows(tmp_path / "run") if r["val/loss"]][-1]["val/loss"])
    assert report["split"] == "val" and report["top1"] == pytest.approx(summary["final_val_acc"])
    assert report["loss"] == pytest.approx(final_val_loss, rel=1e-4)
    with pytest.raises(ConfigError, match="data.progressive.min_size=4"):
        train(compose_train("data.progressive.min_size=4"))


def test_progressive_resizing_follows_the_schedules_length_like_the_learning_rate(compose_train, tmp_path):
    # one epoch of a 3-epoch schedule (optim.epochs) is that schedule's first epoch, at 16x16; a 1-epoch
    # run is its own last epoch, at full size
    for overrides, side in ((["optim.epochs=3"], 16.0), ([], 32.0)):
        run = tmp_path / f"run{len(overrides)}"
        train(compose_train("trainer.max_epochs=1", f"run_dir={run}", f"hydra.run.dir={run}", *overrides))
        assert [float(r["train/image_size"]) for r in metrics_rows(run) if r.get("train/image_size")] == [side]


def test_a_run_from_trained_weights_trains_at_full_size_unless_asked(compose_train, tmp_path):
    # the ramp is a from-scratch schedule: a fine-tune's first epoch of a 3-epoch schedule stays at 32x32
    # (and config.yaml records it off), unless data.progressive.from_weights=true keeps it
    first = tmp_path / "first"
    train(compose_train("trainer.max_epochs=1", run_dir=first))
    weights = first / "checkpoints" / "last.ckpt"
    for extra, side, min_size in (([], 32.0, None), (["data.progressive.from_weights=true"], 16.0, 16)):
        run = tmp_path / f"tune{len(extra)}"
        train(compose_train("trainer.max_epochs=1", "optim.epochs=3", f"init_weights={weights}", *extra, run_dir=run))
        assert [float(r["train/image_size"]) for r in metrics_rows(run) if r.get("train/image_size")] == [side]
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["progressive"]["min_size"] == min_size


# -- exact resume -------------------------------------------------------------------------------


class CrashAt(L.Callback):
    """Simulate a killed process: raise at a given epoch and batch."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated crash")


def crashed_run(compose_train, overrides: list[str], run_dir: Path, epoch: int) -> Path:
    """Train until CrashAt stops the run in `epoch` (its second batch); the run's last.ckpt."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_train(*overrides, run_dir=run_dir), callbacks=[CrashAt(epoch=epoch, batch=1)])
    return run_dir / "checkpoints" / "last.ckpt"


def test_a_crashed_run_resumed_from_last_ckpt_ends_like_one_that_ran_through(compose_train, tmp_path):
    # mobilenet_v2 has dropout, so this also checks the RNG state travels in the checkpoint.
    common = ["model=mobilenet_v2", "model.width=0.25", "trainer.max_epochs=3"]
    straight = train(compose_train(*common, run_dir=tmp_path / "straight"))

    crashed = tmp_path / "crashed"
    last = crashed_run(compose_train, common, crashed, epoch=2)
    assert read_checkpoint(last)["epoch"] == 1  # two epochs done, the third lost mid-way
    resumed = train(compose_train(*common, f"ckpt_path={last}", run_dir=crashed))

    assert resumed["best_val_acc"] == straight["best_val_acc"] and resumed["best_epoch"] == straight["best_epoch"]
    a, b = model_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt"), model_weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = lambda rows: [r for r in rows if r["val/loss"]][-1]
    assert final(metrics_rows(crashed, version=1))["val/loss"] == final(metrics_rows(tmp_path / "straight"))["val/loss"]
    ckpt = read_checkpoint(last)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")["global_step"]


def test_best_epoch_comes_from_the_checkpoint_callback_and_survives_resumes(compose_train, tmp_path, monkeypatch):
    common = ["trainer.max_epochs=4", "optim.ema_decay=null"]
    straight = train(compose_train(*common, run_dir=tmp_path / "straight"))
    accs = [float(r["val/acc"]) for r in metrics_rows(tmp_path / "straight") if r["val/acc"]]
    assert straight["best_epoch"] == accs.index(max(accs)) and straight["best_val_acc"] == pytest.approx(max(accs))
    assert read_checkpoint(straight["best_ckpt"])["epoch"] == straight["best_epoch"]

    # resumed from a checkpoint written before BestEpoch kept the epoch: it is read from best.ckpt
    crashed = tmp_path / "crashed"
    last = crashed_run(compose_train, common, crashed, epoch=3)
    ckpt = read_checkpoint(last)
    assert ckpt["callbacks"].pop("BestEpoch")["epoch"] == accs[:3].index(max(accs[:3]))  # epochs 0-2 ran
    torch.save(ckpt, last)
    reads, load = [], torch.load

    def recorded_load(f, *args, **kwargs):  # Lightning loads from an open file (fsspec: `.path`)
        reads.append(str(f if isinstance(f, (str, Path)) else getattr(f, "path", getattr(f, "name", f))))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recorded_load)
    resumed = train(compose_train(*common, f"ckpt_path={last}", run_dir=crashed))
    assert (resumed["best_epoch"], resumed["best_val_acc"]) == (straight["best_epoch"], straight["best_val_acc"])
    assert reads.count(str(last)) == 1  # the resumed checkpoint is read once: checked, then handed to Lightning


def test_a_resume_names_each_setting_it_changes_of_the_run_that_wrote_the_checkpoint():
    from training.config import recipe_changes

    before = {"seed": 0, "model": {"name": "resnet20", "width": 1.0}, "cpu_threads": 2,
              "data": {"root": "a", "num_workers": 2, "batch_size": 256},
              "optim": {"lr": 0.2, "epochs": 30}, "trainer": {"max_epochs": 30, "enable_progress_bar": False}}
    same_recipe = {**before, "cpu_threads": 1, "data": {**before["data"], "root": "b", "num_workers": 0},
                   "trainer": {"max_epochs": 30, "enable_progress_bar": True}}
    assert recipe_changes(before, same_recipe) == []  # where files are, threads and progress bars
    changed = {**same_recipe, "seed": 1, "data": {**same_recipe["data"], "batch_size": 128},
               "optim": {"lr": 0.1, "epochs": 60}, "trainer": {"max_epochs": 60}}
    assert recipe_changes(before, changed) == ["data.batch_size: 256 -> 128", "optim.lr: 0.2 -> 0.1",
                                               "seed: 0 -> 1", "trainer.max_epochs: 30 -> 60"]
    # a schedule set apart from the epochs is named with the length it had, not as unset
    apart = {**before, "optim": {"lr": 0.2, "epochs": 40}}
    assert recipe_changes(before, apart) == ["optim.epochs: 30 -> 40"]
    del changed["data"]["batch_size"]
    assert "data.batch_size: 256 -> '<unset>'" in recipe_changes(before, changed)


def test_a_resume_with_other_settings_says_so_and_one_with_the_same_says_nothing(compose_train, tmp_path, caplog):
    first = train(compose_train("trainer.max_epochs=1", run_dir=tmp_path / "run"))
    with caplog.at_level("WARNING", logger="training.pipeline"):
        train(compose_train("trainer.max_epochs=1", "cpu_threads=1", f"ckpt_path={first['last_ckpt']}",
                            run_dir=tmp_path / "run"))
    assert not [r for r in caplog.records if "differ from the run" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.pipeline"):
        train(compose_train("trainer.max_epochs=2", "optim.lr=0.05", f"ckpt_path={first['last_ckpt']}",
                            run_dir=tmp_path / "run"))
    [warning] = [r.getMessage() for r in caplog.records if "differ from the run" in r.getMessage()]
    assert str(first["last_ckpt"]) in warning and "trainer.max_epochs: 1 -> 2" in warning
    assert "optim.lr: " in warning and "-> 0.05" in warning and "cpu_threads" not in warning


def test_resume_folder_is_the_checkpoints_run(tmp_path):
    from training.config import resume_run_dir

    run = tmp_path / "runs" / "resnet20" / "x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    assert resume_run_dir(str(run / "checkpoints" / "last.ckpt"), "new") == str(run)
    assert resume_run_dir(None, "new") == "new"
    assert resume_run_dir(str(tmp_path / "elsewhere.ckpt"), "new") == "new"


# -- NaN guard ----------------------------------------------------------------------------------


class PoisonWeights(L.Callback):
    """Turn a weight into NaN at a given epoch, as a diverging run would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(compose_train, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(compose_train("trainer.max_epochs=3"), callbacks=[PoisonWeights(epoch=1)])
    msg = str(err.value)
    assert "loss became nan" in msg and "epoch 1" in msg and str(run / "checkpoints" / "last.ckpt") in msg
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# -- config switches ----------------------------------------------------------------------------


def test_precision_channels_last_compile_and_tensorboard_are_switches(compose_train, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    cfg = compose_train("trainer.precision=32-true", "channels_last=true", "compile=true", "trainer.max_epochs=1",
                        "logger=[csv,tensorboard]")
    summary = train(cfg)
    assert compiled and 0 <= summary["best_val_acc"] <= 1
    assert list((Path(summary["run_dir"]) / "tensorboard").rglob("events.out.tfevents.*"))
    ckpt = read_checkpoint(summary["last_ckpt"])
    config = ckpt["hyper_parameters"]["config"]
    assert config["trainer"]["precision"] == "32-true" and config["channels_last"] and config["compile"]
    conv = next(p for p in ClassifierModule(config).model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("group,name", [("model", "resnet21"), ("data", "cifar11")])
def test_unknown_model_or_data_name_lists_the_choices(group, name):
    with pytest.raises(MissingConfigException) as err:
        compose_config("train", [f"{group}={name}"])
    msg = str(err.value)
    assert f"'{group}/{name}'" in msg and "Available options" in msg
    assert ("resnet20" in msg) if group == "model" else ("cifar100" in msg)


def test_unknown_model_name_in_a_key_override_lists_the_models(compose_train):
    with pytest.raises(ConfigError, match="resnet21.*valid models: .*resnet20"):
        train(compose_train("model.name=resnet21"))


def test_unknown_model_option_is_named(compose_train):
    with pytest.raises(ConfigError, match="no_such_option"):
        train(compose_train("+model.kwargs.no_such_option=1"))


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_bad_data_root_says_what_layout_is_expected(compose_train, tmp_path, kind):
    root = tmp_path / "nothing_here"
    if kind == "empty":
        (root / "train").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        train(compose_train("data.download=false", data_root=root))
    assert "<root>/train/<class>/*.png" in str(err.value) and "data.download=true" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before anything was built


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", r"data.batch_size=0: .*e.g. data.batch_size=256"),
    ("data.batch_size=1", r"data.batch_size=1: training needs at least 2 images per batch.*BatchNorm"),
    ("optim.lr=-0.1", r"optim.lr=-0.1: .*e.g. optim.lr=0.2"),
])
def test_bad_batch_size_or_learning_rate_is_named_before_anything_is_built(compose_train, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose_train(override))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("overrides,message", [
    (["optim.epochs=1"], r"optim.epochs=1 is shorter than trainer.max_epochs=2.*cannot step past its end"),
    (["optim.warmup_epochs=2"], r"optim.warmup_epochs is as long as the schedule or longer"),
])
def test_a_one_cycle_schedule_that_cannot_run_is_named(compose_train, overrides, message):
    # torch's OneCycleLR raises its own error at the step past its end (or at fit start): named here first
    with pytest.raises(ConfigError, match=message):
        train(compose_train("optim/scheduler=onecycle", *overrides))


def test_resuming_a_one_cycle_run_with_another_length_is_refused(compose_train, tmp_path):
    first = train(compose_train("optim/scheduler=onecycle", "optim.warmup_epochs=0.5", "trainer.max_epochs=1",
                                run_dir=tmp_path / "one"))
    with pytest.raises(ConfigError, match=r"cannot be stretched.*trainer.max_epochs"):
        train(compose_train("optim/scheduler=onecycle", "optim.warmup_epochs=0.5", "trainer.max_epochs=2",
                            f"ckpt_path={first['last_ckpt']}",
                            run_dir=tmp_path / "one"))


def test_resuming_from_a_checkpoint_of_another_architecture_names_the_keys(compose_train, trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError) as err:
        train(compose_train("model=mobilenet_v2", f"ckpt_path={ckpt}"))
    msg = str(err.value)
    assert str(ckpt) in msg and "model=resnet20" in msg and "model=mobilenet_v2" in msg
    assert "missing from the checkpoint" in msg and "unexpected in the checkpoint" in msg
    with pytest.raises(CheckpointError, match=r"mismatched shapes: .*\(8, 3, 3, 3\)|mismatched shapes"):
        train(compose_train("model.width=0.5", f"ckpt_path={ckpt}"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_corrupt_truncated_or_missing_checkpoint_is_named(compose_train, trained_run, tmp_path, damage):
    bad = tmp_path / "checkpoints" / "broken.ckpt"
    bad.parent.mkdir()
    good = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    if damage == "garbage":
        bad.write_bytes(b"this is not a checkpoint" * 10)
    elif damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(good)
    with pytest.raises(CheckpointError) as err:
        train(compose_train(f"ckpt_path={bad}"))
    msg = str(err.value)
    assert str(bad) in msg and "last.ckpt" in msg
    assert ("does not exist" if damage == "missing" else "corrupt") in msg


def test_empty_data_root_image_folder_tree_with_only_other_files(tmp_path, compose_train):
    root = make_imagefolder(tmp_path / "d", n_per_class=1)
    for png in root.rglob("*.png"):
        png.rename(png.with_suffix(".txt"))
    with pytest.raises(DataError, match="holds no images"):
        train(compose_train(data_root=root))


def test_precision_auto_picks_bf16_only_where_the_hardware_computes_it(monkeypatch):
    from training import pipeline

    assert pipeline.resolve_precision("32-true", "cpu") == "32-true"  # explicit values pass through
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert pipeline.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert pipeline.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pipeline.resolve_precision("auto", "gpu") == "16-mixed"
    assert compose_config("train", []).trainer.precision == "auto"


def test_the_resolved_precision_is_recorded(compose_train, monkeypatch):
    from training import pipeline

    monkeypatch.setattr(pipeline, "native_bf16_cpu", lambda: False)
    assert train(compose_train("trainer.max_epochs=1"))["precision"] == "32-true"


def test_init_weights_starts_a_new_schedule_from_a_runs_ema_weights(compose_train, tmp_path):
    # finishing a run whose optimizer state is gone (a GPU run stopped at its deadline, slimmed to its EMA)
    from tools.slim_runs import slim

    train(compose_train("trainer.max_epochs=1", run_dir=tmp_path / "first"))
    slim_path = tmp_path / "ema_only.ckpt"
    torch.save(slim(read_checkpoint(tmp_path / "first" / "checkpoints" / "last.ckpt"), half=True), slim_path)
    ema = read_checkpoint(slim_path)["ema_state_dict"]

    seen = {}

    class FirstWeights(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    second = tmp_path / "second"
    train(compose_train("trainer.max_epochs=1", f"init_weights={slim_path}", run_dir=second), callbacks=[FirstWeights()])
    assert seen.keys() == ema.keys() and all(torch.equal(seen[k].float(), ema[k].float()) for k in ema)
    slim_path.unlink()  # the run's own checkpoint is all that later steps read
    assert read_checkpoint(second / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]["init_weights"] == str(slim_path)
    module = ClassifierModule.load_from_checkpoint(second / "checkpoints" / "last.ckpt", weights_only=True)
    trained = model_state_dict(read_checkpoint(second / "checkpoints" / "last.ckpt"), ema=False)
    loaded = module.model.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_init_weights_that_do_not_fit_or_do_not_exist_are_named(compose_train, tmp_path):
    with pytest.raises(ConfigError, match="init_weights=.*no such file"):
        train(compose_train("trainer.max_epochs=1", f"init_weights={tmp_path / 'missing.ckpt'}", run_dir=tmp_path / "a"))
    other = tmp_path / "other.pt"
    torch.save(models.create_model("resnet20", width=0.5).state_dict(), other)
    with pytest.raises(ConfigError, match="does not fit the model of this run"):
        train(compose_train("trainer.max_epochs=1", f"init_weights={other}", run_dir=tmp_path / "b"))


@pytest.mark.parametrize("error", [ConfigError, DataError, CheckpointError, NonFiniteLossError])
def test_every_user_error_exits_with_its_message(error, capsys):
    # what train.py and eval.py wrap their work in (the CLI tests run two of these end to end)
    from training.errors import EXIT_USER_ERROR, exit_on_user_error

    with pytest.raises(SystemExit) as done, exit_on_user_error():
        raise error("the problem, and the fix")
    assert done.value.code == EXIT_USER_ERROR and "error: the problem, and the fix" in capsys.readouterr().err


def test_each_epoch_logs_one_line_saying_where_the_run_stands(compose_train, tmp_path, caplog):
    with caplog.at_level("INFO", logger="train"):
        train(compose_train("trainer.max_epochs=3"))
    lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for line in lines:
        assert "train loss " in line and "val acc " in line and "%" in line and " s" in line
    assert "2 to go, ~" in lines[0] and "1 to go" in lines[1] and "to go" not in lines[2]
    # the numbers are the epoch's logged metrics
    last_val = [float(r["val/acc"]) for r in metrics_rows(tmp_path / "run") if r.get("val/acc")][-1]
    assert f"val acc (EMA) {100 * last_val:.2f}%" in lines[2]  # validation sees the weight EMA
    # a resumed run reports the epochs it trains, numbered on from where it stopped
    caplog.clear()
    with caplog.at_level("INFO", logger="train"):
        train(compose_train("trainer.max_epochs=4", f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"))
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "train"] == ["epoch 4/4"]


class HostReads(L.Callback):
    """Counts the tensor values read back to the host (bool(), item(), float(), ...) from one training
    batch's start to the next's: what makes a GPU step wait for the device."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode

        reads = self.reads = []

        class Count(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in ("__bool__", "item", "tolist", "__float__", "__int__"):
                    reads.append(func.__name__)
                return func(*args, **(kwargs or {}))

        self.mode_type, self.mode, self.steps = Count, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.steps += 1
        self.mode = None
        if batch_idx + 1 < trainer.num_training_batches:  # not across the epoch's end (validation reads)
            self.mode = self.mode_type()
            self.mode.__enter__()


def test_a_gpu_step_reads_nothing_back_and_the_nan_guard_still_stops_before_saving(compose_train, tmp_path, monkeypatch):
    import training.module

    # on a CPU the guard reads the loss every step (free there); an accelerator defers it
    reads = HostReads()  # (between log steps: a logged step reads its values, every log_every_n_steps)
    train(compose_train("trainer.max_epochs=1", "trainer.log_every_n_steps=50"), callbacks=[reads])
    assert reads.steps >= 2 and len(reads.reads) == reads.steps  # the guard's one bool() per step
    monkeypatch.setattr(training.module, "_deferred_reads", lambda device: True)  # as on a GPU
    reads = HostReads()
    train(compose_train("trainer.max_epochs=1", "trainer.log_every_n_steps=50", run_dir=tmp_path / "deferred"), callbacks=[reads])
    assert reads.steps >= 2 and reads.reads == []
    # deferred, a NaN is still caught before any checkpoint of the broken weights is written
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"loss became nan or inf at epoch 1, at a step from \d+ to \d+") as err:
        train(compose_train("trainer.max_epochs=3", run_dir=run), callbacks=[PoisonWeights(epoch=1)])
    assert str(run / "checkpoints" / "last.ckpt") in str(err.value)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_train_py_returns_the_final_weights_accuracy(monkeypatch):
    # what a Hydra sweeper optimizes: the accuracy of what export ships (the final EMA), not the best epoch's
    import importlib

    import training.pipeline

    monkeypatch.setattr(training.pipeline, "train", lambda cfg: {"final_val_acc": 0.7, "best_val_acc": 0.9})
    train_py = importlib.import_module("train")
    assert train_py.main.__wrapped__(compose_config("train", [])) == 0.7
