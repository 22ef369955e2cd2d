"""Check that every shipped entry's card states the validation accuracy `eval.py` measures.

    python -m tools.verify_pretrained --data-root ../shared/data/cifar10

    python -m tools.verify_pretrained --data-root ../shared/data/cifar10 --int8 [entry ...]

Runs each card's documented `eval.py ... pretrained=true` command as a subprocess and prints a
table of stated vs measured top-1; exits 1 if any differs by more than 0.01 points. --int8 runs the
same command with `eval.int8=true` (the card's calibration method, chosen by eval.py itself) for
the cards that state an int8 accuracy (`python -m benchmarks.int8 --update-cards`).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import models
from benchmarks.common import md_table

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--int8", action="store_true", help="check the cards' int8 accuracy instead (eval.int8=true)")
    parser.add_argument("entries", nargs="*", help="default: all shipped entries")
    args = parser.parse_args()
    rows, failed = [], False
    for entry in args.entries or models.list_pretrained():
        meta = models.pretrained_meta(entry)
        if args.int8 and "int8" not in meta:
            rows.append((entry, None, None, "no int8 accuracy on the card"))
            continue
        stated = meta["int8"]["val_acc"] if args.int8 else meta["val_acc"]
        command = shlex.split(meta["eval_command"]) + (["eval.int8=true"] if args.int8 else [])
        command = [a if not a.startswith("data.root=") else f"data.root={args.data_root}" for a in command]
        out = subprocess.run(
            [sys.executable, *command[1:], "cpu_threads=1", "trainer.enable_progress_bar=false", "hydra.run.dir=runs/eval/verify"],
            cwd=REPO, capture_output=True, text=True,
        )
        found = re.search(r"\| top-1\s*\|\s*([\d.]+)%", out.stdout)
        measured = float(found.group(1)) if found else None
        ok = measured is not None and abs(measured - stated) <= 0.01
        failed |= not ok
        status = "ok" if ok else (f"differs by {measured - stated:+.2f}" if measured is not None else out.stderr[-300:])
        rows.append((entry, stated, measured, status))
    print(md_table(["entry", f"card {'int8 ' if args.int8 else ''}val acc", "eval.py val acc", ""],
                   [[f"`{entry}`", "-" if stated is None else f"{stated:.2f}%", "-" if measured is None else f"{measured:.2f}%", status]
                    for entry, stated, measured, status in rows], right=[False, True, True, False]))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
