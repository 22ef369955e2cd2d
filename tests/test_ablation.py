"""tools.ablation: finds the runs of a conv_mode sweep, measures them into one results row per run
(append replaces a run's row), reports per family from the CSV alone (seeds averaged, plots with one
point per run); the cost tables and the equal-cost width."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import models
from conftest import compose_config, tiny_overrides
from tools.ablation import costs, measure, report, results
from tools.ablation.__main__ import main
from tools.ablation.runs import MODES, find_runs, group_runs
from training.models import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = {"name": "mobilenet_v1", "width": 0.25, "stem": "cifar", "num_classes": 10, "kwargs": {}}
FAST = ["--repeats", "3", "--threads", "1"]


def fake_run(folder: Path, conv_mode: str, seed: int = 0, val_acc: float = 0.5, img_s: float = 100.0,
             lr: float = 0.2, checkpoint: bool = True, kwargs: dict | None = None) -> dict:
    """A run folder as the pipeline writes it: config.yaml, summary.json, checkpoints/best.ckpt."""
    model_cfg = dict(MODEL, conv_mode=conv_mode, kwargs=dict(kwargs or {}))
    folder.mkdir(parents=True)
    config = {"model": model_cfg, "data": {"name": "cifar10", "batch_size": 256, "val_size": 5000},
              "trainer": {"max_epochs": 2, "precision": "bf16-mixed"}, "optim": {"name": "sgd", "lr": lr},
              "seed": seed, "cpu_threads": 1, "run_dir": str(folder)}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    cost = models.profile(model)
    if checkpoint:
        (folder / "checkpoints").mkdir()
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
                   folder / "checkpoints" / "best.ckpt")
    summary = {"model": "mobilenet_v1", "model_config": model_cfg, "params": cost["params"], "macs": cost["macs"],
               "final_val_acc": val_acc, "best_val_acc": val_acc + 0.01, "best_epoch": 1, "test_acc": None, "epochs": 2, "wall_seconds": 10.0,
               "images_per_second": img_s, "best_ckpt": str(folder / "checkpoints" / "best.ckpt"), "run_dir": str(folder)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_measure_then_report_one_row_per_run(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # Hydra's job order is the override order; the report sorts by mode regardless
    expected = {
        "pointwise_kxk": fake_run(sweep / "0_pointwise_kxk", "pointwise_kxk", val_acc=0.61, img_s=50),
        "separable": fake_run(sweep / "1_separable", "separable", val_acc=0.55, img_s=300),
        "full": fake_run(sweep / "2_full", "full", val_acc=0.62, img_s=80),
    }
    (sweep / "3_crashed").mkdir()  # a job that died before its summary: warned about, left out
    (sweep / "3_crashed" / "config.yaml").write_text(OmegaConf.to_yaml({"model": dict(MODEL, conv_mode="full")}))
    csv_path, out = tmp_path / "docs" / "results.csv", tmp_path / "docs"

    assert main(["measure", str(sweep), "--append", str(csv_path), *FAST]) == 0
    assert "3_crashed has no summary.json" in capsys.readouterr().err
    rows = read_csv(csv_path)
    for column in ("model", "width", "conv_mode", "epochs", "seed", "params", "macs", "val_acc", "latency_b1_ms",
                   "latency_b64_ms", "train_img_s"):
        assert column in rows[0]
    assert [r["conv_mode"] for r in rows] == ["separable", "full", "pointwise_kxk"]
    for r in rows:
        s = expected[r["conv_mode"]]
        assert int(r["params"]) == s["params"] and int(r["macs"]) == s["macs"]
        assert float(r["val_acc"]) == pytest.approx(s["final_val_acc"])  # not the best epoch's
        assert float(r["train_img_s"]) == pytest.approx(s["images_per_second"])
        # timed (which batch each time is: test_latency_is_interleaved_and_per_forward); not compared with
        # each other, since on a loaded machine a batch of 64 has measured faster than a batch of 1
        assert float(r["latency_b1_ms"]) > 0 and float(r["latency_b64_ms"]) > 0
        assert r["model"] == "mobilenet_v1" and r["seed"] == "0" and r["epochs"] == "2" and r["latency_threads"] == "1"
    assert rows[2]["pointwise_kernel_size"] == "3" and rows[0]["pointwise_kernel_size"] == ""
    # the cost ordering the modes exist to show
    assert int(rows[0]["macs"]) * 5 < int(rows[1]["macs"]) and int(rows[0]["params"]) * 5 < int(rows[2]["params"])

    assert main(["report", str(csv_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | width | mode | epochs |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["acc_vs_latency.png", "acc_vs_macs.png", "report.md", "results.csv"]
    text = (out / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| `mobilenet_v1`")]
    assert [line.split(" | ")[2] for line in table] == ["separable", "full", "pointwise_kxk"]
    assert "| 55.00% |" in table[0] and "| 300 |" in table[0]
    assert "## MobileNetV1" in text and "interleaved" in text and "warning" not in text
    assert "external" in text and "70.6%" in text and "zeiss-microscopy/BSConv" in text
    for png in ("acc_vs_macs.png", "acc_vs_latency.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_seeds_stay_rows_append_replaces_and_recipe_differences_are_flagged(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", "separable", seed=0, val_acc=0.50)
    fake_run(sweep / "1", "separable", seed=1, val_acc=0.60)
    csv_path = tmp_path / "results.csv"
    assert main(["measure", str(sweep), "--append", str(csv_path), "--no-latency", "--note", "not converged"]) == 0
    rows = read_csv(csv_path)
    assert [(r["seed"], r["val_acc"], r["note"]) for r in rows] == [("0", "0.5", "not converged"), ("1", "0.6", "not converged")]
    assert rows[0]["latency_b1_ms"] == ""

    # a re-measured run replaces its row in place; a new run is added at the end
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    (sweep / "0" / "summary.json").write_text(json.dumps(dict(summary, final_val_acc=0.52)))
    fake_run(tmp_path / "more" / "2", "full", seed=0, val_acc=0.70, lr=0.1, checkpoint=False)  # another lr
    assert main(["measure", str(sweep / "0"), str(tmp_path / "more"), "--append", str(csv_path), "--no-latency"]) == 0
    assert "warning: the runs differ" in capsys.readouterr().err
    rows = results.read(csv_path)
    assert [(r["conv_mode"], r["seed"], r["val_acc"]) for r in rows] == [
        ("separable", 0, 0.52), ("separable", 1, 0.6), ("full", 0, 0.7)]

    out = tmp_path / "out"
    assert main(["report", str(csv_path), "--out", str(out), "--no-plots"]) == 0
    text = (out / "report.md").read_text()
    assert "56.00% ± 5.66 (n=2)" in text and "| n/a | n/a |" in text
    assert "warning: the runs differ" in text and "lr 0.1" in text and "lr 0.2" in text
    assert not list(out.glob("*.png"))


def test_a_key_added_to_the_config_later_is_not_a_recipe_difference(tmp_path, capsys):
    # data.progressive.from_weights came after the first rows; what it does shows in min_size
    fake_run(tmp_path / "sweep" / "0", "separable", seed=0)
    fake_run(tmp_path / "sweep" / "1", "full", seed=0)
    later = tmp_path / "sweep" / "1" / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(later))
    config["data"]["progressive"] = {"from_weights": False}
    later.write_text(OmegaConf.to_yaml(config))
    assert main(["measure", str(tmp_path / "sweep"), "--append", str(tmp_path / "r.csv"), "--no-latency"]) == 0
    assert "the runs differ" not in capsys.readouterr().err
    config["data"]["progressive"]["min_size"] = 16  # what it records is a difference
    later.write_text(OmegaConf.to_yaml(config))
    assert main(["measure", str(tmp_path / "sweep"), "--append", str(tmp_path / "r.csv"), "--no-latency"]) == 0
    assert "warning: the runs differ" in capsys.readouterr().err


def test_recipe_differences_are_what_trains_not_where_or_how_fast(tmp_path):
    # one rule for both comparisons (training.config.training_recipe, also tools.recipe_ab's and a resume's):
    # threads, the data's folder and progress bars are not the recipe; gradient clipping is
    from tools.ablation.runs import find_runs, recipe_differences

    fake_run(tmp_path / "sweep" / "0", "separable")
    fake_run(tmp_path / "sweep" / "1", "full")
    other = tmp_path / "sweep" / "1" / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(other))
    config.update(cpu_threads=2)
    config["data"]["root"] = "/elsewhere"
    config["trainer"]["enable_progress_bar"] = False
    other.write_text(OmegaConf.to_yaml(config))
    assert recipe_differences(find_runs([tmp_path / "sweep"])) == {}
    config["trainer"]["gradient_clip_val"] = 1.0
    other.write_text(OmegaConf.to_yaml(config))
    assert recipe_differences(find_runs([tmp_path / "sweep"])) == {"trainer.gradient_clip_val": ["'<unset>'", "1.0"]}


def test_report_from_a_csv_alone_spans_families(tmp_path):
    def row(model, mode, seed, acc, width=1.0, macs=10e6, latency=1.0, note="", cpu="Xeon, torch 2, 2026-11-27", img_s=500.0):
        return {"model": model, "width": width, "stem": "cifar", "conv_mode": mode, "epochs": 100, "seed": seed,
                "params": 1_000_000, "macs": int(macs), "val_acc": acc, "latency_b1_ms": latency, "latency_cpu": cpu,
                "latency_b64_ms": 10 * latency, "train_img_s": img_s, "recipe": "r", "note": note, "run_dir": f"{model}/{mode}/{width}/{seed}"}

    csv_path = tmp_path / "results.csv"
    results.write(csv_path, [
        row("resnet20", "separable", 0, 0.91), row("resnet20", "pointwise_kxk", 0, 0.92, macs=12e6, cpu="EPYC, torch 2, 2026-11-24"),
        row("mobilenet_v1", "full", 0, 0.93, macs=80e6, latency=3.0), row("mobilenet_v1", "separable", 0, 0.90),
        row("mobilenet_v1", "separable", 1, 0.92, img_s=15_000.0, note="on a GPU"), row("mobilenet_v1", "separable", 0, 0.925, width=2.98, macs=79e6, note="x"),
    ])
    assert results.read(csv_path)[0]["width"] == 1.0 and results.read(csv_path)[0]["val_acc"] == 0.91  # typed back
    printed = report.write_report(results.read(csv_path), csv_path, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert text.index("## MobileNetV1") < text.index("## ResNet basic")  # docs/ablation.md's family order
    v1 = [line for line in text.splitlines() if line.startswith("| `mobilenet_v1`")]
    assert [line.split(" | ")[1:3] for line in v1] == [["1", "separable"], ["2.98", "separable"], ["1", "full"]]
    assert "91.00% ± 1.41 (n=2)" in v1[0] and "2 (seed 0 1)" in v1[0]
    assert " | 500 / 15,000 | " in v1[0]  # each seed's own speed (another machine), never a median of the two
    assert v1[0].endswith("| seed 1: on a GPU |")  # notes that differ between seeds say whose they are
    assert "ResNet basic" in printed
    said = text[text.index("## What the numbers say"):text.index("## MobileNetV1")]
    assert ("- `mobilenet_v1` at width 1, 100 epochs: `separable` 91.00%; `full` 93.00% (+2.00 points) for 8.00x the "
            "mult-adds, 3.00x the batch-1 latency.") in said
    # timed on another machine (or day) than its separable row: no latency ratio
    assert "- `resnet20` at width 1, 100 epochs: `separable` 91.00%; `pointwise_kxk` 92.00% (+1.00 points) for 1.20x the mult-adds.\n" in said
    assert ("Equal cost, `mobilenet_v1` at 100 epochs: `separable` widened to 2.98 (79.0 M mult-adds) 92.50% against "
            "`full` at width 1 (80.0 M) 93.00%, at 0.33x its batch-1 latency.") in said
    assert "- `mobilenet_v1` at width 2.98" not in said  # the widened row is read against full, not alone
    assert "pays 8.55x the mult-adds for +1.1 points" in said
    for png in ("acc_vs_macs.png", "acc_vs_latency.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC


def test_match_width_agrees_with_a_direct_mac_count():
    m = costs.match_width("mobilenet_v1", mode="separable", target_mode="full", target_width=0.25, tol=0.01)
    full = models.profile(models.create_model("mobilenet_v1", width=0.25, conv_mode="full"))["macs"]
    wide = models.profile(models.create_model("mobilenet_v1", width=m["width"], conv_mode="separable"))["macs"]
    assert m["target_macs"] == full and m["macs"] == wide
    assert wide == pytest.approx(full, rel=0.05) and 0.25 < m["width"] < 1.0


def test_timed_model_is_the_checkpoint_architecture(tmp_path):
    run = tmp_path / "sweep" / "0"
    fake_run(run, "full")
    config = OmegaConf.load(run / "config.yaml")
    config.model.conv_mode = "separable"  # the config now disagrees with the weights
    OmegaConf.save(config, run / "config.yaml")
    with pytest.raises(SystemExit, match="does not fit the model built from its run config"):
        main(["measure", str(tmp_path / "sweep"), "--append", str(tmp_path / "r.csv"), *FAST])


def test_no_finished_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no finished runs"):
        main(["measure", str(tmp_path / "empty"), "--append", str(tmp_path / "r.csv")])


def test_latency_is_interleaved_and_per_forward():
    calls = []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append((self.name, x.shape[0]))
            return x

    times = measure.measure_latency([("a", Probe("a")), ("b", Probe("b"))], batches=(1, 64), repeats=4, warmup=1,
                                    min_sample_s=0)
    assert {k: {b: len(t.samples) for b, t in d.items()} for k, d in times.items()} == {"a": {1: 4, 64: 4}, "b": {1: 4, 64: 4}}
    timed = [name for name, b in calls if b == 1][4:]  # after 2 warm-ups + 2 sizing calls
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]  # each repeat runs both, the first one rotating


def test_real_pipeline_runs_are_read(tmp_path, imagefolder_root):
    """Three one-epoch runs through training.pipeline.train (what train.py -m runs per job)."""
    from training.pipeline import train

    sweep = tmp_path / "multirun"
    for i, mode in enumerate(MODES):
        overrides = tiny_overrides(imagefolder_root, sweep / f"{i}_{mode}", tmp_path / "cache")
        cfg = compose_config("train", [*overrides, "model=mobilenet_v1", "model.width=0.25", f"model.conv_mode={mode}",
                                       "trainer.max_epochs=1", "+model.kwargs.pointwise_kernel_size=5"])
        train(cfg)
    groups = group_runs(find_runs([sweep]))
    assert [g.label for g in groups] == ["mobilenet_v1 w0.25 separable", "mobilenet_v1 w0.25 full",
                                         "mobilenet_v1 w0.25 pointwise_kxk (k=5)"]
    csv_path = tmp_path / "results.csv"
    assert main(["measure", str(sweep), "--append", str(csv_path), *FAST]) == 0
    rows = read_csv(csv_path)
    assert rows[2]["pointwise_kernel_size"] == "5"
    for r, mode in zip(rows, MODES):
        built = models.create_model("mobilenet_v1", width=0.25, conv_mode=mode, pointwise_kernel_size=5)
        assert int(r["params"]) == sum(p.numel() for p in built.parameters())
        assert 0.0 <= float(r["val_acc"]) <= 1.0 and float(r["train_img_s"]) > 0 and r["epochs"] == "1"
    assert len({r["recipe"] for r in rows}) == 1  # only conv_mode, seed and run_dir differ


def test_changed_layers_name_what_each_mode_changes():
    v2 = models.create_model("mobilenet_v2", width=0.25)
    assert costs.changed_layers(v2, "full") == "17 dw+pwl 3x3 pairs -> dense 3x3"
    assert costs.changed_layers(v2, "pointwise_kxk") == "34 pointwise -> 3x3: 16 pw, 17 pwl, 1 head"
    r20 = models.create_model("resnet20", width=0.25)
    assert costs.changed_layers(r20, "full") == "nothing (no separable pairs)"
    assert costs.changed_layers(r20, "pointwise_kxk", k=5) == "2 pointwise -> 5x5: 2 shortcut"


def test_mobilenet_v1_imagenet_matches_mobilenets_table_4():
    for mode, (params, macs) in costs.PAPER_TABLE4.items():
        c = costs.cost("mobilenet_v1", mode, stem="imagenet", num_classes=1000, size=224)
        assert c["params"] == pytest.approx(params, rel=0.01) and c["macs"] == pytest.approx(macs, rel=0.01)


def test_latency_retimes_every_row_in_one_call(tmp_path, capsys):
    """Rows timed on other machines (or never): one call times each architecture once, fresh init, and
    every row gets its architecture's latency and this machine's name; nothing else changes."""
    def row(mode, seed, k=None, cpu="", latency=None):
        return {"model": "mobilenet_v1", "width": 0.25, "stem": "cifar", "conv_mode": mode, "pointwise_kernel_size": k,
                "epochs": 30, "seed": seed, "params": 1, "macs": 2, "val_acc": 0.9, "latency_b1_ms": latency,
                "latency_cpu": cpu, "recipe": "r", "note": "n", "run_dir": f"gone/{mode}/{seed}"}

    csv_path = tmp_path / "results.csv"
    before = [row("separable", 0, cpu="EPYC, torch 2, 2026-11-24", latency=99.0), row("separable", 1),
              row("full", 0), row("pointwise_kxk", 0, k=3)]
    results.write(csv_path, before)
    original = results.read(csv_path)
    assert main(["latency", str(csv_path), *FAST]) == 0
    assert "timing 3 architectures (4 rows)" in capsys.readouterr().err
    after = results.read(csv_path)
    assert len({r["latency_cpu"] for r in after}) == 1 and after[0]["latency_cpu"] != "EPYC, torch 2, 2026-11-24"
    assert all(r["latency_b1_ms"] > 0 and r["latency_b64_ms"] > r["latency_b1_ms"] for r in after)
    assert after[0]["latency_b1_ms"] == after[1]["latency_b1_ms"] != 99.0  # one timed model for the two seeds
    for b, a in zip(original, after):
        assert {k: v for k, v in a.items() if not k.startswith("latency")} == \
            {k: v for k, v in b.items() if not k.startswith("latency")}


def test_a_run_with_other_model_kwargs_is_its_own_row_and_is_timed_as_built(tmp_path):
    from tools.ablation import measure as measure_mod
    from tools.ablation.results import read

    fake_run(tmp_path / "sweep" / "0", "separable", seed=0, val_acc=0.5)
    fake_run(tmp_path / "sweep" / "1", "separable", seed=0, val_acc=0.7, kwargs={"dropout": 0.2})
    csv_path = tmp_path / "r.csv"
    assert main(["measure", str(tmp_path / "sweep"), "--append", str(csv_path), "--no-latency"]) == 0
    rows = read(csv_path)
    assert [r["model_kwargs"] for r in rows] == ["", '{"dropout": 0.2}']
    assert measure_mod.architecture(rows[1])["kwargs"] == {"dropout": 0.2}
    assert measure_mod.architecture_key(rows[0]) != measure_mod.architecture_key(rows[1])
    # never pooled as seeds of one architecture: two rows, each one run
    assert main(["report", str(csv_path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "mobilenet_v1 (dropout=0.2)" in text and "50.00%" in text and "70.00%" in text and "(n=2)" not in text


def test_plot_labels_never_cover_one_another_even_where_points_coincide():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tools.ablation.report import _place_labels

    fig, ax = plt.subplots(figsize=(7, 5))
    # six runs at two points (equal cost rows on top of each other) and one far away
    labels = {f"mobilenet_v1 w0.5 variant {i}": ((100.0, 90.0) if i % 2 else (110.0, 90.2)) for i in range(6)}
    labels["resnet38_bottleneck w1 pointwise_kxk"] = (300.0, 93.4)
    xs, ys = zip(*labels.values())
    ax.scatter(xs, ys)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.2)
    _place_labels(ax, labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text alone, not its leader line
    assert len(boxes) == len(labels)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    far = ax.texts[-1]  # alone: beside its point (left of it here, the right runs out of axes), no leader line
    assert abs(far.get_position()[0]) == 7 and far.get_position()[1] == 0 and far.arrow_patch is None
    assert any(t.arrow_patch is not None for t in ax.texts[:6])  # the crowded ones are led to their points
    plt.close(fig)
