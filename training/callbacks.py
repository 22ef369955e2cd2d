"""Callbacks: throughput/wall-time accounting that survives a resume; one log line per epoch; the
weight EMA; the best checkpoint's epoch; the step of the last validation."""

from __future__ import annotations

import datetime
import logging
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("train")  # train.py's Hydra logging writes it to the run's train.log and the console


class ThroughputMeter(L.Callback):
    """Training images/s and fit wall time.

    Training time runs from each epoch's start to its last batch (data loading included,
    validation excluded). The totals are saved in checkpoints, so a resumed run reports the
    whole run, not just its last leg.
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.train_images = 0
        self.prior_seconds = 0.0  # fit time of earlier legs of a resumed run (from the checkpoint)
        self._fit_start = self._epoch_start = self._last_batch_end = None
        self._epoch_images = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._epoch_images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_batch_end = time.perf_counter()
        self._epoch_images += len(batch[1]) * trainer.world_size

    def on_validation_start(self, trainer, pl_module) -> None:
        self._close_epoch(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close_epoch(trainer)

    def _close_epoch(self, trainer) -> None:
        if self._epoch_start is None:
            return
        seconds = self._last_batch_end - self._epoch_start
        self.train_seconds += seconds
        self.train_images += self._epoch_images
        self._epoch_start = None
        if trainer.is_global_zero and seconds > 0:
            # per epoch, so warm-up (first epoch, torch.compile) and steady state can be told apart
            metrics = {"train/img_per_s": self._epoch_images / seconds, "train/epoch_seconds": seconds,
                       "epoch": trainer.current_epoch}
            side = getattr(trainer.train_dataloader, "image_size", None)  # the fast loader's, under data.progressive
            if side is not None:
                metrics["train/image_size"] = side
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _fit_elapsed(self) -> float:
        return time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0

    @property
    def images_per_second(self) -> float:
        return self.train_images / self.train_seconds if self.train_seconds else 0.0

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "train_images": self.train_images,
                "fit_seconds": self.prior_seconds + self._fit_elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.train_images = int(state.get("train_images", 0))
        self.prior_seconds = float(state.get("fit_seconds", 0.0))


def logged_epoch_seconds(run_dir) -> list[float]:
    """The `train/epoch_seconds` ThroughputMeter logged, epoch by epoch, from a run's CSV logs (every
    resumed leg's version): what a run stopped before its summary still tells about its speed."""
    import csv
    from pathlib import Path

    seconds = []
    for path in sorted(Path(run_dir).glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            seconds += [float(r["train/epoch_seconds"]) for r in csv.DictReader(f) if r.get("train/epoch_seconds")]
    return seconds


class EpochReport(L.Callback):
    """One log line per finished epoch: where a run stands, for a run in the background with no
    progress bar (a queue under nohup reads its log, not a terminal).

        epoch 15/30: train loss 0.881, acc 83.7% | val acc (EMA) 86.70%, loss 0.412 | 221 s | 15 to go, ~55 min (ends ~21:02)

    An epoch's train metrics are reduced after the epoch's hooks run, so each epoch is reported when
    the next one starts (and the last when training ends). Its seconds include validation; the time
    left is the remaining epochs at the median epoch time of this process (not of earlier legs of a
    resumed run, which may have run on other hardware).
    """

    def __init__(self) -> None:
        self._started: float | None = None  # when the epoch now running started
        self._seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        if self._started is not None:
            self._report(trainer, trainer.current_epoch - 1, now - self._started)
        self._started = now

    def on_train_end(self, trainer, pl_module) -> None:
        if self._started is not None:
            self._report(trainer, trainer.current_epoch - 1, time.perf_counter() - self._started)
            self._started = None

    def _report(self, trainer, epoch: int, seconds: float) -> None:
        self._seconds.append(seconds)
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics

        def value(key: str, fmt: str) -> str | None:
            v = metrics.get(key)
            return None if v is None else fmt.format(float(v) * (100 if "%" in fmt else 1))

        train_part = ", ".join(p for p in (value("train/loss", "train loss {:.3f}"), value("train/acc", "acc {:.1f}%")) if p)
        val = "val acc (EMA)" if any(isinstance(c, WeightEMA) for c in trainer.callbacks) else "val acc"  # what validation sees
        val_part = ", ".join(p for p in (value("val/acc", val + " {:.2f}%"), value("val/loss", "loss {:.3f}")) if p)
        parts = [p for p in (train_part, val_part) if p] + [f"{seconds:.0f} s"]
        total = trainer.max_epochs
        if total is not None and total > 0:
            left = total - (epoch + 1)
            if left > 0:
                eta = left * statistics.median(self._seconds)  # a median: one stalled epoch does not skew it
                ends = datetime.datetime.now() + datetime.timedelta(seconds=eta)
                span = f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.0f} min"
                parts.append(f"{left} to go, ~{span} (ends ~{ends:%H:%M})")
        log.info("epoch %d/%s: %s", epoch + 1, total if total and total > 0 else "?", " | ".join(parts))


class WeightEMA(L.Callback):
    """Exponential moving average of the model's weights *and* its BN running statistics.

    Training steps the raw weights; validation (so `val/acc`, the best checkpoint and the end-of-run
    summary) sees the average, and every checkpoint carries it as `ema_state_dict`, which
    `training.checkpoints.model_state_dict` prefers: evaluating or exporting a run gives the EMA.
    Averaging the BN buffers too keeps them consistent with the averaged weights they normalise.

    After optimizer step t (1, 2, ...) the effective decay is min(decay, (1 + t) / (10 + t)), so in
    short runs the average is not dominated by the random initialisation it starts from.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}; use optim.ema_decay=null to switch EMA off")
        self.decay = decay
        self.average: dict[str, torch.Tensor] | None = None
        self._raw: dict[str, torch.Tensor] | None = None
        self._step = 0  # trainer.global_step at the last update

    def on_fit_start(self, trainer, pl_module) -> None:
        # after the strategy moved the model to its device and a resumed checkpoint was restored
        state = pl_module.model.state_dict()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items()}
        else:
            self.average = {k: self.average[k].to(device=v.device, dtype=v.dtype) for k, v in state.items()}
        # the live tensors, once: state_dict() shares storage with the parameters and buffers
        # split once, not every step: floating tensors are averaged, counters copied
        pairs = [(self.average[k], v) for k, v in state.items()]
        self._avg = [a for a, _ in pairs if a.is_floating_point()]
        self._live = [v for a, v in pairs if a.is_floating_point()]
        self._counters = [(a, v) for a, v in pairs if not a.is_floating_point()]  # e.g. BN's num_batches_tracked

    def on_train_start(self, trainer, pl_module) -> None:
        # the restored step of a resumed run (restored after on_fit_start); checkpoints are written
        # after an epoch's last batch, which always steps, so no update is owed from before them
        self._step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # already counts the step just taken
        if step == self._step:  # trainer.accumulate_grad_batches > 1: no optimizer step after this batch
            return
        self._step = step
        weight = 1.0 - min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self._avg, self._live, weight)
        for a, v in self._counters:
            a.copy_(v)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.average is None or trainer.sanity_checking:
            return
        self._raw = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        pl_module.model.load_state_dict(self.average)

    def on_validation_end(self, trainer, pl_module) -> None:
        # before ModelCheckpoint saves: checkpoints keep the raw weights to resume from
        if self._raw is not None:
            pl_module.model.load_state_dict(self._raw)
            self._raw = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.average is not None:
            checkpoint["ema_state_dict"] = {k: v.detach().cpu().clone() for k, v in self.average.items()}
            checkpoint["ema_decay"] = self.decay

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "ema_state_dict" in checkpoint:
            self.average = {k: v.clone() for k, v in checkpoint["ema_state_dict"].items()}


class BestEpoch(L.Callback):
    """The epoch of the weights a ModelCheckpoint (`checkpoint`, monitoring a score) holds as its best.

    ModelCheckpoint keeps the best score and path, not the epoch. Its best score changes only when it
    saves a better epoch, and every save asks the callbacks for their state right after that change:
    that is when this notes `trainer.current_epoch`. The epoch travels in every checkpoint, so a
    resumed run still knows it. `epoch` is None before the first best, and after resuming from a
    checkpoint written without this callback, until a better epoch comes.
    """

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.epoch: int | None = None
        self._score: float | None = None  # the best score `epoch` belongs to
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer, pl_module) -> None:
        # after a resume: a best score restored without our state belongs to an epoch we do not know
        best = self.checkpoint.best_model_score
        if self._score is None and best is not None:
            self._score = float(best)

    def state_dict(self) -> dict:
        # called while a checkpoint is written, after ModelCheckpoint updated its best score
        best = self.checkpoint.best_model_score
        if best is not None and float(best) != self._score and self._trainer is not None:
            self.epoch, self._score = self._trainer.current_epoch, float(best)
        return {"epoch": self.epoch, "score": self._score}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._score = state.get("epoch"), state.get("score")


class LastValidation(L.Callback):
    """`step`: trainer.global_step at the end of the last validation (None before one). The run's
    final `val/acc` is of its final weights only if that is the final step: with
    trainer.check_val_every_n_epoch > 1 the last epochs may go unvalidated, and a resumed run that
    had nothing left to train validates nothing."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step
