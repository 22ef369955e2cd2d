"""Compare the recipe A/B runs (tools/recipes.sh, `ab.<model>.e<epochs>.<variant>`): one markdown
table per model and schedule, each change against the `base` run (the default recipe).

    python -m tools.recipe_ab report runs/ab [runs/gpu ...]

A run counts once it has finished (its summary.json). Its change is where its recipe differs from
the base run's: the resolved config each run saved (`config.yaml`), over the keys that shape training
(model, data, optim's plain keys, distill, epochs, precision; not paths, threads or seeds). So a default
adopted later, or a job that pins the old default, compares by what it trained, and the seeds of a
variant must share one recipe (else the report names the keys that differ and stops). Accuracy is
the final weights' EMA on the fixed validation split, as every shipped card reports it; img/s and
hours are the run's own, so runs from different machines (or sharing one) compare on accuracy, not
on time. A variant trained at more than one seed (`<job>.s<seed>`, tools/recipes.sh; no suffix is
seed 0) shows the mean of its seeds, each seed's accuracy and its difference from `base` at the same
seed; base's own seeds show how far seeds alone move a run (docs/recipe.md).

A run whose change contains another variant's is also set against that one, its control: `kd_r20`
(crops on the teacher's grid + the teacher) against `grid2` (the grid alone), `prog16_e22`
(progressive, 22 epochs) against `prog16` (progressive, 15).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from benchmarks.common import md_table
from training.config import training_recipe as recipe

NAME = re.compile(r"^ab\.(?P<model>[^.]+)\.e(?P<epochs>\d+)\.(?P<variant>[^.]+)(\.s(?P<seed>\d+))?$")


def load_runs(folders: list[Path]) -> list[dict]:
    """Every finished ab.* run under the folders: name parts, seed, summary, and its recipe."""
    runs = []
    for folder in folders:
        for run in sorted(folder.glob("ab.*")):
            match = NAME.match(run.name)
            summary = run / "summary.json"
            if not match or not summary.is_file():
                continue
            runs.append({**match.groupdict(), "seed": int(match["seed"] or 0), "run": run,
                         "summary": json.loads(summary.read_text()),
                         "recipe": recipe(yaml.safe_load((run / "config.yaml").read_text()))})
    return runs


def _change(run: dict, base: dict | None) -> list[str]:
    """Each recipe key where run differs from base, written as the override that sets it (nothing when
    there is no base): `+key=value` for a key base's config lacks (Hydra refuses `key=value` for a key
    the config does not have, e.g. under `model.kwargs: {}`), `~key` for one run's lacks, booleans and
    None as YAML spells them. A key a config group sets reads as its value, not as the group's
    override: `optim.schedule=linear` is what `optim/scheduler=linear` trained."""
    if base is None:
        return []
    keys = sorted(k for k in run["recipe"].keys() | base["recipe"].keys() if run["recipe"].get(k) != base["recipe"].get(k))
    return [f"~{k}" if k not in run["recipe"] else f"{'' if k in base['recipe'] else '+'}{k}={_value(run['recipe'][k])}"
            for k in keys]


def _value(value) -> str:
    """A config value as an override writes it: true/false/null as YAML spells them, the rest as printed."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _acc(run: dict) -> float:
    return 100 * run["summary"]["final_val_acc"]


def _diff(points: float) -> str:
    return f"{round(points, 2) + 0.0:+.2f}"  # + 0.0: a difference that rounds to zero prints +0.00, not -0.00


def report(runs: list[dict]) -> str:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["epochs"]), {}).setdefault(r["variant"], []).append(r)
    parts = []
    for (model, epochs), variants in sorted(groups.items()):
        seeds = {v: {r["seed"]: r for r in rs} for v, rs in variants.items()}
        mean = {v: sum(map(_acc, rs.values())) / len(rs) for v, rs in seeds.items()}
        for v, rs in seeds.items():
            first = next(iter(rs.values()))
            for r in rs.values():
                if _change(r, first):
                    raise ValueError(f"{r['run']} trained another recipe than {first['run']} ({', '.join(_change(r, first))}); "
                                     "a variant's seeds must differ in their seed only: rename one of them")
        base = seeds.get("base")
        base_run = next(iter(base.values())) if base else None
        changes = {v: _change(next(iter(rs.values())), base_run) for v, rs in seeds.items()}
        rows = []
        for v in sorted(seeds, key=lambda v: (v != "base", v)):
            per_seed = []
            for seed, r in sorted(seeds[v].items()):
                paired = f" ({_diff(_acc(r) - _acc(base[seed]))})" if base and v != "base" and seed in base else ""
                per_seed.append(f"s{seed}: {_acc(r):.2f}{paired}")
            delta = "-" if v == "base" or not base else _diff(mean[v] - mean["base"])
            control = max((c for c in seeds if c not in ("base", v) and changes[c] and set(changes[c]) < set(changes[v])),
                          key=lambda c: len(changes[c]), default=None)
            vs_control = f"{_diff(mean[v] - mean[control])} vs `{control}`" if control else ""
            runs_v = list(seeds[v].values())
            img_s = sum(r["summary"]["images_per_second"] for r in runs_v) / len(runs_v)
            hours = sum(r["summary"]["wall_seconds"] for r in runs_v) / len(runs_v) / 3600
            precision = ", ".join(sorted({r["summary"].get("precision", "") for r in runs_v}))
            rows.append([f"`{v}`", " ".join(f"`{o}`" for o in changes[v]) or "(none: base)", f"{mean[v]:.2f}%",
                         "; ".join(per_seed), delta, vs_control, f"{img_s:,.0f}", f"{hours:.2f}", precision])
        note = "" if base else "\n(no finished `base` run yet: no differences)\n"
        parts.append(f"### `{model}`, {epochs} epochs\n\n" + md_table(
            ["variant", "change", "val acc (final EMA, mean of seeds)", "per seed (vs base at that seed)", "vs base",
             "vs its control", "img/s", "hours", "precision"], rows,
            right=[False, False, True, False, True, True, True, True, False]) + "\n" + note)
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
    try:
        print(report(load_runs(args.folders)))
    except (ValueError, FileNotFoundError) as err:
        print(f"recipe_ab: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
