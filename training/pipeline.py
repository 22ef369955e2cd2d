"""`train(cfg)`: what train.py runs, callable from tests too; and the helpers eval.py shares with
it (the Trainer from the `trainer` config, precision=auto, CPU threads). Evaluation: evaluate.py."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import models

from .allocator import keep_freed_memory
from .callbacks import BestEpoch, LastValidation
from .checkpoints import check_compatible, checkpoint_config, describe_model, model_state_dict, read_checkpoint
from .config import recipe_changes, to_plain
from .data import CifarDataModule
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .module import ClassifierModule
from .summary import write_summary

log = logging.getLogger(__name__)


def _one_copy_of_lightning_logs() -> None:
    """`import lightning` gives its logger a console handler of its own *and* lets records
    propagate; under Hydra (root logger configured: console + <run>/train.log) every line
    would print twice. Keep Hydra's."""
    if logging.getLogger().hasHandlers():
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)


_one_copy_of_lightning_logs()


def print_rank_zero(text: str) -> None:
    """Results go to stdout (rank 0 only) so they show whatever the logging setup."""
    if rank_zero_only.rank == 0:
        print(text, flush=True)


def native_bf16_cpu() -> bool:
    """Does this CPU do bf16 arithmetic in hardware (AVX512-BF16 or AMX)? Without it oneDNN emulates
    bf16 and a training step runs slower than in float32 (measurements: docs/training.md, "Precision,
    channels-last, compile")."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """`trainer.precision=auto`: bf16 autocast where the hardware computes in bf16 (CUDA GPUs that
    support it, CPUs with AVX512-BF16/AMX), otherwise full float32 (or fp16 autocast on older GPUs).
    Any other value is passed to Lightning unchanged."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if native_bf16_cpu() else "32-true"


def make_trainer(config: dict, run_dir: Path, callbacks: list, logger: Any = False, plugins: list | None = None) -> L.Trainer:
    """The Trainer from the `trainer` config group; a nested `_target_` (e.g. a DDPStrategy
    with the gloo backend) is instantiated by Hydra."""
    kwargs = {k: v for k, v in config["trainer"].items() if k != "_target_"}
    if "precision" in kwargs:
        kwargs["precision"] = resolve_precision(kwargs["precision"], str(kwargs.get("accelerator", "auto")))
    kwargs = instantiate(kwargs, _convert_="all") if any(isinstance(v, dict) and "_target_" in v for v in kwargs.values()) else kwargs
    return L.Trainer(**kwargs, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir), plugins=plugins)


class ReadOnce(TorchCheckpointIO):
    """Hands Lightning the checkpoint the pipeline already read (and checked) when `trainer.fit`
    resumes from `path`, so a resumed checkpoint is read from disk once; other paths load as usual."""

    def __init__(self, path: str | Path, ckpt: dict) -> None:
        super().__init__()
        self._path, self._ckpt = Path(path), ckpt

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if self._ckpt is not None and Path(path).resolve() == self._path.resolve():
            ckpt, self._ckpt = self._ckpt, None
            return ckpt
        return super().load_checkpoint(path, weights_only=weights_only)


# pip package of each logger in configs/logger/ that Lightning does not require
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def make_loggers(config: dict) -> list:
    """The loggers the `logger` group chose (configs/logger/: csv by default, several as
    logger=[csv,tensorboard]), instantiated. One whose package is missing is a ConfigError that
    names the pip package."""
    loggers = []
    for name, spec in (config.get("logger") or {}).items():
        try:
            loggers.append(instantiate(spec, _convert_="all"))
        except InstantiationException as err:
            cause = err.__cause__ or err
            if isinstance(cause, ModuleNotFoundError):
                package = LOGGER_PACKAGES.get(name, name)
                raise ConfigError(f"logger={name} needs the {package!r} package, which is not installed: "
                                  f"pip install {package} (or choose another logger, e.g. logger=[csv,tensorboard]). {cause}") from None
            raise ConfigError(f"logger.{name}: {cause}") from None
    return loggers


def make_callbacks(config: dict) -> dict[str, L.Callback]:
    """The `callbacks` group (configs/callbacks/), instantiated by name. An entry set to null is off,
    and so is `ema` while its decay (optim.ema_decay) is null or 0."""
    out = {}
    for name, spec in (config.get("callbacks") or {}).items():
        if spec is None or (name == "ema" and not spec.get("decay")):
            continue
        try:
            out[name] = instantiate(spec, _convert_="all")
        except InstantiationException as err:
            where = f"optim.ema_decay={spec['decay']}" if name == "ema" else f"callbacks.{name}"
            raise ConfigError(f"{where}: {err.__cause__ or err}") from None
    for needed in ("best_checkpoint", "last_checkpoint", "throughput"):
        if needed not in out:
            raise ConfigError(f"callbacks.{needed} is off, but the run needs it (best/last checkpoints, resume, the summary)")
    return out


def profile_model(model: torch.nn.Module, image_size: int = 32) -> dict[str, int]:
    """Params and mult-adds of a CPU fp32 copy (the training copy may be compiled or on a GPU)."""
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    return models.profile(probe, input_size=(1, 3, image_size, image_size))


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """`init_weights=<file>`: start from these weights (a train.py checkpoint's EMA, safetensors, a
    state_dict), e.g. to finish a run whose optimizer state is gone with a new, shorter schedule."""
    if not Path(path).is_file():
        raise ConfigError(f"init_weights={path}: no such file; name a checkpoint, safetensors or state_dict file, "
                          "or init_weights=null to start from a fresh initialisation")
    try:
        models.load_checkpoint(model, path)
    except models.CheckpointLoadError as err:
        raise ConfigError(f"init_weights={path} does not fit the model of this run:\n{err}") from None


def set_cpu_threads(config: dict) -> None:
    if config.get("cpu_threads"):
        torch.set_num_threads(int(config["cpu_threads"]))
    if config.get("keep_freed_memory", True):
        keep_freed_memory()


def _checkpoint_epoch(path: str) -> int | None:
    """The epoch stored in a checkpoint file (for messages, and for runs resumed from a checkpoint
    written before BestEpoch kept the best epoch)."""
    try:
        return int(read_checkpoint(path).get("epoch"))
    except (CheckpointError, TypeError, ValueError):
        return None


def warn_recipe_changes(ckpt_path: str, before: dict | None, config: dict) -> None:
    """A resume takes its settings from the command line, not from the checkpoint: say which
    differ from the run that wrote it, so a forgotten override does not pass silently (a longer
    trainer.max_epochs is usually meant; another lr or batch size rarely is)."""
    changes = recipe_changes(before, config) if before else []
    if changes:
        log.warning("resuming %s with settings that differ from the run that wrote it; the run continues with "
                    "this command's:\n  %s\nIf that is not meant, stop now, before an epoch overwrites last.ckpt, and "
                    "resume with the run's starting command plus ckpt_path.", ckpt_path, "\n  ".join(changes))


def full_size_from_weights(config: dict) -> None:
    """Turn data.progressive off (in `config`) for a run that starts from trained weights
    (pretrained, init_weights, qat), unless data.progressive.from_weights=true: the ramp is a
    from-scratch schedule, and a fine-tune's first epochs on 16x16 images would move the norms'
    statistics (and QAT's activation ranges) away from the size the weights were trained and are
    used at. Done before config.yaml is written, so the run records the recipe it trained."""
    progressive = (config.get("data") or {}).get("progressive") or {}
    starts_from = [key for key in ("pretrained", "init_weights", "qat") if config.get(key)]
    if progressive.get("min_size") is None or progressive.get("from_weights") or not starts_from:
        return
    log.info("progressive resizing off: this run starts from trained weights (%s), so it trains at full size "
             "throughout (data.progressive.from_weights=true keeps the ramp)", ", ".join(starts_from))
    progressive["min_size"] = None


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`, then test the final weights (their EMA); returns the summary.

    `callbacks` are extra Lightning callbacks (tests use them to inject faults).
    """
    start = time.perf_counter()
    config = to_plain(cfg)
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(config["seed"]), workers=True, verbose=False)
    set_cpu_threads(config)
    full_size_from_weights(config)

    # Everything a user can get wrong is checked before the first step: data, model, checkpoint.
    datamodule = CifarDataModule(config["data"], seed=int(config["seed"]), distill=config.get("distill"),
                                 schedule_epochs=(config.get("optim") or {}).get("epochs"))
    if int(config["data"].get("batch_size") or 0) == 1:
        # the networks' last maps are 1x1 with stem=imagenet or progressive resizing's small sizes, where
        # BatchNorm would get one value per channel and torch fails at the first step with its own words
        raise ConfigError("data.batch_size=1: training needs at least 2 images per batch, because BatchNorm "
                          "normalizes each channel over the batch; use e.g. data.batch_size=256 (or 2 and up on "
                          "little memory)")
    datamodule.locate()
    teacher = datamodule.check_teacher()
    datamodule.check_progressive()
    if teacher:  # saved with the config in every checkpoint, so an export card can name the teacher
        config["distill"]["teacher"] = teacher["teacher"]
    module = ClassifierModule(config)
    ckpt_path = config.get("ckpt_path")
    if config.get("init_weights") and not ckpt_path:
        # here, not in the module: eval.py and export rebuild the module from a checkpoint's config,
        # where this file need not exist any more (a resume restores its own weights instead)
        load_init_weights(module.model, config["init_weights"])
    cost = profile_model(module.model)
    plugins = None
    if ckpt_path:  # read once: checked here, then handed to trainer.fit to resume from
        ckpt = read_checkpoint(ckpt_path)
        check_compatible(module.model.state_dict(), model_state_dict(ckpt), ckpt_path,
                         expected_desc=describe_model(config["model"]),
                         found_desc=describe_model((checkpoint_config(ckpt) or {}).get("model")))
        if (checkpoint_config(ckpt) or {}).get("qat") and not config.get("qat"):
            # its `qat.*` activation ranges would not load into a float run
            raise ConfigError(f"{ckpt_path} was trained with qat=true (quantization-aware fine-tuning): resume it with "
                              "qat=true; evaluate it with eval.py ckpt_path=... eval.int8=true")
        warn_recipe_changes(ckpt_path, checkpoint_config(ckpt), config)
        plugins = [ReadOnce(ckpt_path, ckpt)]
        del ckpt

    named = make_callbacks(config)
    checkpoint, last, meter, ema = named["best_checkpoint"], named["last_checkpoint"], named["throughput"], named.get("ema")
    best_epoch, validated = BestEpoch(checkpoint), LastValidation()
    trainer = make_trainer(config, run_dir, [*named.values(), best_epoch, validated, *callbacks], make_loggers(config),
                           plugins=plugins)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))

    try:
        with warnings.catch_warnings():
            if ckpt_path:  # resuming into its own folder is the point, not a mistake
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path or None, weights_only=True)
    except NonFiniteLossError as err:
        last_path = run_dir / "checkpoints" / "last.ckpt"
        kept = (f"The last good checkpoint is kept: {last_path} (end of epoch {_checkpoint_epoch(str(last_path))}); "
                f"resume from it with ckpt_path={last_path} after changing the settings.") if last_path.is_file() \
            else "No epoch finished, so there is no checkpoint to keep."
        raise NonFiniteLossError(f"{err}\n{kept}") from None

    best_path = checkpoint.best_model_path or last.best_model_path
    final_val = trainer.callback_metrics.get("val/acc")
    if final_val is None or validated.step != trainer.global_step:
        # the final weights went unvalidated (trainer.check_val_every_n_epoch > 1, or a resume with
        # nothing left to train): validate them now, their EMA swapped in as every epoch's validation does
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        final_val = results[0].get("val/acc") if results else None
    test_acc = None
    if datamodule.has_test and last.best_model_path:
        # the final weights (their EMA when the run kept one): what last.ckpt holds and export ships,
        # never the best epoch
        if ema is not None and ema.average is not None:
            module.model.load_state_dict(ema.average)
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        test_acc = float(results[0]["test/acc"]) if results else None
    best_score = checkpoint.best_model_score
    best_at = best_epoch.epoch
    if best_at is None and best_path:  # resumed from a checkpoint written before BestEpoch, or no validation
        best_at = _checkpoint_epoch(best_path)
    summary = {
        "model": config["model"]["name"],
        "model_config": config["model"],
        "data": config["data"]["name"],
        "params": cost["params"],
        "macs": cost["macs"],
        "final_val_acc": float(final_val) if final_val is not None else None,
        "ema_decay": ema.decay if ema is not None else None,
        "qat": bool(config.get("qat")),  # the accuracies are of the simulated int8 model
        "teacher": teacher["teacher"]["name"] if teacher else None,
        "precision": str(trainer.precision),  # what trainer.precision=auto resolved to
        "best_val_acc": float(best_score) if best_score is not None else None,
        "best_epoch": best_at,
        "test_acc": test_acc,
        "test_split": "test" if datamodule.has_test else None,
        "epochs": trainer.current_epoch,
        # this session (setup, fit, test) plus the fit time of earlier legs of a resumed run
        "wall_seconds": meter.prior_seconds + time.perf_counter() - start,
        "images_per_second": meter.images_per_second,
        "train_images": meter.train_images,
        "best_ckpt": best_path,
        "last_ckpt": last.best_model_path,
        "run_dir": str(run_dir),
    }
    if trainer.is_global_zero:
        table = write_summary(run_dir, summary)
        print_rank_zero(f"\nRun folder: {run_dir}\n{table}\n")
    return summary
