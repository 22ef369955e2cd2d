"""tools/ and benchmarks/ are packages run as modules from the repository root
(`python -m tools.export_weights ...`), importable without any sys.path edits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

MODULES = ["tools.verify_pretrained", "tools.export_weights", "tools.teacher_logits", "tools.ablation", "tools.model_table",
           "tools.pack_cifar", "tools.gpu_schedule", "tools.slim_runs", "tools.recipe_ab", "benchmarks.train_speed",
           "benchmarks.data_loading", "benchmarks.inference"]


def test_no_file_in_tools_or_benchmarks_edits_sys_path():
    for folder in ("tools", "benchmarks"):
        assert (REPO / folder / "__init__.py").is_file()
        for path in (REPO / folder).rglob("*.py"):
            assert "sys.path" not in path.read_text(), path


# One interpreter runs every module's --help as `python -m` would (runpy, __main__), so torch is
# imported once rather than once per module; it starts in the repo root with no PYTHONPATH.
RUN_ALL = """
import runpy, sys
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        print(f"== {module} exit {done.code}", flush=True)
"""


def test_runs_as_a_module():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo root as cwd is all it needs
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, *MODULES], cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sections = proc.stdout.split("== ")
    for module in MODULES:
        ends = [part for part in sections if part.startswith(f"{module} exit")]
        assert ends and ends[0].startswith(f"{module} exit 0"), (module, proc.stdout[-2000:])
    assert proc.stdout.count("usage:") == len(MODULES), proc.stdout[-2000:]


def test_the_shell_scripts_call_the_tools_as_modules():
    for script in ("train_pretrained.sh", "gpu_train.sh"):
        text = (REPO / "tools" / script).read_text()
        assert "-m tools.export_weights" in text and "tools/export_weights.py" not in text


def test_time_to_accuracy_table_reads_every_card_and_the_peers():
    from tools.export_weights import PUBLISHED, total_budget
    from tools.model_table import time_to_accuracy

    import models

    lines = time_to_accuracy().splitlines()
    rows = {line.split("|")[1].strip().strip("`"): line for line in lines[2:]}
    assert sorted(rows) == sorted(models.list_pretrained())
    for entry, line in rows.items():
        meta = models.pretrained_meta(entry)
        assert f"{meta['val_acc']:.2f}%" in line and f"| {total_budget(meta['recipe'])[0]} |" in line
        peer = PUBLISHED.get(entry)
        assert (f"{peer.acc} ({peer.epochs} ep" in line) if peer else line.rstrip().endswith("| - |")


def test_a_second_stage_card_counts_both_stages(tmp_path):
    # a GPU run stopped at its deadline (EMA weights, metrics, no summary), finished on the CPU with
    # init_weights=<its checkpoint>: the card names both stages and the table adds them up
    import torch
    import yaml

    from tools.export_weights import first_stage, model_card, total_budget, train_command

    run = tmp_path / "runs" / "gpu" / "xception_small"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / "csv" / "version_0").mkdir(parents=True)
    torch.save({"epoch": 30, "ema_state_dict": {}}, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 46, "precision": "auto"}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=xception_small", "trainer.max_epochs=46"]))
    (run / "csv" / "version_0" / "metrics.csv").write_text(
        "epoch,train/epoch_seconds,val/acc\n0,40.5,\n0,,0.5\n1,12.5,\n1,,0.6\n")
    first = first_stage(run / "checkpoints" / "last.ckpt", "NVIDIA H200")
    assert first["epochs"] == 31 and first["scheduled_epochs"] == 46 and first["train_seconds"] == 53.0
    # a default changed since (CHANGED_DEFAULTS) is named at the value the run trained with, here the old one
    assert first["command"] == ("python train.py model=xception_small trainer.max_epochs=46 optim.norm_lr_factor=1.0 "
                                "data.progressive.min_size=null")
    assert first["hardware"] == "NVIDIA H200"
    today = {"optim": {"norm_lr_factor": 3.0}, "data": {"progressive": {"min_size": 16}}}
    assert train_command(["model=resnet56"], today) == ("python train.py model=resnet56 optim.norm_lr_factor=3.0 "
                                                        "data.progressive.min_size=16")
    assert train_command(["optim.norm_lr_factor=2", "data.progressive.min_size=24"], today) == (
        "python train.py optim.norm_lr_factor=2 data.progressive.min_size=24")
    recipe = {"epochs": 4, "wall_seconds": 3600.0, "hardware": "a 2-core CPU", "started_from": first}
    assert total_budget(recipe) == ("31 + 4", 3653.0, "NVIDIA H200, then a 2-core CPU")
    assert total_budget(dict(recipe, started_from=None)) == ("4", 3600.0, "a 2-core CPU")
    card = models_card_fixture(recipe)
    text = model_card(card)
    assert "| epochs | 31 + 4 |" in text and "First 31 of a 46-epoch schedule on NVIDIA H200" in text


def models_card_fixture(recipe: dict) -> dict:
    import models

    card = dict(models.pretrained_meta("resnet20"))
    card.pop("int8", None)
    return dict(card, recipe=dict(card["recipe"], **recipe), notes="")


@pytest.mark.parametrize("int8", [False, True])
def test_verify_pretrained_runs_each_cards_command_and_compares(int8, monkeypatch, capsys):
    """--int8 appends eval.int8=true and checks the card's int8 accuracy; without it, the float one."""
    import models
    from tools import verify_pretrained

    meta = models.pretrained_meta("mobilenet_v1")
    stated = meta["int8"]["val_acc"] if int8 else meta["val_acc"]
    commands = []

    def fake_eval(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=f"| top-1  | {stated:.2f}% |\n", stderr="")

    monkeypatch.setattr(verify_pretrained.subprocess, "run", fake_eval)
    monkeypatch.setattr(sys, "argv", ["verify", "--data-root", "somewhere", *(["--int8"] if int8 else []), "mobilenet_v1"])
    with pytest.raises(SystemExit) as done:
        verify_pretrained.main()
    assert done.value.code == 0 and f"{stated:.2f}%" in capsys.readouterr().out
    assert ("eval.int8=true" in commands[0]) == int8 and "data.root=somewhere" in commands[0] and "pretrained=true" in commands[0]


def test_cards_hold_no_path_of_the_machine_that_trained_them():
    import json

    from tools.export_weights import repo_relative

    config = {"run_dir": str(REPO / "runs" / "r"), "logger": [{"save_dir": str(REPO / "runs" / "r")}], "data": {"root": "/elsewhere"}}
    assert repo_relative(config) == {"run_dir": "runs/r", "logger": [{"save_dir": "runs/r"}], "data": {"root": "/elsewhere"}}
    for card in (REPO / "models" / "weights").glob("*.json"):
        assert str(REPO) not in card.read_text(), card.name


def test_recipe_ab_report_sets_each_change_against_the_base_run(tmp_path, capsys):
    from tools import recipe_ab

    def run(name, acc, *overrides, finished=True, root="../shared/data/cifar10"):
        # a run folder as train.py leaves it: the resolved config (a trimmed one here) and, once done, its summary
        seed = int(name.rsplit(".s", 1)[1]) if re.search(r"\.s\d+$", name) else 0
        config = {"model": {"name": "resnet20", "width": 1.0, "kwargs": {}},
                  "data": {"root": root, "cache_dir": "data_cache", "batch_size": 256, "augment": {"crop_step": 1}},
                  "optim": {"lr": 0.2, "label_smoothing": 0.1, "norm_lr_factor": 1.0, "schedule": "cosine", "epochs": 15,
                            "optimizer": {"lr": 0.2}},
                  "distill": {"logits": None}, "trainer": {"max_epochs": 15, "precision": "auto"}, "seed": seed,
                  "cpu_threads": 2, "run_dir": f"runs/ab/{name}"}
        for o in overrides:  # key=value, as Hydra would apply it
            key, value = o.split("=")
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        if "optim.lr" in " ".join(overrides):
            config["optim"]["optimizer"]["lr"] = config["optim"]["lr"]  # the target reads the plain key
        folder = tmp_path / name
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        if finished:
            (folder / "summary.json").write_text(json.dumps({"final_val_acc": acc, "images_per_second": 500.0,
                                                             "wall_seconds": 1800.0, "precision": "32-true"}))

    run("ab.resnet20.e15.base", 0.9000)
    run("ab.resnet20.e15.base.s1", 0.8960, root="/elsewhere/cifar10")  # a second seed of base, data read from elsewhere
    run("ab.resnet20.e15.linear", 0.9025, "optim.schedule=linear", "data.progressive.from_weights=false")  # a later key
    run("ab.resnet20.e15.ls0_2", 0.8990, "optim.label_smoothing=0.2")
    run("ab.resnet20.e15.ls0_2.s1", 0.9010, "optim.norm_lr_factor=1.0", "optim.label_smoothing=0.2")  # pins base's value
    run("ab.resnet20.e15.bs128", 0.9040, "data.batch_size=128", "optim.lr=0.1")
    run("ab.resnet20.e15.prog16", 0.95, "data.progressive.min_size=16", finished=False)  # still training: not counted
    run("ab.resnet20.e15.grid2", 0.8980, "data.augment.crop_step=2")
    run("ab.resnet20.e15.kd_r20", 0.9050, "data.augment.crop_step=2", "distill.logits=t.pt")
    run("ab.resnet20.e15.zero_gamma", 0.8990, "model.kwargs.zero_init_residual=true")
    run("ablation.resnet20.w1_0.separable.s0", 0.5)  # not an A/B
    assert recipe_ab.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "### `resnet20`, 15 epochs" in out and "prog16" not in out and "ablation" not in out
    # a variant's seeds are averaged (base: 89.80), each seed set against base at that seed
    assert "| `base` | (none: base) | 89.80% | s0: 90.00; s1: 89.60 | - |  | 500 | 0.50 | 32-true |" in out
    assert "| `ls0_2` | `optim.label_smoothing=0.2` | 90.00% | s0: 89.90 (-0.10); s1: 90.10 (+0.50) | +0.20 |  |" in out
    assert "| `linear` | `optim.schedule=linear` | 90.25% | s0: 90.25 (+0.25) | +0.45 |  |" in out
    assert "| `bs128` | `data.batch_size=128` `optim.lr=0.1` | 90.40% |" in out  # optim.optimizer.lr follows: not a change
    assert "| `grid2` | `data.augment.crop_step=2` | 89.80% | s0: 89.80 (-0.20) | +0.00 |  |" in out
    assert ("| `kd_r20` | `data.augment.crop_step=2` `distill.logits=t.pt` | 90.50% | s0: 90.50 (+0.50) | +0.70 | +0.70 vs `grid2` |"
            in out)
    # a key base's config lacks (model.kwargs is {}) needs Hydra's +, as tools/recipes.sh writes it
    assert "| `zero_gamma` | `+model.kwargs.zero_init_residual=true` | 89.90% |" in out
    assert out.count("| `ls0_2`") == 1  # one row per variant, whatever its seeds

    # a seed that trained another recipe is named, not averaged in
    run("ab.resnet20.e15.grid2.s1", 0.8990, "data.augment.crop_step=4")
    assert recipe_ab.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ab.resnet20.e15.grid2.s1 trained another recipe than" in err and "data.augment.crop_step=4" in err
    assert recipe_ab.main(["report", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_card_eval_command_resolves_to_its_own_entry():
    """verify_pretrained runs each card's eval_command: the command must name the build that
    `pretrained=true` resolves, conv_mode and stem included where they are not the defaults."""
    import shlex

    from hydra import compose, initialize_config_dir

    from tools.export_weights import card_eval_command

    full = card_eval_command({"name": "mobilenet_v1", "width": 0.5, "stem": "cifar", "conv_mode": "full"}, "d")
    plain = card_eval_command({"name": "resnet20", "width": 1.0, "stem": "cifar", "conv_mode": "separable"}, "d")
    assert "model.stem" not in plain and "model.conv_mode" not in plain  # the shipped entries' short form
    argv = shlex.split(full)
    assert argv[:2] == ["python", "eval.py"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=argv[2:])
    assert (cfg.model.name, cfg.model.width, cfg.model.stem, cfg.model.conv_mode) == ("mobilenet_v1", 0.5, "cifar", "full")
    assert cfg.pretrained is True and cfg.data.root == "d" and cfg.trainer.precision == "32-true"
    # every shipped card's command is the one this function builds from the card's own recipe
    for card_path in sorted((REPO / "models" / "weights").glob("*.json")):
        card = json.loads(card_path.read_text())
        config = card["recipe"]["config"]
        assert card["eval_command"] == card_eval_command(config["model"], config["data"]["root"]), card_path.name


def test_the_recipe_before_the_changed_defaults_is_pinned_alike_everywhere():
    """The pre-2026-11-28 recipe is written three times, for three readers: the queue's jobs
    (RECIPE_BEFORE in tools/recipes.sh), the cards' train commands (CHANGED_DEFAULTS) and
    `experiment=ablation`. A later default change must reach all three, or they pin different recipes."""
    from omegaconf import OmegaConf

    from tools.export_weights import CHANGED_DEFAULTS

    done = subprocess.run(["bash", "-c", '. tools/recipes.sh && printf "%s" "$RECIPE_BEFORE"'], cwd=REPO,
                          capture_output=True, text=True, check=True)
    pins = dict(arg.split("=", 1) for arg in done.stdout.split())
    as_written = {k: "null" if v is None else str(v) for k, v in CHANGED_DEFAULTS.items()}
    assert pins == as_written
    ablation = OmegaConf.load(REPO / "configs" / "experiment" / "ablation.yaml")
    assert {k: OmegaConf.select(ablation, k) for k in CHANGED_DEFAULTS} == CHANGED_DEFAULTS
    # and each is a default that did change: train.py's config no longer has the old value
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        today = compose("train")
    assert all(OmegaConf.select(today, k) != v for k, v in CHANGED_DEFAULTS.items())


def test_model_table_profiles_each_model_at_its_own_input_size():
    """The ImageNet columns use the input size the model's pretrained_cfg names (Xception's 299)."""
    from tools.model_table import row

    cells = row("xception_small", {})
    assert cells[2].endswith("@32") and cells[4].endswith("@299")
    assert row("resnet20", {})[4].endswith("@224")


def test_shipped_cards_are_what_their_json_renders():
    # a card's markdown is generated from its JSON (`--card-only` rewrites it): an edit to either
    # alone, or to the generator without regenerating, shows here
    from tools.export_weights import CARDS_DIR, WEIGHTS_DIR, model_card

    for path in sorted(WEIGHTS_DIR.glob("*.json")):
        card = json.loads(path.read_text())
        assert (CARDS_DIR / f"{path.stem}.md").read_text() == model_card(card), f"regenerate {path.stem}'s card"


def test_card_only_needs_an_entry_and_no_data(tmp_path):
    # --card-only reads the JSON and measures nothing: no run folder, no --data-root
    run = [sys.executable, "-m", "tools.export_weights", "--card-only"]
    out = subprocess.run(run, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "name one with --entry" in out.stderr and "resnet20" in out.stderr
    out = subprocess.run([sys.executable, "-m", "tools.export_weights", "runs/x"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "--data-root" in out.stderr


def test_export_refuses_a_run_no_card_could_rebuild():
    from tools.export_weights import check_exportable

    model = {"name": "resnet20", "width": 1.0, "stem": "cifar", "conv_mode": "separable", "kwargs": {}}
    data = {"mean": [0.5] * 3, "std": [0.25] * 3}
    check_exportable(model, data)  # a plain build exports
    with pytest.raises(SystemExit, match=r"model.kwargs \{'shortcut': 'pad'\}.*eval.py ckpt_path="):
        check_exportable({**model, "kwargs": {"shortcut": "pad"}}, data)
    with pytest.raises(SystemExit, match="data.mean is null"):
        check_exportable(model, {**data, "mean": None})


def test_slim_runs_replaces_last_ckpt_whole_or_not_at_all(tmp_path, monkeypatch):
    # last.ckpt is a run's only final weights once best.ckpt is gone: a write that dies half-way
    # (kill, full disk) must leave the old file, and a finished one the slim file and no temp file
    import torch

    from tools import slim_runs
    from training.checkpoints import read_checkpoint

    ckpts = tmp_path / "runs" / "r" / "checkpoints"
    ckpts.mkdir(parents=True)
    ema = {"w": torch.randn(4, 3), "b": torch.randn(4)}
    full = {"state_dict": {f"model.{k}": v + 1 for k, v in ema.items()}, "ema_state_dict": ema, "optimizer_states": [{}],
            "epoch": 3, "global_step": 30, "hyper_parameters": {"config": {"model": {"name": "resnet20"}}}}
    for name in ("last.ckpt", "best.ckpt"):
        torch.save(full, ckpts / name)
    original = (ckpts / "last.ckpt").read_bytes()

    def dies_mid_write(obj, f):
        with open(f, "wb") as out:
            out.write(b"\x80\x02 half a checkpoint")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", dies_mid_write)
        with pytest.raises(OSError, match="No space left"):
            slim_runs.main([str(tmp_path / "runs")])
    assert (ckpts / "last.ckpt").read_bytes() == original
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]

    slim_runs.main([str(tmp_path / "runs")])
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"]  # no temp file, best.ckpt dropped
    slim = read_checkpoint(ckpts / "last.ckpt")
    assert set(slim) == {"hyper_parameters", "epoch", "global_step", "ema_state_dict"}
    assert all(torch.equal(slim["ema_state_dict"][k], v) for k, v in ema.items()) and slim["ema_state_dict"].keys() == ema.keys()
