"""tools/gpu_train.sh's CPU path: pack the data, train as on the GPU machine, slim, split, unpack,
and evaluate what came back -- the same commands a GPU session runs, on tiny data."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose_config, eval_overrides, make_imagefolder
from tools.pack_cifar import pack, to_webp
from training.checkpoints import read_checkpoint
from training.evaluate import evaluate

TINY = ("model.width=0.25 data.val_size=20 data.batch_size=16 data.eval_batch_size=32 trainer.accelerator=cpu "
        "trainer.enable_model_summary=false trainer.num_sanity_val_steps=0 cpu_threads=1")


@pytest.mark.slow
def test_train_slim_split_unpack_and_evaluate(tmp_path):
    # the layout `prepare` leaves: WebP mosaics in two folders, as the two data calls carry them
    gpu = tmp_path / "gpu"
    pack(make_imagefolder(tmp_path / "tree"), tmp_path / "packed")
    to_webp(tmp_path / "packed" / "cifar-10-batches-py", [gpu / "p1", gpu / "p2"])
    data = gpu / "data"  # where `train` decodes them
    out, runs, back = tmp_path / "out", tmp_path / "runs", tmp_path / "back"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), RUNS=str(runs), GPU_DIR=str(gpu), PYTHON=sys.executable,
               EXTRA=f"{TINY} data.cache_dir={tmp_path / 'cache'}", OMP_NUM_THREADS="1")
    done = subprocess.run([str(REPO / "tools" / "gpu_train.sh"), "train", "resnet20:2"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    parts = sorted(out.glob("gpu_runs.tar.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)

    restored = subprocess.run([str(REPO / "tools" / "gpu_train.sh"), "unpack", str(out)], cwd=REPO, capture_output=True, text=True,
                              env=dict(env, RUNS=str(back), NO_EXPORT="1"), timeout=120)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    run = back / "gpu" / "resnet20"
    last = run / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    assert set(ckpt) == {"hyper_parameters", "epoch", "global_step", "ema_decay", "ema_state_dict"}  # slim
    assert not (run / "checkpoints" / "best.ckpt").exists() and (run / "summary.json").is_file()
    assert ckpt["epoch"] == 1 and ckpt["hyper_parameters"]["config"]["trainer"]["max_epochs"] == 2  # entry:epochs applied
    weights = ckpt["ema_state_dict"]  # matrices travel as fp16, vectors (BN statistics) as float32
    assert {t.dtype for t in weights.values() if t.is_floating_point() and t.dim() > 1} == {torch.float16}
    assert {t.dtype for t in weights.values() if t.is_floating_point() and t.dim() == 1} == {torch.float32}

    # what export_weights reads: the slim checkpoint evaluates to the run's own final validation accuracy
    overrides = [*eval_overrides(tmp_path / "eval", tmp_path / "cache"), f"ckpt_path={last}", f"data.root={data}"]
    report = evaluate(compose_config("eval", overrides), overrides=overrides)
    import json
    assert report["top1"] == pytest.approx(json.loads((run / "summary.json").read_text())["final_val_acc"])


def test_unknown_entry_is_named(tmp_path):
    done = subprocess.run([str(REPO / "tools" / "gpu_train.sh"), "train", "resnet21"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OUT=str(tmp_path)), timeout=60)
    assert done.returncode == 2 and "unknown job 'resnet21'" in done.stderr and "mobilenet_v2" in done.stderr


def test_an_ab_second_seed_is_the_same_change_at_another_seed_and_the_families_keep_their_recipe():
    # ab.<...>.<variant>.s1 trains variant's overrides at seed 1; the plain name stays seed 0 (the queue adds it)
    def recipe(job):
        done = subprocess.run(["bash", "-c", f'. tools/recipes.sh && recipe_for "{job}"'], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    for variant in ("base", "ls0_2", "norm_lr3"):
        first, second = recipe(f"ab.resnet20.e15.{variant}"), recipe(f"ab.resnet20.e15.{variant}.s1")
        assert second == first + ["seed=1"] and not any(a.startswith("seed=") for a in first)
    # the A/Bs and the ablation keep the recipe they began with; the entries train the default
    before = ["optim.norm_lr_factor=1.0", "data.progressive.min_size=null"]
    for job in ("ab.resnet20.e15.base", "ablation.mobilenet_v1.w0_5.full.s2", "finish.mobilenet_v2"):
        assert recipe(job)[:2] == before, job
    assert recipe("ab.resnet20.e15.norm_lr3")[-1] == "optim.norm_lr_factor=3"  # Hydra: the last value wins
    assert recipe("ab.resnet20.e15.prog16")[-1] == "data.progressive.min_size=16"
    assert not any(a.startswith(("optim.norm_lr_factor", "data.progressive")) for a in recipe("resnet56"))


@pytest.mark.slow
def test_cpu_queue_resumes_an_ablation_run_and_measures_it_once(tmp_path):
    # the CPU queue as the session runs it, on tiny data: an ablation job trains into
    # <RUNS>/ablation/<job>, lands as one row of the results file, and a second pass skips it
    import csv

    runs, results = tmp_path / "runs", tmp_path / "results.csv"
    job = "ablation.se_resnet20.w1_0.pointwise_kxk.s0"
    env = dict(os.environ, RUNS=str(runs), RESULTS=str(results), PYTHON=sys.executable, THREADS="1", OMP_NUM_THREADS="1",
               DATA_ROOT=str(make_imagefolder(tmp_path / "tree")),
               EXTRA=f"{TINY.replace(' cpu_threads=1', '')} trainer.max_epochs=1 data.cache_dir={tmp_path / 'cache'}")
    queue = [str(REPO / "tools" / "train_pretrained.sh"), job]
    first = subprocess.run(queue, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["conv_mode"], r["seed"], r["epochs"]) for r in rows] == [("se_resnet20", "pointwise_kxk", "0", "1")]
    again = subprocess.run(queue, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"== {job}: trained" in again.stdout and "measure" not in again.stdout + again.stderr


@pytest.mark.slow
def test_cpu_queue_trains_a_recipe_ab_into_its_own_folder(tmp_path):
    # a recipe A/B job trains into <RUNS>/ab/<job> with its change, exports nothing, and is skipped once done
    runs = tmp_path / "runs"
    job = "ab.resnet20.e15.linear"
    env = dict(os.environ, RUNS=str(runs), PYTHON=sys.executable, THREADS="1", OMP_NUM_THREADS="1",
               DATA_ROOT=str(make_imagefolder(tmp_path / "tree")),
               EXTRA=f"{TINY.replace(' cpu_threads=1', '')} trainer.max_epochs=1 data.cache_dir={tmp_path / 'cache'}")
    queue = [str(REPO / "tools" / "train_pretrained.sh"), job]
    first = subprocess.run(queue, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    run = runs / "ab" / job
    assert (run / "summary.json").is_file() and "optim/scheduler=linear" in (run / ".hydra" / "overrides.yaml").read_text()
    assert "export" not in first.stdout + first.stderr and not (runs / "pretrained").exists()
    again = subprocess.run(queue, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"== {job}: trained" in again.stdout


@pytest.mark.slow
def test_cpu_queue_caches_a_teachers_logits_once_before_the_distilled_ab(tmp_path):
    # a distillation A/B reads $TEACHER_DIR/<entry>.pt: the queue makes it from the shipped entry first,
    # the run trains against it and records its teacher, and a second pass makes and trains nothing
    import json

    runs, teachers = tmp_path / "runs", tmp_path / "teachers"
    job = "ab.resnet20.e15.kd_r20"
    env = dict(os.environ, RUNS=str(runs), PYTHON=sys.executable, THREADS="1", OMP_NUM_THREADS="1",
               TEACHER_DIR=str(teachers), PZ_CACHE_DIR=str(tmp_path / "cache"),
               DATA_ROOT=str(make_imagefolder(tmp_path / "tree")),
               EXTRA=f"{TINY.replace(' cpu_threads=1', '')} trainer.max_epochs=1")
    queue = [str(REPO / "tools" / "train_pretrained.sh"), job]
    first = subprocess.run(queue, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "== teacher resnet20: caching its logits" in first.stdout and (teachers / "resnet20.pt").is_file()
    summary = json.loads((runs / "ab" / job / "summary.json").read_text())
    assert "resnet20" in summary["teacher"]
    again = subprocess.run(queue, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "teacher" not in again.stdout and f"== {job}: trained" in again.stdout
