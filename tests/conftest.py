"""Shared fixtures: tiny data sets made on the fly and the real Hydra configs, shrunk.

The data: an ImageFolder tree of PNGs (train only, like ../shared/data/cifar10) and a set in
torchvision's CIFAR-10 file format (train + test). Each class has its own colour plus noise,
so a few epochs of a tiny model learn something, but nothing depends on how much.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Under pytest-xdist (the README's `-n 2`) each worker process gets one core: one torch thread each,
# and the same for the subprocesses tests start, or OpenMP threads spin-wait on each other's core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 8  # 80 images: 60 train + 20 val after the split


def class_images(n_per_class: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3 images whose mean colour depends on the class, and their labels."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1234).integers(30, 226, size=(10, 3))
    labels = np.repeat(np.arange(10), n_per_class)
    noise = rng.normal(0, 40, size=(len(labels), size, size, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def make_imagefolder(root: Path, splits=("train",), n_per_class: int = PER_CLASS) -> Path:
    for s, split in enumerate(splits):
        images, labels = class_images(n_per_class, seed=s)
        for i, (img, y) in enumerate(zip(images, labels)):
            folder = root / split / CIFAR10_CLASSES[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}_{CIFAR10_CLASSES[y]}.png")
    return root


def make_cifar_files(root: Path, n_per_class: int = PER_CLASS, test_per_class: int = 4, name: str = "cifar10") -> Path:
    """torchvision's file layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    or cifar-100-python/{train, test, meta} (10 of the 100 classes used: 0, 10, ..., 90)."""
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    key = "labels" if name == "cifar10" else "fine_labels"
    scale = 1 if name == "cifar10" else 10

    def batch(images, labels, **extra):
        flat = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
        return {"data": flat, key: (labels * scale).tolist(), **extra}

    images, labels = class_images(n_per_class, seed=10)
    order = np.random.default_rng(0).permutation(len(labels))  # the real batches are shuffled
    images, labels = images[order], labels[order]
    t_images, t_labels = class_images(test_per_class, seed=11)
    if name == "cifar10":
        parts = np.array_split(np.arange(len(labels)), 5)
        blobs = {f"data_batch_{b}": batch(images[p], labels[p], batch_label=f"batch {b}") for b, p in enumerate(parts, start=1)}
        blobs.update({"test_batch": batch(t_images, t_labels), "batches.meta": {"label_names": CIFAR10_CLASSES, "num_vis": 3072}})
    else:
        from omegaconf import OmegaConf

        names = list(OmegaConf.load(CONFIGS / "data" / "cifar100.yaml").classes)
        blobs = {"train": batch(images, labels, coarse_labels=[0] * len(labels)),
                 "test": batch(t_images, t_labels, coarse_labels=[0] * len(t_labels)),
                 "meta": {"fine_label_names": names, "coarse_label_names": ["x"] * 20}}
    for file, blob in blobs.items():
        with open(folder / file, "wb") as f:
            pickle.dump(blob, f)
    return root


@contextlib.contextmanager
def one_thread():
    """One torch thread, restored afterwards (this conftest is shared with the zoo's tests). On a
    small shared machine OpenMP threads spin-waiting on busy cores make steps ~50x slower, and the
    pipeline tests' models are far too small to gain from two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _pipeline_tests_use_one_thread(request):
    if request.module.__name__.startswith(("test_train", "test_eval", "test_data", "test_model_api", "test_onnx")):
        with one_thread():
            yield
    else:
        yield


@pytest.fixture
def kernels_on():
    """The measured kernel rules on, whatever POINTWISE_ZOO_PLAIN_KERNELS says (the kernel tests'
    `pytestmark` asks for it); a failing test must not leave them off for the next one."""
    from models import kernels

    previous = kernels.set_enabled(True)
    yield
    kernels.set_enabled(previous)


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory) -> Path:
    """<root>/train/<class>/*.png only: validation is what gets reported."""
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """torchvision's CIFAR-10 files with a test split."""
    return make_cifar_files(tmp_path_factory.mktemp("cifarfiles"))


def tiny_overrides(data_root: Path, run_dir: Path, cache_dir: Path) -> list[str]:
    """Shrink the real configs to seconds on 2 CPU cores (the defaults stay as shipped otherwise)."""
    return [
        "model=resnet20",
        "model.width=0.25",
        f"data.root={data_root}",
        f"data.cache_dir={cache_dir}",
        "data.val_size=20",
        "data.batch_size=16",
        "data.eval_batch_size=32",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "cpu_threads=1",  # 2 OpenMP threads on 2 shared cores spin-wait: ~50x slower steps
        f"run_dir={run_dir}",
    ]


def compose_config(config_name: str, overrides: list[str]):
    """The real configs from configs/, composed with Hydra's compose API."""
    import training.config  # noqa: F401  (registers the pz_run_dir resolver)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def compose_train(tmp_path, imagefolder_root):
    """compose_train(*overrides, data_root=..., run_dir=...) -> the train config, shrunk."""

    def _compose(*overrides: str, data_root: Path | None = None, run_dir: Path | None = None):
        base = tiny_overrides(data_root or imagefolder_root, run_dir or tmp_path / "run", tmp_path / "cache")
        return compose_config("train", [*base, *overrides])

    return _compose


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cifar_root) -> Path:
    """One tiny finished run on CIFAR-format data with a test split; its folder (read-only use)."""
    from training.pipeline import train

    tmp = tmp_path_factory.mktemp("trained")
    with one_thread():
        train(compose_config("train", tiny_overrides(cifar_root, tmp / "run", tmp / "cache")))
    return tmp / "run"


def eval_overrides(run_dir: Path, cache_dir: Path) -> list[str]:
    return ["cpu_threads=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"run_dir={run_dir}", f"data.cache_dir={cache_dir}"]


def run_script(script: str, *args: str, cwd: Path = REPO, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run train.py / eval.py as a user would; returns the finished process (text output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0", **(env_extra or {}))
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_overrides(data_root: Path, run_dir: Path, cache_dir: Path) -> list[str]:
    """tiny_overrides for the command line: the run folder is Hydra's, not `run_dir=`."""
    return [o for o in tiny_overrides(data_root, run_dir, cache_dir) if not o.startswith("run_dir=")] + [f"hydra.run.dir={run_dir}"]


def model_with_bn_statistics(name: str, num_classes: int = 10, stem: str = "cifar", width: float = 0.25):
    """A zoo model in eval mode whose BN layers have non-trivial running statistics (seeded), so
    folding, export and quantization are checked against something other than identity norms."""
    import torch.nn as nn

    import models

    torch.manual_seed(0)
    model = models.create_model(name, num_classes=num_classes, stem=stem, width=width).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model
