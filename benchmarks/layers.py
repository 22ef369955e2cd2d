"""Layer benchmark: one layer as standard k x k conv, depthwise k x k, pointwise 1x1 and
depthwise-separable (depthwise then pointwise), over channel counts and spatial sizes.

    python -m benchmarks.layers [--quick] [--batch 1] [--kernel 3] [--threads 2] [--out outputs/bench_layers]

For each layer: params, mult-adds (counted by `models.profile`, i.e. FlopCounterMode), median
forward latency (eval, no_grad, fp32), achieved GFLOP/s (2 FLOPs per mult-add) and GB/s, and the
roofline floor of this machine: max(FLOPs / peak GEMM FLOP/s, bytes / copy bandwidth), both peaks
measured in the same run. Bytes count every tensor read or written once per kernel: input, weights
and output (the separable pair is two kernels, so its intermediate map is written once and read
once). `x floor` = measured latency / roofline floor (1.0 would be perfect).

Writes layers.csv and layers.png (achieved GFLOP/s against arithmetic intensity, roofline drawn)
into --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

import models
from benchmarks.common import add_common_args, bench, fmt_time, machine_info, md_table, measure_peaks, merge_peaks, setup, write_csv

KINDS = ("standard", "depthwise", "pointwise", "separable")


class Pointwise(nn.Module):
    """A bias-free 1x1 conv through `models.pointwise_conv2d` (stride/padding passed as keywords)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(models.PointwiseConv(c_in, c_out, bias=False).weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return models.pointwise_conv2d(x, self.weight, None, stride=1, padding=0)


def build(kind: str, channels: int, kernel: int) -> nn.Module:
    pad = kernel // 2
    if kind == "standard":
        return nn.Conv2d(channels, channels, kernel, padding=pad, bias=False)
    if kind == "depthwise":
        return nn.Conv2d(channels, channels, kernel, padding=pad, groups=channels, bias=False)
    if kind == "pointwise":
        return Pointwise(channels, channels)
    if kind == "separable":
        return nn.Sequential(build("depthwise", channels, kernel), Pointwise(channels, channels))
    raise ValueError(kind)


def traffic_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes read and written once per kernel: each leaf's input, weights and output."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        tensors = [inputs[0], output, *module.parameters(recurse=False)]
        total += sum(t.numel() * t.element_size() for t in tensors)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def run(args) -> list[dict]:
    print(f"Machine: {machine_info()}")
    peaks_start = measure_peaks()
    channels = args.channels or ([32, 128] if args.quick else [32, 64, 128, 256, 512])
    sizes = args.sizes or ([8, 28] if args.quick else [8, 14, 28, 56])
    measured = []
    for c in channels:
        for s in sizes:
            x = torch.randn(args.batch, c, s, s)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            layers = {}
            for kind in KINDS:
                torch.manual_seed(0)
                m = build(kind, c, args.kernel).eval()
                if args.channels_last:
                    m = m.to(memory_format=torch.channels_last)
                layers[kind] = m
            with torch.no_grad():
                times = bench({k: (lambda m=m: m(x)) for k, m in layers.items()}, repeats=args.repeats, budget_s=args.budget)
            measured.append((c, s, x, layers, times))
    peaks = merge_peaks(peaks_start, measure_peaks())  # the roofline: best seen at the start or the end
    peak_flops, bw = peaks["peak_gflops"] * 1e9, peaks["bw_gbs"] * 1e9
    print(
        f"Roofline (fp32, best single-call samples at the start and the end of the run): MKL GEMM "
        f"{peaks['mkl_gemm_gflops']:.0f} GFLOP/s, oneDNN conv {peaks['onednn_conv_gflops']:.0f} GFLOP/s -> peak "
        f"{peaks['peak_gflops']:.0f} GFLOP/s; copy bandwidth {peaks['bw_gbs']:.1f} GB/s; ridge point "
        f"{peak_flops / bw:.1f} FLOP/byte\n"
    )
    rows = []
    for c, s, x, layers, times in measured:
        for kind, m in layers.items():
            cost = models.profile(m, tuple(x.shape))
            flops = 2 * cost["macs"]
            nbytes = traffic_bytes(m, x)
            t = times[kind].median
            floor = max(flops / peak_flops, nbytes / bw)
            rows.append(
                {
                    "layer": kind,
                    "channels": c,
                    "size": s,
                    "batch": args.batch,
                    "params": cost["params"],
                    "macs": cost["macs"],
                    "bytes": nbytes,
                    "intensity_flop_per_byte": flops / nbytes,
                    "latency_s": t,
                    "noise_iqr_rel": times[kind].iqr_rel,
                    "gflops": flops / t / 1e9,
                    "gbs": nbytes / t / 1e9,
                    "floor_s": floor,
                    "bound": "compute" if flops / peak_flops >= nbytes / bw else "memory",
                    "x_floor": t / floor,
                }
            )
    for r in rows:
        r["peak_gflops"], r["bw_gbs"] = peaks["peak_gflops"], peaks["bw_gbs"]
    return rows, peaks


def table(rows: list[dict]) -> str:
    return md_table(
        ["layer", "C", "HxW", "params", "mult-adds", "latency", "GFLOP/s", "GB/s", "FLOP/B", "floor", "bound", "x floor"],
        [
            [
                r["layer"],
                r["channels"],
                f"{r['size']}x{r['size']}",
                f"{r['params']:,}",
                f"{r['macs'] / 1e6:,.2f} M",
                fmt_time(r["latency_s"]),
                f"{r['gflops']:.1f}",
                f"{r['gbs']:.1f}",
                f"{r['intensity_flop_per_byte']:.1f}",
                fmt_time(r["floor_s"]),
                r["bound"],
                f"{r['x_floor']:.1f}",
            ]
            for r in rows
        ],
    )


def plot(rows: list[dict], peaks: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"standard": "s", "depthwise": "v", "pointwise": "o", "separable": "D"}
    sizes = sorted({r["size"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for kind in KINDS:
        sel = [r for r in rows if r["layer"] == kind]
        ax.scatter(
            [r["intensity_flop_per_byte"] for r in sel],
            [r["gflops"] for r in sel],
            marker=markers[kind],
            c=[cmap(sizes.index(r["size"]) / max(1, len(sizes) - 1)) for r in sel],
            edgecolors="k",
            linewidths=0.4,
            s=[20 + r["channels"] / 6 for r in sel],
            label=kind,
        )
    ai = np.logspace(np.log10(min(r["intensity_flop_per_byte"] for r in rows) / 2), np.log10(max(r["intensity_flop_per_byte"] for r in rows) * 2), 200)
    ax.plot(ai, np.minimum(peaks["peak_gflops"], ai * peaks["bw_gbs"]), "k-", lw=1.5, label="roofline (measured)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(title, fontsize=9)
    leg = ax.legend(loc="lower right", fontsize=8)
    for handle in leg.legend_handles[:-1]:
        handle.set_facecolor("lightgray")
    ax.text(
        0.01, 0.99, "colour: spatial size " + ", ".join(map(str, sizes)) + " (dark -> light)\nmarker size: channels",
        transform=ax.transAxes, va="top", fontsize=8,
    )  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), "outputs/bench_layers")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kernel", type=int, default=3, help="k of the standard and depthwise convs")
    parser.add_argument("--channels", type=int, nargs="*", help="channel counts (in = out); default 32 64 128 256 512")
    parser.add_argument("--sizes", type=int, nargs="*", help="spatial sizes H = W; default 8 14 28 56")
    parser.add_argument("--channels-last", action="store_true", help="channels-last input and weights")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per (C, size) point, at most")
    args = parser.parse_args(argv)
    setup(args)
    rows, peaks = run(args)
    fmt = "channels-last" if args.channels_last else "NCHW"
    print(f"batch {args.batch}, kernel {args.kernel}x{args.kernel}, {fmt}, fp32, forward under no_grad; median of interleaved rounds\n")
    print(table(rows))
    write_csv(args.out / "layers.csv", rows)
    title = f"layers: batch {args.batch}, k={args.kernel}, {fmt}, fp32, threads={torch.get_num_threads()}"
    plot(rows, peaks, args.out / "layers.png", title)
    print(f"\nwrote {args.out / 'layers.csv'} and {args.out / 'layers.png'}")


if __name__ == "__main__":
    main()
