"""The optim/, logger/ and callbacks/ config groups: Hydra targets instantiated by the pipeline.
AdamW with another schedule is a config and nothing else; loggers are chosen as a list; the
plain optim keys of checkpoints written before these groups still mean the same optimizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import models
from conftest import compose_config
from training.callbacks import ThroughputMeter, WeightEMA
from training.checkpoints import read_checkpoint
from training.config import to_plain
from training.errors import ConfigError
from training.module import call_with, optim_targets, param_groups
from training.pipeline import make_callbacks, make_loggers, train


def lrs(optim_cfg: dict, steps: int = 25, total: int = 25, warmup: int = 5) -> tuple[torch.optim.Optimizer, list[float]]:
    """The optimizer an optim config builds and the learning rates its schedule gives, step by step."""
    from hydra.utils import instantiate

    opt_spec, sched_spec = optim_targets(optim_cfg)
    model = models.create_model("resnet20", width=0.25)
    opt = instantiate(opt_spec, _convert_="all")(param_groups(model, float(optim_cfg.get("weight_decay", 0.0))))
    sched = call_with(instantiate(sched_spec, _convert_="all"), opt, total_steps=total, warmup_steps=warmup, steps_per_epoch=5)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return opt, out


PLAIN_KEYS = ["name", "lr", "momentum", "nesterov", "weight_decay", "label_smoothing", "schedule", "warmup_epochs",
              "warmup_start_factor", "final_lr_factor", "ema_decay", "epochs"]


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "constant"])
def test_old_checkpoints_plain_optim_keys_build_what_the_config_targets_build(scheduler):
    new = to_plain(compose_config("train", [f"optim/scheduler={scheduler}", "run_dir=x"]))["optim"]
    assert set(PLAIN_KEYS) <= set(new) and new["schedule"] == scheduler  # checkpoints keep the plain keys
    old = {k: new[k] for k in PLAIN_KEYS}  # what a checkpoint from before the targets holds
    (opt_new, lr_new), (opt_old, lr_old) = lrs(new), lrs(old)
    assert lr_new == lr_old and (scheduler == "constant" or len(set(lr_new)) > 5)
    strip = lambda opt: [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]  # noqa: E731
    assert type(opt_new) is type(opt_old) is torch.optim.SGD and strip(opt_new) == strip(opt_old)
    assert opt_new.defaults["nesterov"] and opt_new.defaults["momentum"] == 0.9  # onecycle then cycles the momentum


def test_default_schedule_warms_up_then_follows_the_cosine():
    _, rates = lrs(to_plain(compose_config("train", ["run_dir=x"]))["optim"], steps=30)
    assert rates[0] == pytest.approx(0.02) and rates[5] == pytest.approx(0.2) and rates[25] == pytest.approx(0.0, abs=1e-9)
    assert rates[:6] == sorted(rates[:6]) and rates[5:26] == sorted(rates[5:26], reverse=True)


def test_a_bad_optim_name_in_an_old_checkpoint_config_is_named():
    with pytest.raises(ConfigError, match="optim.name='lamb'"):
        optim_targets({"name": "lamb", "lr": 0.1})


@pytest.mark.parametrize("override,choose", [("optim.schedule=onecycle", "optim/scheduler=onecycle"),
                                             ("optim.name=adamw", "optim=adamw")])
def test_editing_a_descriptive_key_alone_says_which_config_to_choose(override, choose):
    optim = to_plain(compose_config("train", [override, "run_dir=x"]))["optim"]
    with pytest.raises(ConfigError, match=f"choose it with {choose}"):
        optim_targets(optim)
    assert optim_targets(to_plain(compose_config("train", ["optim=adamw", "run_dir=x"]))["optim"])[0]["_target_"] == "torch.optim.AdamW"


def test_adamw_with_another_schedule_is_config_only_and_trains(compose_train, tmp_path):
    summary = train(compose_train("optim=adamw", "trainer.max_epochs=2"))
    ckpt = read_checkpoint(summary["last_ckpt"])
    config = ckpt["hyper_parameters"]["config"]["optim"]
    assert config["name"] == "adamw" and config["optimizer"]["_target_"] == "torch.optim.AdamW"
    assert config["scheduler"]["_target_"] == "torch.optim.lr_scheduler.OneCycleLR"
    decay, no_decay = ckpt["optimizer_states"][0]["param_groups"]  # what actually ran
    assert decay["betas"] == [0.9, 0.999] or tuple(decay["betas"]) == (0.9, 0.999)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    sched = ckpt["lr_schedulers"][0]
    assert sched["total_steps"] == 8 and sched["last_epoch"] == 8  # 2 epochs x 4 steps, one step per batch
    assert 0 <= summary["best_val_acc"] <= 1


def test_loggers_are_a_list_of_choices(tmp_path):
    def loggers(*overrides):
        return make_loggers(to_plain(compose_config("train", [*overrides, f"run_dir={tmp_path}"])))

    assert [type(x) for x in loggers()] == [CSVLogger]
    both = loggers("logger=[csv,tensorboard]")
    assert [type(x) for x in both] == [CSVLogger, TensorBoardLogger]
    assert Path(both[0].log_dir).parent == tmp_path / "csv" and Path(both[1].log_dir).parent == tmp_path / "tensorboard"
    assert loggers("logger=[]") == []


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_an_optional_logger_without_its_package_names_the_pip_package(tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    config = to_plain(compose_config("train", [f"logger=[csv,{name}]", f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=rf"logger={name} needs the '{name}' package.*pip install {name}"):
        make_loggers(config)


def test_callbacks_are_instantiated_by_name_and_can_be_switched_off(tmp_path):
    def callbacks(*overrides):
        return make_callbacks(to_plain(compose_config("train", [*overrides, f"run_dir={tmp_path}"])))

    named = callbacks()
    assert list(named) == ["throughput", "report", "ema", "best_checkpoint", "last_checkpoint"]
    assert isinstance(named["throughput"], ThroughputMeter) and named["ema"].decay == 0.999
    best, last = named["best_checkpoint"], named["last_checkpoint"]
    assert isinstance(best, ModelCheckpoint) and best.monitor == "val/acc" and best.mode == "max"
    assert Path(best.dirpath) == (tmp_path / "checkpoints").resolve() and last.monitor is None
    # the state keys of checkpoints written before the group: a resumed run keeps tracking its best
    assert best.state_key == ("ModelCheckpoint{'monitor': 'val/acc', 'mode': 'max', 'every_n_train_steps': 0, "
                              "'every_n_epochs': 1, 'train_time_interval': None}")
    assert "ema" not in callbacks("optim.ema_decay=null") and "ema" not in callbacks("callbacks.ema=null")
    assert isinstance(callbacks("optim.ema_decay=0.9")["ema"], WeightEMA)
    with pytest.raises(ConfigError, match="callbacks.last_checkpoint is off"):
        callbacks("callbacks.last_checkpoint=null")


def test_every_queue_job_composes_and_builds_its_model():
    """Each job of tools/recipes.sh (entries, ablation runs, recipe A/Bs, finishing runs) is a valid
    train.py command line: it composes, and its model builds with the options it names."""
    import subprocess

    from conftest import REPO

    listing = subprocess.run(["bash", "-c", '. tools/recipes.sh; for r in "${RECIPES[@]}" "${ABLATION[@]}" "${AB[@]}" "${FINISH[@]}"; do echo "$r"; done'],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    jobs = dict(line.split("|", 1) for line in listing)
    assert len(jobs) == len(listing) and {"ab.resnet20.e15.base", "ab.resnet20.e15.zero_gamma", "resnet20"} <= set(jobs)
    for job, args in jobs.items():
        cfg = compose_config("train", [a for a in args.split() if not a.startswith("init_weights=")])
        assert cfg.trainer.max_epochs > 0, job
        if job.startswith("ab."):
            model = models.create_model(cfg.model.name, width=cfg.model.width, **cfg.model.kwargs)
            if "zero_gamma" in job:
                assert all(float(b.conv2.bn.weight.abs().sum()) == 0 for b in model.modules() if type(b).__name__ == "BasicBlock")
