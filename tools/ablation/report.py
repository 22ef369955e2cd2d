"""The ablation report, from the results CSV alone (no runs or models needed): one table per family
with the seeds of each architecture averaged (mean and spread), cross-family plots with one point
per run, and the published reference points, marked as external."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import md_table

from .costs import FAMILIES, family_of
from .runs import MODES

MARKERS = {"separable": "o", "full": "s", "pointwise_kxk": "^"}
HEADER = ["model", "width", "mode", "epochs", "runs", "params", "mult-adds", "latency b1 (ms)", "latency b64 (ms)",
          "train img/s", "val acc", "note"]

# Published results the ablation is read against. Not measured by this project; kept here, with their
# sources, so the report can set them next to ours.
REFERENCES = [
    "**MobileNets, Table 4** (Howard et al. 2017, [arXiv:1704.04861](https://arxiv.org/abs/1704.04861)), "
    "ImageNet at 224x224: MobileNet with depthwise-separable convolutions reaches 70.6% top-1 for 569 M "
    "mult-adds (4.2 M params); the same network with full 3x3 convolutions reaches 71.7% for 4,866 M mult-adds "
    "(29.3 M params). About 1 point of accuracy for 8.6x the mult-adds -- the trade the `full` mode re-runs on CIFAR.",
    "**BSConv** ([zeiss-microscopy/BSConv](https://github.com/zeiss-microscopy/BSConv), Haase & Amthor, CVPR 2020), "
    "CIFAR-10 wide ResNets: replacing the regular convolutions with depthwise-separable ones costs between "
    "0.4 and 2 points of accuracy, the larger losses for the thinner networks (the range as the project's "
    "ablation issue cites it; the repository's result tables have the exact figures).",
]


# The published trade the findings set ours against: MobileNets Table 4 (ImageNet top-1 %, mult-adds).
TABLE4 = {"separable": (70.6, 569e6), "full": (71.7, 4866e6)}
CONVERGED = 30  # epochs: the ablation issue's "converged" (the separable model's accuracy has stopped moving)


def variant(row: dict[str, Any]) -> str:
    """The model as the report names it: with its other model.kwargs, e.g. `mobilenet_v1 (dropout=0.2)`,
    so a variant is its own row and never pooled with the plain model's seeds."""
    if not row.get("model_kwargs"):
        return str(row["model"])
    kwargs = json.loads(row["model_kwargs"])
    return f"{row['model']} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def _key(row: dict[str, Any]) -> tuple:
    return (variant(row), row["width"], row.get("stem"), row["conv_mode"], row.get("pointwise_kernel_size"),
            row.get("epochs"))


def _order(key: tuple) -> tuple:
    mode_rank = {m: i for i, m in enumerate(MODES)}
    model, width, stem, mode, k, epochs = key
    return (str(model), epochs or 0, mode_rank.get(mode, 99), float(width or 1.0), k or 0, str(stem))


def group(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """The runs of each architecture and schedule (their seeds), in model / epochs / mode / width order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_key(row), []).append(row)
    return {k: groups[k] for k in sorted(groups, key=_order)}


def _values(runs: Sequence[dict], key: str) -> list[float]:
    return [float(r[key]) for r in runs if r.get(key) is not None]


def _median(runs: Sequence[dict], key: str) -> float | None:
    values = _values(runs, key)
    return statistics.median(values) if values else None


def _acc(runs: Sequence[dict]) -> str:
    accs = _values(runs, "val_acc")
    if not accs:
        return "n/a"
    text = f"{100 * statistics.fmean(accs):.2f}%"
    if len(accs) > 1:
        text += f" ± {100 * statistics.stdev(accs):.2f} (n={len(accs)})"
    return text


def _ms(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:,.2f}" if x < 100 else f"{x:,.0f}")


def table_row(key: tuple, runs: Sequence[dict]) -> list[str]:
    model, width, _, mode, k, epochs = key
    label = mode + (f" (k={k})" if mode == "pointwise_kxk" and k not in (None, 3) else "")
    # one figure per run, in seed order, never pooled: seeds of one row were often trained on
    # different machines (a lent GPU, a CPU with or without bf16), so a median would be no run's speed
    ips = " / ".join("n/a" if r.get("train_img_s") is None else f"{float(r['train_img_s']):,.0f}" for r in runs)
    seeds = " ".join(str(r.get("seed")) for r in runs)
    # a row's notes, each once; where its seeds' notes differ, each names its seed (as the img/s column)
    notes = [r.get("note") or "" for r in runs]
    if len(set(notes)) > 1:
        notes = [f"seed {r.get('seed')}: {n}" for r, n in zip(runs, notes) if n]
    else:
        notes = [n for n in notes[:1] if n]
    return [f"`{model}`", f"{width:g}", label, "n/a" if epochs is None else str(epochs), f"{len(runs)} (seed {seeds})",
            f"{runs[0]['params'] / 1e6:,.2f} M", f"{runs[0]['macs'] / 1e6:,.2f} M",
            _ms(_median(runs, "latency_b1_ms")), _ms(_median(runs, "latency_b64_ms")),
            ips, _acc(runs), "; ".join(notes)]


def family_tables(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(family, markdown table, warnings) per family present, in docs/ablation.md's family order."""
    by_family: dict[str, list[dict]] = {}
    for row in rows:
        by_family.setdefault(family_of(str(row["model"])), []).append(row)
    known = list(FAMILIES)
    out = []
    for family in sorted(by_family, key=lambda f: (known.index(f) if f in known else len(known), f)):
        members = by_family[family]
        groups = group(members)
        warnings = []
        schedules: dict[tuple, set] = {}
        for r in members:
            schedules.setdefault((variant(r), r.get("epochs")), set()).add(r.get("recipe") or "")
        for (model, epochs), recipes in schedules.items():
            if len(recipes) > 1:
                warnings.append(f"warning: the runs differ in more than the ablated keys: `{model}` at {epochs} epochs "
                                f"was trained with {' / '.join(sorted(recipes))}")
        table = md_table(HEADER, [table_row(k, runs) for k, runs in groups.items()],
                         right=[False, True, False, True, False, True, True, True, True, True, True, False])
        out.append((family, table, warnings))
    return out


def _scatter(ax, rows: Sequence[dict], x_key: str, scale: float, xlabel: str, title: str, colours: dict) -> None:
    from matplotlib.ticker import FuncFormatter

    labels: dict[str, tuple[float, float]] = {}  # one label per architecture, not per seed
    for row in rows:
        if row.get(x_key) is None or row.get("val_acc") is None:
            continue
        x, y = float(row[x_key]) * scale, 100 * float(row["val_acc"])
        colour = colours[family_of(str(row["model"]))]
        ax.plot([x], [y], MARKERS.get(row["conv_mode"], "D"), ms=8, color=colour, alpha=0.8)
        labels.setdefault(f"{variant(row)} w{row['width']:g} {row['conv_mode']}", (x, y))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val accuracy (%), final weights' EMA")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    _place_labels(ax, labels)


def _place_labels(ax, labels: dict[str, tuple[float, float]], fontsize: float = 7) -> None:
    """Each label beside its point: to its right, else its left, at the nearest height where it stays
    inside the axes and covers no label placed before it and no point (points of equal cost, such as a widened separable net
    beside `full`, sit on top of each other); a label moved off its point's height gets a leader line."""
    ax.figure.canvas.draw()  # fixes the axis limits, so data -> points is final
    to_pt = 72 / ax.figure.dpi
    where = {name: tuple(v * to_pt for v in ax.transData.transform(xy)) for name, xy in labels.items()}
    dots = [(px - 4, py - 4, px + 4, py + 4) for px, py in where.values()]
    overlaps = lambda a, b: a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    frame = tuple(v * to_pt for v in ax.bbox.extents)  # the axes: a label stays inside them
    inside = lambda a: frame[0] <= a[0] and a[2] <= frame[2] and frame[1] <= a[1] and a[3] <= frame[3]
    placed: list[tuple[float, float, float, float]] = []  # label boxes in points: x0, y0, x1, y1
    renderer = ax.figure.canvas.get_renderer()
    for name, (x, y) in labels.items():
        px, py = where[name]
        text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, 0), fontsize=fontsize, va="center")
        extent = text.get_window_extent(renderer)  # the label's real size, not a guess from its length
        width, height = extent.width * to_pt, extent.height * to_pt
        step = height + 1
        candidates = [(side, k * step) for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6) for side in (1, -1)]
        for side, dy in candidates:
            x0 = px + 7 if side > 0 else px - 7 - width
            box = (x0, py + dy - height / 2, x0 + width, py + dy + height / 2)
            if inside(box) and not any(overlaps(box, b) for b in placed + dots):
                break
        else:
            side, dy = 1, 0  # nowhere free within reach: beside the point, overlapping
            box = (px + 7, py - height / 2, px + 7 + width, py + height / 2)
        placed.append(box)
        text.remove()
        leader = dict(arrowstyle="-", lw=0.4, color="0.5", shrinkA=0, shrinkB=4) if dy else None
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(7 * side, dy), fontsize=fontsize,
                    ha="left" if side > 0 else "right", va="center", arrowprops=leader)


def _legend(ax, colours: dict) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=MARKERS[m], ls="", color="black", label=m) for m in MODES]
    handles += [Line2D([], [], marker="s", ls="", color=c, label=f) for f, c in colours.items()]
    ax.legend(handles=handles, fontsize=7, loc="best")


def write_plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    # the converged runs only: a 2-epoch point says nothing about the trade-off and stretches the
    # accuracy axis until the converged points (86-92% here) sit on one line
    rows = [r for r in rows if (r.get("epochs") or 0) >= CONVERGED]
    families = sorted({family_of(str(r["model"])) for r in rows}, key=lambda f: (list(FAMILIES) + [f]).index(f))
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    paths = [out / "acc_vs_macs.png", out / "acc_vs_latency.png"]

    fig, ax = plt.subplots(figsize=(7, 5))
    _scatter(ax, rows, "macs", 1e-6, "mult-adds per 32x32 image (M, log scale)", "accuracy vs mult-adds, one point per run",
             colours)
    _legend(ax, colours)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, batch in zip(axes, (1, 64)):
        _scatter(ax, rows, f"latency_b{batch}_ms", 1.0, f"CPU latency, batch {batch} (ms, log scale)",
                 f"accuracy vs latency, batch {batch}", colours)
    _legend(axes[0], colours)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _mean(runs: Sequence[dict], key: str) -> float | None:
    values = _values(runs, key)
    return statistics.fmean(values) if values else None


def findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the converged rows say, computed from them: per model, width and schedule (at least
    CONVERGED epochs), each mode's accuracy against `separable`'s, with the cost it pays for it; the
    equal-cost rows (separable widened) against `full`; and the published trade beside them."""
    groups = {k: v for k, v in group(rows).items() if (k[5] or 0) >= CONVERGED}
    lines = []
    by_arch: dict[tuple, dict[str, list[dict]]] = {}
    for (model, width, stem, mode, k, epochs), runs in groups.items():
        by_arch.setdefault((model, width, stem, epochs), {})[mode] = runs
    for (model, width, stem, epochs), modes in by_arch.items():
        where = f"`{model}` at width {width:g}, {epochs} epochs"
        base = modes.get("separable")
        if base is None:
            have = ", ".join(f"`{m}` {100 * _mean(r, 'val_acc'):.2f}%" for m, r in modes.items())
            lines.append(f"{where}: no converged `separable` run yet to compare with ({have}).")
            continue
        acc0, macs0 = _mean(base, "val_acc"), base[0]["macs"]
        lat0 = _median(base, "latency_b1_ms")
        parts = []
        for mode in [m for m in MODES if m in modes and m != "separable"]:
            runs = modes[mode]
            acc, macs, lat = _mean(runs, "val_acc"), runs[0]["macs"], _median(runs, "latency_b1_ms")
            same_machine = {r.get("latency_cpu") for r in runs} == {r.get("latency_cpu") for r in base}
            latency = f", {lat / lat0:.2f}x the batch-1 latency" if lat and lat0 and same_machine else ""
            parts.append(f"`{mode}` {100 * acc:.2f}% ({100 * (acc - acc0):+.2f} points) for {macs / macs0:.2f}x the mult-adds{latency}")
        widened = any((m, st, e) == (model, stem, epochs) and "full" in ms and w < width for (m, w, st, e), ms in by_arch.items())
        if parts:
            lines.append(f"{where}: `separable` {100 * acc0:.2f}%; " + "; ".join(parts) + ".")
        elif not widened:  # (a widened separable row is read against full below)
            lines.append(f"{where}: only `separable` has converged ({100 * acc0:.2f}%).")
    # equal cost: a separable row wider than the model's full row, at the same schedule
    for (model, width, stem, mode, k, epochs), runs in groups.items():
        full = [r for (m, w, st, md, _, e), r in groups.items() if (m, st, md, e) == (model, stem, "full", epochs) and w < width]
        if mode == "separable" and full:
            f = full[0]
            lat, lat_full = _median(runs, "latency_b1_ms"), _median(f, "latency_b1_ms")
            same_machine = {r.get("latency_cpu") for r in runs} == {r.get("latency_cpu") for r in f}
            latency = f", at {lat / lat_full:.2f}x its batch-1 latency" if lat and lat_full and same_machine else ""
            lines.append(f"Equal cost, `{model}` at {epochs} epochs: `separable` widened to {width:g} ({runs[0]['macs'] / 1e6:.1f} M "
                         f"mult-adds) {100 * _mean(runs, 'val_acc'):.2f}% against `full` at width {f[0]['width']:g} "
                         f"({f[0]['macs'] / 1e6:.1f} M) {100 * _mean(f, 'val_acc'):.2f}%{latency}.")
    (a0, m0), (a1, m1) = TABLE4["separable"], TABLE4["full"]
    lines.append(f"Published: MobileNets Table 4 (ImageNet) pays {m1 / m0:.2f}x the mult-adds for {a1 - a0:+.1f} points of "
                 "`full` over `separable`; BSConv's CIFAR-10 wide ResNets lose 0.4-2 points to separable convolutions, "
                 "more when thin.")
    return lines


def measured_on(rows: Sequence[dict[str, Any]]) -> str:
    where = sorted({f"{r['latency_cpu']} ({r.get('latency_threads')} thread(s))" for r in rows if r.get("latency_cpu")})
    return "; ".join(where) or "not measured"


def write_report(rows: Sequence[dict[str, Any]], csv_path: Path, out: Path, plots: bool = True) -> str:
    """report.md (and the two PNGs) in `out`; returns the tables as printed."""
    out.mkdir(parents=True, exist_ok=True)
    sections = family_tables(rows)
    paths = write_plots(rows, out) if plots else []
    lines = [
        "# conv_mode ablation: results",
        "",
        f"Generated from [{csv_path.name}]({csv_path.name}) ({len(rows)} runs, one CSV row each) by "
        f"`python -m tools.ablation report {csv_path} --out {out}`; edit the CSV (or re-measure), not this file.",
        "",
        "## Reference points (external: published results, not measured by this project)",
        "",
        *(f"- {ref}" for ref in REFERENCES),
        "",
    ]
    lines += ["## What the numbers say", "",
              f"Computed from the rows of at least {CONVERGED} epochs (seeds averaged; latency: batch 1, set against a row "
              "timed on the same machine, torch and day -- in the same measure call where the rows were measured together, "
              "else within about 10%, what one run moved between two calls):", "", *(f"- {line}" for line in findings(rows)), ""]
    printed = []
    for family, table, warnings in sections:
        lines += [f"## {family}", "", table, ""]
        lines += [f"- **{w}**" for w in warnings]
        lines += [""] if warnings else []
        printed += [f"{family}", table, *warnings, ""]
    if paths:
        lines += ["## Plots", "", f"One point per run of at least {CONVERGED} epochs (the shorter runs are in the tables); marker = "
                  "conv_mode, colour = family.", "",
                  *(f"![{p.stem}]({p.name})" for p in paths), ""]
    lines += [
        "## How it was measured",
        "",
        "- **params, mult-adds**: each run's summary.json (`models.profile`, one 3x32x32 image; mult-adds = FLOPs / 2 "
        "of convolutions and linear layers).",
        "- **val acc**: validation accuracy of a run's final weights (their EMA; runs measured before "
        "2026-11-27 and the 2-epoch rows: the best epoch's); rows average the seeds of one architecture and schedule "
        "(mean ± sample std, n). Each run's own value is in the CSV.",
        "- **train img/s**: training throughput the pipeline measured during each run, one figure per seed in the "
        "runs column's order (seeds were trained on different machines; the note says which); the runs shared "
        "the machine with other jobs, so compare it loosely.",
        f"- **latency**: measured on {measured_on(rows)} by `python -m tools.ablation latency <results.csv>`, which "
        "times every row's architecture again in one call (a fresh init of the row's model, width and conv_mode: "
        "latency does not depend on the weights, and runs trained elsewhere left none here; `tools.ablation measure` "
        "without `--no-latency` times a new run with its trained weights instead), fp32, eval mode, "
        "`torch.inference_mode`, random 3x32x32 inputs, `torch.set_num_threads` as listed; all models of one "
        "call timed interleaved (`benchmarks.common.bench`: every round times each model once, in rotating "
        "order), median ms per forward pass of the whole batch (IQR in the CSV). Compare latencies measured in "
        "the same call.",
        "- **width**: the width multiplier; a separable row wider than 1.0 is the equal-cost comparison "
        "(`python -m tools.ablation match-width <model>` gives the width at which its mult-adds equal `full`'s).",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return "\n".join(printed)
