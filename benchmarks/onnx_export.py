"""ONNX: export fused zoo models with `torch.onnx.export`, run them with onnxruntime, check the
outputs against PyTorch and time both side by side.

    python -m benchmarks.onnx_export [--quick] [--threads 2] [--legacy] [--out outputs/bench_onnx]

Each model is exported from `models.fuse(model)` (batch norms already folded) with a dynamic batch
dimension, by the torch.export-based exporter (`dynamo=True`, the default since PyTorch 2.9;
`--legacy` uses the TorchScript-based one), then loaded in an onnxruntime CPU session with
`intra_op_num_threads` = --threads and all graph optimisations. Outputs must match the unfused
PyTorch model in eval mode to 1e-4 (relative to the output scale) at two batch sizes. Latency:
onnxruntime vs the fused and the unfused PyTorch model, interleaved in one run, medians.
The .onnx files are written into --out.
"""

from __future__ import annotations

import argparse
import sys


import numpy as np

import torch
import torch.nn as nn

import models
from models.onnx import export_onnx, ort_session  # noqa: F401  (tests import them from here too)
from benchmarks.common import add_common_args, bench, fmt_time, machine_info, md_table, paired_ratio, setup, write_csv

CASES = [  # (model, stem, classes, batch, size)
    ("mobilenet_v2", "imagenet", 1000, 1, 224),
    ("mobilenet_v2", "cifar", 10, 256, 32),
    ("mobilenet_v3_large", "imagenet", 1000, 1, 224),
    ("resnet50", "imagenet", 1000, 1, 224),
    ("resnet20", "cifar", 10, 256, 32),
]
QUICK = [("mobilenet_v2", "cifar", 10, 8, 32), ("resnet20", "cifar", 10, 8, 32)]


def ort_run(session, x: torch.Tensor) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def max_rel_error(out: np.ndarray, ref: torch.Tensor) -> float:
    return float(np.abs(out - ref.numpy()).max() / max(1.0, ref.abs().max().item()))


def run_case(name, stem, classes, batch, size, args) -> dict:
    import contextlib
    import io

    torch.manual_seed(0)
    model = models.create_model(name, num_classes=classes, stem=stem).eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding is checked for real
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    fused = models.fuse(model)
    x = torch.randn(batch, 3, size, size)
    path = args.out / f"{name}_{stem}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        export_onnx(fused, torch.randn(2, 3, size, size), path, dynamo=not args.legacy)
    session = ort_session(path, args.threads)
    with torch.inference_mode():
        errors = []
        for xb in (x, torch.randn(3, 3, size, size)):
            errors.append(max_rel_error(ort_run(session, xb), model(xb)))
        times = bench(
            {
                "onnxruntime": lambda: ort_run(session, x),
                "zoo fused (PyTorch)": lambda: fused(x),
                "zoo eager (PyTorch)": lambda: model(x),
            },
            repeats=args.repeats,
            budget_s=args.budget,
            min_repeats=5,
        )
    err = max(errors)
    return {
        "model": name,
        "stem": stem,
        "batch": batch,
        "size": size,
        "exporter": "legacy (TorchScript)" if args.legacy else "dynamo (torch.export)",
        "max_rel_error": err,
        "ok": err <= 1e-4,
        "onnx_mb": path.stat().st_size / 2**20,
        "ort_s": times["onnxruntime"].median,
        "fused_s": times["zoo fused (PyTorch)"].median,
        "eager_s": times["zoo eager (PyTorch)"].median,
        "fused_over_ort": paired_ratio(times["zoo fused (PyTorch)"], times["onnxruntime"]),
        "eager_over_ort": paired_ratio(times["zoo eager (PyTorch)"], times["onnxruntime"]),
    }


def main(argv=None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), "outputs/bench_onnx")
    parser.add_argument("--legacy", action="store_true", help="use the TorchScript-based exporter (dynamo=False)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of timing per model, at most")
    args = parser.parse_args(argv)
    setup(args)
    import onnxruntime

    print(f"Machine: {machine_info()}; onnxruntime {onnxruntime.__version__} (intra-op threads {args.threads})\n")
    rows = [run_case(*case, args) for case in (QUICK if args.quick else CASES)]
    print(
        md_table(
            ["model", "stem", "batch", "exporter", "max error", "onnxruntime", "PyTorch fused", "PyTorch eager",
             "fused / ORT", "eager / ORT"],
            [
                [r["model"], r["stem"], r["batch"], r["exporter"], f"{r['max_rel_error']:.1e}" + ("" if r["ok"] else " FAIL"),
                 fmt_time(r["ort_s"]), fmt_time(r["fused_s"]), fmt_time(r["eager_s"]),
                 f"{r['fused_over_ort']:.2f}", f"{r['eager_over_ort']:.2f}"]
                for r in rows
            ],
            right=[False, False, True, False] + [True] * 6,
        )  # fmt: skip
    )
    print("\nmax error: max |ORT - PyTorch eager| / max(1, max |PyTorch|), over two batch sizes; "
          "fused / ORT > 1: onnxruntime is faster")  # fmt: skip
    write_csv(args.out / "onnx.csv", rows)
    print(f"\nwrote {args.out / 'onnx.csv'} and the .onnx files")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
