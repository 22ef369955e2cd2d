"""The LightningModule: a zoo model, its loss, optimizer, schedule and per-stage metrics."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

import models

from .errors import ConfigError, NonFiniteLossError
from .models import build_model

IGNORE = -1  # label of the padding the fast loader adds so every DDP rank sees the same batch count


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None, norm_lr_factor: float = 1.0) -> list[dict]:
    """Weight decay on conv/linear weights only: norms' scales and all biases (1-D) are exempt.
    `norm_lr_factor` (with `lr`) gives those 1-D parameters a learning rate `lr * norm_lr_factor`;
    schedules scale both groups' rates alike."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    norms = {"params": no_decay, "weight_decay": 0.0}
    if norm_lr_factor != 1.0:
        if lr is None:
            raise ValueError("norm_lr_factor needs the base lr")
        norms["lr"] = lr * norm_lr_factor
    return [{"params": decay, "weight_decay": weight_decay}, norms]


def warmup_cosine(step: int, total: int, warmup: int, start_factor: float, final_factor: float) -> float:
    """LR multiplier: linear warm-up from `start_factor` to 1, then cosine down to `final_factor`."""
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(step: int, total: int, warmup: int, start_factor: float, final_factor: float) -> float:
    """LR multiplier: linear warm-up from `start_factor` to 1, then a straight line down to `final_factor`."""
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_factor + (1.0 - final_factor) * (1.0 - progress)


# -- schedules the optim/scheduler configs name: scheduler(optimizer, total_steps=..., warmup_steps=...) --


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                           start_factor: float = 0.1, final_factor: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """The default: `warmup_cosine` per step, as a LambdaLR."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps, start_factor, final_factor))


def warmup_linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                           start_factor: float = 0.1, final_factor: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """`warmup_linear` per step, as a LambdaLR: the linear decay to zero the recipe A/B sets against cosine."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear(s, total_steps, warmup_steps, start_factor, final_factor))


class OneCycle(torch.optim.lr_scheduler.OneCycleLR):
    """torch's OneCycleLR, which raises mid-run once stepped past `total_steps`: a checkpoint whose
    schedule has another length (a resume with another trainer.max_epochs or optim.epochs) is refused
    when it is loaded, with the fix, instead of failing with torch's error at that step."""

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("total_steps") != self.total_steps:
            raise ConfigError(
                f"the checkpoint's one-cycle schedule spans {state_dict.get('total_steps')} steps and this run's "
                f"{self.total_steps}: a one-cycle schedule cannot be stretched, so resume with the trainer.max_epochs "
                "(and optim.epochs) the run was started with, or start a new run from its weights (init_weights=<ckpt>)")
        super().load_state_dict(state_dict)


def one_cycle_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, max_lr: float,
                       cycle_momentum: bool = True) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's OneCycleLR, rising to `max_lr` over the warm-up steps."""
    if warmup_steps >= total_steps:  # OneCycleLR needs steps left after the rise (else it divides by zero)
        raise ConfigError(f"optim.warmup_epochs is as long as the schedule or longer ({warmup_steps} of {total_steps} "
                          "steps): give fewer warm-up epochs or more trainer.max_epochs")
    return OneCycle(optimizer, max_lr=float(max_lr), total_steps=total_steps,
                    pct_start=max(warmup_steps / total_steps, 1e-3), cycle_momentum=cycle_momentum)


def constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


OPTIMIZERS = {"sgd": "torch.optim.SGD", "adamw": "torch.optim.AdamW"}  # optim.name -> target
SCHEDULES = {"cosine": f"{__name__}.warmup_cosine_schedule", "linear": f"{__name__}.warmup_linear_schedule",
             "onecycle": f"{__name__}.one_cycle_schedule", "constant": f"{__name__}.constant_schedule"}  # optim.schedule -> target


def optim_targets(optim: dict) -> tuple[dict, dict]:
    """The `optimizer` and `scheduler` targets of an optim config.

    A checkpoint written before the optim configs held them has only the plain keys (name, lr,
    momentum, nesterov, schedule, ...): it gets the targets those keys meant then, so rebuilding an
    old run trains as it did. In a config with targets, `name` and `schedule` describe them; one
    edited on its own (`optim.schedule=onecycle`) would change nothing, so that is an error saying
    which config to choose instead.
    """
    if "optimizer" in optim and "scheduler" in optim:
        for key, table, spec, choose in (("name", OPTIMIZERS, optim["optimizer"], "optim="),
                                         ("schedule", SCHEDULES, optim["scheduler"], "optim/scheduler=")):
            value, target = optim.get(key), spec.get("_target_")
            if value in table and target in table.values() and table[value] != target:
                raise ConfigError(f"optim.{key}={value!r} but the config's target is {target}: choose it with {choose}{value}")
        return optim["optimizer"], optim["scheduler"]
    name, lr, schedule = optim.get("name", "sgd"), float(optim["lr"]), optim.get("schedule", "cosine")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r}: choose sgd or adamw")
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r}: choose cosine, linear, onecycle or constant")
    opt = {"sgd": {"momentum": float(optim.get("momentum", 0.9)), "nesterov": bool(optim.get("nesterov", True))},
           "adamw": {}}[name]
    warm = {"start_factor": float(optim.get("warmup_start_factor", 0.1)), "final_factor": float(optim.get("final_lr_factor", 0.0))}
    sched = {"cosine": warm, "linear": warm,
             "onecycle": {"max_lr": lr, "cycle_momentum": name == "sgd"},
             "constant": {}}[schedule]
    return ({"_target_": OPTIMIZERS[name], "_partial_": True, "lr": lr, **opt},
            {"_target_": SCHEDULES[schedule], "_partial_": True, **sched})


def check_lr(optim: dict) -> None:
    """A negative learning rate is a ConfigError naming the key, before anything is built (torch's
    optimizers would refuse it only when fit starts, with a traceback)."""
    for key, lr in (("optim.lr", optim.get("lr")), ("optim.optimizer.lr", (optim.get("optimizer") or {}).get("lr"))):
        if lr is not None and not (isinstance(lr, (int, float)) and lr >= 0):
            raise ConfigError(f"{key}={lr}: a learning rate is a number of 0 or more, e.g. optim.lr=0.2 (optim=sgd) "
                              "or optim.lr=2e-3 (optim=adamw), the defaults at data.batch_size=256")


def _instantiate(spec: dict, where: str):
    try:
        return instantiate(spec, _convert_="all")
    except InstantiationException as err:
        raise ConfigError(f"{where}: {err.__cause__ or err}") from None


def call_with(factory: Callable, *args: Any, **available: Any) -> Any:
    """`factory(*args, **kw)` with those of the `available` keywords that its signature names and
    that it was not already given (a partial's keywords, i.e. the config, win)."""
    params = inspect.signature(factory).parameters
    bound = getattr(factory, "keywords", {}) or {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return factory(*args, **{k: v for k, v in available.items() if (takes_any or k in params) and k not in bound})


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (Hinton et al. 2015).
    The T^2 keeps the term's gradients the size of the cross-entropy's as T grows."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def qat_simulator(config: dict, model: nn.Module) -> models.QATSimulator | None:
    """`qat=true`: a `models.prepare_qat` simulator of what eval.py's `eval.int8=true` will compute
    (`models.quantize`'s default float_layers: the stem conv stays float32); None when off."""
    qat = config.get("qat", False)  # absent from checkpoints written before QAT
    if qat in (False, None):
        return None
    if qat is not True:
        raise ConfigError(f"qat={qat!r}: choose qat=true (quantization-aware fine-tuning) or qat=false")
    if config.get("compile"):
        # the simulation swaps in fake-quantized weights and hooks the layers on every call, which
        # torch.compile would trace anew or break on; a few fine-tuning epochs do not need it
        raise ConfigError("qat=true runs the model eagerly and does not work with compile=true: set compile=false")
    return models.prepare_qat(model, float_layers=models.int8.DEFAULT_FLOAT_LAYERS)


def _accuracy(num_classes: int, top_k: int = 1) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes, top_k=min(top_k, num_classes), average="micro", ignore_index=IGNORE)


def _deferred_reads(device: torch.device) -> bool:
    """Whether reading a value of `device` back to the host stalls it (every accelerator; not a CPU)."""
    return device.type != "cpu"


class ClassifierModule(L.LightningModule):
    """Image classifier around `models.create_model`.

    `config` is the whole resolved run config as plain dicts: it is saved in every checkpoint
    (`hyper_parameters`), which is all `eval.py` needs to rebuild the model, and plain data keeps
    checkpoints loadable with `torch.load(weights_only=True)`. `tta`: average each image's
    prediction with its horizontal mirror's when evaluating.
    """

    def __init__(self, config: dict, tta: bool = False):
        super().__init__()
        self.save_hyperparameters("config")  # the config only: `tta` is how this process evaluates, not the run
        self.config = config
        data, optim = config["data"], config.get("optim") or {}
        self.num_classes = int(data["num_classes"])
        self.class_names = list(data.get("classes") or range(self.num_classes))
        check_lr(optim)
        self.model = build_model(config["model"], self.num_classes, pretrained=bool(config.get("pretrained", False)))
        self.label_smoothing = float(optim.get("label_smoothing", 0.0))
        distill = config.get("distill") or {}  # absent from checkpoints written before distillation
        self.distill_alpha = float(distill.get("alpha", 0.5))
        self.distill_temperature = float(distill.get("temperature", 4.0))
        self.channels_last = bool(config.get("channels_last", False))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # qat=true: training, validation and test forward passes run the model as its int8 version
        # will compute (models/qat.py), so val/acc is the simulated int8 accuracy. The simulator's
        # activation ranges are this module's `qat.*` state, beside `model.*`: checkpoints carry
        # them and resume exactly, and the model's own keys (what eval.py and export read) are unchanged.
        self.qat = qat_simulator(config, self.model)
        self.tta = bool(tta)  # flip test-time augmentation in validation/test steps (eval.py's eval.tta)
        # Logged as metric objects: Lightning computes them (synced across DDP ranks) at the end of
        # each epoch and resets them. Metric states are not saved in checkpoints.
        # The training loss is checked for NaN/inf by _check_finite; the metric's own check would read
        # it back to the host every step (a GPU sync), so it is off.
        self.train_acc, self.train_loss = _accuracy(self.num_classes), MeanMetric(nan_strategy="disable")
        self.val_acc, self.val_acc_top5, self.val_loss = _accuracy(self.num_classes), _accuracy(self.num_classes, 5), MeanMetric()
        self.test_acc, self.test_acc_top5, self.test_loss = _accuracy(self.num_classes), _accuracy(self.num_classes, 5), MeanMetric()
        self.test_confusion = MulticlassConfusionMatrix(self.num_classes, ignore_index=IGNORE)
        self.test_report: dict[str, Any] = {}
        self._finite: torch.Tensor | None = None  # the NaN guard's flag while its read is deferred (below)
        self._finite_since = 0

    def setup(self, stage: str) -> None:
        # Compile in place (keeps state_dict keys); lazily, so params/MACs are counted uncompiled.
        if stage == "fit" and self.config.get("compile", False) and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.qat is not None:
            return self.qat(self.model, x)
        return self.model(x)

    # -- training ----------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, *teacher = batch  # the fast loader adds the teacher's logits when distill.logits is set
        logits = self(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing, ignore_index=IGNORE)
        if teacher:
            kd = distillation_loss(logits, teacher[0], self.distill_temperature)
            loss = (1.0 - self.distill_alpha) * loss + self.distill_alpha * kd
            self.log("train/kd_loss_step", kd.detach(), on_step=True, on_epoch=False)
        self._check_finite(loss)
        self.train_loss.update(loss.detach(), weight=len(y))
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        # progress-bar values are read back to the host every step (a GPU sync): only for a bar someone sees
        bar = self.trainer.progress_bar_callback is not None
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=bar)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, prog_bar=bar)
        return loss

    # -- the NaN guard ---------------------------------------------------------------------------
    # Reading a loss on a CPU costs nothing, so it is checked every step. On a GPU, reading it back
    # makes the host wait for the device every step, which costs small networks much of their speed:
    # there the check stays on the device and is read every FINITE_CHECK_STEPS steps and before any
    # checkpoint is written, so broken weights are never saved either way.
    FINITE_CHECK_STEPS = 50

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        if not _deferred_reads(loss.device):
            ok = bool(finite)
            self._raise_unless_finite(ok, f"at step {self.global_step}", None if ok else loss.item())
            return
        if self._finite is None:
            self._finite, self._finite_since = finite, self.global_step
        else:
            self._finite = self._finite & finite
        if (self.global_step + 1) % self.FINITE_CHECK_STEPS == 0:
            self._read_finite_check()

    def _read_finite_check(self) -> None:
        """Read the device-side NaN guard (steps since the last read) and raise if any loss was not finite."""
        finite, self._finite = self._finite, None
        if finite is None:
            return
        self._raise_unless_finite(bool(finite), f"at a step from {self._finite_since} to {self.global_step}", None)

    def _raise_unless_finite(self, ok: bool, where: str, value: float | None) -> None:
        bad = not ok
        if self.trainer.world_size > 1:  # all ranks stop together, or the others hang in all-reduce
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            became = f"became {value}" if value is not None else "became nan or inf"
            raise NonFiniteLossError(
                f"the training loss {became} at epoch {self.current_epoch}, {where}; "
                "training stopped before saving the broken weights. Lower optim.lr, keep warm-up on, "
                "or try trainer.precision=32-true."
            )

    def on_train_epoch_end(self) -> None:
        self._read_finite_check()

    # -- evaluation --------------------------------------------------------------------------

    def _eval_step(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Update and log the stage's metrics (val or test); returns the logits and labels."""
        x, y = batch
        logits = self(x).float()
        if self.tta:  # average the class probabilities of the image and its mirror
            probs = (logits.softmax(-1) + self(x.flip(-1)).float().softmax(-1)) / 2
            logits = probs.clamp_min(1e-12).log()
        acc, acc_top5, loss_metric = (self.val_acc, self.val_acc_top5, self.val_loss) if stage == "val" else \
            (self.test_acc, self.test_acc_top5, self.test_loss)
        valid = y != IGNORE
        if valid.any():
            # plain cross-entropy (no smoothing) so eval losses compare across recipes
            loss_metric.update(F.cross_entropy(logits[valid], y[valid]), weight=int(valid.sum()))
        acc.update(logits, y)
        acc_top5.update(logits, y)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc_top5", acc_top5, on_step=False, on_epoch=True)
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return logits, y

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self.test_confusion.update(*self._eval_step(batch, "test"))

    def on_test_epoch_end(self) -> None:
        # Lightning logs and resets the scalars after this hook (compute() caches, so the values
        # match); the confusion matrix is the report's own.
        confusion = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
        per_class = confusion.diag().float() / confusion.sum(1).clamp_min(1).float()
        self.test_report = {
            "top1": float(self.test_acc.compute()),
            "top5": float(self.test_acc_top5.compute()),
            "loss": float(self.test_loss.compute()),
            "num_images": int(confusion.sum()),
            "per_class": {str(name): float(acc) for name, acc in zip(self.class_names, per_class)},
            "confusion": confusion.tolist(),
            "classes": [str(c) for c in self.class_names],
        }

    # -- exact resume ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._read_finite_check()  # the NaN guard first: raising here leaves the previous checkpoint in place
        # Dropout draws from torch's global RNG; saving it makes a resumed run draw what the
        # uninterrupted one would have (data order/augmentation derive from (seed, epoch)).
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if self.qat is not None and state is not None and not any(k.startswith("qat.") for k in state):
            # qat=true continuing a float run: its weights, fresh activation ranges
            state.update({f"qat.{k}": v for k, v in self.qat.state_dict().items()})
        states = checkpoint.get("rng_states") or {}
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])

    # -- optimizer and schedule --------------------------------------------------------------

    def configure_optimizers(self):
        """The optim config's `optimizer` over `param_groups`, and its `scheduler` stepped every batch,
        given the step counts it asks for (total_steps, warmup_steps, steps_per_epoch)."""
        cfg = self.config.get("optim") or {}
        opt_spec, sched_spec = optim_targets(cfg)
        factor = float(cfg.get("norm_lr_factor", 1.0))  # absent from checkpoints written before it
        if not factor > 0:
            raise ConfigError(f"optim.norm_lr_factor={factor}: give a positive factor (1.0: the same lr as the weights)")
        groups = param_groups(self.model, float(cfg.get("weight_decay", 0.0)), float(cfg["lr"]) if "lr" in cfg else None, factor)
        opt = _instantiate(opt_spec, "optim.optimizer")(groups)

        # The schedule spans optim.epochs (default: trainer.max_epochs), so a run stopped early
        # and resumed follows the same curve as one that ran through.
        self.trainer.estimated_stepping_batches  # noqa: B018  (sets num_training_batches)
        steps_per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        epochs = float(cfg.get("epochs") or self.trainer.max_epochs)
        if cfg.get("schedule") == "onecycle" and epochs < self.trainer.max_epochs:  # OneCycleLR raises past its end
            raise ConfigError(f"optim.epochs={cfg.get('epochs')} is shorter than trainer.max_epochs={self.trainer.max_epochs}, "
                              "and a one-cycle schedule cannot step past its end: leave optim.epochs unset, or set "
                              "trainer.max_epochs to it")
        total = max(1, int(epochs * steps_per_epoch))
        warmup = int(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch)
        sched = call_with(_instantiate(sched_spec, "optim.scheduler"), opt, total_steps=total, warmup_steps=warmup,
                          steps_per_epoch=steps_per_epoch)
        lrs = [g["lr"] for g in opt.param_groups]
        if factor != 1.0 and lrs[0] > 0 and abs(lrs[1] / lrs[0] - factor) > 1e-6 * factor:
            raise ConfigError(f"optim.norm_lr_factor={factor} needs a schedule that scales each group's own lr "
                              f"(optim/scheduler=cosine, linear or constant); {sched_spec.get('_target_')} sets one lr for all")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
