"""Primitive benchmark: `models.pointwise_conv2d` against `F.conv2d` with a 1x1 kernel, on every
pointwise layer shape of mobilenet_v2.

    python -m benchmarks.pointwise [--quick] [--strategies] [--threads 2] [--out outputs/bench_pointwise]

Shapes come from running mobilenet_v2 (cifar stem at 32x32, imagenet stem at 224x224) with forward
hooks on its `PointwiseConv` modules (duplicates merged, `n` counts them). Each shape is timed at
batch 1 and 64, NCHW and channels-last input, forward (no_grad) and forward+backward (input and
weight gradients), in float32 and in bfloat16 under `torch.autocast("cpu", dtype=torch.bfloat16)`
(the training default on CPU: activations arrive in bf16, weights are fp32 parameters).

`pw/conv` is the median over interleaved rounds of the per-round ratio pointwise_conv2d / F.conv2d
(< 1: ours is faster); `noise` is that ratio's interquartile range; `best/best` the ratio of the
two best rounds (interference only adds time, so the best rounds are the least disturbed). `x floor` is the faster of the
two over this machine's roofline floor max(FLOPs / peak, bytes / bandwidth), with peak = the best of
a large MKL GEMM and a large oneDNN 1x1 conv in that dtype, bandwidth = a large copy, all measured
in this run (fwd+bwd: 3x the FLOPs; bytes add dY, dX and dW). `--strategies` also times each of
the primitive's internal strategies (`models.kernels.STRATEGIES`) where it applies -- the data
its dispatch rules are tuned on; `--prepacked` adds, for float32 forward rows, the same oneDNN conv
with its weight reordered once beforehand (what `models.fuse`'s OneDNNConv does; a stateless
functional has to reorder on every call).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

import models
from models import kernels
from benchmarks.common import add_common_args, bench, fmt_time, machine_info, md_table, measure_peaks, merge_peaks, paired_ratio, setup, write_csv


def mobilenet_v2_shapes(stem: str, size: int) -> list[dict]:
    """Pointwise layer shapes of mobilenet_v2 (batch 1), in order of first use, with counts."""
    model = models.create_model("mobilenet_v2", stem=stem, num_classes=1000 if stem == "imagenet" else 10).eval()
    seen: dict[tuple, dict] = {}

    def hook(module, inputs, output):
        x = inputs[0]
        key = (x.shape[1], output.shape[1], x.shape[2], x.shape[3], module.stride)
        seen.setdefault(key, {"c_in": key[0], "c_out": key[1], "h": key[2], "w": key[3], "stride": key[4], "n": 0})
        seen[key]["n"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, models.PointwiseConv)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return list(seen.values())


def roofline(quick: bool) -> dict:
    """Per dtype: peak FLOP/s (best of MKL GEMM and oneDNN convs) and copy bandwidth."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = measure_peaks(dtype, copy_mb=128 if quick else 256, repeats=10 if quick else 60)
        out[dtype] = {**p, "peak": p["peak_gflops"] * 1e9, "bw": p["bw_gbs"] * 1e9}
    return out


def merge_rooflines(a: dict, b: dict) -> dict:
    return {dt: {**merge_peaks(a[dt], b[dt]), "peak": max(a[dt]["peak"], b[dt]["peak"]), "bw": max(a[dt]["bw"], b[dt]["bw"])} for dt in a}


def cost(shape: dict, batch: int, dtype: torch.dtype, backward: bool) -> tuple[float, float]:
    """(FLOPs, bytes) of one call, each tensor read or written once."""
    hw = shape["h"] * shape["w"] // (shape["stride"] ** 2)
    act = dtype.itemsize if dtype == torch.float32 else 2
    x = batch * shape["c_in"] * shape["h"] * shape["w"] * act
    y = batch * shape["c_out"] * hw * act
    wgt = shape["c_in"] * shape["c_out"] * 4  # fp32 parameter (autocast reads it and casts)
    flops = 2 * batch * hw * shape["c_in"] * shape["c_out"]
    if not backward:
        return flops, x + y + wgt
    return 3 * flops, (x + y + wgt) + (y + x + wgt) + (x + wgt)  # fwd; bwd reads dY, X, W, writes dX, dW


def make_call(fn, x, w, backward: bool, bf16: bool):
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast("cpu", enabled=False))
    if not backward:

        def run():
            with torch.no_grad(), ctx():
                fn(x, w)

        return run
    xg = x.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_()
    grad = {}

    def run_bwd():
        with ctx():
            y = fn(xg, wg)
        if "g" not in grad or grad["g"].shape != y.shape or grad["g"].dtype != y.dtype:
            grad["g"] = torch.randn_like(y)
        y.backward(grad["g"])
        xg.grad = wg.grad = None

    return run_bwd


def _onednn_conv():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return getattr(mkldnn, "_convolution_pointwise", None)


def _prepacked_call(x, w, stride: int):
    """F.conv2d's computation with the weight reordered once, for this input shape, outside the timing."""
    mk = torch.ops.mkldnn
    packed = mk._reorder_convolution_weight(w.contiguous(memory_format=torch.channels_last), [0, 0], [stride] * 2, [1, 1], 1, list(x.shape))
    return lambda x, w: mk._convolution_pointwise(x, packed, None, [0, 0], [stride] * 2, [1, 1], 1, "none", [], "")


def dispatch_label(x, w, backward: bool, bf16: bool) -> str:
    """The strategy `pointwise_conv2d` picks for this call, asked in the call's own context."""
    x, w = x.detach().requires_grad_(backward), w.detach().requires_grad_(backward)
    with torch.set_grad_enabled(backward), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return kernels.choose(x, w, x.shape)


def strategies_for(channels_last: bool) -> list[str]:
    return ["conv", "linear"] if channels_last else ["conv", "matmul"]


def run(args) -> list[dict]:
    print(f"Machine: {machine_info()}")
    peaks_start = roofline(args.quick)
    stems = [("cifar", 32), ("imagenet", 224)]
    batches = args.batches
    layouts = [layout == "channels_last" for layout in args.layouts]
    passes = [p == "fwd+bwd" for p in args.passes]
    dtypes = args.dtypes
    if args.quick:
        batches, passes = [1], [False]
    rows = []
    for stem, size in stems:
        shapes = mobilenet_v2_shapes(stem, size)
        if args.quick:
            shapes = shapes[:: max(1, len(shapes) // 5)]
        for batch in batches:
            for dt in dtypes:
                for channels_last in layouts:
                    for backward in passes:
                        for s in shapes:
                            torch.manual_seed(0)
                            x = torch.randn(batch, s["c_in"], s["h"], s["w"])
                            if dt == "bf16":
                                x = x.bfloat16()
                            if channels_last:
                                x = x.contiguous(memory_format=torch.channels_last)
                            w = torch.randn(s["c_out"], s["c_in"], 1, 1) / math.sqrt(s["c_in"])
                            stride = s["stride"]
                            fns = {
                                "pointwise": lambda x, w: models.pointwise_conv2d(x, w, None, stride=stride, padding=0),
                                "conv2d": lambda x, w: F.conv2d(x, w, None, stride=stride),
                            }
                            if args.strategies and stride == 1:
                                for name in strategies_for(channels_last):
                                    if name != "conv":  # "conv" is F.conv2d itself
                                        fns[name] = lambda x, w, f=kernels.STRATEGIES[name]: f(x, w, None)
                            if args.prepacked and dt == "fp32" and not backward and _onednn_conv() is not None:
                                # what a stateful module can do and a functional cannot: reorder the
                                # weight into oneDNN's layout once (models.fuse's OneDNNConv)
                                fns["prepacked"] = _prepacked_call(x, w, stride)
                            calls = {k: make_call(f, x, w, backward, dt == "bf16") for k, f in fns.items()}
                            t = bench(calls, repeats=args.repeats, budget_s=args.budget, min_repeats=5)
                            ratios = [a / b for a, b in zip(t["pointwise"].samples, t["conv2d"].samples)]
                            q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [math.nan] * 3
                            flops, nbytes = cost(s, batch, torch.float32 if dt == "fp32" else torch.bfloat16, backward)
                            row = {
                                "stem": stem,
                                "batch": batch,
                                "dtype": dt,
                                "layout": "channels_last" if channels_last else "nchw",
                                "pass": "fwd+bwd" if backward else "fwd",
                                "c_in": s["c_in"],
                                "c_out": s["c_out"],
                                "hw": f"{s['h']}x{s['w']}",
                                "stride": stride,
                                "n_layers": s["n"],
                                "dispatch": dispatch_label(x, w, backward, dt == "bf16") if stride == 1 else "conv (strided)",
                                "pointwise_s": t["pointwise"].median,
                                "conv2d_s": t["conv2d"].median,
                                "ratio": paired_ratio(t["pointwise"], t["conv2d"]),
                                "ratio_iqr": q[2] - q[0],
                                "ratio_best": t["pointwise"].best / t["conv2d"].best,
                                "flops": flops,
                                "bytes": nbytes,
                            }
                            for name in fns:
                                if name not in ("pointwise", "conv2d"):
                                    row[f"{name}/conv2d"] = paired_ratio(t[name], t["conv2d"])
                            rows.append(row)
                            if args.verbose:
                                print(_line(row), flush=True)
    peaks = merge_rooflines(peaks_start, roofline(args.quick))  # best seen at the start or the end
    for dtype, p in peaks.items():
        print(
            f"Roofline {str(dtype).replace('torch.', '')} (best single-call samples, start and end of the run): "
            f"MKL GEMM {p['mkl_gemm_gflops']:.0f} GFLOP/s, oneDNN conv {p['onednn_conv_gflops']:.0f} GFLOP/s -> "
            f"peak {p['peak'] / 1e9:.0f} GFLOP/s; copy bandwidth {p['bw'] / 1e9:.1f} GB/s"
        )
    for row in rows:
        p = peaks[torch.float32 if row["dtype"] == "fp32" else torch.bfloat16]
        row["floor_s"] = max(row["flops"] / p["peak"], row["bytes"] / p["bw"])
        row["x_floor"] = min(row["pointwise_s"], row["conv2d_s"]) / row["floor_s"]
    return rows


def _line(r: dict) -> str:
    extra = " ".join(f"{k}={v:.2f}" for k, v in r.items() if k.endswith("/conv2d"))
    return (
        f"{r['stem']} N{r['batch']} {r['dtype']} {r['layout']} {r['pass']} {r['c_in']}->{r['c_out']}@{r['hw']}: "
        f"pw {fmt_time(r['pointwise_s'])} conv {fmt_time(r['conv2d_s'])} ratio {r['ratio']:.2f}+-{r['ratio_iqr']:.2f} "
        f"[{r['dispatch']}] {extra}"
    )


def _groups(rows: list[dict]):
    keys = []
    for r in rows:
        k = (r["stem"], r["batch"], r["dtype"], r["layout"], r["pass"])
        if k not in keys:
            keys.append(k)
    return [(k, [r for r in rows if (r["stem"], r["batch"], r["dtype"], r["layout"], r["pass"]) == k]) for k in keys]


def slower_beyond_noise(r: dict) -> bool:
    """Median per-round ratio above 1 by more than its IQR (and 5%), and the best-of-rounds ratio
    agreeing: on a shared machine interference only ever adds time, so a real slowdown shows in both."""
    return r["ratio"] > 1 + max(0.05, r["ratio_iqr"]) and r["ratio_best"] > 1.05


def summary(rows: list[dict]) -> str:
    out = []
    for (stem, batch, dt, layout, ps), sel in _groups(rows):
        gmean = math.exp(sum(math.log(r["ratio"]) for r in sel) / len(sel))
        # whole-network view: every layer of the model (n_layers copies of each shape), summed
        tot_pw = sum(r["pointwise_s"] * r["n_layers"] for r in sel)
        tot_cv = sum(r["conv2d_s"] * r["n_layers"] for r in sel)
        worst = max(sel, key=lambda r: r["ratio"])
        out.append(
            [
                stem, batch, dt, layout, ps, len(sel), f"{gmean:.2f}", f"{tot_pw / tot_cv:.2f}",
                f"{worst['ratio']:.2f} ({worst['c_in']}->{worst['c_out']}@{worst['hw']})",
                sum(slower_beyond_noise(r) for r in sel),
                f"{statistics.median(r['x_floor'] for r in sel):.1f}",
            ]
        )  # fmt: skip
    return md_table(
        ["stem", "batch", "dtype", "layout", "pass", "shapes", "geomean pw/conv", "sum pw / sum conv", "worst pw/conv",
         "slower beyond noise", "median x floor"],
        out,
        right=[False] * 5 + [True] * 6,
    )  # fmt: skip


def detail(rows: list[dict]) -> str:
    parts = []
    for (stem, batch, dt, layout, ps), sel in _groups(rows):
        strategy_cols = [k for k in sel[0] if k.endswith("/conv2d")]
        headers = ["C_in->C_out", "HxW", "n", "dispatch", "pointwise", "F.conv2d", "pw/conv", "noise", "best/best", "x floor"] + strategy_cols
        body = [
            [
                f"{r['c_in']}->{r['c_out']}" + (f" s{r['stride']}" if r["stride"] != 1 else ""),
                r["hw"], r["n_layers"], r["dispatch"], fmt_time(r["pointwise_s"]), fmt_time(r["conv2d_s"]),
                f"**{r['ratio']:.2f}**" if slower_beyond_noise(r) else f"{r['ratio']:.2f}",
                f"{r['ratio_iqr']:.2f}", f"{r['ratio_best']:.2f}", f"{r['x_floor']:.1f}",
            ] + [f"{r[k]:.2f}" for k in strategy_cols]
            for r in sel
        ]  # fmt: skip
        parts.append(f"\n#### {stem} stem, batch {batch}, {dt}, {layout}, {ps}\n\n" + md_table(headers, body, right=[False, False, True, False] + [True] * (len(headers) - 4)))
    return "\n".join(parts)


def main(argv=None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), "outputs/bench_pointwise")
    parser.add_argument("--strategies", action="store_true", help="also time each internal strategy of the primitive")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="*", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    parser.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument(
        "--prepacked", action="store_true",
        help="fp32 forward rows: also time the 1x1 conv with its weight prepacked once by oneDNN (prepacked/conv2d)",
    )
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per shape and setting, at most")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each row as it is measured")
    args = parser.parse_args(argv)
    setup(args)
    rows = run(args)
    print("\nbold pw/conv: slower than F.conv2d beyond noise (median ratio > 1 + max(0.05, its IQR) and best/best > 1.05)\n")
    print("### Summary\n")
    print(summary(rows))
    print("\n### Per shape")
    print(detail(rows))
    write_csv(args.out / "pointwise.csv", rows)
    print(f"\nwrote {args.out / 'pointwise.csv'}")


if __name__ == "__main__":
    main()
