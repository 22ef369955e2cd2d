"""CIFAR data: where it comes from, the uint8 cache, the validation split, and two loaders.

Sources (``data.root``), detected in this order:
  1. an ImageFolder tree ``<root>/train/<class>/*.png`` (and ``<root>/test/...`` when present);
  2. torchvision's CIFAR files ``<root>/cifar-10-batches-py`` / ``<root>/cifar-100-python``;
  3. nothing there and ``data.download=true`` (the default): torchvision downloads (2) into root.

Loaders (``data.loader``):
  - ``fast`` (default): every split is decoded once into a uint8 tensor cached on disk, keyed
    by a fingerprint of its source files, then kept on the training device and augmented a
    whole batch at a time (random crop from a padded image + horizontal flip), as airbench does.
    The epoch's order and augmentations are drawn from (seed, epoch), so a resumed run sees the
    same batches as one that ran through. With cached teacher logits (``distill.logits``, made by
    ``python -m tools.teacher_logits``) crop offsets are drawn on the file's grid and each batch
    carries the teacher's logits for its images' views.
  - ``torchvision``: the classic per-image path (PIL decode + transforms in DataLoader workers),
    kept as the baseline the fast path is measured against.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_VERSION = 1
# torchvision's on-disk CIFAR layout: folder, train files, test files, meta file, label key, names key.
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def how_to_get_data(name: str, root: str) -> str:
    """The part of every data error that says which layouts we read and how to get CIFAR."""
    folder = CIFAR_FILES.get(name, CIFAR_FILES["cifar10"])[0]
    return (
        f"Expected one of these layouts under data.root={root}:\n"
        f"  - an ImageFolder tree: <root>/train/<class>/*.png (optional <root>/test/<class>/*.png), "
        f"class folders named as in the data config's `classes`;\n"
        f"  - torchvision's CIFAR files: <root>/{folder}/.\n"
        f"To get CIFAR: with internet, data.download=true (the default) has torchvision download it into data.root; "
        f"offline, point data.root at an ImageFolder tree or CIFAR files (e.g. data.root=../shared/data/cifar10)."
    )


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass
class SplitSource:
    """Where one split (train or test) lives; enough to fingerprint it and to read it."""

    layout: str  # "imagefolder" or "cifar"
    split: str  # "train" or "test"
    path: Path  # ImageFolder split dir, or the CIFAR batches dir
    files: list[Path]  # image files (imagefolder) or batch files (cifar)
    labels: list[int] | None = None  # imagefolder only: known from the folder names, no decode needed


def _cfg(data_cfg: Any, key: str, default: Any = None) -> Any:
    value = data_cfg.get(key, default) if hasattr(data_cfg, "get") else getattr(data_cfg, key, default)
    return default if value is None else value


def scan_imagefolder(split_dir: Path, classes: Sequence[str] | None) -> tuple[list[Path], list[int]]:
    """Image files and labels of ``split_dir/<class>/*``; labels follow ``classes`` (the data
    set's own order), not the alphabetical folder order, and files are sorted by name."""
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
    names = list(classes) if classes else [p.name for p in folders]
    index = {name: i for i, name in enumerate(names)}
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DataError(
            f"{split_dir} has class folder(s) {unknown[:5]} that are not classes of this data set; "
            f"expected folder names among: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
        )
    files: list[Path] = []
    labels: list[int] = []
    for folder in sorted(folders, key=lambda p: index[p.name]):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(entry.path))
                labels.append(index[folder.name])
    return files, labels


def find_source(data_cfg: Any, split: str) -> SplitSource | None:
    """Locate ``split`` under data.root; None for a missing test split. Raises DataError with the
    expected layouts when the root has no training data."""
    name = _cfg(data_cfg, "name", "cifar10")
    root = Path(str(_cfg(data_cfg, "root"))).expanduser()
    split_dir = root / split
    if split_dir.is_dir():
        files, labels = scan_imagefolder(split_dir, _cfg(data_cfg, "classes"))
        if files:
            return SplitSource("imagefolder", split, split_dir, files, labels)
        if split == "train":
            raise DataError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}).\n" + how_to_get_data(name, str(root)))
        return None
    if name in CIFAR_FILES:
        folder, train_files, test_files, *_ = CIFAR_FILES[name]
        batches = [root / folder / f for f in (train_files if split == "train" else test_files)]
        if all(b.is_file() for b in batches):
            return SplitSource("cifar", split, root / folder, batches)
    if split == "test":
        return None
    if not root.exists():
        raise DataError(f"data root {root} does not exist.\n" + how_to_get_data(name, str(root)))
    raise DataError(f"no {name} training images found under {root}.\n" + how_to_get_data(name, str(root)))


def download(data_cfg: Any) -> None:
    """Let torchvision fetch CIFAR into data.root (called when data.root holds none and data.download=true)."""
    import torchvision

    name = _cfg(data_cfg, "name", "cifar10")
    datasets = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    if name not in datasets:
        raise DataError(f"data.download=true only knows cifar10 and cifar100, not {name!r}")
    root = str(_cfg(data_cfg, "root"))
    try:
        for train in (True, False):
            datasets[name](root=root, train=train, download=True)
    except Exception as err:  # network errors come in many types
        raise DataError(f"downloading {name} into {root} failed: {err}\n" + how_to_get_data(name, root)) from err


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's files are pickles: allow only what they hold (numpy arrays, lists, dicts)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_cifar_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as err:
        raise DataError(f"{path} is not a readable CIFAR batch file ({err}); delete it and re-download") from err
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def read_cifar(source: SplitSource, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, _, _, label_key, _ = CIFAR_FILES[name]
    images, labels = [], []
    for path in source.files:
        batch = _read_cifar_file(path)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(y) for y in batch[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def read_cifar_classes(source: SplitSource, name: str) -> list[str] | None:
    _, _, _, meta_file, _, names_key = CIFAR_FILES[name]
    meta = source.path / meta_file
    return [str(n) for n in _read_cifar_file(meta)[names_key]] if meta.is_file() else None


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:
        raise DataError(f"cannot decode image {path}: {err}") from err


def decode_images(files: Sequence[Path]) -> torch.Tensor:
    """Decode image files into one uint8 N x 3 x H x W tensor (all images must share a size).
    PIL releases the GIL while it inflates PNGs, so a few threads help."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode, files, chunksize=256))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape
        odd = next(f for f, a in zip(files, arrays) if a.shape != first)
        raise DataError(
            f"{odd} is {arrays[files.index(odd)].shape[:2]} pixels but {files[0]} is {first[:2]}; "
            "all images of a split must have the same size (CIFAR is 32x32)"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# The uint8 cache
# --------------------------------------------------------------------------------------------


def fingerprint(source: SplitSource) -> str:
    """Hash of the source: layout, location and every file's name, size and mtime. Editing,
    adding or removing an image gives a new key, so a stale cache is never read."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, source.layout, str(source.path.resolve())]).encode())
    for path in source.files:
        st = path.stat()
        h.update(f"{path.relative_to(source.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_path(data_cfg: Any, source: SplitSource) -> Path:
    name = _cfg(data_cfg, "name", "cifar10")
    return Path(str(_cfg(data_cfg, "cache_dir", "data_cache"))) / f"{name}-{source.split}-{fingerprint(source)}.pt"


def build_cache(data_cfg: Any, source: SplitSource) -> Path:
    """Decode ``source`` once into ``{"images": uint8 NCHW, "labels": int64}`` unless cached."""
    path = cache_path(data_cfg, source)
    if path.is_file():
        return path
    name = _cfg(data_cfg, "name", "cifar10")
    log.info("Decoding %d %s file(s) of %s into %s (once)", len(source.files), source.split, source.path, path)
    if source.layout == "imagefolder":
        images, labels = decode_images(source.files), torch.tensor(source.labels, dtype=torch.int64)
    else:
        images, labels = read_cifar(source, name)
        expected, found = _cfg(data_cfg, "classes"), read_cifar_classes(source, name)
        if expected and found and list(expected) != found:
            raise DataError(f"{source.path} lists classes {found[:5]}... but the {name} config expects {list(expected)[:5]}...")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": images, "labels": labels}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    return path


def load_cached(data_cfg: Any, source: SplitSource) -> tuple[torch.Tensor, torch.Tensor]:
    path = build_cache(data_cfg, source)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["images"], blob["labels"]
    except Exception as err:
        raise DataError(f"the data cache {path} is unreadable ({err}); delete it and it will be rebuilt") from err


# --------------------------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------------------------


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx): ``val_size`` indices drawn per class in proportion to its size
    (largest remainder), with a fixed seed, so every run carves the same validation set."""
    n = len(labels)
    if not 0 < val_size < n:
        raise DataError(f"data.val_size={val_size} must be between 1 and the training set size - 1 ({n - 1})")
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_size / n
    take = exact.floor().long()
    order = torch.argsort(exact - take.double(), descending=True, stable=True)
    take[order[: val_size - int(take.sum())]] += 1
    train_idx, val_idx = [], []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        val_idx.append(members[:k])
        train_idx.append(members[k:])
    # Validation in a seeded shuffled order: an ImageFolder tree is sorted by class, so the first
    # batches (all that trainer.limit_val_batches looks at) would otherwise hold one class only.
    val = torch.cat(val_idx).sort().values
    return torch.cat(train_idx).sort().values, val[torch.randperm(len(val), generator=gen)]


# --------------------------------------------------------------------------------------------
# Fast path: whole-batch augmentation on the device
# --------------------------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch): no state to save for resuming."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def batch_crop(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop each image of a batch at its own offset from a zero-padded copy (= RandomCrop(padding)).
    Two 1-D gathers (rows, then columns), which CPUs do faster than one 4-D fancy index."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dev = images.device
    rows = (dy.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = (dx.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(n, c, h, w)
    return torch.gather(torch.gather(padded, 2, rows), 3, cols)


def batch_flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(images.device)[:, None, None, None], images.flip(-1), images)


# -- the view grid of cached teacher logits -----------------------------------------------------
# A view is (dx, dy, flip) with crop offsets on multiples of `step`: (2 * pad / step + 1)^2 offsets
# times 2 flips. Caching every view once lets the teacher cost nothing per epoch; the tool that
# writes the cache (tools/teacher_logits.py) and the loader that reads it both number views here.


def grid_side(pad: int, step: int) -> int:
    """Offsets per axis. `pad` must be a multiple of `step` so the un-shifted view (offset `pad`)
    is on the grid: it is the view the teacher's own accuracy is measured on."""
    if step < 1 or pad % step:
        raise DataError(f"teacher-logit grid step {step} (tools.teacher_logits --step) must be >= 1 and divide "
                        f"data.augment.crop_padding={pad}")
    return 2 * pad // step + 1


def grid_views(pad: int, step: int) -> list[tuple[int, int, bool]]:
    """Every (dx, dy, flip) of the grid, in view-id order (see `view_ids`)."""
    grid_side(pad, step)
    offsets = range(0, 2 * pad + 1, step)
    return [(dx, dy, flip) for dy in offsets for dx in offsets for flip in (False, True)]


def view_ids(dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, pad: int, step: int) -> torch.Tensor:
    side = grid_side(pad, step)
    return ((dy // step) * side + dx // step) * 2 + flip.long()


class EpochOrder:
    """This rank's share of one epoch: the sample order and each sample's augmentation.

    Named and shaped like a sampler so Lightning calls ``set_epoch`` on it at each epoch start
    (it looks for ``loader.sampler.set_epoch``). Draws depend on (seed, epoch) only, and every
    image gets the same draw whatever the number of processes.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, pad: int = 0, step: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world_size, self.pad = n, shuffle, seed, rank, world_size, pad
        self.step = step  # crop offsets on multiples of step (teacher-logit grid); 1 = every offset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def per_rank(self) -> int:
        # training: equal shares (DDP steps in lock-step), the remainder is dropped for this epoch;
        # evaluation: ceil, the short ranks are padded with label -1 (ignored by the metrics).
        return self.n // self.world_size if self.shuffle else math.ceil(self.n / self.world_size)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, dx, dy, flip) for this rank; indices are -1 where evaluation pads."""
        gen = epoch_generator(self.seed, self.epoch)
        if self.shuffle:
            order = torch.randperm(self.n, generator=gen)
            # step=1 draws exactly what runs before the grid drew, so their checkpoints resume exactly
            side = 2 * self.pad // self.step + 1
            dx = torch.randint(0, side, (self.n,), generator=gen) * self.step
            dy = torch.randint(0, side, (self.n,), generator=gen) * self.step
            flip = torch.rand(self.n, generator=gen) < 0.5
            take = torch.arange(self.rank, self.per_rank * self.world_size, self.world_size)
            return order[take], dx[take], dy[take], flip[take]
        order = torch.arange(self.rank, self.per_rank * self.world_size, self.world_size)
        order = torch.where(order < self.n, order, -1)
        zeros = torch.zeros(len(order), dtype=torch.long)
        return order, zeros, zeros, zeros.bool()


# -- progressive resizing (data.progressive) ------------------------------------------------------
# Early epochs see smaller images: a step costs about (side / 32)^2 of a full one, and what the
# network learns first (colour, coarse shape) survives the downsampling. The side grows linearly
# from `min_size` to full between two points of the run and is rounded to a multiple of `step`, the
# schedule FFCV's ImageNet recipes use (libffcv/ffcv-imagenet, `get_resolution`: 160 -> 192 px,
# rounded to 32). It depends on the epoch only, so a resumed run sees the sizes it would have seen.


def progressive_size(epoch: int, max_epochs: int, full: int, min_size: int | None,
                     start: float = 0.0, end: float = 0.75, step: int = 8) -> int:
    """The training image side at `epoch` (0-based) of a `max_epochs` run: `min_size` until
    `start * max_epochs`, `full` from `end * max_epochs` on, linear in between, rounded to the
    nearest multiple of `step` (halves up) and kept within [min_size, full]. The last epoch is always
    at `full` (a run of 1-3 epochs would otherwise validate at a size it never trained on).
    `min_size=None`: always `full`."""
    if min_size is None or min_size >= full:
        return full
    first, last = start * max_epochs, min(end * max_epochs, max_epochs - 1)
    if epoch >= last:
        return full
    frac = 0.0 if epoch <= first else (epoch - first) / (last - first)
    side = math.floor((min_size + frac * (full - min_size)) / step + 0.5) * step  # halves round up
    return int(min(full, max(min_size, side)))


def check_progressive(cfg: Any, full: int | None = None) -> dict | None:
    """data.progressive as keyword arguments of `progressive_size` (None when off); a ConfigError
    naming the key and a value that works when a setting cannot be a schedule. `full`: the images'
    side, once known."""
    cfg = dict(cfg or {})
    if cfg.get("min_size") is None:
        return None
    args = {"min_size": int(cfg["min_size"]), "start": float(cfg.get("start", 0.0)),
            "end": float(cfg.get("end", 0.75)), "step": int(cfg.get("step", 8))}
    if args["min_size"] < 8 or (full is not None and args["min_size"] > full):
        side = f"the images' {full}" if full is not None else "the images' side"
        raise ConfigError(f"data.progressive.min_size={args['min_size']}: the first epochs' image side must be "
                          f"between 8 and {side} (e.g. 24 for CIFAR's 32), or null for no resizing")
    if not 0.0 <= args["start"] < args["end"] <= 1.0:
        raise ConfigError(f"data.progressive.start={args['start']} / end={args['end']}: fractions of "
                          "trainer.max_epochs with 0 <= start < end <= 1 (e.g. start=0 end=0.75)")
    if args["step"] < 1:
        raise ConfigError(f"data.progressive.step={args['step']}: sizes are rounded to multiples of it; use 1 or more (8)")
    return args


def normalizer(mean, std, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with (x/255 - mean)/std = x * scale + shift for uint8 images x, per channel."""
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    scale = (1.0 / (255.0 * std_t))[None, :, None, None]
    shift = (-torch.tensor(mean, dtype=torch.float32, device=device) / std_t)[None, :, None, None]
    return scale, shift


def normalize(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float32, in one fused multiply-add. The one normalisation of
    the fast loader (training and evaluation), the int8 tools and the teacher logits, so they see
    bit-identical inputs (the textbook (x/255 - mean)/std rounds differently, enough to move an int8
    model's accuracy by 0.2 points). The torchvision loader (`data.loader=torchvision`) uses
    `T.Normalize` instead."""
    return torch.addcmul(shift, images.float(), scale)


class DeviceBatchLoader:
    """Batches of normalized float images from a uint8 tensor, augmented a batch at a time on
    whatever device the tensor lives on (the training device: no host->device copy per step).

    `teacher`: cached teacher logits (N, views, classes) on the same device, for training; crops
    are then drawn on its grid (`grid_step`) and batches are (x, y, teacher logits of each view).
    `grid_step` alone (data.augment.crop_step) draws crops on that grid without a teacher: the
    control of a distillation A/B, whose student only ever sees grid crops.
    `progressive`: `progressive_size`'s schedule (with `max_epochs`), for training: each epoch's
    augmented images are resized to its side (bilinear, antialiased) after normalisation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int = 0,
        crop_padding: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
        teacher: torch.Tensor | None = None,
        grid_step: int = 1,
        progressive: dict | None = None,
        max_epochs: int | None = None,
    ):
        self.images, self.labels = images, labels.to(images.device)
        self.batch_size, self.train, self.flip = batch_size, train, flip
        self.crop_padding = crop_padding if train else 0
        self.teacher = teacher if train else None
        self.grid_step = grid_step if self.crop_padding else 1
        if self.grid_step != 1:
            grid_side(self.crop_padding, self.grid_step)
        self.scale, self.shift = normalizer(mean, std, images.device)
        # `sampler`/`batch_sampler` as on a DataLoader: Lightning calls sampler.set_epoch each epoch
        self.sampler = EpochOrder(len(labels), shuffle=train, seed=seed, rank=rank, world_size=world_size,
                                  pad=self.crop_padding, step=self.grid_step)
        self.batch_sampler = None
        self.progressive = progressive if train else None
        if self.progressive is not None and (not max_epochs or max_epochs < 0):
            raise ConfigError("progressive resizing (data.progressive, on by default) needs the run's length: set "
                              "trainer.max_epochs (not -1), or add data.progressive.min_size=null to train at full size")
        self.max_epochs = max_epochs

    @property
    def image_size(self) -> int:
        """The side of this epoch's training images (the stored side unless resizing progressively)."""
        full = int(self.images.shape[-1])
        if self.progressive is None:
            return full
        return progressive_size(self.sampler.epoch, self.max_epochs, full, **self.progressive)

    def __len__(self) -> int:
        n, bs = self.sampler.per_rank, self.batch_size
        # never end on a 1-image training batch: BatchNorm cannot normalize it
        return n // bs if self.train and n % bs == 1 else math.ceil(n / bs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order, dx, dy, flip = self.sampler.draw()
        flip = flip & self.flip  # a run without flips uses the un-flipped views only
        side = self.image_size
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order[sl].to(self.images.device)
            valid = idx >= 0
            x = self.images[idx.clamp(min=0)]
            y = torch.where(valid, self.labels[idx.clamp(min=0)], -1)
            if self.train:
                if self.crop_padding:
                    x = batch_crop(x, dx[sl], dy[sl], self.crop_padding)
                if self.flip:
                    x = batch_flip(x, flip[sl])
            x = normalize(x, self.scale, self.shift)
            if side != x.shape[-1]:  # after the crop, so a small image is a whole view shrunk, not a part of it
                x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            if self.teacher is not None:
                views = view_ids(dx[sl], dy[sl], flip[sl], self.crop_padding, self.grid_step).to(idx.device)
                yield x, y, self.teacher[idx, views].float()
            else:
                yield x, y


# --------------------------------------------------------------------------------------------
# Cached teacher logits (distill.logits)
# --------------------------------------------------------------------------------------------

TEACHER_FORMAT = 1
# what the logits depend on besides the teacher: a file made for another value is another data set,
# split or grid, so its logits would belong to other images or other crops
TEACHER_CHECKED = ("data", "fingerprint", "val_size", "split_seed", "crop_padding", "num_classes", "classes")


def teacher_data_meta(data_cfg: Any, source: SplitSource, step: int) -> dict:
    """The data half of a teacher-logits file's metadata: written by tools/teacher_logits.py,
    compared with the run's own by `check_teacher_meta`."""
    aug = _cfg(data_cfg, "augment", {}) or {}
    num_classes = int(_cfg(data_cfg, "num_classes"))
    return {
        "format": TEACHER_FORMAT,
        "data": str(_cfg(data_cfg, "name", "cifar10")),
        "fingerprint": fingerprint(source),
        "val_size": int(_cfg(data_cfg, "val_size", 5000)),
        "split_seed": int(_cfg(data_cfg, "split_seed", 0)),
        "crop_padding": int(aug.get("crop_padding", 4)),
        "grid_step": int(step),
        "num_classes": num_classes,
        "classes": [str(c) for c in (_cfg(data_cfg, "classes") or range(num_classes))],
    }


def remake_teacher_command(meta: dict, data_cfg: Any) -> str:
    teacher = (meta.get("teacher") or {}).get("arg", "<entry or run .ckpt>")
    aug = _cfg(data_cfg, "augment", {}) or {}
    extras = [f"data={_cfg(data_cfg, 'name', 'cifar10')}", f"data.val_size={_cfg(data_cfg, 'val_size', 5000)}",
              f"data.split_seed={_cfg(data_cfg, 'split_seed', 0)}", f"data.augment.crop_padding={aug.get('crop_padding', 4)}"]
    return (f"python -m tools.teacher_logits --teacher {teacher} --data-root {_cfg(data_cfg, 'root')} "
            f"--step {meta.get('grid_step', 2)} {' '.join(extras)}")


def check_teacher_meta(meta: dict, expected: dict, path: str, data_cfg: Any) -> None:
    """DataError naming every metadata value that differs from this run's, and the command that
    makes a file for this run."""
    if meta.get("format") != TEACHER_FORMAT:
        diffs = [f"format {meta.get('format')!r} (this version reads {TEACHER_FORMAT})"]
    else:
        diffs = [f"{k}: file {meta.get(k)!r}, run {expected[k]!r}" for k in TEACHER_CHECKED if meta.get(k) != expected[k]]
    if diffs:
        raise DataError(
            f"distill.logits={path} was not made for this run's data:\n  " + "\n  ".join(diffs)
            + f"\nRe-run the tool for this run's data and settings: {remake_teacher_command(meta, data_cfg)}"
        )


def read_teacher_logits(path: str, data_cfg: Any) -> dict:
    """{"logits": fp16 (N_train, views, classes), "meta": {...}} from `path`, unchecked."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"distill.logits={path} does not exist; make it with "
                          f"{remake_teacher_command({}, data_cfg)} (docs/recipe.md, distillation)")
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
        blob["logits"], blob["meta"]  # noqa: B018  (both present, or the file is not ours)
    except Exception as err:
        raise DataError(f"distill.logits={path} is not a readable teacher-logits file ({err}); "
                        f"re-make it with {remake_teacher_command({}, data_cfg)}") from err
    return blob


# --------------------------------------------------------------------------------------------
# Classic path: per-image PIL transforms in DataLoader workers
# --------------------------------------------------------------------------------------------


class PerImageDataset(Dataset):
    """One image at a time: decoded from its file (ImageFolder) or taken from a uint8 array
    (CIFAR files, as torchvision's CIFAR10 does), then transformed as a PIL image."""

    def __init__(self, items: list[Path] | torch.Tensor, labels: torch.Tensor, transform: Any):
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        item = self.items[i]
        if isinstance(item, torch.Tensor):
            img = Image.fromarray(item.permute(1, 2, 0).numpy())
        else:
            with open(item, "rb") as f:
                img = Image.open(f).convert("RGB")
        return self.transform(img), int(self.labels[i])


def per_image_transform(mean: Sequence[float], std: Sequence[float], train: bool, crop_padding: int, flip: bool, size: int):
    from torchvision import transforms as T

    steps = []
    if train and crop_padding:
        steps.append(T.RandomCrop(size, padding=crop_padding))
    if train and flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


# --------------------------------------------------------------------------------------------
# Lightning DataModule
# --------------------------------------------------------------------------------------------

class CifarDataModule(L.LightningDataModule):
    """Train/val (carved from train) and test (when the source has one) for CIFAR-style data.

    `test_split` is what the test stage (`trainer.test`, eval.py) reads: "test", "val", or "auto"
    (the test split when the source has one, else validation). `schedule_epochs`: the length of the
    run's schedule (optim.epochs; default trainer.max_epochs), which progressive resizing follows as
    the learning rate does, so a run stopped early and resumed sees the sizes of one that ran through.
    """

    def __init__(self, data_cfg: dict, seed: int = 0, test_split: str = "auto", distill: dict | None = None,
                 schedule_epochs: int | None = None):
        super().__init__()
        self.cfg = dict(data_cfg)
        self.schedule_epochs = schedule_epochs
        self.distill_path = (distill or {}).get("logits")
        self.teacher: dict | None = None  # the read and checked distill.logits file
        self.seed = int(seed)
        if test_split not in ("auto", "test", "val"):
            raise DataError(f"test_split={test_split!r}: choose auto, test or val")
        self.test_split = test_split
        self.loader = self.cfg.get("loader", "fast")
        if self.loader not in ("fast", "torchvision"):
            raise DataError(f"data.loader={self.loader!r}: choose fast or torchvision")
        # read as _loader reads them (a null or 0 eval_batch_size means batch_size's): a size below 1
        # would surface as a ZeroDivisionError from the loader's length
        for key, value, example in (("batch_size", self.cfg.get("batch_size", 256), 256),
                                    ("eval_batch_size", self.cfg.get("eval_batch_size") or 1, 1024)):
            if not (isinstance(value, int) and value > 0):
                raise ConfigError(f"data.{key}={value}: give a positive number of images per batch (per process), "
                                  f"e.g. data.{key}={example}")
        self.train_source: SplitSource | None = None
        self.test_source: SplitSource | None = None
        self.splits: dict[str, tuple[Any, torch.Tensor]] = {}
        self.mean: list[float] = []
        self.std: list[float] = []

    # -- sources -----------------------------------------------------------------------------

    def locate(self) -> None:
        """Find the sources (cheap: a directory scan). Raises DataError with the fix."""
        if self.train_source is not None:
            return
        name, root = self.cfg.get("name"), Path(str(self.cfg.get("root")))
        # A root with a train/ folder is the user's ImageFolder tree, even a broken one: say what is
        # wrong with it rather than download CIFAR next to it.
        if self.cfg.get("download") and not (root.expanduser() / "train").is_dir() and find_source_or_none(self.cfg, "train") is None:
            download(self.cfg)
        self.train_source = find_source(self.cfg, "train")
        self.test_source = find_source(self.cfg, "test")
        log.info("%s from %s (%s layout): test split %s", name, root, self.train_source.layout,
                 "found" if self.test_source else "absent -- validation is reported")

    def check_teacher(self) -> dict | None:
        """Read distill.logits and check it was made for this run's data, split and crop padding;
        its metadata, or None when distillation is off. Cheap next to training: the pipeline calls it
        before the first step."""
        if not self.distill_path:
            return None
        if self.loader != "fast":
            raise ConfigError(f"distill.logits is set but data.loader={self.loader}: distillation from cached teacher "
                              "logits needs data.loader=fast (it knows each sample's crop and flip)")
        if self.teacher is None:
            self.locate()
            blob = read_teacher_logits(self.distill_path, self.cfg)
            step = int(blob["meta"].get("grid_step", 1))
            asked = int((self.cfg.get("augment") or {}).get("crop_step", 1))
            if asked not in (1, step):
                raise ConfigError(f"data.augment.crop_step={asked} but distill.logits={self.distill_path} holds crops on a "
                                  f"grid of step {step}: drop the override (the teacher's grid is used) or re-make the "
                                  f"file with --step {asked}")
            expected = teacher_data_meta(self.cfg, self.train_source, step)
            check_teacher_meta(blob["meta"], expected, self.distill_path, self.cfg)
            self.teacher = blob
        return self.teacher["meta"]

    def check_progressive(self) -> dict | None:
        """data.progressive's schedule (None when off), checked (against the images' side once they
        are read); the pipeline calls it before training."""
        images = self.splits.get("train", (None,))[0]
        full = int(images.shape[-1]) if isinstance(images, torch.Tensor) else None
        schedule = check_progressive(self.cfg.get("progressive"), full=full)
        if schedule is not None and self.loader != "fast":
            raise ConfigError(f"data.progressive.min_size={schedule['min_size']} (progressive resizing is on by default) but "
                              f"data.loader={self.loader}: progressive resizing resizes whole batches in the fast loader; "
                              "use data.loader=fast, or add data.progressive.min_size=null to train at full size")
        return schedule

    @property
    def has_test(self) -> bool:
        self.locate()
        return self.test_source is not None

    @property
    def eval_split(self) -> str:
        """The split the test stage reads: `test_split`, with "auto" resolved."""
        if self.test_split == "auto":
            return "test" if self.has_test else "val"
        if self.test_split == "test" and not self.has_test:
            raise DataError(f"{self.cfg.get('root')} has no test split; read validation (test_split=val) or auto")
        return self.test_split

    @property
    def num_classes(self) -> int:
        return int(self.cfg["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg.get("classes") or [str(i) for i in range(self.num_classes)])

    # -- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Once per node (local rank 0): download if asked, decode into the cache.
        self.locate()
        if self.loader == "fast":
            for source in (self.train_source, self.test_source):
                if source is not None:
                    build_cache(self.cfg, source)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.locate()
        items, labels = self._read(self.train_source)
        if int(labels.max()) >= self.num_classes:
            raise DataError(f"labels go up to {int(labels.max())} but data.num_classes={self.num_classes}")
        train_idx, val_idx = stratified_split(labels, int(self.cfg.get("val_size", 5000)), int(self.cfg.get("split_seed", 0)))
        self.splits["train"] = (_take(items, train_idx), labels[train_idx])
        self.splits["val"] = (_take(items, val_idx), labels[val_idx])
        if self.test_source is not None:
            self.splits["test"] = self._read(self.test_source)
        self.mean, self.std = self._stats()
        if self.loader == "fast":
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}
        if self.check_teacher():
            meta, logits = self.teacher["meta"], self.teacher["logits"]
            views = len(grid_views(meta["crop_padding"], meta["grid_step"]))
            if tuple(logits.shape) != (len(train_idx), views, self.num_classes):
                raise DataError(f"distill.logits={self.distill_path} holds logits of shape {tuple(logits.shape)}, but this run "
                                f"needs ({len(train_idx)} training images, {views} views, {self.num_classes} classes); "
                                f"re-make it with {remake_teacher_command(meta, self.cfg)}")
            # on the training device, like the images: a batch gathers its rows there
            self.teacher["logits"] = logits.to(self.splits["train"][0].device)

    def _read(self, source: SplitSource) -> tuple[Any, torch.Tensor]:
        if self.loader == "fast":
            return load_cached(self.cfg, source)
        if source.layout == "cifar":  # held in memory as arrays, as torchvision's CIFAR10 does
            return read_cifar(source, self.cfg["name"])
        return source.files, torch.tensor(source.labels, dtype=torch.int64)  # decoded per access

    def _stats(self) -> tuple[list[float], list[float]]:
        mean, std = self.cfg.get("mean"), self.cfg.get("std")
        if mean is not None and std is not None:
            return [float(m) for m in mean], [float(s) for s in std]
        images = self.splits["train"][0]
        if not isinstance(images, torch.Tensor):
            raise DataError("data.mean/std are null (compute from data) but the torchvision loader does not decode up front; set them or use data.loader=fast")
        x = images.float().div_(255)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()

    def _loader(self, split: str, train: bool):
        items, labels = self.splits[split]
        aug = self.cfg.get("augment") or {}
        pad, flip = int(aug.get("crop_padding", 4)), bool(aug.get("flip", True))
        bs = int(self.cfg.get("batch_size" if train else "eval_batch_size") or self.cfg.get("batch_size", 256))
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if self.loader == "fast":
            teacher = self.teacher if train and split == "train" else None
            return DeviceBatchLoader(items, labels, bs, self.mean, self.std, train, seed=self.seed,
                                     crop_padding=pad, flip=flip, rank=rank, world_size=world,
                                     teacher=teacher["logits"] if teacher else None,
                                     grid_step=teacher["meta"]["grid_step"] if teacher else int(aug.get("crop_step", 1)),
                                     progressive=self.check_progressive() if train else None,
                                     max_epochs=self.schedule_epochs or (self.trainer.max_epochs if self.trainer else None))
        size = int(items.shape[-1]) if isinstance(items, torch.Tensor) else 32
        dataset = PerImageDataset(items, labels, per_image_transform(self.mean, self.std, train, pad, flip, size))
        workers = int(self.cfg.get("num_workers", 2))
        # as the fast loader: never end an epoch on a 1-image batch, which BatchNorm cannot normalize on 1x1 maps
        return DataLoader(dataset, batch_size=bs, shuffle=train, num_workers=workers, drop_last=train and len(dataset) % bs == 1,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        # test_split="auto" and no test split: the test stage reports validation (and says so)
        return self._loader(self.eval_split, train=False)

    def state_dict(self) -> dict:
        # Saved in checkpoints so a resume can check it carves the same validation split.
        return {"seed": self.seed, "val_size": int(self.cfg.get("val_size", 5000)), "split_seed": int(self.cfg.get("split_seed", 0))}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
        if changed:
            log.warning("Resuming with different data settings than the checkpoint (old, new): %s", changed)


def find_source_or_none(data_cfg: Any, split: str) -> SplitSource | None:
    try:
        return find_source(data_cfg, split)
    except DataError:
        return None


def _take(items: Any, idx: torch.Tensor) -> Any:
    return items[idx] if isinstance(items, torch.Tensor) else [items[i] for i in idx.tolist()]
