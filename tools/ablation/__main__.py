"""The conv_mode ablation: measure trained runs into one results CSV, report from the CSV.

    # 1. train every mode of a family (docs/ablation.md has the full commands)
    python train.py -m experiment=ablation model=mobilenet_v1 model.conv_mode=separable,full,pointwise_kxk ...
    # 2. add (or replace) one row per run in the results file; latency is measured here, on this machine
    python -m tools.ablation measure runs/ablation/mobilenet_v1/<date> --append docs/ablation/results.csv
    # latency of every row's architecture again, on this machine in one call (rows timed on several
    # machines, or runs trained elsewhere, become comparable)
    python -m tools.ablation latency docs/ablation/results.csv
    # 3. report.md, acc_vs_macs.png, acc_vs_latency.png from the CSV alone (no runs needed)
    python -m tools.ablation report docs/ablation/results.csv --out docs/ablation
    # the width at which separable mobilenet_v1 costs what full mobilenet_v1 costs (mult-adds)
    python -m tools.ablation match-width mobilenet_v1 --mode full
    # params / mult-adds of every family in all three modes, and the MobileNets Table 4 check
    python -m tools.ablation cost

A run is any folder under the given one(s) holding the pipeline's summary.json next to its resolved
config.yaml. Runs of one architecture (several seeds) share one timed model; each run keeps its own row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.common import md_table

from . import costs, measure, report, results
from .runs import find_runs, group_runs, recipe_differences


def cmd_measure(args: argparse.Namespace) -> int:
    runs = find_runs(args.runs)
    diffs = recipe_differences(runs)
    if diffs:
        print("warning: the runs differ in more than conv_mode / width / seed: "
              + "; ".join(f"{k}: {' / '.join(v)}" for k, v in diffs.items()), file=sys.stderr)
    groups = group_runs(runs)
    if not args.no_latency:
        print(f"timing {len(groups)} models at batch 1 and 64, {args.repeats} interleaved repeats, "
              f"{torch.get_num_threads()} thread(s) ...", file=sys.stderr, flush=True)
    rows = measure.measure(groups, repeats=args.repeats, latency=not args.no_latency)
    for row in rows:
        row["note"] = args.note
    results.append(args.append, rows)
    cols = ["model", "width", "conv_mode", "epochs", "seed", "val_acc", "latency_b1_ms", "latency_b64_ms", "run_dir"]
    print(md_table(cols, [["n/a" if r.get(c) is None else r[c] for c in cols] for r in rows]))
    print(f"wrote {len(rows)} row(s) into {args.append}")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    rows = results.read(args.csv)
    if not rows:
        raise SystemExit(f"error: {args.csv} has no rows")
    archs = len({measure.architecture_key(r) for r in rows})
    print(f"timing {archs} architectures ({len(rows)} rows) at batch 1 and 64, {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} thread(s) ...", file=sys.stderr, flush=True)
    rows = measure.retime(rows, repeats=args.repeats)
    results.write(args.csv, rows)
    cols = ["model", "width", "conv_mode", "epochs", "seed", "latency_b1_ms", "latency_b64_ms"]
    print(md_table(cols, [["n/a" if r.get(c) is None else r[c] for c in cols] for r in rows]))
    print(f"rewrote the latency of {len(rows)} row(s) in {args.csv} ({rows[0]['latency_cpu']})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    rows = results.read(args.csv)
    if not rows:
        raise SystemExit(f"error: {args.csv} has no rows")
    print(report.write_report(rows, args.csv, args.out, plots=not args.no_plots))
    written = ["report.md"] + ([] if args.no_plots else ["acc_vs_macs.png", "acc_vs_latency.png"])
    print(f"wrote {', '.join(str(args.out / w) for w in written)}")
    return 0


def cmd_match_width(args: argparse.Namespace) -> int:
    m = costs.match_width(args.model, mode=args.base, target_mode=args.mode, target_width=args.width,
                          stem=args.stem, size=args.size, num_classes=args.num_classes, tol=args.tol)
    print(f"{m['model']} {m['mode']} at width {m['width']}: {m['macs']:,} mult-adds, {m['params']:,} params "
          f"({m['macs'] / m['target_macs']:.3f}x of {m['target_mode']} at width {m['target_width']}: "
          f"{m['target_macs']:,} mult-adds)")
    print(f"train it with: model={m['model']} model.conv_mode={m['mode']} model.width={m['width']}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    text = f"{costs.cost_tables(args.width, args.k)}\n#### MobileNetV1 at ImageNet scale\n\n{costs.imagenet_check()}"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.ablation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads spin-wait on busy cores)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("measure", parents=[common], help="add/replace one results row per run found; measures latency here")
    m.add_argument("runs", nargs="+", type=Path, help="multirun folder(s); every folder below with a summary.json is a run")
    m.add_argument("--append", type=Path, required=True, help="results CSV (created if missing), e.g. docs/ablation/results.csv")
    m.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds per batch size")
    m.add_argument("--no-latency", action="store_true", help="skip the latency measurement (columns left empty)")
    m.add_argument("--note", default="", help="text for the rows' note column, e.g. 'not converged'")
    m.set_defaults(func=cmd_measure)

    t = sub.add_parser("latency", parents=[common], help="time every row's architecture again here, in one call")
    t.add_argument("csv", type=Path, help="the results CSV, rewritten in place")
    t.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds per batch size")
    t.set_defaults(func=cmd_latency)

    r = sub.add_parser("report", parents=[common], help="report.md and plots from the results CSV only")
    r.add_argument("csv", type=Path)
    r.add_argument("--out", type=Path, required=True, help="report folder, e.g. docs/ablation")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.set_defaults(func=cmd_report)

    w = sub.add_parser("match-width", parents=[common], help="width at which the separable model's mult-adds equal another mode's")
    w.add_argument("model")
    w.add_argument("--mode", default="full", help="the mode whose mult-adds to match (default full)")
    w.add_argument("--base", default="separable", help="the mode to widen (default separable)")
    w.add_argument("--width", type=float, default=1.0, help="width of the --mode model (default 1.0)")
    w.add_argument("--stem", default="cifar")
    w.add_argument("--size", type=int, default=32, help="input image size")
    w.add_argument("--num-classes", type=int, default=10)
    w.add_argument("--tol", type=float, default=1e-3, help="bisection stops when the width bracket is this narrow")
    w.set_defaults(func=cmd_match_width)

    c = sub.add_parser("cost", parents=[common], help="params / mult-adds of every family in all three modes (no training)")
    c.add_argument("--width", type=float, default=1.0, help="width multiplier")
    c.add_argument("--k", type=int, default=3, help="pointwise_kernel_size of pointwise_kxk")
    c.add_argument("--out", type=Path, help="also write the tables to this file")
    c.set_defaults(func=cmd_cost)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
