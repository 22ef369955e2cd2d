"""tools/gpu_schedule.py: fitting jobs into the one call a lent GPU allows (the plan, on made-up
speeds), and the probe -> run -> report path on tiny data on the CPU, as the GPU call runs it."""

import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import REPO, make_imagefolder

from tools.gpu_schedule import make_job, plan

ARGS = SimpleNamespace(extra=[], train_images=45_000, min_fraction=0.5, stretch=1.0)
# 176 batches an epoch at 10 ms, times the 1.2 safety factor: 2.112 s an epoch, plus 10 s to start
SPEED = {"seconds_per_batch": 0.01, "startup_seconds": 10.0, "fallback": []}


def test_a_bare_entry_gets_the_epochs_that_fit_if_at_least_half():
    job = make_job("se_resnet20")  # recipe: 80 epochs
    assert not job.fixed and job.epochs == 80
    assert plan(job, SPEED, 1000.0, ARGS) is None and job.epochs == 80  # all fit: the recipe's
    assert plan(job, SPEED, 100.0, ARGS) is None and job.epochs == 42 and "trainer.max_epochs=42" in job.args
    assert job.args.count("trainer.max_epochs=42") == 1 and "trainer.max_epochs=80" not in job.args
    assert plan(make_job("se_resnet20"), SPEED, 80.0, ARGS) == "skipped (33 of 80 epochs fit)"
    longer = SimpleNamespace(**dict(vars(ARGS), stretch=1.5))  # up to 120 epochs where they fit
    assert plan(job := make_job("se_resnet20"), SPEED, 1000.0, longer) is None and job.epochs == 120
    assert plan(job := make_job("se_resnet20"), SPEED, 200.0, longer) is None and job.epochs == 89


def test_fixed_epochs_run_whole_or_not_at_all():
    ablation = make_job("ablation.se_resnet20.w1_0.pointwise_kxk.s0")  # the ablation fixes 30 epochs
    named = make_job("resnet56:7")
    assert ablation.fixed and ablation.epochs == 30 and named.fixed and named.epochs == 7
    assert plan(ablation, SPEED, 60.0, ARGS).startswith("skipped (30 epochs need ~73 s")
    assert plan(ablation, SPEED, 80.0, ARGS) is None and ablation.epochs == 30
    assert plan(named, SPEED, 30.0, ARGS) is None
    assert plan(named, None, 1000.0, ARGS) == "left out (probe failed)"


def test_a_probe_that_needed_the_fallback_passes_it_on():
    job = make_job("resnet20")
    assert plan(job, dict(SPEED, fallback=["trainer.precision=32-true"]), 1000.0, ARGS) is None
    assert job.extra == ["trainer.precision=32-true"]


def test_a_measured_epoch_time_replaces_the_probe():
    from tools.gpu_schedule import static_speed

    args = SimpleNamespace(**dict(vars(ARGS), epoch_seconds=4.0, startup_seconds=60.0))
    speed = static_speed(job := make_job("mobilenet_v2"), args)
    assert speed["seconds_per_batch"] * 176 == 4.0 and speed["startup_seconds"] == 60.0
    assert plan(job, speed, 300.0, args) is None and job.epochs == int(240 / 4.8)  # 4.0 s times the 1.2 safety factor


def test_probe_run_and_report_on_tiny_data(tmp_path):
    tree = make_imagefolder(tmp_path / "tree")
    tiny = ("model.width=0.25 data.val_size=20 data.batch_size=16 data.eval_batch_size=32 trainer.accelerator=cpu "
            f"data.cache_dir={tmp_path / 'cache'}")
    done = subprocess.run(
        [sys.executable, "-m", "tools.gpu_schedule", "--runs", str(tmp_path / "gpu"), "--data-root", str(tree), "--budget", "400",
         "--lanes", "2", "--train-images", "60", "--probe-batches", "2", "--poll", "0.5", "--extra", tiny,
         "resnet20:1", "resnet20:100000"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu" / "schedule.json").read_text())
    status = {r["job"] + ":" + str(r["epochs"]): r["status"] for r in report["jobs"]}
    assert status["resnet20:1"] == "done"
    assert status["resnet20:100000"].startswith("skipped (100000 epochs need")  # the same model: one probe
    assert [p["job"] for p in report["probes"]] == ["resnet20"]
    assert all(p["seconds_per_batch"] > 0 and p["fallback"] == [] for p in report["probes"])
    assert (tmp_path / "gpu" / "resnet20" / "summary.json").is_file() and not (tmp_path / "gpu" / "resnet20:100000").exists()
    assert (tmp_path / "gpu_probe" / "resnet20").is_dir()  # probes stay out of what travels back
    assert "| resnet20 | 1 | done |" in done.stdout
