"""The ablation's results file: one CSV row per run (seeds are separate rows; the report averages
them). `append` replaces the rows of runs already in the file, so re-measuring a run updates it.
`model_kwargs` holds the run's other `model.kwargs` as JSON (empty when it set none), so a variant of
an architecture is its own row, timed as it was built."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

FIELDS = [
    "model", "width", "stem", "conv_mode", "pointwise_kernel_size", "model_kwargs", "epochs", "seed",
    "params", "macs", "val_acc", "test_acc",
    "latency_b1_ms", "latency_b1_iqr_ms", "latency_b64_ms", "latency_b64_iqr_ms", "latency_cpu", "latency_threads",
    "train_img_s", "recipe", "note", "run_dir",
]
NUMERIC = {"width": float, "epochs": int, "seed": int, "params": int, "macs": int, "val_acc": float, "test_acc": float,
           "latency_b1_ms": float, "latency_b1_iqr_ms": float, "latency_b64_ms": float, "latency_b64_iqr_ms": float,
           "latency_threads": int, "train_img_s": float, "pointwise_kernel_size": int}


def _parse(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, text in row.items():
        kind = NUMERIC.get(key)
        if kind is None or text in ("", None):
            out[key] = None if kind else (text or "")
        else:
            out[key] = kind(float(text)) if kind is int else kind(text)
    return out


def read(path: Path) -> list[dict[str, Any]]:
    """Rows with numbers as numbers and empty cells as None."""
    with open(path, newline="") as f:
        return [_parse(row) for row in csv.DictReader(f)]


def write(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in FIELDS})


def append(path: Path, new_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge `new_rows` into the file (created if missing): a row whose run_dir is already there
    replaces it in place, the others go to the end. Returns what was written."""
    rows = read(path) if path.is_file() else []
    fresh = {r["run_dir"]: r for r in new_rows}
    merged = [fresh.pop(r["run_dir"], r) for r in rows]
    merged += [r for r in new_rows if r["run_dir"] in fresh]
    write(path, merged)
    return merged
