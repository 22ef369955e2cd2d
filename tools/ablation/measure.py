"""Measuring the runs: each architecture's model rebuilt from its run config (`build_model`), its
trained weights loaded strictly (so the timed model is the trained one), CPU latency timed with
`benchmarks.common.bench` (all models interleaved, rotating order, medians and IQR), and one
results row per run."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Sequence

import torch

from benchmarks.common import Timing, bench, cpu_name
from models._loader import CheckpointLoadError, load_checkpoint
from training.models import build_model

from .runs import Group, Run, recipe

BATCHES = (1, 64)


def load_group_model(group: Group) -> torch.nn.Module:
    """The group's model with its first run's weights; a fresh init when the run kept no checkpoint
    (the latency of an architecture does not depend on its weights)."""
    model = build_model(group.model_cfg)
    path = group.runs[0].checkpoint()
    if path is not None:
        try:
            # the raw weights, not the average: the timing is the same and every run has them
            load_checkpoint(model, path, use_ema=False, strict=True)
        except CheckpointLoadError as err:
            raise SystemExit(f"error: {path} does not fit the model built from its run config "
                             f"({group.model_cfg}):\n{str(err).splitlines()[0]} ...") from err
    return model.eval().float()


def measure_latency(
    named_models: Sequence[tuple[str, torch.nn.Module]],
    batches: Sequence[int] = BATCHES,
    repeats: int = 20,
    warmup: int = 3,
    min_sample_s: float = 0.02,
    image_size: int = 32,
) -> dict[str, dict[int, Timing]]:
    """Seconds per forward pass of each model at each batch size (`bench`: interleaved rounds, the
    first model rotating, so a burst of load from other processes hits all of them)."""
    out: dict[str, dict[int, Timing]] = {name: {} for name, _ in named_models}
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, 3, image_size, image_size)
            fns = {name: (lambda m=model: m(x)) for name, model in named_models}
            for name, timing in bench(fns, repeats=repeats, warmup=warmup, min_sample_s=min_sample_s).items():
                out[name][batch] = timing
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or seconds != seconds else round(1e3 * seconds, 4)


def run_row(run: Run, latency: dict[int, Timing] | None = None, threads: int | None = None) -> dict[str, Any]:
    """A run's results row: cost and accuracy from its summary.json, latency as measured here."""
    cfg, s = run.model_cfg, run.summary
    row: dict[str, Any] = {
        "model": cfg.get("name"), "width": cfg.get("width", 1.0), "stem": cfg.get("stem"), "conv_mode": run.conv_mode,
        "pointwise_kernel_size": run.k if run.conv_mode == "pointwise_kxk" else None,
        "model_kwargs": model_kwargs(cfg),
        "epochs": s.get("epochs"), "seed": run.seed, "params": s.get("params"), "macs": s.get("macs"),
        # the final weights (their EMA), as shipped: the best epoch would be chosen on this very split
        "val_acc": s.get("final_val_acc", s.get("best_val_acc")), "test_acc": s.get("test_acc"),
        "train_img_s": round(float(s["images_per_second"]), 1) if s.get("images_per_second") else None,
        "recipe": recipe(run), "note": "", "run_dir": str(run.folder),
    }
    if latency:
        row.update(latency_columns(latency, threads))
    return row


def latency_columns(latency: dict[int, Timing], threads: int | None) -> dict[str, Any]:
    """A row's latency cells, with the machine (and day) that timed them: the report compares
    latencies only between rows that share it."""
    return {
        "latency_b1_ms": _ms(latency[1].median), "latency_b1_iqr_ms": _ms(latency[1].iqr),
        "latency_b64_ms": _ms(latency[64].median), "latency_b64_iqr_ms": _ms(latency[64].iqr),
        "latency_cpu": f"{cpu_name()}, torch {torch.__version__}, {_dt.date.today()}", "latency_threads": threads,
    }


def measure(groups: Sequence[Group], repeats: int = 20, latency: bool = True) -> list[dict[str, Any]]:
    """One results row per run of `groups`; all groups' models timed in the same interleaved rounds."""
    times: dict[str, dict[int, Timing]] = {}
    if latency:
        named = [(g.label, load_group_model(g)) for g in groups]
        times = measure_latency(named, repeats=repeats)
    threads = torch.get_num_threads()
    return [run_row(run, times.get(g.label), threads) for g in groups for run in g.runs]


def architecture(row: dict[str, Any]) -> dict[str, Any]:
    """A results row's model config (10 classes: the ablation's CIFAR-10), as `build_model` takes it."""
    cfg: dict[str, Any] = {"name": row["model"], "width": row["width"], "stem": row["stem"] or "cifar",
                           "conv_mode": row["conv_mode"], "num_classes": 10, "kwargs": {}}
    if row.get("model_kwargs"):
        cfg["kwargs"].update(json.loads(row["model_kwargs"]))
    if row["conv_mode"] == "pointwise_kxk" and row.get("pointwise_kernel_size"):
        cfg["kwargs"]["pointwise_kernel_size"] = row["pointwise_kernel_size"]
    return cfg


def model_kwargs(model_cfg: dict[str, Any]) -> str | None:
    """A run's `model.kwargs` other than pointwise_kernel_size (its own column), as sorted JSON;
    None when it set none."""
    other = {k: v for k, v in (model_cfg.get("kwargs") or {}).items() if k != "pointwise_kernel_size"}
    return json.dumps(other, sort_keys=True) if other else None


def retime(rows: list[dict[str, Any]], repeats: int = 20) -> list[dict[str, Any]]:
    """Every row's latency timed again here, all architectures in the same interleaved rounds, with a
    fresh init (a run's latency does not depend on its weights, and runs trained elsewhere left none
    here): rows from several machines become comparable. The other columns stay as they are."""
    archs = {architecture_key(row): architecture(row) for row in rows}
    times = measure_latency([(key, build_model(cfg).eval().float()) for key, cfg in archs.items()], repeats=repeats)
    threads = torch.get_num_threads()
    return [dict(row, **latency_columns(times[architecture_key(row)], threads)) for row in rows]


def architecture_key(row: dict[str, Any]) -> str:
    """The rows of one architecture (its seeds) share this key, and one timed model."""
    return repr(sorted((k, str(v)) for k, v in architecture(row).items()))
