"""tools/ and benchmarks/ are packages run as modules from the repository root
(`python -m tools.export_weights ...`), importable without any sys.path edits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

MODULES = ["tools.verify_pretrained", "tools.export_weights", "tools.teacher_logits", "tools.ablation", "tools.model_table",
           "benchmarks.train_speed", "benchmarks.data_loading"]


def test_no_file_in_tools_or_benchmarks_edits_sys_path():
    for folder in ("tools", "benchmarks"):
        assert (REPO / folder / "__init__.py").is_file()
        for path in (REPO / folder).rglob("*.py"):
            assert "sys.path" not in path.read_text(), path


# One interpreter runs every module's --help as `python -m` would (runpy, __main__), so torch is
# imported once rather than once per module; it starts in the repo root with no PYTHONPATH.
RUN_ALL = """
import runpy, sys
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        print(f"== {module} exit {done.code}", flush=True)
"""


def test_runs_as_a_module():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo root as cwd is all it needs
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, *MODULES], cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sections = proc.stdout.split("== ")
    for module in MODULES:
        ends = [part for part in sections if part.startswith(f"{module} exit")]
        assert ends and ends[0].startswith(f"{module} exit 0"), (module, proc.stdout[-2000:])
    assert proc.stdout.count("usage:") == len(MODULES), proc.stdout[-2000:]


def test_the_shell_scripts_call_the_tools_as_modules():
    for script in ("train_pretrained.sh", "gpu_train.sh"):
        text = (REPO / "tools" / script).read_text()
        assert "-m tools.export_weights" in text and "tools/export_weights.py" not in text


def test_time_to_accuracy_table_reads_every_card_and_the_peers():
    from tools.export_weights import PUBLISHED
    from tools.model_table import time_to_accuracy

    import models

    lines = time_to_accuracy().splitlines()
    rows = {line.split("|")[1].strip().strip("`"): line for line in lines[2:]}
    assert sorted(rows) == sorted(models.list_pretrained())
    for entry, line in rows.items():
        meta = models.pretrained_meta(entry)
        assert f"{meta['val_acc']:.2f}%" in line and f"| {meta['recipe']['epochs']} |" in line
        peer = PUBLISHED.get(entry)
        assert (f"{peer.acc} ({peer.epochs} ep" in line) if peer else line.rstrip().endswith("| - |")


@pytest.mark.parametrize("int8", [False, True])
def test_verify_pretrained_runs_each_cards_command_and_compares(int8, monkeypatch, capsys):
    """--int8 appends eval.int8=true and checks the card's int8 accuracy; without it, the float one."""
    import models
    from tools import verify_pretrained

    meta = models.pretrained_meta("mobilenet_v1")
    stated = meta["int8"]["val_acc"] if int8 else meta["val_acc"]
    commands = []

    def fake_eval(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=f"| top-1  | {stated:.2f}% |\n", stderr="")

    monkeypatch.setattr(verify_pretrained.subprocess, "run", fake_eval)
    monkeypatch.setattr(sys, "argv", ["verify", "--data-root", "somewhere", *(["--int8"] if int8 else []), "mobilenet_v1"])
    with pytest.raises(SystemExit) as done:
        verify_pretrained.main()
    assert done.value.code == 0 and f"{stated:.2f}%" in capsys.readouterr().out
    assert ("eval.int8=true" in commands[0]) == int8 and "data.root=somewhere" in commands[0] and "pretrained=true" in commands[0]


def test_cards_hold_no_path_of_the_machine_that_trained_them():
    import json

    from tools.export_weights import repo_relative

    config = {"run_dir": str(REPO / "runs" / "r"), "logger": [{"save_dir": str(REPO / "runs" / "r")}], "data": {"root": "/elsewhere"}}
    assert repo_relative(config) == {"run_dir": "runs/r", "logger": [{"save_dir": "runs/r"}], "data": {"root": "/elsewhere"}}
    for card in (REPO / "models" / "weights").glob("*.json"):
        assert str(REPO) not in card.read_text(), card.name
