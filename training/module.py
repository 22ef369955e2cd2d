"""The LightningModule: a zoo model, its loss, optimizer, schedule and per-stage metrics."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

import models

from .errors import ConfigError, NonFiniteLossError

IGNORE = -1  # label of the padding the fast loader adds so every DDP rank sees the same batch count


def build_model(model_cfg: dict, num_classes: int, pretrained: bool = False) -> nn.Module:
    """`models.create_model` from a model config section; its ValueError/KeyError (unknown name,
    option or pretrained entry) becomes a ConfigError that keeps its message."""
    cfg = dict(model_cfg)
    name = cfg.pop("name", None)
    kwargs = dict(cfg.pop("kwargs", None) or {})
    cfg.pop("num_classes", None)
    try:
        return models.create_model(name, num_classes=int(num_classes), pretrained=bool(pretrained), **cfg, **kwargs)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ConfigError(f"cannot build model {name!r}: {msg}") from err


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: norms' scales and all biases (1-D) are exempt."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int, start_factor: float, final_factor: float) -> float:
    """LR multiplier: linear warm-up from `start_factor` to 1, then cosine down to `final_factor`."""
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _stage_metrics(num_classes: int, per_class: bool = False) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=IGNORE),
        "acc_top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", ignore_index=IGNORE),
    }
    if per_class:
        metrics["confusion"] = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE)
    return MetricCollection(metrics)


class ClassifierModule(L.LightningModule):
    """Image classifier around `models.create_model`.

    `config` is the whole resolved run config as plain dicts: it is saved in every checkpoint
    (`hyper_parameters`), which is all `eval.py` needs to rebuild the model, and plain data keeps
    checkpoints loadable with `torch.load(weights_only=True)`.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.config = config
        data, optim = config["data"], config.get("optim") or {}
        self.num_classes = int(data["num_classes"])
        self.class_names = list(data.get("classes") or range(self.num_classes))
        self.model = build_model(config["model"], self.num_classes, pretrained=bool(config.get("pretrained", False)))
        self.label_smoothing = float(optim.get("label_smoothing", 0.0))
        self.channels_last = bool(config.get("channels_last", False))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.tta = False  # flip test-time augmentation, switched on by eval.py
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro", ignore_index=IGNORE)
        self.train_loss = MeanMetric()
        self.val_metrics = _stage_metrics(self.num_classes)
        self.val_loss = MeanMetric()
        self.test_metrics = _stage_metrics(self.num_classes, per_class=True)
        self.test_loss = MeanMetric()
        self.test_report: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        # Compile in place (keeps state_dict keys); lazily, so params/MACs are counted uncompiled.
        if stage == "fit" and self.config.get("compile", False) and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    # -- training ----------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing, ignore_index=IGNORE)
        self._check_finite(loss)
        self.train_loss.update(loss.detach(), weight=len(y))
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.world_size > 1:  # all ranks stop together, or the others hang in all-reduce
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "training stopped before saving the broken weights. Lower optim.lr, keep warm-up on, "
                "or try trainer.precision=32-true."
            )

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss.compute())
        self.log("train/acc", self.train_acc.compute())
        self.train_loss.reset()
        self.train_acc.reset()

    # -- evaluation --------------------------------------------------------------------------

    def _eval_step(self, batch, metrics: MetricCollection, loss_metric: MeanMetric) -> None:
        x, y = batch
        logits = self(x).float()
        if self.tta:  # average the class probabilities of the image and its mirror
            probs = (logits.softmax(-1) + self(x.flip(-1)).float().softmax(-1)) / 2
            logits = probs.clamp_min(1e-12).log()
        valid = y != IGNORE
        if valid.any():
            # plain cross-entropy (no smoothing) so eval losses compare across recipes
            loss = F.cross_entropy(logits[valid], y[valid])
            loss_metric.update(loss, weight=int(valid.sum()))
        metrics.update(logits, y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log("val/acc", values["acc"], prog_bar=True)
        self.log("val/acc_top5", values["acc_top5"])
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_metrics.reset()
        self.val_loss.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_loss)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        loss = self.test_loss.compute()
        confusion = values["confusion"].cpu()
        per_class = confusion.diag().float() / confusion.sum(1).clamp_min(1).float()
        self.log("test/acc", values["acc"])
        self.log("test/acc_top5", values["acc_top5"])
        self.log("test/loss", loss)
        self.test_report = {
            "top1": float(values["acc"]),
            "top5": float(values["acc_top5"]),
            "loss": float(loss),
            "num_images": int(confusion.sum()),
            "per_class": {str(name): float(acc) for name, acc in zip(self.class_names, per_class)},
            "confusion": confusion.tolist(),
            "classes": [str(c) for c in self.class_names],
        }
        self.test_metrics.reset()
        self.test_loss.reset()

    # -- exact resume ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Dropout draws from torch's global RNG; saving it makes a resumed run draw what the
        # uninterrupted one would have (data order/augmentation derive from (seed, epoch)).
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states") or {}
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])

    # -- optimizer and schedule --------------------------------------------------------------

    def configure_optimizers(self):
        cfg = self.config.get("optim") or {}
        groups = param_groups(self.model, float(cfg.get("weight_decay", 0.0)))
        name = cfg.get("name", "sgd")
        if name == "sgd":
            opt = torch.optim.SGD(groups, lr=float(cfg["lr"]), momentum=float(cfg.get("momentum", 0.9)), nesterov=bool(cfg.get("nesterov", True)))
        elif name == "adamw":
            opt = torch.optim.AdamW(groups, lr=float(cfg["lr"]))
        else:
            raise ConfigError(f"optim.name={name!r}: choose sgd or adamw")

        # The schedule spans optim.epochs (default: trainer.max_epochs), so a run stopped early
        # and resumed follows the same curve as one that ran through.
        self.trainer.estimated_stepping_batches  # noqa: B018  (sets num_training_batches)
        steps_per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        epochs = float(cfg.get("epochs") or self.trainer.max_epochs)
        total = max(1, int(epochs * steps_per_epoch))
        warmup = int(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch)
        schedule = cfg.get("schedule", "cosine")
        if schedule == "cosine":
            start, final = float(cfg.get("warmup_start_factor", 0.1)), float(cfg.get("final_lr_factor", 0.0))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup, start, final))
        elif schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=float(cfg["lr"]), total_steps=total, pct_start=max(warmup / total, 1e-3),
                cycle_momentum=name == "sgd",
            )
        elif schedule == "constant":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        else:
            raise ConfigError(f"optim.schedule={schedule!r}: choose cosine, onecycle or constant")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
