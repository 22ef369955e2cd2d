"""The end-of-run table: printed, and saved as summary.md / summary.json in the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _model(s: dict[str, Any]) -> str:
    cfg = s.get("model_config") or {}
    details = ", ".join(f"{k} {cfg[k]}" for k in ("width", "conv_mode", "stem") if k in cfg)
    return f"{s.get('model', '')} ({details})" if details else str(s.get("model", ""))


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    test = _pct(s.get("test_acc")) if s.get("test_acc") is not None else "n/a -- no test split; validation reported"
    sim = " (simulated int8, qat=true)" if s.get("qat") else ""  # fake-quant forward passes (models/qat.py)
    return [
        ("model", _model(s)),
        ("params", f"{_human(s['params'])} ({s['params']:,})"),
        ("mult-adds", f"{_human(s['macs'])} ({s['macs']:,})"),
        ("final val acc", _pct(s.get("final_val_acc")) + (f" (weight EMA, decay {s['ema_decay']})" if s.get("ema_decay") else "") + sim),
        ("best val acc", f"{_pct(s.get('best_val_acc'))} (epoch {s.get('best_epoch', '?')}){sim}"),
        ("test acc", test + sim if s.get("test_acc") is not None else test),
        ("wall time", f"{s['wall_seconds']:.1f} s"),
        ("img/s (train)", f"{s['images_per_second']:.0f}"),
    ]


def format_table(rows: list[tuple[str, str]], headers: tuple[str, str] = ("metric", "value")) -> str:
    width = max(len(k) for k, _ in [headers, *rows])
    vwidth = max(len(v) for _, v in [headers, *rows])
    lines = [f"| {headers[0]:<{width}} | {headers[1]:<{vwidth}} |", f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|"]
    lines += [f"| {k:<{width}} | {v:<{vwidth}} |" for k, v in rows]
    return "\n".join(lines)


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> str:
    """Write summary.json (machine-readable) and summary.md (the table); return the table."""
    run_dir = Path(run_dir)
    table = format_table(summary_rows(summary))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.md").write_text(f"# Run summary\n\n{table}\n")
    return table
