"""Cache a teacher's logits for every view of every training image, once, for distillation.

    python -m tools.teacher_logits --teacher resnet20 --data-root ../shared/data/cifar10
    python -m tools.teacher_logits --teacher runs/pretrained/resnet20/checkpoints/last.ckpt \\
        --data-root ../shared/data/cifar10 [--out FILE] [--step 2] [data.val_size=... data.split_seed=...]

The teacher is a shipped entry (`models.create_model(name, pretrained=True)`) or a run's checkpoint
(its weight EMA when it has one). It runs in eval mode over the training part of the fixed stratified
split (the data config's val_size/split_seed: validation images are never seen) in every view of the
grid the fast loader then draws from: crop offsets on multiples of --step inside the
data.augment.crop_padding pad, times both flips (pad 4, step 2: 5 x 5 x 2 = 50 views, about 50 MB of
fp16 for CIFAR's 45,000 training images). Cost: one teacher forward per view per image, once, under
bf16 autocast on a CPU that computes bf16 (as `precision=auto` trains there), else in float32.

Writes `{"logits": fp16 (N_train, views, classes), "meta": {...}}` (torch.save, plain data) with the
teacher's identity, the data fingerprint, split, padding, grid step, normalisation and the teacher's
accuracy on the un-augmented view; `train.py distill.logits=FILE` checks the metadata against its run.
Trailing `data.*` overrides compose configs/data like train.py does.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import models
from training.checkpoints import checkpoint_config, describe_model, load_state_into, model_state_dict, read_checkpoint
import training.config  # noqa: F401  (registers the resolvers the train config uses)
from training.data import CifarDataModule, batch_crop, batch_flip, grid_views, normalize, normalizer, teacher_data_meta
from training.errors import ConfigError, exit_on_user_error
from training.pipeline import native_bf16_cpu
from training.models import build_model

REPO = Path(__file__).resolve().parents[1]


def load_teacher(teacher: str) -> tuple[nn.Module, dict, dict | None, str | None]:
    """(model in eval mode, identity, its input normalisation {"mean", "std"} or None for the data's,
    the data set it was trained on)."""
    path = Path(teacher).expanduser()
    if path.is_file() or teacher.endswith(".ckpt"):
        ckpt = read_checkpoint(path)
        config = checkpoint_config(ckpt)
        if not config:
            raise ConfigError(f"{path} has no run config (hyper_parameters.config): pass a checkpoint written by train.py")
        model = build_model(config["model"], int(config["data"]["num_classes"]))
        # the weight EMA when the run kept one: what export ships
        load_state_into(model, model_state_dict(ckpt), path)
        epoch = ckpt.get("epoch")
        ema = "ema_state_dict" in ckpt
        identity = {"kind": "checkpoint", "arg": teacher, "path": str(path.resolve()), "epoch": epoch, "ema": ema,
                    "model": describe_model(config["model"]),
                    "name": f"{path} (epoch {epoch}{', weight EMA' if ema else ''}; {describe_model(config['model'])})"}
        data = config["data"]
        norm = {"mean": data.get("mean"), "std": data.get("std")} if data.get("mean") is not None else None
        return model.eval(), identity, norm, data.get("name")
    if teacher not in models.list_pretrained():
        raise ConfigError(f"--teacher {teacher!r} is neither a checkpoint file nor a shipped entry; "
                          f"shipped: {', '.join(models.list_pretrained())}")
    card = models.pretrained_meta(teacher)
    model = models.create_model(teacher, pretrained=True)
    identity = {"kind": "pretrained", "arg": teacher, "entry": teacher, "sha256": card["sha256"],
                "name": f"{teacher} (shipped, sha256 {card['sha256'][:12]})"}
    return model.eval(), identity, {"mean": card["mean"], "std": card["std"]}, card.get("dataset")


def data_config(name: str | None, root: str, overrides: list[str]) -> dict:
    """configs/data/<name>.yaml as train.py composes it, with data.root and the trailing overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    bad = [o for o in overrides if not o.lstrip("+~").startswith(("data.", "data="))]
    if bad:
        raise ConfigError(f"only data.* overrides apply here (the split and padding the logits are for), not {bad}")
    choice = [f"data={name}"] if name and not any(o.startswith("data=") for o in overrides) else []
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*choice, f"data.root={root}", *overrides])
    return OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[return-value]


@torch.inference_mode()
def teacher_logits(model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float], pad: int, step: int,
                   batch_size: int = 512, device: str | torch.device = "cpu", progress: bool = True,
                   partial: Path | None = None, key: str = "", save_every_s: float = 300.0,
                   bf16: bool = False) -> torch.Tensor:
    """fp16 logits (N, views, classes) of `model` on every view of `grid_views(pad, step)` of the uint8
    images: the crops and flips `batch_crop`/`batch_flip` make in training, normalised the same way.
    `bf16`: the forwards run under bf16 autocast (`make` asks for it where training would use it).

    `partial`: a file the finished batches are saved to every `save_every_s` seconds, and resumed
    from when it was written for the same `key` (teacher, data, grid, batch size): on a CPU the
    teacher runs for hours, and a killed queue must not start it over."""
    device = torch.device(device)
    model = model.to(device).to(memory_format=torch.channels_last)
    views = grid_views(pad, step)
    scale, shift = normalizer(mean, std, device)
    out, first, start = None, 0, time.perf_counter()
    batches = math.ceil(len(images) / batch_size)
    if partial is not None and partial.is_file():
        saved = torch.load(partial, weights_only=True)
        if saved.get("key") == key:
            out, first = saved["logits"], int(saved["done_batches"])
            print(f"  resuming from {partial}: {first}/{batches} batches done", flush=True)
    last_save = time.perf_counter()
    for b in range(first, batches):
        x = images[b * batch_size:(b + 1) * batch_size].to(device)
        n = len(x)
        for v, (dx, dy, flip) in enumerate(views):
            view = batch_crop(x, torch.full((n,), dx), torch.full((n,), dy), pad) if pad else x
            view = batch_flip(view, torch.full((n,), flip))
            view = normalize(view, scale, shift).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(view).float()
            if out is None:
                out = torch.empty(len(images), len(views), logits.shape[1], dtype=torch.float16)
            out[b * batch_size:b * batch_size + n, v] = logits.half().cpu()
        if partial is not None and (time.perf_counter() - last_save > save_every_s) and b + 1 < batches:
            tmp = partial.with_suffix(".tmp")
            torch.save({"key": key, "done_batches": b + 1, "logits": out}, tmp)
            tmp.replace(partial)  # a kill mid-save leaves the previous partial file whole
            last_save = time.perf_counter()
        if progress:
            done, spent = b + 1 - first, time.perf_counter() - start
            seen = min((b + 1) * batch_size, len(images))
            rate = done * batch_size * len(views) / spent
            print(f"  {seen}/{len(images)} images x {len(views)} views, "
                  f"{spent:.0f} s, {rate:.0f} forwards/s, about {spent / done * (batches - b - 1):.0f} s left", flush=True)
    return out


def default_out(data_cfg: dict, meta: dict) -> Path:
    teacher = meta["teacher"]
    tag = teacher.get("entry") or Path(teacher["path"]).parent.parent.name + f"-e{teacher.get('epoch')}"
    return (Path(str(data_cfg.get("cache_dir") or "data_cache")) / "teacher_logits" /
            f"{tag}-{meta['data']}-{meta['fingerprint']}-val{meta['val_size']}s{meta['split_seed']}"
            f"-pad{meta['crop_padding']}step{meta['grid_step']}.pt")


def make(teacher: str, data_root: str, out: str | Path | None = None, step: int = 2, overrides: list[str] = (),
         batch_size: int = 512, device: str = "auto", progress: bool = True) -> Path:
    """Write the logits file for `teacher` on the training split of `data_root`; returns its path."""
    model, identity, norm, dataset = load_teacher(teacher)
    data_cfg = data_config(dataset, data_root, list(overrides))
    grid_views(int((data_cfg.get("augment") or {}).get("crop_padding", 4)), step)  # a bad --step fails before any work
    datamodule = CifarDataModule({**data_cfg, "loader": "fast"})
    datamodule.prepare_data()
    datamodule.setup()
    images, labels = datamodule.splits["train"]
    classes = getattr(model, "num_classes", None) or model(torch.zeros(1, 3, 32, 32)).shape[1]
    if int(classes) != datamodule.num_classes:
        raise ConfigError(f"the teacher predicts {classes} classes but {data_cfg['name']} has {datamodule.num_classes}; "
                          "choose the data set it was trained on (data=...)")
    # the teacher sees images normalised as it was trained; the student's own normalisation is its run's
    norm = norm or {"mean": datamodule.mean, "std": datamodule.std}
    meta = teacher_data_meta(data_cfg, datamodule.train_source, step)
    pad = meta["crop_padding"]
    views = grid_views(pad, step)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # the precision trainer.precision=auto trains in here: on a CPU with AVX512-BF16/AMX, bf16 autocast runs
    # resnet20's forwards 2.7-2.9x faster (3,449-3,686 against 1,278-1,293 img/s, batch 512, 2 threads, the
    # AMX Xeon, 2026-11-28, a one-off timing), and the logits are stored in fp16 either way
    bf16 = torch.device(device).type == "cpu" and native_bf16_cpu()
    precision = "bf16-mixed" if bf16 else "32-true"
    print(f"teacher {identity['name']}: {len(images)} training images x {len(views)} views "
          f"(pad {pad}, step {step}) on {device}, {precision}", flush=True)
    path = Path(out) if out else None
    partial = (path or default_out(data_cfg, {**meta, "teacher": identity})).with_suffix(".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    key = repr((identity, meta, norm, batch_size, precision))  # what the logits depend on: another value starts over
    logits = teacher_logits(model, images, norm["mean"], norm["std"], pad, step, batch_size, device, progress,
                            partial=partial, key=key, bf16=bf16)
    plain = views.index((pad, pad, False))
    acc = float((logits[:, plain].float().argmax(-1) == labels).float().mean())
    meta.update(teacher=identity, teacher_precision=precision, mean=[float(m) for m in norm["mean"]], std=[float(s) for s in norm["std"]],
                n_train=len(images), views=len(views), teacher_train_acc=acc, created=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = path or default_out(data_cfg, meta)
    tmp = path.with_suffix(".tmp")
    torch.save({"logits": logits, "meta": meta}, tmp)
    tmp.replace(path)
    partial.unlink(missing_ok=True)
    print(f"teacher accuracy on the un-augmented training images: {100 * acc:.2f}%\n"
          f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): train with distill.logits={path}", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a shipped entry name, or a run's .ckpt")
    parser.add_argument("--data-root", required=True, help="data.root of the training data")
    parser.add_argument("--out", help="output file (default: <data.cache_dir>/teacher_logits/<teacher>-<data>-...pt)")
    parser.add_argument("--step", type=int, default=2, help="crop-offset grid step in pixels (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, ...")
    parser.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data=cifar100 data.val_size=5000")
    args = parser.parse_args()
    with exit_on_user_error():
        make(args.teacher, args.data_root, args.out, args.step, args.overrides, args.batch_size, args.device)


if __name__ == "__main__":
    main()
