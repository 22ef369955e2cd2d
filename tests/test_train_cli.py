"""train.py and eval.py as subprocesses, as a user runs them: end to end, a sweep, DDP with two
CPU processes (gloo), a run killed with SIGKILL and resumed, and bad input without tracebacks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, cli_overrides, compose_config, eval_overrides, run_script
from training.checkpoints import read_checkpoint

pytestmark = pytest.mark.slow


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc


def failed_cleanly(proc: subprocess.CompletedProcess) -> str:
    """A bad-input failure: non-zero exit, a message, and no Python traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_train_then_eval_end_to_end(tmp_path, imagefolder_root):
    run = tmp_path / "run"
    proc = ok(run_script("train.py", *cli_overrides(imagefolder_root, run, tmp_path / "cache")))
    for label in ("params", "mult-adds", "best val acc", "test acc", "wall time", "img/s", f"Run folder: {run}"):
        assert label in proc.stdout
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "csv" / "version_0" / "metrics.csv").is_file()

    out = tmp_path / "eval"
    proc = ok(run_script("eval.py", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={out}",
                         f"data.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false", "eval.tta=true",
                         "cpu_threads=1"))
    assert "top-1" in proc.stdout and "validation reported" in proc.stdout and "flip TTA" in proc.stdout
    assert (out / "confusion_matrix.png").is_file()
    report = json.loads((out / "metrics.json").read_text())
    assert report["split"] == "val" and report["tta"] is True and report["num_images"] == 20


def test_multirun_sweep_writes_one_folder_per_job(tmp_path, imagefolder_root):
    sweep = tmp_path / "sweep"
    args = [o for o in cli_overrides(imagefolder_root, tmp_path / "unused", tmp_path / "cache") if not o.startswith("hydra.run")]
    ok(run_script("train.py", "-m", *args, "trainer.max_epochs=1", "model=resnet20,mobilenet_v2", "seed=0,1",
                  f"hydra.sweep.dir={sweep}"))
    jobs = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert jobs == ["0_resnet20_seed0", "1_resnet20_seed1", "2_mobilenet_v2_seed0", "3_mobilenet_v2_seed1"]
    configs = [OmegaConf.load(sweep / j / "config.yaml") for j in jobs]
    assert [(c.model.name, c.seed) for c in configs] == [("resnet20", 0), ("resnet20", 1), ("mobilenet_v2", 0), ("mobilenet_v2", 1)]


def test_ddp_with_two_cpu_processes(tmp_path, cifar_root):
    run = tmp_path / "run"
    proc = ok(run_script("train.py", *cli_overrides(cifar_root, run, tmp_path / "cache"), "trainer=cpu_ddp",
                         "trainer.max_epochs=2", timeout=400))
    logs = proc.stdout + proc.stderr
    assert "MEMBER: 2/2" in logs  # Lightning's line for the second process joining
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == 2 * 60 and summary["test_acc"] is not None  # 2 epochs x 60, split over 2 ranks
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 * 2  # 30 images per rank at batch 16: 2 steps per epoch

    # The DDP validation score (shards + padding ignored) is what a single process finds.
    overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), f"ckpt_path={summary['best_ckpt']}", "eval.split=val"]
    from training.evaluate import evaluate

    report = evaluate(compose_config("eval", overrides), overrides=overrides)
    assert report["top1"] == pytest.approx(summary["best_val_acc"])


def test_a_killed_run_resumed_ends_like_one_that_ran_through(tmp_path, imagefolder_root):
    epochs = ["trainer.max_epochs=6"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(run_script("train.py", *cli_overrides(imagefolder_root, straight, tmp_path / "cache"), *epochs))

    args = [sys.executable, str(REPO / "train.py"), *cli_overrides(imagefolder_root, killed, tmp_path / "cache"), *epochs]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while not last.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no clean-up, no final checkpoint: like a node dying
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    epoch_at_kill = read_checkpoint(last)["epoch"]
    assert epoch_at_kill < 5

    ok(run_script("train.py", *cli_overrides(imagefolder_root, killed, tmp_path / "cache"), *epochs, f"ckpt_path={last}"))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, killed))
    assert a["best_val_acc"] == b["best_val_acc"] and a["best_epoch"] == b["best_epoch"]
    wa, wb = (read_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (straight, killed))
    assert wa and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_run_dir_goes_back_into_the_checkpoints_run(tmp_path, imagefolder_root):
    # No hydra.run.dir: the default `runs/...` folder is replaced by the checkpoint's own run.
    run = tmp_path / "runs" / "resnet20" / "first"
    ok(run_script("train.py", *cli_overrides(imagefolder_root, run, tmp_path / "cache"), "trainer.max_epochs=1"))
    args = [o for o in cli_overrides(imagefolder_root, run, tmp_path / "cache") if not o.startswith("hydra.run")]
    proc = ok(run_script("train.py", *args, "trainer.max_epochs=2", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                         cwd=tmp_path))
    assert f"Run folder: {run}" in proc.stdout
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert (run / "csv" / "version_1" / "metrics.csv").is_file()


# -- bad input, as the user sees it ----------------------------------------------------------------


@pytest.mark.parametrize("override,expected", [
    ("model=resnet21", "Available options in 'model'"),
    ("data=cifar11", "Available options in 'data'"),
])
def test_unknown_names_list_the_options(tmp_path, override, expected):
    stderr = failed_cleanly(run_script("train.py", override, f"hydra.run.dir={tmp_path}"))
    assert expected in stderr and ("resnet20" in stderr or "cifar100" in stderr)


def test_bad_inputs_exit_with_a_message_not_a_traceback(tmp_path, imagefolder_root):
    # one failure of each script through its real wrapper (training.errors.exit_on_user_error handles
    # every UserError the same way); the other messages are checked in-process (test_train.py, test_eval.py)
    base = cli_overrides(imagefolder_root, tmp_path / "run", tmp_path / "cache")
    missing = failed_cleanly(run_script("train.py", *base, f"data.root={tmp_path / 'nope'}", "data.download=false"))
    assert "does not exist" in missing and "<root>/train/<class>/*.png" in missing and "data.download=true" in missing

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    corrupt = failed_cleanly(run_script("eval.py", f"ckpt_path={garbage}", f"hydra.run.dir={tmp_path / 'e'}"))
    assert str(garbage) in corrupt and "corrupt" in corrupt
