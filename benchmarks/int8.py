"""int8 against float32 on the CPU, for every shipped entry: latency, size and validation accuracy.

    python -m benchmarks.int8 --data-root ../shared/data/cifar10 [--entries resnet20 ...] [--threads 2] [--out outputs/bench_int8]
        [--method minmax|percentile|entropy] [--weight-type int8|uint8] [--float-layers none|first|last|ends]
        [--accuracy-only] [--update-cards]

Per entry (its shipped weights): float32 eager, `models.fuse` float32 and `models.quantize` int8
(calibrated on the first --calib training images, never the validation split), timed interleaved
(`benchmarks.common.bench`, medians) at batch 1 x 224 x 224 and batch 64 x 32 x 32; file size of the
float32 weights and of the int8 ONNX file; top-1 on the 5,000-image validation split for float32
and int8. Without --data-root the accuracy columns are skipped. --update-cards writes each entry's
int8 accuracy, calibration method and weight type into its card, where `models.quantize` and
`eval.py eval.int8=true` find them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

import models
from benchmarks.common import add_common_args, bench, fmt_time, machine_info, md_table, paired_ratio, setup, write_csv

SHAPES = [(64, 32), (1, 224)]


def cifar_split(data_root: str, split: str, limit: int | None = None, overrides: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float images and labels of the training or validation split, as train.py carves them
    (`overrides`: more train.py config overrides, e.g. a test's data.val_size)."""
    from training.config import to_plain
    from training.data import CifarDataModule, normalize, normalizer
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = to_plain(compose("train", [f"data.root={data_root}", "run_dir=.", *overrides]))
    dm = CifarDataModule(cfg["data"], seed=0)
    dm.setup()
    images, labels = dm.splits[split]
    images, labels = images[:limit], labels[:limit]
    return normalize(images, *normalizer(dm.mean, dm.std)), labels  # as eval.py's loader normalises


@torch.inference_mode()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    correct = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum()) for i in range(0, len(images), batch))
    return correct / len(images)


def run_entry(entry: str, args, calib: torch.Tensor | None, val) -> dict:
    model = models.create_model(entry, pretrained=True).eval()
    fused = models.fuse(model)
    calib = calib if calib is not None else torch.randn(args.calib, 3, 32, 32)
    # only the options given, so models.quantize's defaults are what a bare run measures
    given = (("method", args.method), ("weight_type", args.weight_type), ("float_layers", args.float_layers))
    options = {"threads": args.threads, **{k: v for k, v in given if v}}
    if args.float_layers == "none":  # every layer in int8
        options["float_layers"] = None
    q32 = models.quantize(model, calib, **options)
    row = {"entry": entry, "method": options.get("method") or models.int8.default_method(model),
           "weight_type": options.get("weight_type") or models.int8.default_weight_type(model),
           "float_layers": options.get("float_layers", models.int8.DEFAULT_FLOAT_LAYERS), "float32_bytes": sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()),
           "int8_bytes": q32.size_bytes}
    for batch, size in [] if args.accuracy_only else SHAPES:
        x = torch.randn(batch, 3, size, size)
        q = q32
        if size != 32:  # the ONNX graph has a fixed image size: a second one for 224, calibrated on upsampled images
            q = models.quantize(model, F.interpolate(calib[:16], size=size, mode="bilinear").split(4), **options)
        with torch.inference_mode():
            t = bench({"eager": lambda: model(x), "fuse": lambda: fused(x), "int8": lambda: q(x)}, repeats=args.repeats, budget_s=args.budget)
        tag = f"b{batch}_{size}"
        row.update({f"{tag}_eager_s": t["eager"].median, f"{tag}_fuse_s": t["fuse"].median, f"{tag}_int8_s": t["int8"].median,
                    f"{tag}_int8_vs_fuse": paired_ratio(t["fuse"], t["int8"])})
    if val is not None:  # float32 accuracy from the fused model: the eager one's outputs to 1e-4, in a third of the time
        row["val_acc_float32"], row["val_acc_int8"] = accuracy(fused, *val), accuracy(q32, *val)
    return row


def update_card(row: dict, args) -> None:
    """Record what was measured in the entry's card (models/weights/<entry>.json, key "int8") and its
    docs/model_cards page: `models.quantize` then calibrates these weights with this method and
    stores them with this weight type by default (models.int8.card_choice). Re-exporting an entry
    drops the block: new weights, new measurement."""
    import datetime as dt
    import json

    from tools.export_weights import CARDS_DIR, model_card

    path = models.pretrained.WEIGHTS_DIR / f"{row['entry']}.json"
    card = json.loads(path.read_text())
    card["int8"] = {
        "method": row["method"], "weight_type": row["weight_type"], "float_layers": row["float_layers"],
        "calibration_images": args.calib,
        "val_acc": round(100 * row["val_acc_int8"], 2), "val_acc_float32": round(100 * row["val_acc_float32"], 2),
        "command": " ".join(["python -m benchmarks.int8 --accuracy-only", f"--data-root {args.data_root}",
                             f"--calib {args.calib}", f"--entries {row['entry']}",
                             *([f"--method {args.method}"] if args.method else []),
                             *([f"--weight-type {args.weight_type}"] if args.weight_type else []),
                             *([f"--float-layers {args.float_layers}"] if args.float_layers else [])]),
        "hardware": "; ".join(machine_info().split("; ")[:2]),  # the CPU and torch, not the load of the moment
        "measured_on": dt.date.today().isoformat(),
    }  # fmt: skip
    path.write_text(json.dumps(card, indent=2) + "\n")
    (CARDS_DIR / f"{row['entry']}.md").write_text(model_card(card))


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        acc = (f"{100 * r['val_acc_float32']:.2f} / {100 * r['val_acc_int8']:.2f} ({100 * (r['val_acc_int8'] - r['val_acc_float32']):+.2f})"
               if "val_acc_int8" in r else "-")
        out.append([f"`{r['entry']}`"] + [
            f"{fmt_time(r[f'b{b}_{s}_eager_s'])} / {fmt_time(r[f'b{b}_{s}_fuse_s'])} / {fmt_time(r[f'b{b}_{s}_int8_s'])} "
            f"(**{r[f'b{b}_{s}_int8_vs_fuse']:.2f}x**)" if f"b{b}_{s}_int8_s" in r else "-" for b, s in SHAPES
        ] + [f"{r['float32_bytes'] / 1e6:.2f} / {r['int8_bytes'] / 1e6:.2f} MB ({r['int8_bytes'] / r['float32_bytes']:.2f})", acc])
    shapes = [f"b{b} {s}x{s}: eager / fuse / int8 (int8 vs fuse)" for b, s in SHAPES]
    return md_table(["entry", *shapes, "size float32 / int8", "val top-1 float32 / int8 (%)"], out)


def build_parser() -> argparse.ArgumentParser:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), "outputs/bench_int8")
    parser.add_argument("--data-root", default=None, help="CIFAR-10 data.root: calibrate on training images, measure validation accuracy")
    parser.add_argument("--entries", nargs="+", default=None, help="shipped entries (default: all)")
    parser.add_argument("--calib", type=int, default=1024, help="training images used to calibrate")
    parser.add_argument("--method", default=None, choices=models.int8.METHODS, help="calibration method (default: models.quantize's)")
    parser.add_argument("--weight-type", default=None, choices=models.int8.WEIGHT_TYPES,
                        help="the weights' integer type, uint8: uint8 x uint8 products, no int16 saturation on CPUs "
                             "without VNNI (default: models.quantize's)")
    parser.add_argument("--float-layers", default=None, choices=[f or "none" for f in models.int8.FLOAT_LAYERS],
                        help="layers kept in float32, none: every layer int8 (default: models.quantize's)")
    parser.add_argument("--accuracy-only", action="store_true", help="skip the timings: sizes and accuracies (to compare quantize's options)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per shape and entry")
    parser.add_argument("--update-cards", action="store_true",
                        help="write each entry's int8 accuracy, calibration method and weight type into its card (needs --data-root)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.update_cards and not args.data_root:
        parser.error("--update-cards records validation accuracy: give --data-root")
    setup(args)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"`python -m benchmarks.int8 {shown}`\n\nMachine: {machine_info()}\n")
    calib = cifar_split(args.data_root, "train", args.calib)[0] if args.data_root else None
    val = cifar_split(args.data_root, "val") if args.data_root else None
    rows = []
    for entry in args.entries or models.list_pretrained():
        rows.append(run_entry(entry, args, calib, val))
        if args.update_cards:
            update_card(rows[-1], args)
        write_csv(args.out / "int8.csv", rows)  # after each entry: a run cut short keeps what it measured
        print(f"{entry} done", file=sys.stderr, flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
