"""tools.pack_cifar: the packed CIFAR files give the very same train/val tensors as the PNG tree."""

import subprocess
import sys

import torch

from conftest import REPO, compose_config, make_imagefolder, tiny_overrides
from tools.pack_cifar import pack
from training.config import to_plain
from training.data import CifarDataModule


def splits(data_root, tmp_path, name):
    config = to_plain(compose_config("train", tiny_overrides(data_root, tmp_path / name, tmp_path / f"cache_{name}")))
    dm = CifarDataModule(config["data"], seed=0)
    dm.setup()
    return dm


def test_packed_files_read_back_as_the_same_split(tmp_path):
    tree = make_imagefolder(tmp_path / "tree", splits=("train", "test"))
    written = pack(tree, tmp_path / "packed")
    assert sorted(p.name for p in written) == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                                              "data_batch_4", "data_batch_5", "test_batch"]
    a, b = splits(tree, tmp_path, "tree"), splits(tmp_path / "packed", tmp_path, "packed")
    assert b.train_source.layout == "cifar" and a.train_source.layout == "imagefolder"
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split][0], b.splits[split][0]) and torch.equal(a.splits[split][1], b.splits[split][1])


def test_pack_cifar_runs_as_a_module(tmp_path):
    tree = make_imagefolder(tmp_path / "tree")
    out = subprocess.run([sys.executable, "-m", "tools.pack_cifar", str(tree), str(tmp_path / "packed")], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "data_batch_5" in out and (tmp_path / "packed" / "cifar-10-batches-py" / "batches.meta").is_file()
