"""Shared helpers for the benchmarks: interleaved timing, the machine's roofline, tables and files.

Timing on a shared, noisy machine: the things being compared are timed in the same process,
interleaved round by round (the order rotates every round), each sample long enough to dwarf the
timer (calls are repeated inside a sample), and the summary is the median. A ratio between two
candidates is the median of the per-round ratios, so a slow spell that hits one round hits both
sides of that round's ratio.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

__all__ = [
    "Timing",
    "bench",
    "paired_ratio",
    "measure_peaks",
    "merge_peaks",
    "machine_info",
    "md_table",
    "write_csv",
    "add_common_args",
    "setup",
    "fmt_time",
]


@dataclass
class Timing:
    """Seconds per call: the median and spread of `samples` (each a mean over `inner` calls)."""

    samples: list[float] = field(default_factory=list)
    inner: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def iqr_rel(self) -> float:
        """Interquartile range over median: how noisy the samples were."""
        return self.iqr / self.median

    @property
    def iqr(self) -> float:
        """Interquartile range of the samples (nan under 4 samples: too few to have quartiles)."""
        if len(self.samples) < 4:
            return float("nan")
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]


def _time_once(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def bench(
    fns: dict[str, Callable[[], object]],
    repeats: int = 25,
    warmup: int = 2,
    min_sample_s: float = 2e-3,
    budget_s: float | None = None,
    min_repeats: int = 5,
    inner: int | None = None,
    on_round: Callable[[int, dict[str, Timing]], None] | None = None,
) -> dict[str, Timing]:
    """Time each callable, interleaved: every round runs each of them once (a sample), in an order
    that rotates every round. Calls faster than `min_sample_s` are repeated inside a sample.
    `budget_s`, if given, lowers the number of rounds (not below `min_repeats`) so the whole
    comparison takes about that long.

    `inner` fixes the calls per sample instead, and skips the call that would size it: a training
    step of seconds needs no sizing, and an extra step would cost more than the samples.
    `on_round(round_index, timings)` is called after every round (progress logs)."""
    names = list(fns)
    calls: dict[str, int] = {}
    for name in names:
        fn = fns[name]
        for _ in range(warmup):
            fn()
        if inner is None:
            once = _time_once(fn, 1)
            calls[name] = max(1, int(min_sample_s / max(once, 1e-7)))
        else:
            calls[name] = inner
    rounds = repeats
    if budget_s is not None:
        per_round = sum(_time_once(fns[n], calls[n]) * calls[n] for n in names)
        rounds = max(min_repeats, min(repeats, int(budget_s / max(per_round, 1e-9))))
    out = {name: Timing(inner=calls[name]) for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].samples.append(_time_once(fns[name], calls[name]))
        if on_round is not None:
            on_round(r, out)
    return out


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a/b (the two were timed in the same rounds by `bench`)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


def measure_peaks(dtype: torch.dtype = torch.float32, copy_mb: int = 256, repeats: int = 60) -> dict:
    """This machine's roofline in `dtype`: peak FLOP/s and memory bandwidth.

    Peak FLOP/s is the best of three compute-bound kernels, each sample a single call of a few
    milliseconds (short enough that some samples fall between other tenants' time slices):
    torch.mm of 1024 x 1024 matrices (MKL -- on AMD CPUs MKL takes its AVX2 path for float32; in bf16
    with AMX a 512 x 512 one is too short to reach the peak),
    a 1x1 convolution 512 -> 512 channels on a 32x32 channels-last map and a 3x3 convolution
    128 -> 128 channels on 28x28 (both oneDNN, AVX-512). Bandwidth: copying a `copy_mb` MiB
    float32 tensor into a preallocated one (bytes = read + write). All are the best sample, not
    the median: a peak is the most the machine was seen to do (interference only slows it).
    Call it again at the end of a run and keep the larger values (`merge_peaks`).
    """
    import torch.nn.functional as F

    cl = torch.channels_last
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    c = torch.empty(1024, 1024, dtype=dtype)
    x1 = torch.randn(1, 512, 32, 32, dtype=dtype).contiguous(memory_format=cl)
    w1 = torch.randn(512, 512, 1, 1, dtype=dtype)
    x3 = torch.randn(1, 128, 28, 28, dtype=dtype).contiguous(memory_format=cl)
    w3 = torch.randn(128, 128, 3, 3, dtype=dtype).contiguous(memory_format=cl)
    src = torch.randn(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once, outside the timing
    with torch.no_grad():
        t = bench(
            {
                "gemm": lambda: torch.mm(a, b, out=c),
                "conv1x1": lambda: F.conv2d(x1, w1),
                "conv3x3": lambda: F.conv2d(x3, w3, padding=1),
                "copy": lambda: dst.copy_(src),
            },
            repeats=repeats,
            warmup=3,
            min_sample_s=0,
        )
    mkl = 2 * 1024**3 / t["gemm"].best / 1e9
    onednn = max(2 * 512 * 512 * 32 * 32 / t["conv1x1"].best, 2 * 128 * 128 * 9 * 28 * 28 / t["conv3x3"].best) / 1e9
    nbytes = 2 * src.numel() * src.element_size()
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "mkl_gemm_gflops": mkl,
        "onednn_conv_gflops": onednn,
        "peak_gflops": max(mkl, onednn),
        "bw_gbs": nbytes / t["copy"].best / 1e9,
    }


def merge_peaks(*measurements: dict) -> dict:
    """Field-wise maximum of several `measure_peaks` results (e.g. start and end of a run)."""
    out = dict(measurements[0])
    for m in measurements[1:]:
        for k, v in m.items():
            if isinstance(v, float):
                out[k] = max(out[k], v)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                keep = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"]
                return ",".join(f for f in keep if f in flags)
    except OSError:
        pass
    return ""


def machine_info() -> str:
    """One line: CPU, cores, SIMD flags, threads, torch version, date, load average."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_name()}, {os.cpu_count()} cores ({_cpu_flags()}); torch {torch.__version__} "
        f"(capability {torch.backends.cpu.get_cpu_capability()}), threads={torch.get_num_threads()}; "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; load average {load}"
    )


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """A markdown table; `right[i]` right-aligns column i (default: every column but the first)."""
    right = list(right) if right is not None else [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))  # union, in order of appearance
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> argparse.ArgumentParser:
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: on this shared 2-core machine a second OpenMP thread makes "
        "every timing hostage to the other tenants -- a descheduled thread stalls each parallel region)",
    )
    parser.add_argument("--repeats", type=int, default=25, help="timing rounds per comparison (median over rounds)")
    parser.add_argument("--out", type=Path, default=Path(out_default), help="folder for CSV/PNG (created)")
    parser.add_argument("--quick", action="store_true", help="a small sweep, for a smoke test")
    return parser


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
