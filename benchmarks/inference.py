"""Inference speed: the fused zoo model (`models.fuse`) against its torchvision / timm twin in eager
mode, side by side in one run.

    python -m benchmarks.inference [--quick] [--threads 2] [--no-twins] [--jit] [--out outputs/bench_inference]

Part 1, mobilenet_v2 (target: fused zoo >= 1.5x faster than torchvision eager in both settings):
  - batch 1 at 224x224, imagenet stem, 1000 classes;
  - batch 256 at 32x32, CIFAR layout, 10 classes: for torchvision, its mobilenet_v2 with the stem
    conv at stride 1 and the first stride-2 block (features[2]) at stride 1 -- our cifar stem.
  The twin's weights are converted onto the zoo model (`models.convert_state_dict`), so both compute
  the same function; the run checks that their outputs agree before timing anything.
Part 2, every zoo model with a torchvision or timm twin (`models.REFERENCES`), batch 1 at 224x224
(299x299 for xception), imagenet stem, 1000 classes.

Rows: the twin in eager mode as shipped (NCHW) -- the baseline every ratio divides --, the twin in
eager mode with channels-last (a free trick any user can apply: shows how much of the speed-up is
layout alone), the unfused zoo model, the fused zoo model without oneDNN's fused conv op
(`models.fuse(m, onednn=False)`: BN folding + channels-last only) and the fused zoo model
(`models.fuse(m)`, the target row). For batches larger than --micro-batch, both the twin and the
fused model also run fed in slices (`MicroBatch` from models/fuse.py) -- a control that shows how much of
a large-batch gap is memory traffic rather than arithmetic. With --jit also the plain fused model
traced and frozen by TorchScript (`torch.jit.optimize_for_inference`). Every row is
timed in the same interleaved rounds (forward under torch.inference_mode); `speed-up` is the
median of per-round ratios twin-eager / row.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

import models
from benchmarks.common import add_common_args, bench, fmt_time, machine_info, md_table, paired_ratio, setup, write_csv
from benchmarks.train_speed import torchvision_mobilenet_v2_cifar

def reference(name: str, source: str, num_classes: int) -> nn.Module:
    ref_name = models.REFERENCES[name][source]
    if source == "torchvision":
        import torchvision

        return getattr(torchvision.models, ref_name)(num_classes=num_classes)
    import timm

    return timm.create_model(ref_name, pretrained=False, num_classes=num_classes)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics (a fresh BN is the identity in eval mode, which would flatter
    nothing but make the output check weak)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def pair(name: str, source: str, stem: str, num_classes: int, ref: nn.Module | None = None):
    """(twin, zoo) in eval mode with the twin's weights loaded into the zoo model."""
    torch.manual_seed(0)
    ref = randomize_norms(ref if ref is not None else reference(name, source, num_classes)).eval()
    zoo = models.create_model(name, num_classes=num_classes, stem=stem)
    zoo.load_state_dict(models.convert_state_dict(name, ref.state_dict(), source))
    return ref, zoo.eval()


def variants(ref: nn.Module, zoo: nn.Module, x: torch.Tensor, args) -> dict[str, nn.Module]:
    import copy

    from models.fuse import MicroBatch

    out = {
        "twin eager": ref,
        "twin eager, channels-last": copy.deepcopy(ref).to(memory_format=torch.channels_last),
        "zoo eager (unfused)": zoo,
        "zoo fused, plain PyTorch (onednn=False)": models.fuse(zoo, onednn=False),
        "zoo fused": models.fuse(zoo),
    }
    if args.micro_batch and x.shape[0] > args.micro_batch:
        k = args.micro_batch
        out[f"twin eager, micro-batches of {k}"] = MicroBatch(ref, k)
        out[f"zoo fused, micro-batches of {k}"] = MicroBatch(out["zoo fused"], k)
    if args.jit:
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: the dispatch's Python branches are baked in, as intended
            traced = torch.jit.trace(models.fuse(zoo, onednn=False), x.contiguous(memory_format=torch.channels_last))
            out["zoo fused + jit.optimize_for_inference"] = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    return out


def compare(label: str, ref: nn.Module, zoo: nn.Module, x: torch.Tensor, args) -> list[dict]:
    rows_models = variants(ref, zoo, x, args)
    with torch.inference_mode():
        expect = ref(x)
        scale = max(1.0, expect.abs().max().item())
        for name, m in rows_models.items():
            err = (m(x) - expect).abs().max().item() / scale
            if err > 1e-4:
                raise AssertionError(f"{label}: {name} differs from the twin by {err:.2e} (relative to output scale)")
        times = bench({k: (lambda m=m: m(x)) for k, m in rows_models.items()}, repeats=args.repeats, budget_s=args.budget, min_repeats=5)
    base = times["twin eager"]
    rows = []
    for k, t in times.items():
        rows.append(
            {
                "setting": label,
                "variant": k,
                "median_s": t.median,
                "noise_iqr_rel": t.iqr_rel,
                "rounds": len(t.samples),
                "speedup_vs_twin_eager": paired_ratio(base, t),
                "images_per_s": x.shape[0] / t.median,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    return md_table(
        ["setting", "variant", "median", "images/s", "noise (IQR/median)", "speed-up vs twin eager"],
        [
            [r["setting"], r["variant"], fmt_time(r["median_s"]), f"{r['images_per_s']:,.0f}", f"{r['noise_iqr_rel']:.2f}",
             f"**{r['speedup_vs_twin_eager']:.2f}x**" if r["variant"] == "zoo fused" else f"{r['speedup_vs_twin_eager']:.2f}x"]
            for r in rows
        ],  # fmt: skip
        right=[False, False, True, True, True, True],
    )


def allocation_cost(sizes_mb=(8, 25, 100)) -> str:
    """Why large batches are slow here: filling a freshly allocated tensor vs a reused one.
    glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh pages that the
    kernel faults in one by one on first touch -- costly in this VM."""
    rows = []
    for mb in sizes_mb:
        n = mb * 2**20 // 4
        keep = torch.empty(n)
        t = bench({"fresh": lambda: torch.empty(n).fill_(1.0), "reused": lambda: keep.fill_(1.0)}, repeats=15)
        rows.append([f"{mb} MiB", fmt_time(t["fresh"].median), fmt_time(t["reused"].median), f"{paired_ratio(t['fresh'], t['reused']):.1f}x"])
    return md_table(["tensor", "torch.empty(n).fill_(1)", "reused.fill_(1)", "fresh / reused"], rows)


def main(argv=None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), "outputs/bench_inference")
    parser.add_argument("--no-twins", action="store_true", help="only part 1 (mobilenet_v2)")
    parser.add_argument("--jit", action="store_true", help="also time the fused model traced + frozen by TorchScript")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per comparison, at most")
    parser.add_argument("--cifar-batch", type=int, default=256)
    parser.add_argument(
        "--micro-batch", type=int, default=32,
        help="also time the twin and the fused model fed in slices of this many images (0: off)",
    )
    args = parser.parse_args(argv)
    setup(args)
    print(f"Machine: {machine_info()}\n")

    rows = []
    # Part 1: mobilenet_v2, both settings
    ref, zoo = pair("mobilenet_v2", "torchvision", "imagenet", 1000)
    rows += compare("mobilenet_v2, batch 1, 224x224 (imagenet)", ref, zoo, torch.randn(1, 3, 224, 224), args)
    ref, zoo = pair("mobilenet_v2", "torchvision", "cifar", 10, ref=torchvision_mobilenet_v2_cifar(10))
    b = 32 if args.quick else args.cifar_batch
    rows += compare(f"mobilenet_v2, batch {b}, 32x32 (cifar)", ref, zoo, torch.randn(b, 3, 32, 32), args)
    print("### mobilenet_v2 against torchvision (target: fused >= 1.5x)\n")
    print(table(rows))

    if not args.no_twins:
        twin_rows = []
        names = [n for n in models.list_models() if models.REFERENCES.get(n)]
        if args.quick:
            names = names[:2]
        for name in names:
            for source in models.REFERENCES[name]:
                ref, zoo = pair(name, source, "imagenet", 1000)
                size = zoo.pretrained_cfg["input_size"][-1]  # the paper's input (Xception: 299)
                label = f"{name} vs {source} {models.REFERENCES[name][source]}, batch 1, {size}x{size}"
                twin_rows += compare(label, ref, zoo, torch.randn(1, 3, size, size), args)
        print("\n### Every model with a twin, batch 1\n")
        print(table(twin_rows))
        summary = [
            [r["setting"].split(",")[0], f"{r['speedup_vs_twin_eager']:.2f}x"]
            for r in twin_rows
            if r["variant"] == "zoo fused"
        ]
        print("\n#### Summary: fused zoo speed-up over the twin in eager mode (batch 1)\n")
        print(md_table(["model vs twin", "fused speed-up"], summary))
        rows += twin_rows
    print("\n### Allocation cost on this machine (why batch 256 at 32x32 is memory-bound)\n")
    print(allocation_cost())
    write_csv(args.out / "inference.csv", rows)
    print(f"\nwrote {args.out / 'inference.csv'}")


if __name__ == "__main__":
    main()
