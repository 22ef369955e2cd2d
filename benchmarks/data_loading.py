"""Data time per epoch: the per-image torchvision path vs the fast path (uint8 cache + batch augmentation).

Times one training epoch of batches with no model, through the same DataModule train.py uses:

  - torchvision: a DataLoader of PIL images decoded from their files every epoch, with
    RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize in worker processes;
  - fast: images decoded once into a cached uint8 tensor, then cropped/flipped/normalized a whole
    batch at a time on the training device (the CPU here).

    python -m benchmarks.data_loading --root ../shared/data/cifar10 --epochs 2

The fast path's one-time costs (decode into the cache; load the cache) are reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.common import md_table
from training.data import CifarDataModule, find_source, load_cached

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "cifar10.yaml"


def data_config(root: str, cache_dir: str, loader: str, batch_size: int, workers: int) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=False)
    cfg.update(root=root, cache_dir=cache_dir, loader=loader, batch_size=batch_size, num_workers=workers)
    cfg["progressive"] = {**cfg["progressive"], "min_size": None}  # both loaders at full size (torchvision's cannot resize)
    return cfg


def time_epochs(loader, epochs: int) -> list[float]:
    """Seconds to pull every batch of one epoch, per epoch (touching each batch so nothing is lazy)."""
    times = []
    for epoch in range(epochs):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        n = 0
        for x, y in loader:
            n += len(y)
            x.sum()  # force the work
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("PZ_DATA_ROOT", "data") + "/cifar10")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per way (the first includes warm-up)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the torchvision way")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fast way's batch ops)")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temp dir, so the decode is timed")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="pz_cache_")
    results: dict = {"root": args.root, "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    try:
        # Fast path, one-time costs: decode into the cache, then a load of the cached file.
        cfg = data_config(args.root, cache_dir, "fast", args.batch_size, args.workers)
        source = find_source(cfg, "train")
        start = time.perf_counter()
        load_cached(cfg, source)
        results["fast_decode_and_cache_s"] = time.perf_counter() - start
        start = time.perf_counter()
        load_cached(cfg, find_source(cfg, "train"))
        results["fast_cache_load_s"] = time.perf_counter() - start

        fast = CifarDataModule(cfg, seed=0)
        fast.setup("fit")
        results["train_images"] = len(fast.splits["train"][1])
        results["source_images"] = len(source.files)
        results["fast_epoch_s"] = time_epochs(fast.train_dataloader(), args.epochs)

        classic = CifarDataModule(data_config(args.root, cache_dir, "torchvision", args.batch_size, args.workers), seed=0)
        classic.setup("fit")
        results["torchvision_epoch_s"] = time_epochs(classic.train_dataloader(), args.epochs)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)

    n = results["train_images"]
    rows = [
        ("torchvision (PIL per image, %d workers)" % args.workers, results["torchvision_epoch_s"]),
        ("fast (uint8 cache, batch augmentation)", results["fast_epoch_s"]),
    ]
    print(f"\n{n} training images, batch {args.batch_size}, {results['machine']}, torch threads {args.threads}\n")
    cells = []
    for name, times in rows:
        later = times[1:] or times
        mean = sum(later) / len(later)
        cells.append([name, f"{times[0]:.2f}", f"{mean:.2f}", f"{n / mean:,.0f}"])
    print(md_table(["way", "data time, epoch 1 (s)", "data time, later epochs (s)", "img/s (later)"], cells))
    print(f"\nfast path one-time costs: decode {results['source_images']} images into the cache {results['fast_decode_and_cache_s']:.1f} s; "
          f"load the cache {results['fast_cache_load_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
