"""Training speed: img/s of a full training step, the zoo's mobilenet_v2 with this project's default
training settings against torchvision's mobilenet_v2 (same CIFAR layout) with plain settings.

    python -m benchmarks.train_speed                       # part 1 only, batch 256
    python -m benchmarks.train_speed --all                 # + part 2: every registered model
    python -m benchmarks.train_speed --batch 32 --rounds 3 --all --all-batch 16   # a quick smoke run
    python -m benchmarks.train_speed --all --out outputs/bench_train_speed/train_speed.csv

A training step is what `training/module.py` does per batch under Lightning: forward, cross-entropy
with label smoothing 0.1 (on float32 logits), backward, an SGD step with Nesterov momentum 0.9,
zero_grad -- on a fixed batch of random 32x32 images and labels (the data path is not timed; its
cost is under 1 % of a step, docs/training.md).

Settings ("default" = what `train.py` uses unless told otherwise; "plain" = what a user gets out of
the box):
  default: `trainer.precision=auto` -- bf16 autocast on a CPU that computes bf16 natively
           (AVX512-BF16/AMX), float32 otherwise; model and input channels-last
           (`channels_last=true`), the optimizer over `training.module.param_groups` (weight decay
           5e-4 on conv/linear weights only, norms and biases at 3x the learning rate), its
           settings read from configs/optim/sgd.yaml;
  plain:   float32, NCHW, the optimizer over `model.parameters()` with weight decay 5e-4 on all.
Both use lr 0.02 (the recipe's first warm-up step: peak 0.2 x warm-up start factor 0.1), so the
weights stay finite over the run.

Part 1 (the target docs/train_speed.md tracks: the zoo with default settings >= 1.3x torchvision
with plain settings), at
`--batch` (default 256), four rows timed in the same interleaved rounds:
  - torchvision `mobilenet_v2(num_classes=10)` adapted to CIFAR as our cifar stem (stem conv at
    stride 1; the first stride-2 block, `features[2]` (24 channels), with its depthwise conv at
    stride 1): the same 2,236,682 params and 4x4 final map as ours (checked before timing), plain
    settings -- the baseline every ratio divides;
  - the same torchvision model with the default settings;
  - the zoo `create_model("mobilenet_v2")` (cifar stem, 10 classes) with plain settings;
  - the zoo model with the default settings (the target row).
The two middle rows split the gain into settings (same model, other settings) and architecture /
implementation (same settings, other model).

Part 2 (`--all`): every registered model (`models.list_models()`), cifar stem, width 1.0, 10
classes, default settings, at `--all-batch` (default 128: batch 256 over 12 models would take
well over 10 minutes on the shared 2-core machine), interleaved the same way.

Part 5 (`--depthwise [MODEL ...]`): every distinct depthwise layer of the MobileNets and
xception_small that the zoo's C kernels cover (`models/depthwise.py`), forward + backward at
`--all-batch`, oneDNN's conv (kernels switched off) against the kernels, in the same rounds.

Part 6 (`--norm-act-depthwise [MODEL ...]`): every distinct expanded map of the inverted residuals
(mobilenet_v2 and the MobileNetV3s) going norm -> activation -> depthwise conv, forward + backward at
`--all-batch`, as two layers (`models/norm_act.py`'s kernel, then the conv) against one kernel
(`models/norm_act_depthwise.py`), in the same rounds: the measurement behind its `kernel_wins`.

Part 8 (`--residual-end [MODEL ...]`): whole training steps with each residual block's last norm, the
residual sum and (ResNets) the ReLU in one kernel (`models.norm_act.batch_norm_add_act`) against the
norm's kernel followed by PyTorch's sum and ReLU, interleaved: ResNet blocks, and the inverted
residuals' linear ends.

Part 9 (`--autocast-float32 [MODEL ...]`): whole training steps under bf16 autocast (channels-last,
param groups), the depthwise convs `models.kernels.float32_depthwise` picks (strided, 5x5, 2x2
maps; with the norm + act before them fused where they are) computed in float32 on the zoo's
kernels, against the whole network in bf16, interleaved.

Part 10 (`--norm-bf16 [MODEL ...]`): whole training steps under bf16 autocast, every norm (+ act, +
residual sum) that reads a bf16 map on the zoo's norm kernels (`models/norm_act.py`, its `_bf16` C
functions) against PyTorch's bf16 layers, interleaved.

Part 11 (`--norm-act-depthwise-bf16 [MODEL ...]`): under bf16 autocast, every distinct norm -> act ->
depthwise conv that stays in bf16 (stride 1, 3x3: not `models.kernels.float32_depthwise`'s), forward +
backward at `--all-batch`, as two layers in bf16 (the norm's bf16 kernel, then oneDNN's conv) against
the one kernel reading and writing bf16 (`models/norm_act_depthwise.py`, called directly), in the same
rounds: the measurement behind its `bf16_kernel_wins`; then whole steps with the kernel where that
rule puts it against the two layers everywhere.

Part 12 (`--max-pool [MODEL ...]`): every distinct max-pool of these models (xception_small's strided
blocks), forward + backward at `--all-batch` in the default settings' precision, PyTorch's
`max_pool2d` against the zoo's kernel (`models/pool.py`), in the same rounds; then whole steps
with the kernel on and off.

Part 7 (`--profile [MODEL ...]`): where each zoo model's step goes and its twin's, by operator group
(1x1 / depthwise / kxk convolutions, the zoo's kernels, norm, activation, pooling, optimizer, other),
torch.profiler's self CPU time over `--all-rounds` steps at `--all-batch`; and the bound the zoo's
kernels work under: both run the same convolutions, so no kernel for the rest can take the zoo past
twin step / zoo convolution time.

Timing (as the other benchmarks, `benchmarks/common.py`): `--warmup` untimed steps per row, then
`--rounds` rounds; each round runs every row for `--steps` steps (one sample), in an order that
rotates every round. img/s = batch x steps / seconds of a sample; the table shows the median over
rounds. A speed-up is the median over rounds of that round's (baseline seconds / row seconds), so a
slow spell that hits one round hits both sides of its ratio. `--threads` defaults to 1 (see
docs/training.md, "Threads").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

import models
from benchmarks.common import Timing, bench, machine_info, md_table, paired_ratio, write_csv
from training.allocator import keep_freed_memory
from training.module import param_groups
from training.pipeline import native_bf16_cpu

CIFAR_PARAMS = 2_236_682  # zoo mobilenet_v2, cifar stem, 10 classes (README)
# the recipe's optimizer settings, read from the config train.py trains with rather than copied
_SGD = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "optim" / "sgd.yaml")
LR = _SGD.lr * _SGD.warmup_start_factor  # the recipe's first warm-up step (0.2 x 0.1): weights stay finite
MOMENTUM = _SGD.momentum
WEIGHT_DECAY = _SGD.weight_decay
NORM_LR_FACTOR = _SGD.norm_lr_factor  # the norms' and biases' rate, as train.py's param groups set it
LABEL_SMOOTHING = _SGD.label_smoothing


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a model is trained: autocast dtype (None = float32), memory format, optimizer groups."""

    name: str
    amp_dtype: torch.dtype | None
    channels_last: bool
    param_groups: bool

    def describe(self) -> str:
        prec = "bf16 autocast" if self.amp_dtype is torch.bfloat16 else "fp32"
        fmt = "channels-last" if self.channels_last else "NCHW"
        opt = "param groups" if self.param_groups else "plain SGD params"
        return f"{prec}, {fmt}, {opt}"


# train.py's default (`trainer.precision=auto`): bf16 autocast only where the CPU computes in bf16.
DEFAULT = Settings("default", torch.bfloat16 if native_bf16_cpu() else None, True, True)
PLAIN = Settings("plain", None, False, False)
# Part 3: the precision x memory-format grid that `trainer.precision=auto` and `channels_last` choose from.
GRID = [
    Settings("bf16 channels-last", torch.bfloat16, True, True),
    Settings("bf16 NCHW", torch.bfloat16, False, True),
    Settings("fp32 channels-last", None, True, True),
    Settings("fp32 NCHW", None, False, True),
]


# -- models -----------------------------------------------------------------------------------


def torchvision_mobilenet_v2_cifar(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """torchvision's mobilenet_v2 in our cifar-stem layout: the stem conv at stride 1 and the first
    stride-2 inverted-residual block (`features[2]`, 24 channels) at stride 1 (its depthwise conv,
    `conv[1][0]`, carries the block's stride). 32x32 -> 4x4 before pooling."""
    import torchvision

    m = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width)
    m.features[0][0].stride = (1, 1)
    dw = m.features[2].conv[1][0]
    assert dw.groups == dw.in_channels and dw.stride == (2, 2), "features[2] is not the first stride-2 block"
    dw.stride = (1, 1)
    return m


def torchvision_cifar(name: str, num_classes: int = 10) -> nn.Module:
    """torchvision's `name` (a MobileNet) in our cifar-stem layout: stem conv and the first stride-2
    block's depthwise conv at stride 1, as the zoo's cifar stem does (mobilenet_v2 above, by position)."""
    import torchvision

    m = getattr(torchvision.models, name)(num_classes=num_classes)
    m.features[0][0].stride = (1, 1)
    first = next(c for c in m.features[1:].modules()
                 if isinstance(c, nn.Conv2d) and c.groups == c.in_channels > 1 and c.stride == (2, 2))
    first.stride = (1, 1)
    return m


class PlainKernels(nn.Module):
    """The same zoo network with its kernel dispatch off (`models.kernels.plain()`): every layer the
    plain PyTorch op (no fused batch norm + activation, `models/norm_act.py`). The twin where
    torchvision has none (mobilenet_v1, Xception, the ResNets)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with models.kernels.plain():
            return self.model(x)


# zoo model -> its twin's builder: torchvision's where there is one, else the plain-layer zoo model
TWINS = {
    "mobilenet_v2": ("torchvision mobilenet_v2", lambda: torchvision_mobilenet_v2_cifar()),
    "mobilenet_v3_small": ("torchvision mobilenet_v3_small", lambda: torchvision_cifar("mobilenet_v3_small")),
    "mobilenet_v3_large": ("torchvision mobilenet_v3_large", lambda: torchvision_cifar("mobilenet_v3_large")),
    "mobilenet_v1": ("zoo, plain kernels", lambda: PlainKernels(models.create_model("mobilenet_v1"))),
    "xception_small": ("zoo, plain kernels", lambda: PlainKernels(models.create_model("xception_small"))),
    # the ResNets' target is "no slower than the plain layers"
    **{name: ("zoo, plain kernels", lambda name=name: PlainKernels(models.create_model(name)))
       for name in ("resnet20", "resnet56", "se_resnet20", "resnet38_bottleneck")},
}


def zoo_mobilenet_v2(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return models.create_model("mobilenet_v2", num_classes=num_classes, stem="cifar", width=width)


def feature_map_size(model: nn.Module, size: int = 32) -> tuple[int, int]:
    """Spatial size of the map the classifier pools (torchvision: `features`; zoo: `forward_features`)."""
    x = torch.zeros(1, 3, size, size)
    model = model.model if isinstance(model, PlainKernels) else model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x) if hasattr(model, "forward_features") else model.features(x)
    model.train(was_training)
    return tuple(feats.shape[-2:])


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_twin(tv: nn.Module, zoo: nn.Module) -> dict:
    """The torchvision CIFAR adaptation must be our architecture: same param count, same final map."""
    info = {
        "tv_params": num_params(tv),
        "zoo_params": num_params(zoo),
        "tv_map": feature_map_size(tv),
        "zoo_map": feature_map_size(zoo),
    }
    if info["tv_params"] != info["zoo_params"] or info["tv_map"] != info["zoo_map"]:
        raise RuntimeError(f"torchvision CIFAR adaptation differs from the zoo model: {info}")
    return info


# -- one training step ------------------------------------------------------------------------


def make_optimizer(model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    params = param_groups(model, WEIGHT_DECAY, LR, NORM_LR_FACTOR) if settings.param_groups else model.parameters()
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)


class TrainStep:
    """One training step of `model` with `settings` on a fixed random batch (32x32, NCHW float32, as
    the fast data path hands it over; the channels-last copy is part of the step, as in
    `ClassifierModule.forward`)."""

    def __init__(self, model: nn.Module, settings: Settings, batch: int, num_classes: int = 10, seed: int = 0, size: int = 32):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 3, size, size, generator=gen)
        self.y = torch.randint(0, num_classes, (batch,), generator=gen)
        self.settings = settings
        self.model = model.train()
        if settings.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(self.model, settings)
        self.batch = batch
        self.last_loss = float("nan")

    def loss(self) -> torch.Tensor:
        s = self.settings
        x = self.x.contiguous(memory_format=torch.channels_last) if s.channels_last else self.x
        with torch.autocast("cpu", dtype=s.amp_dtype or torch.bfloat16, enabled=s.amp_dtype is not None):
            logits = self.model(x).float()
            return F.cross_entropy(logits, self.y, label_smoothing=LABEL_SMOOTHING)

    def __call__(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def kept_for_backward(self) -> int:
        """Bytes of activations autograd keeps from one forward until the backward (each storage
        once, parameters not counted): the step's activation memory."""
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        kept = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.loss()
        return sum(kept.values())


# -- timing -----------------------------------------------------------------------------------


def round_logger(log) -> Callable[[int, dict[str, Timing]], None] | None:
    """`bench`'s per-round hook printing every row's latest step time (a training step takes seconds)."""
    if not log:
        return None
    return lambda r, out: log(f"  round {r + 1}: " + ", ".join(f"{n} {t.samples[-1]:.2f} s" for n, t in out.items()))


def img_s(t: Timing, batch: int) -> float:
    return batch / t.median


# -- part 1: zoo vs torchvision ---------------------------------------------------------------

ROWS = [  # (key, model, settings); the first row is the baseline
    ("tv_plain", "torchvision", PLAIN),
    ("tv_default", "torchvision", DEFAULT),
    ("zoo_plain", "zoo", PLAIN),
    ("zoo_default", "zoo", DEFAULT),
]


def head_to_head(batch: int, rounds: int, warmup: int = 1, steps: int = 1, width: float = 1.0, log=None) -> dict:
    """Part 1. Returns {"check": ..., "rows": [dict per row], "ratios": {...}}."""
    builders = {"torchvision": torchvision_mobilenet_v2_cifar, "zoo": zoo_mobilenet_v2}
    torch.manual_seed(0)
    check = check_twin(builders["torchvision"](width=width), builders["zoo"](width=width))
    cost = models.profile(builders["zoo"](width=width), (1, 3, 32, 32))
    steps_by_key = {}
    for key, which, settings in ROWS:
        torch.manual_seed(0)
        steps_by_key[key] = TrainStep(builders[which](width=width), settings, batch)
    timings = bench(steps_by_key, repeats=rounds, warmup=warmup, inner=steps, on_round=round_logger(log))
    base = timings["tv_plain"]
    rows = []
    for key, which, settings in ROWS:
        t = timings[key]
        label = ("torchvision mobilenet_v2 (cifar-adapted)" if which == "torchvision" else "zoo mobilenet_v2 (stem cifar)")
        rows.append({
            "table": "mobilenet_v2",
            "row": key,
            "model": label,
            "settings": f"{settings.name}: {settings.describe()}",
            "batch": batch,
            "img_s": img_s(t, batch),
            "img_s_min": batch / max(t.samples),
            "img_s_max": batch / min(t.samples),
            "speedup_vs_tv_plain": paired_ratio(base, t),
            "rounds": len(t.samples),
            "finite": steps_by_key[key].finite(),
        })
    ratios = {
        "zoo_default/tv_plain (target >= 1.3)": paired_ratio(base, timings["zoo_default"]),
        "settings, torchvision: tv_default/tv_plain": paired_ratio(base, timings["tv_default"]),
        "settings, zoo: zoo_default/zoo_plain": paired_ratio(timings["zoo_plain"], timings["zoo_default"]),
        "architecture, plain: zoo_plain/tv_plain": paired_ratio(base, timings["zoo_plain"]),
        "architecture, default: zoo_default/tv_default": paired_ratio(timings["tv_default"], timings["zoo_default"]),
    }
    return {"check": check, "cost": cost, "rows": rows, "ratios": ratios}


def head_to_head_table(result: dict) -> str:
    rows = [
        [r["model"], r["settings"], f"{r['img_s']:,.0f}", f"{r['img_s_min']:,.0f}-{r['img_s_max']:,.0f}", f"{r['speedup_vs_tv_plain']:.2f}x"]
        for r in result["rows"]
    ]
    return md_table(["model", "settings", "train img/s (median)", "range over rounds", "vs torchvision plain"], rows, right=[False, False, True, True, True])


# -- part 1b: every MobileNet/Xception against its twin, equal settings ----------------------------


def twins(names: list[str], batch: int, rounds: int, warmup: int = 1, steps: int = 1, log=None) -> list[dict]:
    """Each zoo model and its twin (TWINS), both with train.py's default settings, all rows in the
    same interleaved rounds; the ratio is zoo img/s over twin img/s (the issue's target: >= 1.3x,
    mobilenet_v2 >= 1.5x). Also the activation memory each keeps for its backward (measured once,
    before timing)."""
    fns, labels = {}, {}
    for name in names:
        label, build = TWINS[name]
        torch.manual_seed(0)
        zoo = models.create_model(name, num_classes=10, stem="cifar")
        torch.manual_seed(0)
        twin = build()
        check_twin(twin, zoo)
        fns[f"{name}/zoo"], fns[f"{name}/twin"] = TrainStep(zoo, DEFAULT, batch), TrainStep(twin, DEFAULT, batch)
        labels[name] = label
    kept = {key: step.kept_for_backward() for key, step in fns.items()}
    timings = bench(fns, repeats=rounds, warmup=warmup, inner=steps, on_round=round_logger(log))
    return [
        {"table": "twins", "model": name, "twin": labels[name], "batch": batch,
         "img_s": img_s(timings[f"{name}/zoo"], batch), "twin_img_s": img_s(timings[f"{name}/twin"], batch),
         "speedup_vs_twin": paired_ratio(timings[f"{name}/twin"], timings[f"{name}/zoo"]),
         "kept_mb": kept[f"{name}/zoo"] / 2**20, "twin_kept_mb": kept[f"{name}/twin"] / 2**20,
         "rounds": len(timings[f"{name}/zoo"].samples), "finite": fns[f"{name}/zoo"].finite() and fns[f"{name}/twin"].finite()}
        for name in names
    ]


def twins_table(rows: list[dict]) -> str:
    return md_table(["model", "twin", "zoo img/s", "twin img/s", "zoo / twin", "kept for backward: zoo / twin (MiB)"],
                    [[f"`{r['model']}`", r["twin"], f"{r['img_s']:,.0f}", f"{r['twin_img_s']:,.0f}", f"{r['speedup_vs_twin']:.2f}x",
                      f"{r['kept_mb']:,.0f} / {r['twin_kept_mb']:,.0f}"]
                     for r in rows], right=[False, False, True, True, True, True])


# -- part 2: every model ----------------------------------------------------------------------


def all_models(batch: int, rounds: int, warmup: int = 1, steps: int = 1, names: list[str] | None = None, width: float = 1.0, log=None) -> list[dict]:
    """Part 2: median training img/s of each registered model (cifar stem, default settings)."""
    names = list(names or models.list_models())
    fns, costs = {}, {}
    for name in names:
        torch.manual_seed(0)
        model = models.create_model(name, num_classes=10, stem="cifar", width=width)
        costs[name] = models.profile(model, (1, 3, 32, 32))
        fns[name] = TrainStep(model, DEFAULT, batch)
    timings = bench(fns, repeats=rounds, warmup=warmup, inner=steps, on_round=round_logger(log))
    return [
        {
            "table": "models",
            "model": name,
            "width": width,
            "params": costs[name]["params"],
            "macs": costs[name]["macs"],
            "batch": batch,
            "img_s": img_s(timings[name], batch),
            "img_s_min": batch / max(timings[name].samples),
            "img_s_max": batch / min(timings[name].samples),
            "rounds": len(timings[name].samples),
            "finite": fns[name].finite(),
        }
        for name in names
    ]


def all_models_table(rows: list[dict]) -> str:
    return md_table(
        ["model", "params", "mult-adds", "train img/s"],
        [[f"`{r['model']}`", f"{r['params'] / 1e6:.3f} M", f"{r['macs'] / 1e6:,.1f} M", f"{r['img_s']:,.0f}"] for r in rows],
    )


# -- part 3: precision and memory format ------------------------------------------------------


def precision_grid(names: list[str], batch: int, rounds: int, warmup: int = 1, steps: int = 1, log=None) -> list[dict]:
    """Part 3: each model under every GRID setting, all rows interleaved in the same rounds; the
    speed-up is against fp32 channels-last (what `precision=auto` picks on a CPU without bf16)."""
    fns = {}
    for name in names:
        for settings in GRID:
            torch.manual_seed(0)
            fns[(name, settings.name)] = TrainStep(models.create_model(name, num_classes=10), settings, batch)
    keyed = {f"{n}/{s}": fn for (n, s), fn in fns.items()}
    timings = bench(keyed, repeats=rounds, warmup=warmup, inner=steps, on_round=round_logger(log))
    rows = []
    for name in names:
        base = timings[f"{name}/fp32 channels-last"]
        for settings in GRID:
            t = timings[f"{name}/{settings.name}"]
            rows.append({"table": "precision", "model": name, "settings": settings.name, "batch": batch,
                         "img_s": img_s(t, batch), "speedup_vs_fp32_cl": paired_ratio(base, t),
                         "rounds": len(t.samples), "finite": fns[(name, settings.name)].finite()})
    return rows


def precision_table(rows: list[dict]) -> str:
    return md_table(["model", "settings", "train img/s (median)", "vs fp32 channels-last"],
                    [[f"`{r['model']}`", r["settings"], f"{r['img_s']:,.0f}", f"{r['speedup_vs_fp32_cl']:.2f}x"] for r in rows],
                    right=[False, False, True, True])


# -- part 5: depthwise layers ------------------------------------------------------------------

DEPTHWISE_MODELS = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "xception_small")


def layer_inputs(names: list[str], batch: int, layer: type, describe: Callable) -> dict[tuple, list[str]]:
    """Each distinct `describe(module, input)` (None: not counted) over the `layer` modules of these
    models (cifar stem, a training forward at `batch`), with the models and counts that have it."""
    shapes: dict[tuple, list[str]] = {}
    for name in names:
        model = models.create_model(name, num_classes=10).to(memory_format=torch.channels_last)
        seen: list[tuple] = []

        def record(module, args, seen=seen):
            shape = describe(module, args[0])
            if shape is not None:
                seen.append(shape)

        hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, layer)]
        model(torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last))
        for h in hooks:
            h.remove()
        for shape in sorted(set(seen), key=seen.index):
            shapes.setdefault(shape, []).append(f"{name} x{seen.count(shape)}")
    return shapes


def depthwise_shapes(names: list[str], batch: int) -> dict[tuple, list[str]]:
    """Each distinct depthwise conv input (batch, C, H, W, k, stride) the C kernels cover in these
    models (where they are used or not), with the models and counts that have it."""
    def describe(module, x):
        conv = module.conv
        return (*x.shape, conv.kernel_size[0], conv.stride[0]) if models.depthwise._covered(x, conv) else None

    return layer_inputs(names, batch, models.layers.DepthwiseConv, describe)


def depthwise_layers(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 5: each depthwise layer's forward + backward (input and weight gradients), oneDNN's conv
    against the zoo's C kernels (called directly, whatever `models.depthwise.kernels_win` picks),
    interleaved in the same rounds: the measurement behind that rule."""
    rows = []
    for (n, c, h, w, k, s), where in depthwise_shapes(names, batch).items():
        torch.manual_seed(0)
        conv = nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn_like(conv(x))

        def step(plain: bool) -> None:
            y = conv(x) if plain else models.depthwise._DepthwiseConv.apply(x, conv.weight, s)
            y.backward(grad)
            x.grad = conv.weight.grad = None

        t = bench({"onednn": lambda: step(True), "zoo": lambda: step(False)}, repeats=rounds, warmup=warmup)
        rows.append({"table": "depthwise", "shape": f"{n}x{c}x{h}x{w}", "kernel": k, "stride": s, "models": ", ".join(where),
                     "onednn_ms": t["onednn"].median * 1e3, "zoo_ms": t["zoo"].median * 1e3,
                     "speedup": paired_ratio(t["onednn"], t["zoo"]), "used": models.depthwise.kernels_win(k, h, w)})
        if log:
            log(f"depthwise {rows[-1]['shape']} k{k} s{s}: {rows[-1]['speedup']:.2f}x")
    return rows


def depthwise_table(rows: list[dict]) -> str:
    return md_table(["input (N x C x H x W)", "k", "stride", "in", "oneDNN fwd+bwd (ms)", "zoo kernels (ms)", "speed-up", "used"],
                    [[r["shape"], r["kernel"], r["stride"], r["models"], f"{r['onednn_ms']:.2f}", f"{r['zoo_ms']:.2f}",
                      f"{r['speedup']:.2f}x", "zoo" if r["used"] else "oneDNN"] for r in rows],
                    right=[False, True, True, False, True, True, True, False])


# -- part 6: the expand's norm + act fused into the depthwise conv --------------------------------

NORM_ACT_DW_MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
# part 8 (se_resnet20's SE sits before its sum)
RESIDUAL_MODELS = ("resnet20", "resnet56", "resnet38_bottleneck", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")


def norm_act_dw_shapes(names: list[str], batch: int) -> dict[tuple, list[str]]:
    """Each distinct (batch, C, H, W, k, stride, activation) at which an inverted residual's expanded
    map goes norm -> act -> depthwise conv in these models, with the models and counts that have it."""
    def describe(block, x):
        if type(block.conv_pw) is not models.layers.ConvNormAct:
            return None  # no expand
        conv = block.conv_dw.conv
        return (x.shape[0], conv.in_channels, *x.shape[2:], conv.kernel_size[0], conv.stride[0], type(block.conv_pw.act).__name__)

    return layer_inputs(names, batch, models.layers.InvertedResidual, describe)


def norm_act_dw_layers(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 6: each expanded map's norm + act + depthwise conv, forward + backward, as two layers (the
    fused norm kernel, then the conv as `models.depthwise` runs it) against the one kernel of
    `models/norm_act_depthwise.py` (called directly, whatever its `kernel_wins` picks), interleaved."""
    return _time_norm_act_dw(norm_act_dw_shapes(names, batch), rounds, warmup, log, bf16=False)


def _time_norm_act_dw(shapes: dict[tuple, list[str]], rounds: int, warmup: int, log, bf16: bool) -> list[dict]:
    """Parts 6 and 11: each shape's norm + act + depthwise conv, forward + backward, two layers against
    the one kernel (its bf16-output functions with `bf16`, x and the output gradient then bf16 and the
    step under bf16 autocast), in the same interleaved rounds; "used": what the rule picks there."""
    from models.norm_act_depthwise import _NormActDepthwise, bf16_kernel_wins, kernel_wins

    acts = {"ReLU": nn.ReLU, "ReLU6": nn.ReLU6, "Hardswish": nn.Hardswish}
    dtype, rule = (torch.bfloat16, bf16_kernel_wins) if bf16 else (torch.float32, kernel_wins)
    rows = []
    for (n, c, h, w, k, s, act_name), where in shapes.items():
        torch.manual_seed(0)
        norm = not act_name.endswith(NO_NORM)
        bn, act = nn.BatchNorm2d(c), acts[act_name.removesuffix(NO_NORM)]()
        conv = nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).to(dtype).requires_grad_()
        grad = torch.randn_like(conv(x.float())).to(dtype)
        fused_name = models.norm_act.FUSED_ACTIVATIONS[type(act)]

        def step(two_layers: bool) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if two_layers:
                    y = models.norm_act.batch_norm_act(x, bn, act) if norm else act(x)
                    z = models.depthwise.depthwise_conv2d(y, conv)
                elif norm:
                    z = _NormActDepthwise.apply(x, bn.weight, bn.bias, conv.weight, bn, fused_name, s, bf16)
                else:
                    z = _NormActDepthwise.apply(x, None, None, conv.weight, None, fused_name, s, bf16)
            z.backward(grad)
            x.grad = conv.weight.grad = bn.weight.grad = bn.bias.grad = None

        t = bench({"two": lambda: step(True), "fused": lambda: step(False)}, repeats=rounds, warmup=warmup)
        rows.append({"table": "norm_act_depthwise_bf16" if bf16 else "norm_act_depthwise", "shape": f"{n}x{c}x{h}x{w}",
                     "kernel": k, "stride": s, "act": act_name, "models": ", ".join(where),
                     "two_layers_ms": t["two"].median * 1e3, "fused_ms": t["fused"].median * 1e3,
                     "speedup": paired_ratio(t["two"], t["fused"]), "used": rule(k, h, w)})
        if log:
            log(f"{'bf16 ' if bf16 else ''}norm+act+depthwise {rows[-1]['shape']} k{k} s{s}: {rows[-1]['speedup']:.2f}x")
    return rows


def switched_steps(names: list[str], batch: int, rounds: int, switch: Callable[[bool], contextlib.AbstractContextManager],
                   table: str, warmup: int = 1, log=None, settings: Settings | None = None) -> list[dict]:
    """Each model's whole training step (`settings`, default: DEFAULT) with one kernel choice off and
    on, in the same interleaved rounds: `switch(on)` is a context in which the step runs. What that
    one kernel is worth to a step, free of a twin's other differences."""
    rows = []
    for name in names:
        torch.manual_seed(0)
        step = TrainStep(models.create_model(name, num_classes=10), settings or DEFAULT, batch)

        def run(on: bool) -> None:
            with switch(on):
                step()

        t = bench({"off": lambda: run(False), "on": lambda: run(True)}, repeats=rounds, warmup=warmup)
        rows.append({"table": table, "model": name, "two_layers_img_s": batch / t["off"].median,
                     "fused_img_s": batch / t["on"].median, "speedup": paired_ratio(t["off"], t["on"])})
        if log:
            log(f"{table} {name}: {rows[-1]['speedup']:.2f}x")
    return rows


@contextlib.contextmanager
def _depthwise_rule(on: bool, rule_name: str = "kernel_wins"):
    """With `on` False, `models.norm_act_depthwise`'s rule `rule_name` picks the two layers everywhere."""
    import models.norm_act_depthwise as nad

    rule = getattr(nad, rule_name)
    setattr(nad, rule_name, rule if on else (lambda k, h, w: False))
    try:
        yield
    finally:
        setattr(nad, rule_name, rule)


def norm_act_dw_steps(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 6, whole steps: the one kernel where `kernel_wins` puts it against two layers everywhere."""
    return switched_steps(names, batch, rounds, _depthwise_rule, "norm_act_depthwise_step", warmup, log)


BF16 = dataclasses.replace(DEFAULT, name="bf16 autocast", amp_dtype=torch.bfloat16)  # parts 9-11


NO_NORM = ", no norm"  # an activation name's suffix where no norm comes before it (an Xception block's opening ReLU)


def bf16_norm_act_dw_shapes(names: list[str], batch: int) -> dict[tuple, list[str]]:
    """Each distinct (batch, C, H, W, k, stride, activation) at which a norm + act + depthwise conv
    that stays in bf16 under autocast (not float32 by `kernels.float32_depthwise`) reaches
    `norm_act_depthwise` in a training forward of these models -- or an act + depthwise conv reaches
    `act_depthwise` (the activation's name ends in NO_NORM) --, with the models and counts."""
    import models.layers as layers
    from models.depthwise import float32_under_autocast

    real, real_act, shapes = layers.norm_act_depthwise, layers.act_depthwise, {}
    for name in names:
        model = models.create_model(name, num_classes=10).to(memory_format=torch.channels_last)
        seen: list[tuple] = []

        def record(x, act, conv, norm: bool, seen=seen):
            if x.dtype == torch.bfloat16 and not float32_under_autocast(x, conv):
                act_name = type(act).__name__ + ("" if norm else NO_NORM)
                seen.append((*x.shape, conv.kernel_size[0], conv.stride[0], act_name))

        # the names both callers (inverted residuals, separable chains) use
        layers.norm_act_depthwise = lambda x, bn, act, conv: record(x, act, conv, True) or real(x, bn, act, conv)
        layers.act_depthwise = lambda x, act, conv: record(x, act, conv, False) or real_act(x, act, conv)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last))
        finally:
            layers.norm_act_depthwise, layers.act_depthwise = real, real_act
        for shape in sorted(set(seen), key=seen.index):
            shapes.setdefault(shape, []).append(f"{name} x{seen.count(shape)}")
    return shapes


def bf16_norm_act_dw_layers(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 11: each such layer, forward + backward under bf16 autocast, two layers in bf16 against the
    one kernel reading and writing bf16 (called directly, whatever `bf16_kernel_wins` picks), interleaved."""
    return _time_norm_act_dw(bf16_norm_act_dw_shapes(names, batch), rounds, warmup, log, bf16=True)


_bf16_depthwise_rule = functools.partial(_depthwise_rule, rule_name="bf16_kernel_wins")


def bf16_norm_act_dw_steps(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 11, whole steps under bf16 autocast: the bf16 kernel where `bf16_kernel_wins` puts it
    against the two bf16 layers everywhere."""
    return switched_steps(names, batch, rounds, _bf16_depthwise_rule, "norm_act_depthwise_bf16_step", warmup, log, BF16)


def max_pool_layers(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 12: each distinct max-pool input of these models, forward + backward in the default
    settings' precision, channels-last: PyTorch's max_pool2d against the zoo's kernel, interleaved."""
    from models.pool import _MaxPool

    def describe(pool, x):
        return (*x.shape, pool.kernel_size, pool.stride, pool.padding)

    dtype, rows = DEFAULT.amp_dtype or torch.float32, []
    for (n, c, h, w, k, s, p), where in layer_inputs(names, batch, nn.MaxPool2d, describe).items():
        torch.manual_seed(0)
        x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).to(dtype).requires_grad_()
        grad = torch.randn_like(F.max_pool2d(x.detach(), k, s, p))

        def step(kernel: bool) -> None:
            (_MaxPool.apply(x, k, s, p) if kernel else F.max_pool2d(x, k, s, p)).backward(grad)
            x.grad = None

        t = bench({"pytorch": lambda: step(False), "kernel": lambda: step(True)}, repeats=rounds, warmup=warmup)
        rows.append({"table": "max_pool", "shape": f"{n}x{c}x{h}x{w}", "dtype": str(dtype).removeprefix("torch."),
                     "pool": f"{k}x{k}, stride {s}, pad {p}", "models": ", ".join(where),
                     "pytorch_ms": t["pytorch"].median * 1e3, "kernel_ms": t["kernel"].median * 1e3,
                     "speedup": paired_ratio(t["pytorch"], t["kernel"])})
        if log:
            log(f"max-pool {rows[-1]['shape']}: {rows[-1]['speedup']:.2f}x")
    return rows


def max_pool_table(rows: list[dict]) -> str:
    if not rows:
        return "(no max-pools in these models)"
    return md_table(["input (N x C x H x W)", "dtype", "pool", "in", "PyTorch (ms)", "kernel (ms)", "speed-up"],
                    [[r["shape"], r["dtype"], r["pool"], r["models"], f"{r['pytorch_ms']:.2f}", f"{r['kernel_ms']:.2f}",
                      f"{r['speedup']:.2f}x"] for r in rows], right=[False, False, False, False, True, True, True])


@contextlib.contextmanager
def _max_pool_kernel(on: bool):
    import models.pool as pool

    covered = pool._covered
    pool._covered = covered if on else (lambda x, module: None)
    try:
        yield
    finally:
        pool._covered = covered


def max_pool_steps(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 12, whole steps: the max-pools on the zoo's kernel against PyTorch's."""
    return switched_steps(names, batch, rounds, _max_pool_kernel, "max_pool_step", warmup, log)


@contextlib.contextmanager
def _residual_end(on: bool):
    import models.layers as layers
    from models.norm_act import batch_norm_act, batch_norm_add_act

    # off: the block's last norm in its own kernel (act Identity), then PyTorch's sum and activation
    layers.batch_norm_add_act = batch_norm_add_act if on else (lambda x, bn, r, act: act(batch_norm_act(x, bn, nn.Identity()) + r))
    try:
        yield
    finally:
        layers.batch_norm_add_act = batch_norm_add_act


def residual_end_steps(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 8: steps with each residual block's last norm, sum and ReLU (or none) in one kernel
    (`models.norm_act.batch_norm_add_act`) against the norm's kernel followed by PyTorch's sum and ReLU."""
    return switched_steps(names, batch, rounds, _residual_end, "residual_end_step", warmup, log)


@contextlib.contextmanager
def _autocast_float32(on: bool):
    rule = models.kernels.float32_depthwise
    models.kernels.float32_depthwise = rule if on else (lambda stride, onednn_slow: False)
    try:
        yield
    finally:
        models.kernels.float32_depthwise = rule


def autocast_float32_steps(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 9: whole steps under bf16 autocast (whatever the CPU computes natively), the depthwise
    convs where `kernels.float32_depthwise` puts them (float32, on the zoo's kernels) against all of
    the network in bf16."""
    return switched_steps(names, batch, rounds, _autocast_float32, "autocast_float32_step", warmup, log, BF16)


@contextlib.contextmanager
def _norm_bf16(on: bool):
    import models.norm_act as na

    fusable = na._fusable
    # off: a bf16 map takes PyTorch's layers, as before the kernels read bf16 (a cast map still fuses)
    na._fusable = fusable if on else (lambda x, bn, act, cast=False: None if x.dtype == torch.bfloat16 and not cast
                                      else fusable(x, bn, act, cast))
    try:
        yield
    finally:
        na._fusable = fusable


NORM_BF16_MODELS = ("resnet20", "resnet56", "se_resnet20", "resnet38_bottleneck", "mobilenet_v1", "mobilenet_v2",
                    "mobilenet_v3_small", "xception_small")


def norm_bf16_steps(names: list[str], batch: int, rounds: int, warmup: int = 1, log=None) -> list[dict]:
    """Part 10: whole steps under bf16 autocast, the norms of bf16 maps on the zoo's kernels against
    PyTorch's bf16 norm, activation and sum layers."""
    return switched_steps(names, batch, rounds, _norm_bf16, "norm_bf16_step", warmup, log, BF16)


# whole-step tables of switched_steps: their two columns' names
STEP_TABLES = {
    "norm_act_depthwise_step": ("two layers everywhere (img/s)", "one kernel where it wins (img/s)"),
    "residual_end_step": ("norm kernel, then sum and ReLU (img/s)", "one kernel (img/s)"),
    "autocast_float32_step": ("all bf16 (img/s)", "depthwise in float32 where the rule says (img/s)"),
    "norm_bf16_step": ("PyTorch's bf16 norms (img/s)", "the zoo's norm kernels read bf16 (img/s)"),
    "max_pool_step": ("PyTorch's max-pool (img/s)", "the zoo's max-pool kernel (img/s)"),
    "norm_act_depthwise_bf16_step": ("two bf16 layers everywhere (img/s)", "one bf16 kernel where it wins (img/s)"),
}


def norm_act_dw_table(rows: list[dict]) -> str:
    steps = [r for r in rows if r["table"] in STEP_TABLES]
    if steps:
        off, on = STEP_TABLES[steps[0]["table"]]
        return md_table(["model", off, on, "speed-up"],
                        [[f"`{r['model']}`", f"{r['two_layers_img_s']:,.0f}", f"{r['fused_img_s']:,.0f}", f"{r['speedup']:.2f}x"]
                         for r in steps], right=[False, True, True, True])
    if not rows:
        return "(no such layers in these models: their steps are below)"
    return md_table(["expanded map (N x C x H x W)", "k", "stride", "act", "in", "two layers (ms)", "one kernel (ms)", "speed-up", "used"],
                    [[r["shape"], r["kernel"], r["stride"], r["act"], r["models"], f"{r['two_layers_ms']:.2f}",
                      f"{r['fused_ms']:.2f}", f"{r['speedup']:.2f}x", "one kernel" if r["used"] else "two layers"] for r in rows],
                    right=[False, True, True, False, False, True, True, True, False])


# -- part 7: where a step's time goes -------------------------------------------------------------

# Operator groups of a step, in the order the table prints them. Convolutions are told apart by
# their weight: (C_out, C_in / groups, kh, kw).
STEP_GROUPS = ["conv 1x1", "conv depthwise", "conv kxk", "linear", "zoo kernels (norm + act, depthwise)",
               "batch norm", "activation", "pooling", "optimizer", "other"]
_ZOO_KERNELS = ("_BatchNormAct", "_NormActDepthwise", "_DepthwiseConv")  # their autograd functions
_CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::thnn_conv2d", "aten::_slow_conv2d_forward",
             "aten::_slow_conv2d_backward", "aten::_conv_depthwise2d")


def _conv_group(name: str, shapes: list) -> str:
    weight = shapes[2] if name.endswith("_backward") else shapes[1]  # a backward's inputs: (grad_out, x, weight, ...)
    if len(weight) != 4:
        return "conv kxk"
    if weight[2:] == [1, 1]:
        return "conv 1x1"
    return "conv depthwise" if weight[1] == 1 else "conv kxk"


def step_group(name: str, shapes: list) -> str:
    """The group (a STEP_GROUPS entry) of one profiler event, by its operator name and input shapes."""
    if name.startswith(_ZOO_KERNELS):
        return "zoo kernels (norm + act, depthwise)"
    if name in _CONV_OPS:
        return _conv_group(name, shapes)
    if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm"):
        return "linear"
    if "batch_norm" in name:
        return "batch norm"
    if any(a in name for a in ("relu", "hardtanh", "clamp", "threshold", "hardswish", "hardsigmoid", "sigmoid", "silu")):
        return "activation"
    if "pool" in name or name in ("aten::mean", "aten::adaptive_avg_pool2d"):
        return "pooling"
    if "_foreach" in name or name.startswith("Optimizer."):
        return "optimizer"
    return "other"


def step_breakdown(step: "TrainStep", steps: int = 3, warmup: int = 2) -> dict[str, float]:
    """Milliseconds per training step in each STEP_GROUPS group: torch.profiler's self CPU time of
    every operator over `steps` steps (after `warmup`), summed by group. The profiler adds a little to
    every call, so many small operators look heavier than they are; the groups' sum is the step under
    the profiler, a few percent above its unprofiled time."""
    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    ms = dict.fromkeys(STEP_GROUPS, 0.0)
    for event in prof.events():
        ms[_owning_group(event)] += event.self_cpu_time_total / 1e3 / steps
    return ms


def _owning_group(event) -> str:
    """An event inside the optimizer's step (SGD's per-parameter adds on CPU) is the optimizer's;
    anything else goes by its own name and shapes."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    return step_group(event.name, event.input_shapes)


def profile_steps(names: list[str], batch: int, steps: int = 3, warmup: int = 2) -> list[dict]:
    """Part 7: each zoo model's step and its twin's (TWINS), by operator group. The zoo's kernels
    change only what is not a convolution, and both run the same convolutions, so the zoo's step
    without them bounds what any such kernel could give: twin step / zoo's convolution time."""
    rows = []
    for name in names:
        torch.manual_seed(0)
        zoo = models.create_model(name, num_classes=10, stem="cifar")
        torch.manual_seed(0)
        label, build = TWINS[name]
        twin = build()
        ms = {"zoo": step_breakdown(TrainStep(zoo, DEFAULT, batch), steps, warmup),
              "twin": step_breakdown(TrainStep(twin, DEFAULT, batch), steps, warmup)}
        total = {k: sum(v.values()) for k, v in ms.items()}
        conv = {k: sum(v[g] for g in STEP_GROUPS if g.startswith("conv")) for k, v in ms.items()}
        for group in STEP_GROUPS:
            rows.append({"table": "step_profile", "model": name, "twin": label, "batch": batch, "group": group,
                         "zoo_ms": ms["zoo"][group], "twin_ms": ms["twin"][group]})
        rows.append({"table": "step_profile", "model": name, "twin": label, "batch": batch, "group": "step",
                     "zoo_ms": total["zoo"], "twin_ms": total["twin"], "zoo_conv_ms": conv["zoo"], "twin_conv_ms": conv["twin"],
                     "bound_vs_twin": total["twin"] / conv["zoo"]})
    return rows


def profile_table(rows: list[dict]) -> str:
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        step = mine[-1]
        out.append(f"`{name}` against {step['twin']}, ms per step:\n")
        out.append(md_table(["group", "zoo", "twin", "zoo share"],
                            [[r["group"], f"{r['zoo_ms']:.1f}", f"{r['twin_ms']:.1f}", f"{100 * r['zoo_ms'] / step['zoo_ms']:.0f}%"]
                             for r in mine], right=[False, True, True, True]))
        out.append(f"\nConvolutions: zoo {step['zoo_conv_ms']:.0f} ms, twin {step['twin_conv_ms']:.0f} ms. Profiled ratio "
                   f"{step['twin_ms'] / step['zoo_ms']:.2f}x; if everything else in the zoo's step took no time at all: "
                   f"{step['bound_vs_twin']:.2f}x.\n")
    return "\n".join(out)


# -- part 4: roofline ---------------------------------------------------------------------------


def step_traffic(model: nn.Module, batch: int, settings: Settings = DEFAULT) -> dict:
    """FLOPs of one training step and the bytes it must move at least. FLOPs: 3x the forward's
    convolution and linear FLOPs (counted by FlopCounterMode; the backward computes the gradients of
    the input and of the weights, each costing a forward; FlopCounterMode's own backward formulas
    count a grouped convolution as if it were dense, which would inflate depthwise networks ~7x).
    Bytes: every leaf module's output written once by the forward and read once by the
    backward, plus the parameters (read by the forward, gradients written, then SGD with momentum
    reads parameter, gradient and momentum and writes parameter and momentum: 7 passes)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = TrainStep(copy.deepcopy(model), settings, batch)  # its input batch and layout; not stepped
    act_bytes = 0

    def hook(_module, _inputs, output):
        nonlocal act_bytes
        if isinstance(output, torch.Tensor):
            act_bytes += output.numel() * output.element_size()

    leaves = [m for m in step.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=settings.amp_dtype or torch.bfloat16, enabled=settings.amp_dtype is not None):
            step.model(step.x.contiguous(memory_format=torch.channels_last) if settings.channels_last else step.x)
    for h in handles:
        h.remove()
    param_bytes = sum(p.numel() * p.element_size() for p in step.model.parameters())
    return {"flops": 3 * counter.get_total_flops(), "bytes": 2 * act_bytes + 7 * param_bytes}


def roofline(names: list[str], batch: int, rounds: int, warmup: int = 1, steps: int = 1, log=None) -> tuple[dict, list[dict]]:
    """Part 4: each model's measured step time against its floor max(FLOPs / peak FLOP/s,
    bytes / bandwidth), with this machine's peaks measured before and after the timing. The peak is
    measured in the dtype the default settings compute in (bf16 under autocast: with AMX about 6x
    the float32 peak, so a float32 peak would put a bf16 step's compute floor far too high)."""
    from benchmarks.common import measure_peaks, merge_peaks

    dtype = DEFAULT.amp_dtype or torch.float32
    peaks_start = measure_peaks(dtype)
    fns, traffic = {}, {}
    for name in names:
        torch.manual_seed(0)
        model = models.create_model(name, num_classes=10)
        traffic[name] = step_traffic(model, batch)
        fns[name] = TrainStep(model, DEFAULT, batch)
    timings = bench(fns, repeats=rounds, warmup=warmup, inner=steps, on_round=round_logger(log))
    peaks = merge_peaks(peaks_start, measure_peaks(dtype))
    rows = []
    for name in names:
        flops, nbytes, t = traffic[name]["flops"], traffic[name]["bytes"], timings[name].median
        compute_s, memory_s = flops / (peaks["peak_gflops"] * 1e9), nbytes / (peaks["bw_gbs"] * 1e9)
        rows.append({"table": "roofline", "model": name, "batch": batch, "step_gflop": flops / 1e9, "step_gb": nbytes / 1e9,
                     "intensity_flop_per_byte": flops / nbytes, "compute_floor_s": compute_s, "memory_floor_s": memory_s,
                     "measured_s": t, "img_s": batch / t, "x_floor": t / max(compute_s, memory_s),
                     "bound": "compute" if compute_s >= memory_s else "memory", "achieved_gflops": flops / t / 1e9})
    return peaks, rows


def roofline_table(rows: list[dict]) -> str:
    return md_table(
        ["model", "GFLOP / step", "GB / step (floor)", "FLOP/byte", "floor (bound)", "measured", "x floor", "achieved GFLOP/s"],
        [[f"`{r['model']}`", f"{r['step_gflop']:.1f}", f"{r['step_gb']:.2f}", f"{r['intensity_flop_per_byte']:.0f}",
          f"{1e3 * max(r['compute_floor_s'], r['memory_floor_s']):.0f} ms ({r['bound']})", f"{1e3 * r['measured_s']:.0f} ms",
          f"{r['x_floor']:.1f}x", f"{r['achieved_gflops']:.0f}"] for r in rows])


# -- command line -----------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="part 1 batch size (default 256, the training default)")
    p.add_argument("--rounds", type=int, default=7, help="part 1 timed rounds (median over rounds)")
    p.add_argument("--steps", type=int, default=1, help="training steps per sample (both parts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row before timing (both parts)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: docs/training.md, 'Threads')")
    p.add_argument("--all", action="store_true", help="part 2: every registered model, default settings")
    p.add_argument("--all-batch", type=int, default=128, help="part 2 batch size (default 128, to stay under ~10 min)")
    p.add_argument("--all-rounds", type=int, default=5, help="part 2 timed rounds")
    p.add_argument("--models", nargs="+", default=None, help="part 2: only these models")
    p.add_argument("--precision", nargs="*", default=None, metavar="MODEL",
                   help="part 3: bf16/fp32 x channels-last/NCHW for these models (default resnet20 mobilenet_v2), at --all-batch")
    p.add_argument("--roofline", nargs="*", default=None, metavar="MODEL",
                   help="part 4: step FLOPs and bytes against this machine's peaks (default: every model), at --all-batch")
    p.add_argument("--twins", nargs="*", default=None, metavar="MODEL",
                   help=f"each zoo model against its twin, equal default settings, at --all-batch (default: {' '.join(TWINS)})")
    p.add_argument("--depthwise", nargs="*", default=None, metavar="MODEL",
                   help=f"part 5: every depthwise layer of these models, oneDNN against the zoo's kernels (default: {' '.join(DEPTHWISE_MODELS)})")
    p.add_argument("--norm-act-depthwise", nargs="*", default=None, metavar="MODEL",
                   help=f"part 6: every expanded norm + act + depthwise conv of these models, two layers against one "
                        f"kernel (default: {' '.join(NORM_ACT_DW_MODELS)})")
    p.add_argument("--residual-end", nargs="*", default=None, metavar="MODEL",
                   help=f"part 8: whole steps, each residual block's norm + sum (+ ReLU) in one kernel against the norm's kernel "
                        f"then the sum (and ReLU) (default: {' '.join(RESIDUAL_MODELS)})")
    p.add_argument("--autocast-float32", nargs="*", default=None, metavar="MODEL",
                   help=f"part 9: whole steps under bf16 autocast, depthwise convs in float32 where models.kernels."
                        f"float32_depthwise says against all bf16 (default: {' '.join(DEPTHWISE_MODELS)})")
    p.add_argument("--norm-bf16", nargs="*", default=None, metavar="MODEL",
                   help=f"part 10: whole steps under bf16 autocast, the norms of bf16 maps on the zoo's kernels against "
                        f"PyTorch's bf16 layers (default: {' '.join(NORM_BF16_MODELS)})")
    p.add_argument("--norm-act-depthwise-bf16", nargs="*", default=None, metavar="MODEL",
                   help=f"part 11: under bf16 autocast, every stride-1 norm + act + depthwise conv of these models, two bf16 "
                        f"layers against one kernel reading and writing bf16 (default: {' '.join(DEPTHWISE_MODELS)})")
    p.add_argument("--max-pool", nargs="*", default=None, metavar="MODEL",
                   help="part 12: every max-pool of these models, PyTorch's against the zoo's kernel, and whole steps "
                        "(default: xception_small)")
    p.add_argument("--profile", nargs="*", default=None, metavar="MODEL",
                   help=f"part 7: where each model's step and its twin's go, by operator group (torch.profiler), at "
                        f"--all-batch (default: {' '.join(DEPTHWISE_MODELS)})")
    p.add_argument("--skip-head-to-head", action="store_true", help="run part 2 only")
    p.add_argument("--out", type=Path, default=None, help="write every row (both tables) to this CSV file")
    p.add_argument("--quiet", action="store_true", help="no per-round progress on stderr")
    return p.parse_args(argv)


def _print_layers_and_steps(layer_table: str, rows: list[dict], steps: list[dict], settings: Settings, batch: int) -> list[dict]:
    """Parts 6, 11 and 12 print a table of layers, then the whole steps of the same models; returns both's rows."""
    print(layer_table + "\n")
    print(f"Whole training steps ({settings.describe()}), the same models, batch {batch}:\n")
    print(norm_act_dw_table(steps) + "\n")
    return rows + steps


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py does (keep_freed_memory=true): every row gets the same allocator
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    cmd = "python -m benchmarks.train_speed " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"`{cmd.strip()}`\n")
    print(f"Machine: {machine_info()}\n")
    csv_rows: list[dict] = []
    t0 = time.perf_counter()
    if not args.skip_head_to_head:
        res = head_to_head(args.batch, args.rounds, args.warmup, args.steps, log=log)
        c = res["check"]
        print(
            f"## mobilenet_v2, CIFAR layout, batch {args.batch}, {args.rounds} rounds x {args.steps} step(s)\n\n"
            f"Twin check: torchvision cifar-adapted {c['tv_params']:,} params, final map {c['tv_map'][0]}x{c['tv_map'][1]}; "
            f"zoo {c['zoo_params']:,} params, {c['zoo_map'][0]}x{c['zoo_map'][1]}; {res['cost']['macs'] / 1e6:.1f} M mult-adds.\n"
        )
        print(head_to_head_table(res) + "\n")
        print(md_table(["ratio (median of per-round ratios)", "value"], [[k, f"{v:.2f}x"] for k, v in res["ratios"].items()]) + "\n")
        target = res["ratios"]["zoo_default/tv_plain (target >= 1.3)"]
        print(f"Target (docs/train_speed.md): zoo default >= 1.3x torchvision plain: {'MET' if target >= 1.3 else 'NOT MET'} ({target:.2f}x).\n")
        if not all(r["finite"] for r in res["rows"]):
            print("WARNING: some weights became non-finite during the run\n")
        csv_rows += [dict(r, **{"tv_map": "x".join(map(str, c["tv_map"]))}) for r in res["rows"]]
        csv_rows += [{"table": "ratios", "row": k, "speedup_vs_tv_plain": v} for k, v in res["ratios"].items()]
    if args.twins is not None:
        rows = twins(args.twins or list(TWINS), args.all_batch, args.all_rounds, args.warmup, args.steps, log=log)
        print(f"## Zoo against twin, cifar layout, equal settings ({DEFAULT.describe()}), batch {args.all_batch}, "
              f"{args.all_rounds} rounds x {args.steps} step(s); twin = torchvision's model adapted as our cifar stem, "
              f"or the zoo model with its kernel dispatch off where torchvision has none\n")
        print(twins_table(rows) + "\n")
        csv_rows += rows
    if args.all:
        rows = all_models(args.all_batch, args.all_rounds, args.warmup, args.steps, names=args.models, log=log)
        print(
            f"## Every model, cifar stem, width 1.0, 10 classes, default settings ({DEFAULT.describe()}), "
            f"batch {args.all_batch}, {args.all_rounds} rounds x {args.steps} step(s)\n"
        )
        print(all_models_table(rows) + "\n")
        if not all(r["finite"] for r in rows):
            print("WARNING: non-finite weights in: " + ", ".join(r["model"] for r in rows if not r["finite"]) + "\n")
        csv_rows += rows
    if args.precision is not None:
        names = args.precision or ["resnet20", "mobilenet_v2"]
        rows = precision_grid(names, args.all_batch, args.all_rounds, args.warmup, args.steps, log=log)
        print(f"## Precision and memory format, batch {args.all_batch}, {args.all_rounds} rounds x {args.steps} step(s); "
              f"this CPU computes bf16 natively: {'yes' if native_bf16_cpu() else 'no'} "
              f"(trainer.precision=auto picks {'bf16-mixed' if native_bf16_cpu() else '32-true'})\n")
        print(precision_table(rows) + "\n")
        csv_rows += rows
    if args.roofline is not None:
        peaks, rows = roofline(args.roofline or models.list_models(), args.all_batch, args.all_rounds, args.warmup, args.steps, log=log)
        print(f"## Roofline of a training step, default settings ({DEFAULT.describe()}), batch {args.all_batch}; this machine: "
              f"{peaks['peak_gflops']:.0f} GFLOP/s peak ({peaks['dtype']}), {peaks['bw_gbs']:.1f} GB/s copy bandwidth\n")
        print(roofline_table(rows) + "\n")
        csv_rows += rows
    if args.depthwise is not None:
        rows = depthwise_layers(args.depthwise or list(DEPTHWISE_MODELS), args.all_batch, args.all_rounds, args.warmup, log=log)
        print(f"## Depthwise layers, forward + backward, float32 channels-last, batch {args.all_batch}, median of "
              f"{args.all_rounds} interleaved rounds: oneDNN's conv against the zoo's C kernels (models/depthwise.py)\n")
        print(depthwise_table(rows) + "\n")
        csv_rows += rows
    if args.norm_act_depthwise is not None:
        rows = norm_act_dw_layers(args.norm_act_depthwise or list(NORM_ACT_DW_MODELS), args.all_batch, args.all_rounds,
                                  args.warmup, log=log)
        print(f"## Expanded maps: norm + act + depthwise conv, forward + backward, float32 channels-last, batch "
              f"{args.all_batch}, median of {args.all_rounds} interleaved rounds: two layers against one kernel "
              "(models/norm_act_depthwise.py)\n")
        steps = norm_act_dw_steps(args.norm_act_depthwise or list(NORM_ACT_DW_MODELS), args.all_batch, args.all_rounds,
                                  args.warmup, log=log)
        csv_rows += _print_layers_and_steps(norm_act_dw_table(rows), rows, steps, DEFAULT, args.all_batch)
    if args.norm_act_depthwise_bf16 is not None:
        names = args.norm_act_depthwise_bf16 or list(DEPTHWISE_MODELS)
        rows = bf16_norm_act_dw_layers(names, args.all_batch, args.all_rounds, args.warmup, log=log)
        print(f"## Under bf16 autocast: norm + act + depthwise convs that stay in bf16, forward + backward, channels-last, "
              f"batch {args.all_batch}, median of {args.all_rounds} interleaved rounds: two bf16 layers against one kernel "
              "reading and writing bf16 (models/norm_act_depthwise.py)\n")
        steps = bf16_norm_act_dw_steps(names, args.all_batch, args.all_rounds, args.warmup, log=log)
        csv_rows += _print_layers_and_steps(norm_act_dw_table(rows), rows, steps, BF16, args.all_batch)
    if args.max_pool is not None:
        names = args.max_pool or ["xception_small"]
        rows = max_pool_layers(names, args.all_batch, args.all_rounds, args.warmup, log=log)
        print(f"## Max-pools, forward + backward, channels-last, batch {args.all_batch}, median of {args.all_rounds} "
              "interleaved rounds: PyTorch's max_pool2d against the zoo's kernel (models/pool.py)\n")
        steps = max_pool_steps(names, args.all_batch, args.all_rounds, args.warmup, log=log)
        csv_rows += _print_layers_and_steps(max_pool_table(rows), rows, steps, DEFAULT, args.all_batch)
    # parts 8-10: whole steps with one kernel choice off and on (switched_steps)
    for chosen, steps, default, title in (
        (args.residual_end, residual_end_steps, RESIDUAL_MODELS,
         "## Residual blocks' end: norm, sum and ReLU (ResNets) or none (inverted residuals) in one kernel "
         f"(models/norm_act.py) against the norm's kernel then PyTorch's sum and ReLU; whole training steps ({DEFAULT.describe()})"),
        (args.autocast_float32, autocast_float32_steps, DEPTHWISE_MODELS,
         "## Under bf16 autocast: depthwise convs in float32 where models.kernels.float32_depthwise says, against "
         "the whole network in bf16; whole training steps (bf16 autocast, channels-last, param groups)"),
        (args.norm_bf16, norm_bf16_steps, NORM_BF16_MODELS,
         "## Under bf16 autocast: norms (+ activation, + residual sum) of bf16 maps on the zoo's kernels, reading "
         "and writing bf16, against PyTorch's bf16 layers; whole training steps (bf16 autocast, channels-last, param groups)"),
    ):
        if chosen is not None:
            rows = steps(chosen or list(default), args.all_batch, args.all_rounds, args.warmup, log=log)
            print(f"{title}, batch {args.all_batch}, median of {args.all_rounds} interleaved rounds\n")
            print(norm_act_dw_table(rows) + "\n")
            csv_rows += rows
    if args.profile is not None:
        rows = profile_steps(args.profile or list(DEPTHWISE_MODELS), args.all_batch, steps=args.all_rounds, warmup=args.warmup)
        print(f"## Where a training step goes, zoo against twin ({DEFAULT.describe()}), batch {args.all_batch}: "
              f"torch.profiler self CPU time by operator group, mean of {args.all_rounds} steps\n")
        print(profile_table(rows) + "\n")
        csv_rows += rows
    print(f"Wall time {time.perf_counter() - t0:.0f} s; load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.out is not None and csv_rows:
        write_csv(args.out, csv_rows)
        print(f"CSV: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
