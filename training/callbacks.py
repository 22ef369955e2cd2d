"""Callbacks: throughput/wall-time accounting that survives a resume."""

from __future__ import annotations

import time

import lightning as L


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
            for logger in trainer.loggers:
                logger.log_metrics({"train/img_per_s": self._epoch_images / seconds, "train/epoch_seconds": seconds,
                                    "epoch": trainer.current_epoch}, step=trainer.global_step)

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
