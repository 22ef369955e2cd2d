"""Pack an ImageFolder CIFAR-10 tree into torchvision's CIFAR-10 batch files, to carry the data where
the PNGs are not (a GPU machine: each call carries at most 64 MiB with the ~21 MB working tree).

    python -m tools.pack_cifar ../shared/data/cifar10 .gpu/data
    python -m tools.pack_cifar ../shared/data/cifar10 .gpu --webp 2      # the same, as two folders to carry
    python -m tools.pack_cifar --from-webp .gpu/p1 .gpu/p2 --out .gpu/data   # there: back to batch files

writes `<out>/cifar-10-batches-py/data_batch_1..5` (10,000 images, 30.7 MB each, uint8 CHW rows as
in the official files) and `batches.meta`, which `data.root=<out>` reads like a download. The images
go in the order the ImageFolder loader reads the tree (class by class, files by name), so the labels
come in the same order and the stratified validation split (data.val_size, data.split_seed) is the
same 5,000 images as with `data.root=<tree>`. A test split, if the tree has one, is packed as
`test_batch` the same way.

`--webp N` re-encodes the batch files as lossless WebP mosaics (1,000 images each) spread over
folders <out>/p1..pN, with the labels and file names in <out>/p1/cifar_webp.json: 48% of the raw
150 MB, so the data travels in two calls (xz with a delta filter reaches 65%, PNG 61%).
`--from-webp` decodes them into the very same batch files (byte-for-byte the same images and labels).
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from training.data import CIFAR_FILES, _read_cifar_file, decode_images, scan_imagefolder

# the label order the data config trains with (labels are indices into it)
CLASSES = list(OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "data" / "cifar10.yaml").classes)
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


TILE, COLUMNS, INDEX = 1000, 40, "cifar_webp.json"


def _mosaic(images: np.ndarray) -> np.ndarray:
    """(n, 3, 32, 32) -> one RGB picture, COLUMNS images a row (the last row padded with black)."""
    rows = -(-len(images) // COLUMNS)
    padded = np.zeros((rows * COLUMNS, 3, 32, 32), np.uint8)
    padded[: len(images)] = images
    return padded.reshape(rows, COLUMNS, 3, 32, 32).transpose(0, 3, 1, 4, 2).reshape(rows * 32, COLUMNS * 32, 3)


def _unmosaic(picture: np.ndarray, n: int) -> np.ndarray:
    rows = picture.shape[0] // 32
    return picture.reshape(rows, 32, COLUMNS, 32, 3).transpose(0, 2, 4, 1, 3).reshape(rows * COLUMNS, 3, 32, 32)[:n]


def to_webp(batches: Path, parts: list[Path]) -> list[Path]:
    """The batch files in `batches` as lossless WebP mosaics spread evenly over the `parts` folders."""
    from PIL import Image

    for part in parts:
        part.mkdir(parents=True, exist_ok=True)
    sizes = [0] * len(parts)
    index: dict = {"meta": None, "files": {}}
    for path in sorted(batches.iterdir()):
        batch = _read_cifar_file(path)
        if "data" not in batch:  # batches.meta
            index["meta"] = {"name": path.name, "content": {k: v for k, v in batch.items()}}
            continue
        images = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32)
        tiles = []
        for start in range(0, len(images), TILE):
            buf = io.BytesIO()
            Image.fromarray(_mosaic(images[start:start + TILE])).save(buf, "WEBP", lossless=True, quality=100, method=4)
            i = sizes.index(min(sizes))  # the emptiest folder, so the parts come out the same size
            name = f"{path.name}.{start // TILE:02d}.webp"
            (parts[i] / name).write_bytes(buf.getvalue())
            sizes[i] += len(buf.getvalue())
            tiles.append(name)
        index["files"][path.name] = {"n": len(images), "tiles": tiles, "batch_label": str(batch.get("batch_label", "")),
                                     "labels": [int(y) for y in batch["labels"]],
                                     "filenames": [str(f) for f in batch.get("filenames", [])]}
    (parts[0] / INDEX).write_text(json.dumps(index))
    return sorted(p for part in parts for p in part.iterdir())


def from_webp(parts: list[Path], out: Path) -> list[Path]:
    """Decode `to_webp`'s folders into `out`/cifar-10-batches-py, as `pack` writes it."""
    from PIL import Image

    found = [part / INDEX for part in parts if (part / INDEX).is_file()]
    if not found:
        raise SystemExit(f"error: none of {', '.join(map(str, parts))} holds {INDEX}: carry the folder that has it")
    index = json.loads(found[0].read_text())
    where = {p.name: p for part in parts for p in part.glob("*.webp")}
    dest = out / CIFAR_FILES["cifar10"][0]
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, entry in index["files"].items():
        missing = [t for t in entry["tiles"] if t not in where]
        if missing:
            raise SystemExit(f"error: {len(missing)} mosaics of {name} are missing ({missing[0]}, ...): carry every part folder")
        chunks = []
        for start, tile in zip(range(0, entry["n"], TILE), entry["tiles"]):
            with Image.open(where[tile]) as img:
                chunks.append(_unmosaic(np.asarray(img.convert("RGB")), min(TILE, entry["n"] - start)))
        files = [Path(f) for f in entry["filenames"]]
        _write(dest / name, np.concatenate(chunks), entry["labels"], files, entry["batch_label"])
        written.append(dest / name)
    if index["meta"]:
        with open(dest / index["meta"]["name"], "wb") as f:
            pickle.dump(index["meta"]["content"], f, protocol=2)
        written.append(dest / index["meta"]["name"])
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path, nargs="?", help="ImageFolder root holding train/<class>/*.png")
    parser.add_argument("out", type=Path, nargs="?", help="data.root to write (gets cifar-10-batches-py/), or with --webp the folder for p1..pN")
    parser.add_argument("--webp", type=int, metavar="N", help="write lossless WebP mosaics in N folders <out>/p1..pN instead")
    parser.add_argument("--from-webp", type=Path, nargs="+", metavar="PART", help="decode --webp's folders into --out")
    parser.add_argument("--out", dest="out_root", type=Path, help="with --from-webp: the data.root to write")
    args = parser.parse_args(argv)
    if args.from_webp:
        if args.out_root is None:
            parser.error("--from-webp needs --out <data.root to write>")
        written = from_webp(args.from_webp, args.out_root)
    elif args.tree is None or args.out is None:
        parser.error("name the ImageFolder tree and the folder to write (or --from-webp PART ... --out ROOT)")
    elif args.webp:
        packed = args.out / "packed"
        pack(args.tree, packed)
        written = to_webp(packed / CIFAR_FILES["cifar10"][0], [args.out / f"p{i}" for i in range(1, args.webp + 1)])
        for path in (packed / CIFAR_FILES["cifar10"][0]).iterdir():
            path.unlink()
        (packed / CIFAR_FILES["cifar10"][0]).rmdir()
        packed.rmdir()
    else:
        written = pack(args.tree, args.out)
    for path in written:
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
