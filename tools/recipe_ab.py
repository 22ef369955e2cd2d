"""Compare the recipe A/B runs (tools/recipes.sh, `ab.<model>.e<epochs>.<variant>`): one markdown
table per model and schedule, each change against the `base` run (the default recipe).

    python -m tools.recipe_ab report runs/ab [runs/gpu ...]

A run counts once it has finished (its summary.json). Its change is what its command line overrode
beyond the base run's (`.hydra/overrides.yaml`). Accuracy is the final weights' EMA on the fixed
validation split, as every shipped card reports it; img/s and hours are the run's own, so runs from
different machines (or sharing one) compare on accuracy, not on time. One seed per variant: a
difference under about 0.3 points is inside what seeds alone move (docs/recipe.md).

A run whose overrides contain another variant's (beyond base) is also set against that one, its
control: `kd_r20` (crops on the teacher's grid + the teacher) against `grid2` (the grid alone),
`prog16_e22` (progressive, 22 epochs) against `prog16` (progressive, 15).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from benchmarks.common import md_table

NAME = re.compile(r"^ab\.(?P<model>[^.]+)\.e(?P<epochs>\d+)\.(?P<variant>[^.]+)$")
# overrides every queue run gets, which say nothing about the recipe
PLUMBING = ("data.root=", "cpu_threads=", "trainer.enable_progress_bar=", "hydra.run.dir=", "ckpt_path=", "seed=",
            "data.cache_dir=", "+trainer.benchmark=")


def load_runs(folders: list[Path]) -> list[dict]:
    """Every finished ab.* run under the folders: name parts, summary, and its overrides."""
    runs = []
    for folder in folders:
        for run in sorted(folder.glob("ab.*")):
            match = NAME.match(run.name)
            summary = run / "summary.json"
            if not match or not summary.is_file():
                continue
            overrides_file = run / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
            overrides = [o for o in overrides if not o.startswith(PLUMBING)]
            runs.append({**match.groupdict(), "run": run, "summary": json.loads(summary.read_text()), "overrides": overrides})
    return runs


def report(runs: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["epochs"]), []).append(r)
    parts = []
    for (model, epochs), group in sorted(groups.items()):
        base = next((r for r in group if r["variant"] == "base"), None)
        base_acc = 100 * base["summary"]["final_val_acc"] if base else None
        changes = {r["variant"]: [o for o in r["overrides"] if not base or o not in base["overrides"]] for r in group}
        rows = []
        for r in sorted(group, key=lambda r: (r["variant"] != "base", r["variant"])):
            s = r["summary"]
            acc = 100 * s["final_val_acc"]
            change = changes[r["variant"]]
            delta = "-" if r is base or base_acc is None else f"{acc - base_acc:+.2f}"
            control = max((c for c in group if c is not base and c is not r and changes[c["variant"]]
                           and set(changes[c["variant"]]) < set(change)), key=lambda c: len(changes[c["variant"]]), default=None)
            vs_control = f"{acc - 100 * control['summary']['final_val_acc']:+.2f} vs `{control['variant']}`" if control else ""
            rows.append([f"`{r['variant']}`", " ".join(f"`{o}`" for o in change) or "(the default recipe)", f"{acc:.2f}%",
                         delta, vs_control, f"{s['images_per_second']:,.0f}", f"{s['wall_seconds'] / 3600:.2f}", s.get("precision", "")])
        note = "" if base else "\n(no finished `base` run yet: no differences)\n"
        parts.append(f"### `{model}`, {epochs} epochs\n\n" + md_table(
            ["variant", "change", "val acc (final EMA)", "vs base", "vs its control", "img/s", "hours", "precision"], rows,
            right=[False, False, True, True, True, True, True, False]) + "\n" + note)
    return "\n".join(parts) if parts else "(no finished recipe A/B runs)\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="print the comparison tables")
    rep.add_argument("folders", nargs="+", type=Path, help="folders holding ab.* run folders (runs/ab, runs/gpu)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"no such folder: {', '.join(missing)} (the CPU queue writes runs/ab, a GPU lease runs/gpu)", file=sys.stderr)
        return 2
    print(report(load_runs(args.folders)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
