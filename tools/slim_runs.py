"""Shrink finished runs to what exporting them needs, so they travel back from a GPU machine.

    python -m tools.slim_runs runs/gpu

For every `<folder>/<run>/checkpoints/last.ckpt`: keeps the final weights' EMA (or the weights, for a
run without EMA), the run config (`hyper_parameters`), epoch and step; drops the raw weights, the
optimizer state and `best.ckpt` (never shipped). mobilenet_v2's 27 MB checkpoint becomes 9 MB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from training.checkpoints import load_checkpoint


def slim(ckpt: dict) -> dict:
    keep = {k: ckpt[k] for k in ("hyper_parameters", "epoch", "global_step", "ema_decay") if k in ckpt}
    if "ema_state_dict" in ckpt:
        keep["ema_state_dict"] = ckpt["ema_state_dict"]
    else:
        keep["state_dict"] = ckpt["state_dict"]
    return keep


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder of run folders (e.g. runs/gpu)")
    args = parser.parse_args(argv)
    for last in sorted(args.folder.glob("*/checkpoints/last.ckpt")):
        before = last.stat().st_size
        torch.save(slim(load_checkpoint(last)), last)
        (last.parent / "best.ckpt").unlink(missing_ok=True)
        print(f"{last}: {before / 1e6:.1f} MB -> {last.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
