"""Pack an ImageFolder CIFAR-10 tree into torchvision's CIFAR-10 batch files, to carry the data where
the PNGs are not (a GPU machine: the working tree travels, in files of at most 60 MB).

    python -m tools.pack_cifar ../shared/data/cifar10 .gpu/data

writes `<out>/cifar-10-batches-py/data_batch_1..5` (10,000 images, 30.7 MB each, uint8 CHW rows as
in the official files) and `batches.meta`, which `data.root=<out>` reads like a download. The images
go in the order the ImageFolder loader reads the tree (class by class, files by name), so the labels
come in the same order and the stratified validation split (data.val_size, data.split_seed) is the
same 5,000 images as with `data.root=<tree>`. A test split, if the tree has one, is packed as
`test_batch` the same way.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from training.data import CIFAR_FILES, decode_images, scan_imagefolder

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 10_000


def _write(path: Path, images: np.ndarray, labels: list[int], files: list[Path], batch_label: str) -> None:
    batch = {"batch_label": batch_label, "labels": labels, "data": images.reshape(len(images), -1),
             "filenames": [f.name for f in files]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)  # the official files' protocol: plain ndarray reconstruction


def pack(tree: Path, out: Path) -> list[Path]:
    folder, train_files, test_files, meta_file, _, names_key = CIFAR_FILES["cifar10"]
    dest = out / folder
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for split, names in (("train", train_files), ("test", test_files)):
        if not (tree / split).is_dir():
            continue
        files, labels = scan_imagefolder(tree / split, CLASSES)
        images = decode_images(files).numpy()  # (N, 3, 32, 32) uint8
        per = PER_BATCH if split == "train" and len(files) == PER_BATCH * len(names) else -(-len(files) // len(names))
        for i, name in enumerate(names):
            part = slice(i * per, (i + 1) * per)
            _write(dest / name, images[part], labels[part], files[part], f"{split} batch {i + 1} of {len(names)}")
            written.append(dest / name)
    with open(dest / meta_file, "wb") as f:
        pickle.dump({names_key: CLASSES, "num_cases_per_batch": PER_BATCH, "num_vis": 3072}, f, protocol=2)
    return written + [dest / meta_file]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path, help="ImageFolder root holding train/<class>/*.png")
    parser.add_argument("out", type=Path, help="data.root to write (gets cifar-10-batches-py/)")
    args = parser.parse_args(argv)
    for path in pack(args.tree, args.out):
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
