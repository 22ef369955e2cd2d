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


def test_webp_parts_decode_to_the_same_batch_files(tmp_path):
    # what the GPU calls carry: lossless mosaics in two folders, decoded there into the batch files
    # (through the command line, as tools/gpu_train.sh prepare runs it)
    tree = make_imagefolder(tmp_path / "tree", splits=("train", "test"))
    pack(tree, tmp_path / "packed")
    out = subprocess.run([sys.executable, "-m", "tools.pack_cifar", str(tree), str(tmp_path / "gpu"), "--webp", "2"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "p2" in out and not (tmp_path / "gpu" / "packed").exists()
    assert list((tmp_path / "gpu" / "p1").glob("*.webp")) and list((tmp_path / "gpu" / "p2").glob("*.webp"))
    parts = [tmp_path / "gpu" / "p2", tmp_path / "gpu" / "p1"]  # any order; the index is in one of them
    from tools.pack_cifar import from_webp

    from_webp(parts, tmp_path / "decoded")
    a, b = splits(tmp_path / "packed", tmp_path, "packed"), splits(tmp_path / "decoded", tmp_path, "decoded")
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split][0], b.splits[split][0]) and torch.equal(a.splits[split][1], b.splits[split][1])


def test_a_missing_webp_part_is_named(tmp_path):
    import pytest

    from tools.pack_cifar import from_webp, to_webp

    pack(make_imagefolder(tmp_path / "tree"), tmp_path / "packed")
    to_webp(tmp_path / "packed" / "cifar-10-batches-py", [tmp_path / "gpu" / "p1", tmp_path / "gpu" / "p2"])
    with pytest.raises(SystemExit, match="carry every part folder"):
        from_webp([tmp_path / "gpu" / "p1"], tmp_path / "decoded")
    with pytest.raises(SystemExit, match="carry the folder that has it"):
        from_webp([tmp_path / "gpu" / "p2"], tmp_path / "decoded")
