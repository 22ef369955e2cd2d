"""Data: sources, the uint8 cache, the stratified split and the fast batch loader."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from conftest import CIFAR10_CLASSES, compose_config, make_imagefolder
from training.data import (
    CifarDataModule,
    DeviceBatchLoader,
    batch_crop,
    batch_flip,
    build_cache,
    cache_path,
    check_progressive,
    find_source,
    load_cached,
    progressive_size,
    stratified_split,
)
from training.config import to_plain
from training.errors import ConfigError, DataError


def data_cfg(root: Path, cache: Path, **extra) -> dict:
    cfg = {"name": "cifar10", "root": str(root), "cache_dir": str(cache), "classes": CIFAR10_CLASSES,
           "num_classes": 10, "val_size": 20, "split_seed": 0, "batch_size": 16, "eval_batch_size": 32,
           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return {**cfg, **extra}


def test_imagefolder_source_follows_the_config_class_order(tmp_path):
    # Folders are listed alphabetically by the filesystem; labels must follow `classes`.
    for name in ["zebra_first", "alpha_second"]:
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "train" / name / "0.png")
    source = find_source({"name": "x", "root": str(tmp_path), "classes": ["zebra_first", "alpha_second"]}, "train")
    assert [p.parent.name for p in source.files] == ["zebra_first", "alpha_second"]
    assert source.labels == [0, 1]


def test_imagefolder_with_unknown_class_folder_is_rejected(tmp_path):
    (tmp_path / "train" / "not_a_cifar_class").mkdir(parents=True)
    with pytest.raises(DataError, match="not_a_cifar_class"):
        find_source({"name": "cifar10", "root": str(tmp_path), "classes": CIFAR10_CLASSES}, "train")


def test_cache_matches_the_pngs_and_is_keyed_by_the_source(tmp_path, imagefolder_root):
    cfg = data_cfg(imagefolder_root, tmp_path / "cache")
    source = find_source(cfg, "train")
    images, labels = load_cached(cfg, source)
    assert images.dtype == torch.uint8 and images.shape == (80, 3, 32, 32)
    first = np.asarray(Image.open(source.files[0]).convert("RGB"))
    assert torch.equal(images[0], torch.from_numpy(first).permute(2, 0, 1))
    assert labels.tolist() == source.labels

    # Same source -> same file, not rebuilt.
    path = cache_path(cfg, source)
    mtime = path.stat().st_mtime_ns
    assert build_cache(cfg, find_source(cfg, "train")) == path and path.stat().st_mtime_ns == mtime


def test_cache_key_changes_when_an_image_changes(tmp_path):
    root = make_imagefolder(tmp_path / "data", n_per_class=2)
    cfg = data_cfg(root, tmp_path / "cache")
    before = cache_path(cfg, find_source(cfg, "train"))
    victim = find_source(cfg, "train").files[3]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(victim)
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))  # make sure the mtime moves
    after_source = find_source(cfg, "train")
    assert cache_path(cfg, after_source) != before
    images, _ = load_cached(cfg, after_source)
    assert images[3, 0].eq(255).all()  # the new pixels, not a stale cache


def test_cifar_files_source_reads_train_and_test(tmp_path, cifar_root):
    cfg = data_cfg(cifar_root, tmp_path / "cache")
    train, test = find_source(cfg, "train"), find_source(cfg, "test")
    assert train.layout == "cifar" and test is not None
    images, labels = load_cached(cfg, train)
    assert images.shape == (80, 3, 32, 32) and sorted(torch.bincount(labels).tolist()) == [8] * 10
    assert len(load_cached(cfg, test)[1]) == 40


def test_imagefolder_without_test_split_has_none(tmp_path, imagefolder_root):
    assert find_source(data_cfg(imagefolder_root, tmp_path), "test") is None


@pytest.mark.parametrize("make", ["missing", "empty", "empty_train"])
def test_bad_roots_say_the_expected_layout_and_how_to_get_cifar(tmp_path, make):
    root = tmp_path / "root"
    if make != "missing":
        root.mkdir()
    if make == "empty_train":
        (root / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        find_source(data_cfg(root, tmp_path), "train")
    msg = str(err.value)
    assert "<root>/train/<class>/*.png" in msg and "data.download=true" in msg and str(root) in msg
    if make == "missing":
        assert "does not exist" in msg


def test_stratified_split_is_proportional_fixed_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val = stratified_split(labels, val_size=10, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.bincount(labels[val]).tolist() == [5, 3, 2]
    assert torch.equal(val, stratified_split(labels, 10, seed=0)[1])
    assert not torch.equal(val, stratified_split(labels, 10, seed=1)[1])
    with pytest.raises(DataError, match="val_size"):
        stratified_split(labels, 100, seed=0)


def test_validation_order_mixes_classes():
    # class-sorted data (an ImageFolder tree): the first validation batch must not be one class
    labels = torch.arange(10).repeat_interleave(100)
    _, val = stratified_split(labels, val_size=100, seed=0)
    assert len(set(labels[val[:20]].tolist())) >= 5


def test_batch_crop_and_flip_match_torchvision_semantics():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    dx, dy = torch.tensor([0, 4, 8]), torch.tensor([8, 4, 0])
    out = batch_crop(x, dx, dy, pad=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(3):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])
    assert torch.equal(out[1], x[1])  # offset (4, 4) is the identity
    flipped = batch_flip(x, torch.tensor([True, False, True]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])


def test_fast_loader_normalizes_like_torchvision():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    loader = DeviceBatchLoader(x, torch.arange(4), batch_size=4, mean=mean, std=std, train=False)
    (batch, y), = list(loader)
    ref = torch.stack([T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(img.permute(1, 2, 0).numpy()))) for img in x])
    assert torch.allclose(batch, ref, atol=1e-5) and y.tolist() == [0, 1, 2, 3]


def _epoch(loader: DeviceBatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_fast_loader_is_a_function_of_seed_and_epoch():
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    make = lambda seed: DeviceBatchLoader(images, torch.arange(50), 16, [0.5] * 3, [0.5] * 3, train=True, seed=seed)
    a, b = _epoch(make(0), 3), _epoch(make(0), 3)  # a fresh loader (as after a resume) repeats it
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], _epoch(make(0), 4)[0][1])  # another epoch, another order
    assert not torch.equal(a[0][1], _epoch(make(1), 3)[0][1])  # another seed, another order
    seen = torch.cat([y for _, y in a])
    assert sorted(seen.tolist()) == list(range(50))  # every image once per epoch
    assert len(a) == 4 and [len(y) for _, y in a] == [16, 16, 16, 2]


def test_fast_loader_never_ends_on_a_single_image_batch():
    loader = DeviceBatchLoader(torch.zeros(17, 3, 4, 4, dtype=torch.uint8), torch.zeros(17, dtype=torch.long),
                               16, [0.5] * 3, [0.5] * 3, train=True, crop_padding=0)
    assert [len(y) for _, y in loader] == [16]


def test_torchvision_loader_never_ends_on_a_single_image_batch_either(tmp_path, imagefolder_root):
    dm = CifarDataModule(data_cfg(imagefolder_root, tmp_path / "cache", loader="torchvision", num_workers=0), seed=0)
    dm.prepare_data()
    dm.setup("fit")
    n = len(dm.splits["train"][1])
    dm.cfg["batch_size"] = n - 1  # n images: one batch of n - 1, then one of 1
    assert [len(y) for _, y in dm.train_dataloader()] == [n - 1]
    dm.cfg["batch_size"] = n - 2
    assert [len(y) for _, y in dm.train_dataloader()] == [n - 2, 2]


def test_fast_loader_shards_across_ranks():
    images = torch.randint(0, 256, (21, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(21)
    shards = [DeviceBatchLoader(images, labels, 4, [0.5] * 3, [0.5] * 3, train=True, seed=0, rank=r, world_size=2) for r in (0, 1)]
    train_ids = [torch.cat([y for _, y in _epoch(s, 0)]) for s in shards]
    assert len(train_ids[0]) == len(train_ids[1]) == 10  # equal steps per rank: DDP runs in lock-step
    assert set(train_ids[0].tolist()).isdisjoint(train_ids[1].tolist())
    # evaluation: every image exactly once over the ranks, short ranks padded with -1
    evals = [DeviceBatchLoader(images, labels, 4, [0.5] * 3, [0.5] * 3, train=False, rank=r, world_size=2) for r in (0, 1)]
    ys = [torch.cat([y for _, y in e]) for e in evals]
    assert len(ys[0]) == len(ys[1]) == 11
    assert sorted(t for t in torch.cat(ys).tolist() if t >= 0) == list(range(21)) and (torch.cat(ys) == -1).sum() == 1


def test_progressive_sizes_ramp_from_min_to_full_then_stay_full():
    sizes = [progressive_size(e, 16, 32, min_size=16, start=0.25, end=0.75, step=8) for e in range(16)]
    # flat at 16 until epoch 4, then linear to 32 at epoch 12, rounded to 8 (20 at epoch 6 and 28 at 10 round up)
    assert sizes == [16] * 6 + [24] * 4 + [32] * 6
    assert [progressive_size(e, 10, 32, min_size=24, end=0.5, step=4) for e in range(10)] == [24, 24, 28, 28, 32] + [32] * 5
    assert {progressive_size(e, 10, 32, min_size=None) for e in range(10)} == {32}  # off
    assert progressive_size(0, 10, 32, min_size=20, step=8) == 24 and progressive_size(9, 10, 28, min_size=16, step=8) == 28
    # the default (16 -> 32 at 3/4) on the schedules in use, and a short run's last epoch is always full size
    assert [progressive_size(e, 15, 32, min_size=16) for e in range(15)] == [16] * 3 + [24] * 6 + [32] * 6  # docs/recipe.md
    assert [progressive_size(e, 1, 32, min_size=16) for e in range(1)] == [32]
    assert [progressive_size(e, 2, 32, min_size=16) for e in range(2)] == [16, 32]
    assert [progressive_size(e, 3, 32, min_size=16) for e in range(3)] == [16, 24, 32]


def test_progressive_loader_shrinks_the_same_views_and_leaves_evaluation_alone():
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    schedule = check_progressive({"min_size": 16, "end": 0.5})
    make = lambda **kw: DeviceBatchLoader(images, torch.arange(20), 8, [0.5] * 3, [0.5] * 3, train=True, seed=3, **kw)
    small, full = make(progressive=schedule, max_epochs=4), make()
    assert small.image_size == 16 and full.image_size == 32
    first_small, first_full = _epoch(small, 0), _epoch(full, 0)
    assert len(first_small) == len(first_full) == 3
    for (xs, ys), (xf, yf) in zip(first_small, first_full):
        # the same images, crops and flips as without resizing, each whole view shrunk to 16x16
        assert xs.shape[-2:] == (16, 16) and torch.equal(ys, yf)
        assert torch.allclose(xs, torch.nn.functional.interpolate(xf, size=(16, 16), mode="bilinear", antialias=True), atol=1e-6)
    assert [x.shape[-1] for x, _ in _epoch(small, 1)] == [24] * 3 and small.image_size == 24
    late, late_full = _epoch(small, 2), _epoch(full, 2)
    assert len(late) == len(late_full) == 3 and all(torch.equal(a, b) for (a, _), (b, _) in zip(late, late_full))  # full size: bit-identical
    evaluation = DeviceBatchLoader(images, torch.arange(20), 8, [0.5] * 3, [0.5] * 3, train=False, progressive=schedule, max_epochs=4)
    assert {x.shape[-1] for x, _ in evaluation} == {32}


@pytest.mark.parametrize("cfg, names", [({"min_size": 4}, "min_size=4"), ({"min_size": 40}, "min_size=40"),
                                        ({"min_size": 16, "start": 0.8, "end": 0.5}, "start=0.8"),
                                        ({"min_size": 16, "step": 0}, "step=0")])
def test_progressive_settings_that_make_no_schedule_are_named(cfg, names):
    with pytest.raises(ConfigError, match=names):
        check_progressive(cfg, full=32)
    assert check_progressive({"min_size": None}) is None and check_progressive(None) is None


def test_progressive_needs_the_fast_loader_and_a_run_length(tmp_path, imagefolder_root):
    cfg = data_cfg(imagefolder_root, tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.loader=fast"):
        CifarDataModule({**cfg, "loader": "torchvision", "progressive": {"min_size": 16}}).check_progressive()
    with pytest.raises(ConfigError, match=r"set trainer.max_epochs \(not -1\), or add data.progressive.min_size=null"):
        DeviceBatchLoader(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4), 2, [0.5] * 3, [0.5] * 3,
                          train=True, progressive={"min_size": 16}, max_epochs=-1)


def test_datamodule_builds_train_val_and_reports_val_without_test(tmp_path, imagefolder_root):
    dm = CifarDataModule(data_cfg(imagefolder_root, tmp_path / "cache"), seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert not dm.has_test
    assert len(dm.splits["train"][1]) == 60 and len(dm.splits["val"][1]) == 20
    assert torch.bincount(dm.splits["val"][1]).tolist() == [2] * 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    assert torch.equal(dm.splits["val"][1], next(iter(dm.test_dataloader()))[1][:20])


def test_test_split_picks_what_the_test_stage_reads(tmp_path, cifar_root, imagefolder_root):
    def test_labels(root, split):
        dm = CifarDataModule(data_cfg(root, tmp_path / "cache"), seed=0, test_split=split)
        dm.prepare_data()
        dm.setup("test")
        return dm, torch.cat([y for _, y in dm.test_dataloader()])

    dm, labels = test_labels(cifar_root, "auto")
    assert dm.eval_split == "test" and len(labels) == 40
    dm, labels = test_labels(cifar_root, "val")
    assert dm.eval_split == "val" and torch.equal(labels, dm.splits["val"][1])
    with pytest.raises(DataError, match="no test split"):
        test_labels(imagefolder_root, "test")
    with pytest.raises(DataError, match="choose auto, test or val"):
        CifarDataModule(data_cfg(cifar_root, tmp_path / "cache"), test_split="train")


def test_torchvision_loader_gives_the_same_split(tmp_path, imagefolder_root):
    fast = CifarDataModule(data_cfg(imagefolder_root, tmp_path / "cache"), seed=0)
    classic = CifarDataModule(data_cfg(imagefolder_root, tmp_path / "cache", loader="torchvision", num_workers=0), seed=0)
    for dm in (fast, classic):
        dm.prepare_data()
        dm.setup("fit")
    assert torch.equal(fast.splits["val"][1], classic.splits["val"][1])
    x_fast, _ = next(iter(fast.val_dataloader()))
    x_classic, _ = next(iter(classic.val_dataloader()))
    assert torch.allclose(x_fast, x_classic, atol=1e-5)  # same images, same normalization


def test_cifar100_files_are_read_with_fine_labels(tmp_path):
    from conftest import make_cifar_files

    root = make_cifar_files(tmp_path / "c100", name="cifar100")
    cfg = data_cfg(root, tmp_path / "cache", name="cifar100", num_classes=100, classes=None)
    images, labels = load_cached(cfg, find_source(cfg, "train"))
    assert images.shape == (80, 3, 32, 32) and sorted(set(labels.tolist())) == list(range(0, 100, 10))
    assert len(load_cached(cfg, find_source(cfg, "test"))[1]) == 40


def test_download_asks_torchvision_then_reads_its_files(tmp_path, monkeypatch):
    import torchvision

    from conftest import make_cifar_files

    calls = []

    class FakeCIFAR10:  # stands in for the network: writes what torchvision would
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if not (Path(root) / "cifar-10-batches-py").exists():
                make_cifar_files(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    root = tmp_path / "fresh"
    dm = CifarDataModule(data_cfg(root, tmp_path / "cache", download=True), seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [(str(root), True, True), (str(root), False, True)]
    assert dm.has_test and len(dm.splits["test"][1]) == 40


@pytest.mark.parametrize("data", ["cifar10", "cifar100"])
def test_shipped_configs_download_into_an_empty_root_by_default(tmp_path, monkeypatch, data):
    # The README's main job is `python train.py model=...` on a fresh machine: no data.root, no
    # download flag. The shipped data config must fetch CIFAR then, and only then.
    import torchvision

    from conftest import compose_config, make_cifar_files

    calls = []

    class FakeCIFAR:
        def __init__(self, root, train, download):
            calls.append(train)
            if train:  # torchvision's first call writes the archive's files, both splits
                make_cifar_files(Path(root), name=data)

    monkeypatch.setattr(torchvision.datasets, {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}[data], FakeCIFAR)
    cfg = compose_config("train", [f"data={data}", f"data.root={tmp_path / 'fresh'}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert cfg.data.download is True
    dm = CifarDataModule(OmegaConf.to_container(cfg.data, resolve=True), seed=0)
    dm.locate()
    assert calls == [True, False] and dm.train_source.layout == "cifar"
    dm.train_source = None
    dm.locate()  # the files are there now: nothing is downloaded again
    assert calls == [True, False]


def test_unreadable_cifar_file_is_named(tmp_path, cifar_root):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(cifar_root, root)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04junk")
    cfg = data_cfg(root, tmp_path / "cache")
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR batch file"):
        load_cached(cfg, find_source(cfg, "train"))




def test_eval_loader_and_int8_tools_normalise_bit_identically(tmp_path):
    # int8 accuracy on a card (benchmarks.int8) and eval.py eval.int8=true must see the same inputs:
    # two roundings of (x/255 - mean)/std moved an int8 model's accuracy by 0.2 points
    from benchmarks.int8 import cifar_split
    from training.data import DeviceBatchLoader, normalize, normalizer

    tree = make_imagefolder(tmp_path / "tree")
    small = ["data.val_size=20", f"data.cache_dir={tmp_path / 'cache'}"]
    images, labels = cifar_split(str(tree), "val", overrides=small)
    dm = CifarDataModule(to_plain(compose_config("train", [f"data.root={tree}", "run_dir=.", *small]))["data"], seed=0)
    dm.setup()
    uint8, val_labels = dm.splits["val"]
    loader = DeviceBatchLoader(uint8, val_labels, 7, dm.mean, dm.std, train=False)  # eval.py's batches
    through_loader = torch.cat([x for x, _ in loader])
    assert torch.equal(labels, val_labels) and torch.equal(images, through_loader)
    assert torch.equal(through_loader, normalize(uint8, *normalizer(dm.mean, dm.std)))
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, (uint8.float() / 255 - mean) / std)  # the same function, rounded differently
