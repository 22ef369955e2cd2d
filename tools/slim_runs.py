"""Shrink finished runs to what exporting them needs, so they travel back from a GPU machine.

    python -m tools.slim_runs runs/gpu

For every `<folder>/<run>/checkpoints/last.ckpt`: keeps the final weights' EMA (or the weights, for a
run without EMA), the run config (`hyper_parameters`), epoch and step; drops the raw weights, the
optimizer state and `best.ckpt` (never shipped). mobilenet_v2's 27 MB checkpoint becomes 9 MB;
`--half` stores the weight matrices (tensors of 2+ dimensions) as fp16, about 4.5 MB, and keeps
vectors (norm scales, biases, running statistics) in float32: a shipped file is fp16 when that moves
accuracy by less than 0.1 point (tools/export_weights.py measures it again here), and a variance
below fp16's normal range would lose its digits.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from training.checkpoints import read_checkpoint


def slim(ckpt: dict, half: bool = False) -> dict:
    keep = {k: ckpt[k] for k in ("hyper_parameters", "epoch", "global_step", "ema_decay") if k in ckpt}
    key = "ema_state_dict" if "ema_state_dict" in ckpt else "state_dict"
    keep[key] = {name: t.half() if half and t.is_floating_point() and t.dim() > 1 else t for name, t in ckpt[key].items()}
    return keep


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder of run folders (e.g. runs/gpu)")
    parser.add_argument("--half", action="store_true", help="weight matrices as fp16 (vectors stay float32)")
    args = parser.parse_args(argv)
    for last in sorted(args.folder.glob("*/checkpoints/last.ckpt")):
        before = last.stat().st_size
        # a temp file beside it, then os.replace: a kill or a full disk mid-write leaves the run's only
        # final weights whole (the old last.ckpt), never truncated
        tmp = last.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save(slim(read_checkpoint(last), args.half), tmp)
            os.replace(tmp, last)
        finally:
            tmp.unlink(missing_ok=True)
        (last.parent / "best.ckpt").unlink(missing_ok=True)
        print(f"{last}: {before / 1e6:.1f} MB -> {last.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
