"""Training img/s with glibc's default malloc against `training.allocator.keep_freed_memory`.

    python -m benchmarks.allocator [--models mobilenet_v2 resnet20] [--pairs 3] [--steps 5] [--threads 2]

malloc settings are per process, so each sample is a fresh process (`--child`) that builds the model
(cifar stem, 10 classes, channels-last, train.py's default precision), runs 2 untimed steps and
reports the median img/s of `--steps` steps of `benchmarks.train_speed.TrainStep`. Processes
alternate default, tuned, default, tuned, ... `--pairs` times per model; the table gives the median
img/s of each and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchmarks.common import machine_info, md_table


def child(model: str, tuned: bool, steps: int, batch: int, threads: int) -> None:
    import torch

    from training.allocator import keep_freed_memory

    if tuned:
        keep_freed_memory()
    torch.set_num_threads(threads)
    import models
    from benchmarks.train_speed import DEFAULT, TrainStep

    step = TrainStep(models.create_model(model, num_classes=10), DEFAULT, batch)
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(batch / statistics.median(times))


def sample(model: str, tuned: bool, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "benchmarks.allocator", "--child", model, "--steps", str(args.steps),
           "--batch", str(args.batch), "--threads", str(args.threads)] + (["--tuned"] if tuned else [])
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet20"])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.tuned, args.steps, args.batch, args.threads)
        return 0
    print(f"`python -m benchmarks.allocator {' '.join(sys.argv[1:] if argv is None else argv)}`\n\nMachine: {machine_info()}\n")
    rows = []
    for model in args.models:
        pairs = [(sample(model, False, args), sample(model, True, args)) for _ in range(args.pairs)]
        rows.append([f"`{model}`", f"{statistics.median(a for a, _ in pairs):.0f}", f"{statistics.median(b for _, b in pairs):.0f}",
                     f"{statistics.median(b / a for a, b in pairs):.2f}x", " / ".join(f"{a:.0f}:{b:.0f}" for a, b in pairs)])
    print(md_table(["model", "default malloc img/s", "keep_freed_memory img/s", "ratio (median of pairs)", "pairs"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
