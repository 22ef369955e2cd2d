"""The conv_mode ablation report: one family, its three modes, trained under one recipe.

    # 1. train every mode of a family (see docs/ablation.md for the full command)
    python train.py -m model=mobilenet_v1 model.conv_mode=separable,full,pointwise_kxk seed=0 ...
    # 2. the report: reads each run folder, measures CPU latency, writes table, CSV and plots
    python -m tools.ablation_report runs/ablation/mobilenet_v1/<date> --out docs/ablation/mobilenet_v1
    # params / mult-adds of every family in all three modes (no training needed)
    python -m tools.ablation_report --cost-only

A run folder is any folder under the given one(s) holding the pipeline's `summary.json`
(params, mult-adds, best val acc, train img/s) next to its resolved `config.yaml`. Runs of the
same architecture (same model config) are one row: several seeds give the mean val acc and its
spread. Latency is measured here, on this machine, on each row's model itself (built from the
run's config, the best checkpoint's weights loaded strictly, so the architecture is the trained
one): eval mode, fp32, 3x32x32 inputs, batch 1 and batch 64, `torch.inference_mode`. The models
are timed interleaved -- every repeat runs each model once, in a rotating order -- so load from
other processes falls on all of them alike; the table gives medians over the repeats.

Writes into --out: report.md (the table and how it was measured), ablation.csv (every number),
acc_vs_macs.png and acc_vs_latency.png. The table is printed too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

import models
from benchmarks.common import cpu_name
from training.checkpoints import load_checkpoint, model_state_dict
from training.models import build_model

MODES = models.ConvMode.MODES
# Keys of a run config that may differ between the rows of one ablation (the thing ablated,
# where the run lives, and the seed); anything else differing means the recipes differ.
ABLATED = ("model.conv_mode", "model.kwargs.pointwise_kernel_size", "seed", "run_dir", "ckpt_path")

# --cost-only: the families of docs/ablation.md and the models measured for each.
FAMILIES = {
    "MobileNetV1": ["mobilenet_v1"],
    "MobileNetV2": ["mobilenet_v2"],
    "MobileNetV3": ["mobilenet_v3_large", "mobilenet_v3_small"],
    "Xception": ["xception_small", "xception"],
    "ResNet basic": ["resnet20", "resnet56"],
    "ResNet bottleneck": ["resnet38_bottleneck", "resnet50"],
    "SE": ["se_resnet20", "se_resnet50"],
}
# MobileNets paper (Howard et al. 2017), Table 4: ImageNet, 224x224, 1000 classes.
PAPER_TABLE4 = {"separable": (4.2e6, 569e6), "full": (29.3e6, 4866e6)}


# ------------------------------------------------------------------------------------------------
# Reading the runs
# ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    folder: Path
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def model_cfg(self) -> dict[str, Any]:
        return dict(self.config.get("model") or self.summary.get("model_config") or {})


@dataclass
class Row:
    """One architecture of the ablation: its runs (seeds) and what was measured."""

    label: str
    model_cfg: dict[str, Any]
    runs: list[Run]
    latency: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds per forward
    weights: str = ""  # where the timed weights came from

    @property
    def conv_mode(self) -> str:
        return str(self.model_cfg.get("conv_mode", "separable"))

    @property
    def k(self) -> int:
        return int((self.model_cfg.get("kwargs") or {}).get("pointwise_kernel_size", 3))

    def _values(self, key: str) -> list[float]:
        return [float(r.summary[key]) for r in self.runs if r.summary.get(key) is not None]

    @property
    def params(self) -> int:
        return int(self.runs[0].summary["params"])

    @property
    def macs(self) -> int:
        return int(self.runs[0].summary["macs"])

    @property
    def val_accs(self) -> list[float]:
        return self._values("best_val_acc")

    @property
    def val_acc(self) -> float | None:
        accs = self.val_accs
        return statistics.fmean(accs) if accs else None

    @property
    def val_acc_std(self) -> float | None:
        accs = self.val_accs
        return statistics.stdev(accs) if len(accs) > 1 else None

    @property
    def test_acc(self) -> float | None:
        accs = self._values("test_acc")
        return statistics.fmean(accs) if accs else None

    @property
    def train_img_s(self) -> float | None:
        ips = [v for v in self._values("images_per_second") if v > 0]
        return statistics.median(ips) if ips else None

    @property
    def epochs(self) -> int | None:
        eps = self._values("epochs")
        return int(max(eps)) if eps else None

    def latency_ms(self, batch: int) -> float | None:
        samples = self.latency.get(batch)
        return 1e3 * statistics.median(samples) if samples else None

    def latency_iqr_ms(self, batch: int) -> float | None:
        samples = self.latency.get(batch)
        if not samples or len(samples) < 4:
            return None
        q = statistics.quantiles(samples, n=4)
        return 1e3 * (q[2] - q[0])


def _load_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def find_runs(folders: Sequence[Path]) -> list[Run]:
    """Every finished run (a folder with summary.json) under `folders`, sorted by path."""
    runs, unfinished = [], []
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} is not a folder")
        for summary_path in sorted({*folder.rglob("summary.json")}):
            run_dir = summary_path.parent
            summary = json.loads(summary_path.read_text())
            config_path = run_dir / "config.yaml"
            config = _load_yaml(config_path) if config_path.is_file() else {"model": summary.get("model_config") or {}}
            if not config.get("model"):
                print(f"warning: {run_dir} has no model config (config.yaml or summary.json model_config); skipped",
                      file=sys.stderr)
                continue
            runs.append(Run(run_dir, summary, config))
        # a sweep job folder that never got its summary (crashed, or still running)
        for config_path in folder.rglob("config.yaml"):
            if config_path.parent.name != ".hydra" and not (config_path.parent / "summary.json").is_file():
                unfinished.append(config_path.parent)
    for run_dir in sorted(set(unfinished)):
        print(f"warning: {run_dir} has no summary.json (unfinished or failed run); left out", file=sys.stderr)
    if not runs:
        raise SystemExit(f"error: no finished runs (folders with summary.json) under {', '.join(map(str, folders))}")
    return runs


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_differences(runs: Sequence[Run]) -> dict[str, list]:
    """Config keys (other than the ablated ones) whose values differ between runs. A run's own folder
    inside a value (e.g. `callbacks.best_checkpoint.dirpath: <run>/checkpoints`) is not a difference."""

    def in_run(value: Any, run_dir: str) -> Any:
        return value.replace(run_dir, "<run_dir>") if isinstance(value, str) and run_dir else value

    flats = [{k: in_run(v, str(r.config.get("run_dir") or "")) for k, v in _flatten(r.config).items()} for r in runs]
    keys = sorted(set().union(*flats))
    diffs = {}
    for key in keys:
        if any(key == a or key.startswith(a + ".") for a in ABLATED):
            continue
        values = [repr(f.get(key, "<unset>")) for f in flats]
        if len(set(values)) > 1:
            diffs[key] = sorted(set(values))
    return diffs


def _arch_key(model_cfg: dict) -> str:
    cfg = dict(model_cfg)
    kwargs = dict(cfg.pop("kwargs", None) or {})
    if cfg.get("conv_mode", "separable") != "pointwise_kxk":
        kwargs.pop("pointwise_kernel_size", None)  # only read by pointwise_kxk
    return json.dumps({**cfg, "kwargs": kwargs}, sort_keys=True, default=str)


def group_rows(runs: Sequence[Run]) -> list[Row]:
    """One row per architecture, in mode order (separable, full, pointwise_kxk), then by name."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_arch_key(run.model_cfg), []).append(run)
    rows = [Row("", members[0].model_cfg, members) for members in groups.values()]
    names = {(r.model_cfg.get("name"), r.model_cfg.get("width"), r.model_cfg.get("stem")) for r in rows}
    for row in rows:
        cfg = row.model_cfg
        label = row.conv_mode + (f" (k={row.k})" if row.conv_mode == "pointwise_kxk" and row.k != 3 else "")
        if len(names) > 1:  # several architectures in one report: say which
            label = f"{cfg.get('name')} w{cfg.get('width')} {cfg.get('stem')} {label}"
        row.label = label
    seen: dict[str, int] = {}
    for row in rows:  # rows that differ only in other options (e.g. dropout) still need their own label
        seen[row.label] = seen.get(row.label, 0) + 1
        if seen[row.label] > 1:
            row.label = f"{row.label} #{seen[row.label]}"
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (str(r.model_cfg.get("name")), float(r.model_cfg.get("width", 1.0)),
                             str(r.model_cfg.get("stem")), order.get(r.conv_mode, 99), r.k))
    return rows


# ------------------------------------------------------------------------------------------------
# Building each row's model and timing it
# ------------------------------------------------------------------------------------------------


def _checkpoint_path(run: Run) -> Path | None:
    for candidate in (run.folder / "checkpoints" / "best.ckpt", run.summary.get("best_ckpt"),
                      run.folder / "checkpoints" / "last.ckpt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def load_row_model(row: Row) -> torch.nn.Module:
    """The row's model with its first run's best weights (strict: the architecture must match)."""
    model = build_model(row.model_cfg)
    ckpt_path = _checkpoint_path(row.runs[0])
    if ckpt_path is None:
        row.weights = "fresh init (no checkpoint found)"
    else:
        state = model_state_dict(load_checkpoint(ckpt_path), ema=False)  # the raw weights; the timing is the same
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise SystemExit(f"error: {ckpt_path} does not fit the model built from its run config "
                             f"({row.model_cfg}):\n{str(err).splitlines()[0]} ...") from err
        row.weights = str(ckpt_path)
    return model.eval().float()


def measure_latency(
    named_models: Sequence[tuple[str, torch.nn.Module]],
    batches: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 3,
    min_sample_s: float = 0.02,
    image_size: int = 32,
) -> dict[str, dict[int, list[float]]]:
    """Seconds per forward pass of each model at each batch size, `repeats` samples each.

    Models are interleaved: each repeat runs every model once, the starting model rotating from
    one repeat to the next, so a burst of load from other processes hits all of them. A sample
    of a fast forward (batch 1) averages enough back-to-back calls to last `min_sample_s`.
    """
    out: dict[str, dict[int, list[float]]] = {name: {} for name, _ in named_models}
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, 3, image_size, image_size)
            inner = {}
            for name, model in named_models:  # warm-up, and how many calls make one sample
                for _ in range(warmup):
                    model(x)
                t0 = time.perf_counter()
                model(x)
                once = time.perf_counter() - t0
                inner[name] = max(1, min(100, math.ceil(min_sample_s / max(once, 1e-6))))
                out[name][batch] = []
            n = len(named_models)
            for r in range(repeats):
                for i in range(n):
                    name, model = named_models[(i + r) % n]
                    t0 = time.perf_counter()
                    for _ in range(inner[name]):
                        model(x)
                    out[name][batch].append((time.perf_counter() - t0) / inner[name])
    return out


# ------------------------------------------------------------------------------------------------
# Writing the report
# ------------------------------------------------------------------------------------------------


def _m(n: float) -> str:
    return f"{n / 1e6:,.2f} M"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:,.2f}" if x < 100 else f"{x:,.0f}")


def _acc(row: Row) -> str:
    if row.val_acc is None:
        return "n/a"
    text = f"{100 * row.val_acc:.2f}%"
    if row.val_acc_std is not None:
        text += f" ± {100 * row.val_acc_std:.2f} (n={len(row.val_accs)})"
    return text


HEADER = ["mode", "params", "mult-adds", "latency b1 (ms)", "latency b64 (ms)", "train img/s", "val acc"]


def table_rows(rows: Sequence[Row]) -> list[list[str]]:
    return [
        [row.label, _m(row.params), _m(row.macs), _ms(row.latency_ms(1)), _ms(row.latency_ms(64)),
         "n/a" if row.train_img_s is None else f"{row.train_img_s:,.0f}", _acc(row)]
        for row in rows
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def text_table(rows: Sequence[Row]) -> str:
    body = [HEADER, *table_rows(rows)]
    widths = [max(len(r[i]) for r in body) for i in range(len(HEADER))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(HEADER), "  ".join("-" * w for w in widths), *(fmt(r) for r in body[1:])])


CSV_FIELDS = [
    "label", "model", "width", "stem", "conv_mode", "pointwise_kernel_size", "params", "macs",
    "latency_b1_ms", "latency_b1_iqr_ms", "latency_b64_ms", "latency_b64_iqr_ms", "train_img_per_s",
    "val_acc", "val_acc_std", "n_runs", "seeds", "epochs", "test_acc", "run_dirs",
]


def csv_record(row: Row) -> dict[str, Any]:
    cfg = row.model_cfg
    fmt = lambda x, nd=4: "" if x is None else round(x, nd)  # noqa: E731
    return {
        "label": row.label, "model": cfg.get("name"), "width": cfg.get("width"), "stem": cfg.get("stem"),
        "conv_mode": row.conv_mode, "pointwise_kernel_size": row.k if row.conv_mode == "pointwise_kxk" else "",
        "params": row.params, "macs": row.macs,
        "latency_b1_ms": fmt(row.latency_ms(1)), "latency_b1_iqr_ms": fmt(row.latency_iqr_ms(1)),
        "latency_b64_ms": fmt(row.latency_ms(64)), "latency_b64_iqr_ms": fmt(row.latency_iqr_ms(64)),
        "train_img_per_s": fmt(row.train_img_s, 1), "val_acc": fmt(row.val_acc, 5), "val_acc_std": fmt(row.val_acc_std, 5),
        "n_runs": len(row.runs), "seeds": " ".join(str(r.config.get("seed", "")) for r in row.runs),
        "epochs": "" if row.epochs is None else row.epochs, "test_acc": fmt(row.test_acc, 5),
        "run_dirs": " ".join(str(r.folder) for r in row.runs),
    }


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(csv_record(row))


def _scatter(ax, rows: Sequence[Row], x_of, xlabel: str, title: str) -> None:
    from matplotlib.ticker import FuncFormatter

    colours = {"separable": "tab:blue", "full": "tab:red", "pointwise_kxk": "tab:green"}
    for i, row in enumerate(rows):
        x = x_of(row)
        if x is None or row.val_acc is None:
            continue
        y = 100 * row.val_acc
        yerr = None if row.val_acc_std is None else 100 * row.val_acc_std
        ax.errorbar([x], [y], yerr=yerr, fmt="o", ms=8, capsize=3, color=colours.get(row.conv_mode, "tab:gray"))
        # labels alternate above / below the point: "full" and "pointwise_kxk" often sit close together
        ax.annotate(row.label, (x, y), textcoords="offset points", xytext=(6, 7 if i % 2 == 0 else -13), fontsize=8)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("best val accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.25, y=0.2)


def write_plots(rows: Sequence[Row], out: Path, title: str, threads: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = [out / "acc_vs_macs.png", out / "acc_vs_latency.png"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    _scatter(ax, rows, lambda r: r.macs / 1e6, "mult-adds per 32x32 image (M, log scale)", f"{title}: accuracy vs mult-adds")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, batch in zip(axes, (1, 64)):
        _scatter(ax, rows, lambda r, b=batch: r.latency_ms(b), f"CPU latency, batch {batch} (ms, log scale)",
                 f"{title}: accuracy vs latency, batch {batch} ({threads} thread{'s' * (threads != 1)})")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def recipe_line(runs: Sequence[Run]) -> str:
    c = runs[0].config
    trainer, data, optim, model = c.get("trainer", {}), c.get("data", {}), c.get("optim", {}), c.get("model", {})
    parts = [
        f"data {data.get('name')} ({data.get('root')}, val {data.get('val_size')})",
        f"width {model.get('width')}, stem {model.get('stem')}",
        f"{trainer.get('max_epochs')} epochs" + (f" x {trainer.get('limit_train_batches')} batches"
                                                 if trainer.get("limit_train_batches") not in (None, 1.0) else ""),
        f"batch {data.get('batch_size')}", f"{optim.get('name')} lr {optim.get('lr')}",
        f"precision {trainer.get('precision')}", f"cpu_threads {c.get('cpu_threads')}",
        f"seeds {sorted({r.config.get('seed') for r in runs})}",
    ]
    return ", ".join(str(p) for p in parts)


def write_report(rows: Sequence[Row], runs: Sequence[Run], sources: Sequence[Path], out: Path, info: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({str(r.model_cfg.get("name")) for r in rows})
    title = ", ".join(names)
    table = markdown_table(rows)
    write_csv(rows, out / "ablation.csv")
    plots = write_plots(rows, out, title, info["threads"]) if info["plots"] else []
    diffs = recipe_differences(runs)
    lines = [
        f"# conv_mode ablation: {title}",
        "",
        table,
        "",
        "- **params, mult-adds**: from each run's summary.json (`models.profile`, one 3x32x32 image; "
        "mult-adds = FLOPs / 2 of convolutions and linear layers).",
        f"- **val acc**: best validation accuracy of the run (mean ± std over seeds when there are several). "
        f"Recipe: {recipe_line(runs)}.",
        "- **train img/s**: training throughput the pipeline measured during the run (median over seeds); "
        "runs on a shared machine, so compare it loosely.",
        f"- **latency**: measured by this report on {info['cpu']} ({os.cpu_count()} logical CPUs), torch "
        f"{torch.__version__}, `torch.set_num_threads({info['threads']})`, fp32, eval mode, `torch.inference_mode`, "
        f"random 3x32x32 inputs; median of {info['repeats']} interleaved repeats per model (each repeat times every "
        "model once in rotating order) in ms per forward pass of the whole batch. Spread (IQR) is in the CSV.",
        f"- runs: {', '.join(str(s) for s in sources)} ({len(runs)} finished); timed weights: each row's first run's "
        "best checkpoint, loaded strictly.",
    ]
    if diffs:
        lines.append("- **warning: the runs differ in more than the ablated keys**: "
                     + "; ".join(f"`{k}` {' / '.join(v)}" for k, v in diffs.items()))
    if plots:
        lines += ["", *(f"![{p.stem}]({p.name})" for p in plots)]
    lines += ["", f"Regenerate: `python -m tools.ablation_report {' '.join(str(s) for s in sources)} --out {info['out_arg']}`", ""]
    (out / "report.md").write_text("\n".join(lines))
    return table


# ------------------------------------------------------------------------------------------------
# --cost-only: params and mult-adds of every family in every mode
# ------------------------------------------------------------------------------------------------


def cost(name: str, mode: str, stem: str = "cifar", num_classes: int = 10, size: int = 32, width: float = 1.0,
         k: int = 3) -> dict[str, int]:
    model = models.create_model(name, num_classes=num_classes, stem=stem, width=width, conv_mode=mode,
                                pointwise_kernel_size=k)
    return models.profile(model, (1, 3, size, size))


def changed_layers(model: torch.nn.Module, mode: str, k: int = 3) -> str:
    """What `mode` changes in `model` (built separable), counted from its modules."""
    from collections import Counter

    from models.layers import DepthwiseSeparableConv, InvertedResidual

    if mode == "separable":
        return "(as published)"
    if mode == "full":
        pairs: Counter = Counter()
        for m in model.modules():
            if isinstance(m, (DepthwiseSeparableConv, InvertedResidual)):
                kk = m.conv_dw.conv.kernel_size[0]
                what = "dw+pw" if isinstance(m, DepthwiseSeparableConv) else "dw+pwl"
                pairs[f"{what} {kk}x{kk}"] += 1
        return "; ".join(f"{n} {p} pairs -> dense {p.split()[1]}" for p, n in pairs.items()) or "nothing (no separable pairs)"
    roles: Counter = Counter()
    for name, m in model.named_modules():
        if isinstance(m, models.PointwiseConv):
            parts = name.split(".")
            if "se" in parts:
                roles["SE " + parts[-1].replace("conv_", "")] += 1
            elif "shortcut" in parts:
                roles["shortcut"] += 1
            elif parts[0] == "head":
                roles["head"] += 1
            else:
                roles[{"conv_pw": "pw", "conv_pwl": "pwl"}.get(parts[-2], parts[-2])] += 1
    order = ["pw", "pwl", "SE reduce", "SE expand", "shortcut", "head"]
    ranked = sorted(roles.items(), key=lambda rn: order.index(rn[0]) if rn[0] in order else len(order))
    return f"{sum(roles.values())} pointwise -> {k}x{k}: " + ", ".join(f"{n} {r}" for r, n in ranked)


def cost_tables(width: float = 1.0, k: int = 3) -> str:
    lines = [f"CIFAR stem, 10 classes, one 3x32x32 image, width {width}, pointwise_kxk with k={k}. "
             "Counted by `models.profile` (FlopCounterMode; mult-adds = FLOPs / 2). Layer roles: pw = expand/reduce "
             "pointwise, pwl = linear projection, SE reduce/expand, shortcut = projection shortcut, head = head conv(s).",
             ""]
    for family, names in FAMILIES.items():
        lines += [f"#### {family}", "",
                  "| model | mode | params | mult-adds | params vs separable | mult-adds vs separable | what changes |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for name in names:
            base = None
            separable = models.create_model(name, width=width)
            for mode in MODES:
                c = cost(name, mode, width=width, k=k)
                base = base or c
                lines.append(f"| `{name}` | {mode} | {c['params']:,} | {c['macs']:,} | "
                             f"{c['params'] / base['params']:.2f}x | {c['macs'] / base['macs']:.2f}x | "
                             f"{changed_layers(separable, mode, k)} |")
        lines.append("")
    return "\n".join(lines)


def imagenet_check() -> str:
    lines = ["`mobilenet_v1`, stem=imagenet, 1000 classes, one 3x224x224 image, width 1.0, against the MobileNets "
             "paper, Table 4 (\"Conv MobileNet\" = every depthwise-separable block as one full 3x3 conv):", "",
             "| mode | params (ours) | params (paper) | mult-adds (ours) | mult-adds (paper) |",
             "|---|---:|---:|---:|---:|"]
    for mode in MODES:
        c = cost("mobilenet_v1", mode, stem="imagenet", num_classes=1000, size=224)
        paper = PAPER_TABLE4.get(mode)
        pp, pm = (f"{paper[0] / 1e6:.1f} M", f"{paper[1] / 1e6:,.0f} M") if paper else ("--", "--")
        lines.append(f"| {mode} | {c['params'] / 1e6:.2f} M ({c['params']:,}) | {pp} | "
                     f"{c['macs'] / 1e6:,.1f} M | {pm} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="*", type=Path, help="multirun folder(s); every folder below with a summary.json is a run")
    p.add_argument("--out", type=Path, help="report folder, e.g. docs/ablation/mobilenet_v1")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the latency measurement (default 1: on a shared machine more threads "
                        "spin-wait on busy cores)")
    p.add_argument("--repeats", type=int, default=20, help="interleaved timing repeats per model and batch size")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement (columns read n/a)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--cost-only", action="store_true",
                   help="print params / mult-adds of every family in all three modes, and the MobileNetV1 ImageNet check")
    p.add_argument("--width", type=float, default=1.0, help="--cost-only: width multiplier")
    p.add_argument("--k", type=int, default=3, help="--cost-only: pointwise_kernel_size of pointwise_kxk")
    args = p.parse_args(argv)
    if not args.cost_only and (not args.runs or args.out is None):
        p.error("give the multirun folder(s) and --out (or --cost-only)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.cost_only:
        text = f"{cost_tables(args.width, args.k)}\n#### MobileNetV1 at ImageNet scale\n\n{imagenet_check()}"
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        return 0

    runs = find_runs(args.runs)
    rows = group_rows(runs)
    diffs = recipe_differences(runs)
    if diffs:
        print("warning: the runs differ in more than conv_mode / seed: "
              + "; ".join(f"{k}: {' / '.join(v)}" for k, v in diffs.items()), file=sys.stderr)
    if not args.no_latency:
        named = [(row.label, load_row_model(row)) for row in rows]
        print(f"timing {len(named)} models at batch 1 and 64, {args.repeats} interleaved repeats, "
              f"{torch.get_num_threads()} thread(s) ...", file=sys.stderr, flush=True)
        times = measure_latency(named, repeats=args.repeats)
        for row in rows:
            row.latency = times[row.label]
    info = {"threads": torch.get_num_threads(), "repeats": args.repeats, "cpu": cpu_name(),
            "plots": not args.no_plots, "out_arg": str(args.out)}
    write_report(rows, runs, args.runs, args.out, info)
    print(text_table(rows))
    print(f"\nlatency: median ms per forward, fp32, {info['threads']} thread(s), {args.repeats} interleaved repeats")
    written = ["report.md", "ablation.csv"] + ([] if args.no_plots else ["acc_vs_macs.png", "acc_vs_latency.png"])
    print(f"wrote {', '.join(str(args.out / w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
