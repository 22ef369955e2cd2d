"""Train many queue jobs side by side on one GPU inside a fixed time (a lent GPU gives one call of at
most ten minutes), so that whatever is started also finishes.

    python -m tools.gpu_schedule --budget 460 --lanes 14 --runs runs/gpu --data-root .gpu/data JOB[:EPOCHS] ...

JOB is a job of tools/recipes.sh (a shipped entry or an ablation run), in priority order.

1. Probe: each distinct model trains two short epochs (`--probe-batches` batches each), all probes
   at once, so the speed measured is the speed under load: a CIFAR model leaves most of a GPU idle, and
   the real runs share it the same way. A probe that fails is tried again with the fallback overrides
   (float32, NCHW); a job whose probe fails twice is left out and its log's end printed.
2. Run: jobs start in the order given, at most `--lanes` at a time (one CPU core each drives its GPU
   work). A job named with its epochs (resnet56:100), an ablation job or a recipe A/B (they fix their epochs)
   starts only if all of them fit in the time left; a shipped entry named bare gets its recipe's epochs
   times `--stretch` (a GPU can afford the longer schedules the CIFAR repos use), or as many as fit if
   that is at least `--min-fraction` of the recipe's (the card records the epochs).
3. Deadline: a run still going when the budget ends is killed, so it leaves no summary.json and
   counts as unfinished; the caller still packs everything that finished.

The decisions and the probe's figures go to <runs>/schedule.json and a table on stdout.

`--epoch-seconds S` skips the probe and plans every job at S seconds an epoch (plus
`--startup-seconds`): the probe can misjudge. On a lent H200 (2026-11-27) 20 probes started over
~30 s, so many timed their epoch while others were still starting; the runs then shared the GPU
by time-slicing (no MPS) and every model took 12.5-12.8 s an epoch with 7 runs at once, against the
probe's 4-6 s, and four entries were stopped by the deadline. With 3 runs at once an epoch took
3.2-4.0 s (docs/recipe.md, "On a lent GPU").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FALLBACK = ["trainer.precision=32-true", "channels_last=false"]
SAFETY = 1.2  # an epoch's estimate from the probe, times this (validation, checkpoints, the last short batch, jitter)


@dataclass
class Job:
    name: str
    args: list[str]
    epochs: int
    fixed: bool  # the epochs must all run (named with them, an ablation run or a recipe A/B)
    probe_key: str
    extra: list[str] = field(default_factory=list)  # the fallback, if the probe needed it
    status: str = "queued"
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float = 0.0


def recipe_args(job: str) -> list[str]:
    done = subprocess.run(["bash", "-c", '. tools/recipes.sh && recipe_for "$1"', "_", job], cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip() or f"unknown job '{job}'")
    return shlex.split(done.stdout)


def setting(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None


def override(args: list[str], key: str, value: object) -> list[str]:
    return [a for a in args if a.split("=", 1)[0].lstrip("+") != key] + [f"{key}={value}"]


def make_job(spec: str) -> Job:
    name, _, epochs = spec.partition(":")
    args = recipe_args(name)
    if epochs:
        args = override(args, "trainer.max_epochs", int(epochs))
    if setting(args, "seed") is None:
        args.append("seed=0")
    key = " ".join(a for a in args if a.split("=", 1)[0] not in ("seed", "trainer.max_epochs"))
    return Job(name, args, int(setting(args, "trainer.max_epochs") or 100), bool(epochs) or name.startswith(("ablation.", "ab.")), key)


def command(job_args: list[str], run: Path, data_root: str, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", *job_args, f"data.root={data_root}", "cpu_threads=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"hydra.run.dir={run}", *extra]


def launch(cmd: list[str], run: Path) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    log = open(run / "stdout.log", "w")  # noqa: SIM115  (the child owns it)
    # own process group, so a run past the deadline is killed with everything it started
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def epoch_seconds(run: Path) -> float | None:
    """The second probe epoch's training seconds (the first pays for start-up and autotuning)."""
    from training.callbacks import logged_epoch_seconds

    seconds = logged_epoch_seconds(run)
    return seconds[-1] if len(seconds) >= 2 else None


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def probe(jobs: list[Job], args, probe_dir: Path) -> dict[str, dict]:
    """Seconds per training batch and start-up seconds of each distinct model, all probed at once."""
    results: dict[str, dict] = {}
    keys = {job.probe_key: job for job in reversed(jobs)}  # first job of each key names its probe
    for attempt, fallback in enumerate(([], FALLBACK)):
        todo = [(key, job) for key, job in keys.items() if key not in results]
        if not todo:
            break
        procs = []
        start = time.time()
        for key, job in todo:
            run = probe_dir / f"{job.name}{'.fallback' if attempt else ''}"
            short = [f"trainer.limit_train_batches={args.probe_batches}", "trainer.limit_val_batches=2",
                     "trainer.num_sanity_val_steps=0", "logger=csv"]
            cmd = command(override(job.args, "trainer.max_epochs", 2) + short, run, args.data_root, fallback + args.extra)
            procs.append((key, job, run, launch(cmd, run)))
        for key, job, run, proc in procs:
            try:
                proc.wait(timeout=max(1.0, args.probe_timeout - (time.time() - start)))
            except subprocess.TimeoutExpired:
                kill(proc)
            seconds = epoch_seconds(run) if proc.returncode == 0 else None
            if seconds is None:
                print(f"== probe of {job.name}{' (fallback)' if attempt else ''} failed (exit {proc.returncode}):\n{tail(run / 'stdout.log')}",
                      flush=True)
                continue
            per_batch = seconds / args.probe_batches
            # measured when this probe is collected, which may be after it ended: an upper bound
            results[key] = {"job": job.name, "seconds_per_batch": per_batch, "fallback": fallback,
                            "startup_seconds": max(0.0, time.time() - start - 2 * seconds)}
    return results


def estimate(job: Job, speed: dict, args, epochs: int) -> float:
    batch = int(setting(job.args + args.extra, "data.batch_size") or 256)
    steps = math.ceil(args.train_images / batch)
    return speed["startup_seconds"] + epochs * steps * speed["seconds_per_batch"] * SAFETY


def static_speed(job: Job, args) -> dict:
    """--epoch-seconds: the same measured epoch time for every model (per-step overhead, not the
    model, sets a GPU run's speed when several share the GPU)."""
    steps = math.ceil(args.train_images / int(setting(job.args + args.extra, "data.batch_size") or 256))
    return {"job": job.name, "seconds_per_batch": args.epoch_seconds / steps, "fallback": [],
            "startup_seconds": args.startup_seconds}


def plan(job: Job, speed: dict | None, left: float, args) -> str | None:
    """Fit `job` into `left` seconds (may shorten a bare entry's epochs); a reason when it cannot run."""
    if speed is None:
        return "left out (probe failed)"
    job.extra = speed["fallback"]
    if not job.fixed:
        per_epoch = estimate(job, speed, args, 1) - speed["startup_seconds"]
        fit = int((left - speed["startup_seconds"]) / per_epoch)
        if fit < args.min_fraction * job.epochs:
            return f"skipped ({max(fit, 0)} of {job.epochs} epochs fit)"
        epochs = min(fit, round(job.epochs * args.stretch))
        job.args, job.epochs = override(job.args, "trainer.max_epochs", epochs), epochs
    need = estimate(job, speed, args, job.epochs)
    if need > left:
        return f"skipped ({job.epochs} epochs need ~{need:.0f} s, {left:.0f} s left)"
    return None


def schedule(specs: list[str], args) -> list[Job]:
    jobs = [make_job(spec) for spec in specs]
    t0 = time.time()
    deadline = t0 + args.budget if args.budget else math.inf
    if args.budget and args.epoch_seconds:
        speeds = {job.probe_key: static_speed(job, args) for job in jobs}
    elif args.budget:
        speeds = probe(jobs, args, args.runs.parent / (args.runs.name + "_probe"))
    else:
        speeds = {}
    print(f"== probe: {time.time() - t0:.0f} s", flush=True)
    queue = list(jobs)
    running: list[Job] = []
    while queue or running:
        for job in list(running):
            if job.proc.poll() is not None:
                job.ended, job.status = time.time(), ("done" if (args.runs / job.name / "summary.json").is_file() else
                                                      f"failed (exit {job.proc.returncode})")
                running.remove(job)
        if time.time() > deadline:
            for job in running:
                kill(job.proc)
                job.ended, job.status = time.time(), "unfinished (deadline)"
            running = []
            for job in queue:
                job.status = "skipped (deadline)"
            break
        while queue and len(running) < args.lanes:
            job = queue.pop(0)
            if args.budget:
                why = plan(job, speeds.get(job.probe_key), deadline - time.time(), args)
                if why:
                    job.status = why
                    continue
            job.proc = launch(command(job.args, args.runs / job.name, args.data_root, job.extra + args.extra), args.runs / job.name)
            job.started, job.status = time.time(), "running"
            running.append(job)
            print(f"== {job.name}: {job.epochs} epochs{' (fallback: ' + ' '.join(job.extra) + ')' if job.extra else ''}", flush=True)
        time.sleep(args.poll)
    report(jobs, speeds, args, time.time() - t0)
    return jobs


def report(jobs: list[Job], speeds: dict, args, wall: float) -> None:
    rows = []
    for job in jobs:
        summary = args.runs / job.name / "summary.json"
        acc = json.loads(summary.read_text()).get("final_val_acc") if summary.is_file() else None
        speed = speeds.get(job.probe_key, {})
        rows.append({"job": job.name, "epochs": job.epochs, "status": job.status,
                     "seconds": round(job.ended - job.started, 1) if job.started else None,
                     "final_val_acc": acc, "probe_ms_per_batch": round(1e3 * speed["seconds_per_batch"], 2) if speed else None})
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "schedule.json").write_text(json.dumps({"budget": args.budget, "lanes": args.lanes, "wall_seconds": round(wall, 1),
                                                         "probes": list(speeds.values()), "jobs": rows}, indent=2) + "\n")
    print("\n| job | epochs | status | s | final val acc | probe ms/batch |\n|---|---:|---|---:|---:|---:|")
    for r in rows:
        acc = f"{100 * r['final_val_acc']:.2f}" if r["final_val_acc"] is not None else ""
        print(f"| {r['job']} | {r['epochs']} | {r['status']} | {r['seconds'] or ''} | {acc} | {r['probe_ms_per_batch'] or ''} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", nargs="+", help="JOB[:EPOCHS], in priority order")
    parser.add_argument("--runs", type=Path, default=Path("runs/gpu"), help="run folders go to <runs>/<job>")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--budget", type=float, default=0, help="seconds until every run must be done; 0: no limit, no probe")
    parser.add_argument("--lanes", type=int, default=14, help="runs at a time")
    parser.add_argument("--stretch", type=float, default=1.0, help="a bare entry may run up to its recipe's epochs times this")
    parser.add_argument("--min-fraction", type=float, default=0.5, help="an entry runs only if this share of its epochs fits")
    parser.add_argument("--train-images", type=int, default=45_000, help="training images an epoch (CIFAR less the validation split)")
    parser.add_argument("--epoch-seconds", type=float, default=0, help="plan with this epoch time instead of probing")
    parser.add_argument("--startup-seconds", type=float, default=60, help="with --epoch-seconds: a run's start-up")
    parser.add_argument("--probe-batches", type=int, default=30)
    parser.add_argument("--probe-timeout", type=float, default=150)
    parser.add_argument("--extra", default="", help="overrides for every run, one string")
    parser.add_argument("--poll", type=float, default=2.0)
    args = parser.parse_args(argv)
    args.extra = shlex.split(args.extra)
    args.runs = args.runs if args.runs.is_absolute() else Path.cwd() / args.runs
    jobs = schedule(args.jobs, args)
    return 0 if any(job.status == "done" for job in jobs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
