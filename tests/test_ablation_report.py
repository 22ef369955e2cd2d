"""tools.ablation_report: reads a multirun of the three conv modes, times the models, writes
report.md / ablation.csv / two PNGs with one correct row per mode; --cost-only's numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import models
from conftest import compose_config, tiny_overrides
from tools import ablation_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = {"name": "mobilenet_v1", "width": 0.25, "stem": "cifar", "num_classes": 10, "kwargs": {}}
FAST = ["--repeats", "3", "--threads", "1"]


def fake_run(folder: Path, conv_mode: str, seed: int = 0, val_acc: float = 0.5, img_s: float = 100.0,
             lr: float = 0.2, checkpoint: bool = True) -> dict:
    """A run folder as the pipeline writes it: config.yaml, summary.json, checkpoints/best.ckpt."""
    model_cfg = dict(MODEL, conv_mode=conv_mode)
    folder.mkdir(parents=True)
    config = {"model": model_cfg, "data": {"name": "cifar10", "batch_size": 256, "val_size": 5000},
              "trainer": {"max_epochs": 2, "precision": "bf16-mixed"}, "optim": {"name": "sgd", "lr": lr},
              "seed": seed, "cpu_threads": 1, "run_dir": str(folder)}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    torch.manual_seed(seed)
    model = ablation_report.build_model(model_cfg)
    cost = models.profile(model)
    if checkpoint:
        (folder / "checkpoints").mkdir()
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
                   folder / "checkpoints" / "best.ckpt")
    summary = {"model": "mobilenet_v1", "model_config": model_cfg, "params": cost["params"], "macs": cost["macs"],
               "best_val_acc": val_acc, "best_epoch": 1, "test_acc": None, "epochs": 2, "wall_seconds": 10.0,
               "images_per_second": img_s, "best_ckpt": str(folder / "checkpoints" / "best.ckpt"), "run_dir": str(folder)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_writes_table_csv_and_plots_with_one_row_per_mode(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # Hydra's job order is the override order; the report sorts rows by mode regardless
    expected = {
        "pointwise_kxk": fake_run(sweep / "0_pointwise_kxk", "pointwise_kxk", val_acc=0.61, img_s=50),
        "separable": fake_run(sweep / "1_separable", "separable", val_acc=0.55, img_s=300),
        "full": fake_run(sweep / "2_full", "full", val_acc=0.62, img_s=80),
    }
    (sweep / "3_crashed").mkdir()  # a job that died before its summary: warned about, left out
    (sweep / "3_crashed" / "config.yaml").write_text(OmegaConf.to_yaml({"model": dict(MODEL, conv_mode="full")}))
    out = tmp_path / "docs" / "ablation" / "mobilenet_v1"

    assert ablation_report.main([str(sweep), "--out", str(out), *FAST]) == 0

    printed = capsys.readouterr()
    assert "3_crashed has no summary.json" in printed.err
    for header in ("mode", "params", "mult-adds", "latency b1 (ms)", "latency b64 (ms)", "train img/s", "val acc"):
        assert header in printed.out
    assert sorted(p.name for p in out.iterdir()) == ["ablation.csv", "acc_vs_latency.png", "acc_vs_macs.png", "report.md"]

    rows = read_csv(out / "ablation.csv")
    assert [r["conv_mode"] for r in rows] == ["separable", "full", "pointwise_kxk"]
    for r in rows:
        s = expected[r["conv_mode"]]
        assert int(r["params"]) == s["params"] and int(r["macs"]) == s["macs"]
        assert float(r["val_acc"]) == pytest.approx(s["best_val_acc"])
        assert float(r["train_img_per_s"]) == pytest.approx(s["images_per_second"])
        assert float(r["latency_b1_ms"]) > 0 and float(r["latency_b64_ms"]) > float(r["latency_b1_ms"])
        assert r["model"] == "mobilenet_v1" and r["n_runs"] == "1" and r["epochs"] == "2"
    assert rows[2]["pointwise_kernel_size"] == "3" and rows[0]["pointwise_kernel_size"] == ""
    # the cost ordering the modes exist to show
    assert int(rows[0]["macs"]) * 5 < int(rows[1]["macs"]) and int(rows[0]["params"]) * 5 < int(rows[2]["params"])

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0] == "| mode | params | mult-adds | latency b1 (ms) | latency b64 (ms) | train img/s | val acc |"
    assert [line.split(" | ")[0][2:] for line in table[1:]] == ["separable", "full", "pointwise_kxk"]
    assert "| 55.00% |" in table[1] and "| 300 |" in table[1]
    assert "set_num_threads(1)" in report and "interleaved" in report and "warning" not in report
    assert "![acc_vs_macs](acc_vs_macs.png)" in report and "![acc_vs_latency](acc_vs_latency.png)" in report
    for png in ("acc_vs_macs.png", "acc_vs_latency.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_seeds_of_one_mode_are_one_row_and_recipe_differences_are_flagged(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", "separable", seed=0, val_acc=0.50)
    fake_run(sweep / "1", "separable", seed=1, val_acc=0.60)
    fake_run(sweep / "2", "full", seed=0, val_acc=0.70, lr=0.1, checkpoint=False)  # another lr: not a fair row
    out = tmp_path / "out"
    assert ablation_report.main([str(sweep), "--out", str(out), "--no-latency", "--no-plots"]) == 0

    rows = read_csv(out / "ablation.csv")
    assert [(r["conv_mode"], r["n_runs"], r["seeds"]) for r in rows] == [("separable", "2", "0 1"), ("full", "1", "0")]
    assert float(rows[0]["val_acc"]) == pytest.approx(0.55) and float(rows[0]["val_acc_std"]) == pytest.approx(0.0707, abs=1e-3)
    assert rows[0]["latency_b1_ms"] == ""
    report = (out / "report.md").read_text()
    assert "55.00% ± 7.07 (n=2)" in report and "| n/a | n/a |" in report
    assert "warning: the runs differ" in report and "`optim.lr`" in report
    assert "optim.lr" in capsys.readouterr().err
    assert not list(out.glob("*.png"))


def test_timed_model_is_the_checkpoint_architecture(tmp_path):
    run = tmp_path / "sweep" / "0"
    fake_run(run, "full")
    config = OmegaConf.load(run / "config.yaml")
    config.model.conv_mode = "separable"  # the config now disagrees with the weights
    OmegaConf.save(config, run / "config.yaml")
    with pytest.raises(SystemExit, match="does not fit the model built from its run config"):
        ablation_report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), *FAST])


def test_no_finished_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no finished runs"):
        ablation_report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])


def test_latency_is_interleaved_and_per_forward():
    calls = []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append((self.name, x.shape[0]))
            return x

    times = ablation_report.measure_latency([("a", Probe("a")), ("b", Probe("b"))], batches=(1, 64), repeats=4, warmup=1,
                                            min_sample_s=0)
    assert {k: {b: len(v) for b, v in d.items()} for k, d in times.items()} == {"a": {1: 4, 64: 4}, "b": {1: 4, 64: 4}}
    timed = [name for name, b in calls if b == 1][4:]  # after 2 warm-ups + 2 probes
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]  # each repeat runs both, the first one rotating


def test_real_pipeline_runs_are_read(tmp_path, imagefolder_root):
    """Three one-epoch runs through training.pipeline.train (what train.py -m runs per job)."""
    from training.pipeline import train

    sweep = tmp_path / "multirun"
    for i, mode in enumerate(ablation_report.MODES):
        overrides = tiny_overrides(imagefolder_root, sweep / f"{i}_{mode}", tmp_path / "cache")
        cfg = compose_config("train", [*overrides, "model=mobilenet_v1", "model.width=0.25", f"model.conv_mode={mode}",
                                       "trainer.max_epochs=1", "+model.kwargs.pointwise_kernel_size=5"])
        train(cfg)
    out = tmp_path / "report"
    assert ablation_report.main([str(sweep), "--out", str(out), *FAST, "--no-plots"]) == 0
    rows = read_csv(out / "ablation.csv")
    assert [r["label"] for r in rows] == ["separable", "full", "pointwise_kxk (k=5)"]
    assert rows[2]["pointwise_kernel_size"] == "5"
    for r, mode in zip(rows, ablation_report.MODES):
        built = models.create_model("mobilenet_v1", width=0.25, conv_mode=mode, pointwise_kernel_size=5)
        assert int(r["params"]) == sum(p.numel() for p in built.parameters())
        assert 0.0 <= float(r["val_acc"]) <= 1.0 and float(r["train_img_per_s"]) > 0
    assert "warning" not in (out / "report.md").read_text()  # only conv_mode, seed and run_dir differ


def test_changed_layers_name_what_each_mode_changes():
    v2 = models.create_model("mobilenet_v2", width=0.25)
    assert ablation_report.changed_layers(v2, "full") == "17 dw+pwl 3x3 pairs -> dense 3x3"
    assert ablation_report.changed_layers(v2, "pointwise_kxk") == "34 pointwise -> 3x3: 16 pw, 17 pwl, 1 head"
    r20 = models.create_model("resnet20", width=0.25)
    assert ablation_report.changed_layers(r20, "full") == "nothing (no separable pairs)"
    assert ablation_report.changed_layers(r20, "pointwise_kxk", k=5) == "2 pointwise -> 5x5: 2 shortcut"


def test_mobilenet_v1_imagenet_matches_mobilenets_table_4():
    for mode, (params, macs) in ablation_report.PAPER_TABLE4.items():
        c = ablation_report.cost("mobilenet_v1", mode, stem="imagenet", num_classes=1000, size=224)
        assert c["params"] == pytest.approx(params, rel=0.01) and c["macs"] == pytest.approx(macs, rel=0.01)
