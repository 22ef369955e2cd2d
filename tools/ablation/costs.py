"""Params and mult-adds of every family in every mode (no training), the MobileNets Table 4 check,
and the equal-cost width: how wide the separable network must be to cost the full one's mult-adds."""

from __future__ import annotations

from collections import Counter

import torch

import models
from benchmarks.common import md_table

from .runs import MODES

# The families of docs/ablation.md and the models measured for each.
FAMILIES = {
    "MobileNetV1": ["mobilenet_v1"],
    "MobileNetV2": ["mobilenet_v2"],
    "MobileNetV3": ["mobilenet_v3_large", "mobilenet_v3_small"],
    "Xception": ["xception_small", "xception"],
    "ResNet basic": ["resnet20", "resnet56"],
    "ResNet bottleneck": ["resnet38_bottleneck", "resnet50"],
    "SE": ["se_resnet20", "se_resnet50"],
}
# MobileNets paper (Howard et al. 2017), Table 4: ImageNet, 224x224, 1000 classes.
PAPER_TABLE4 = {"separable": (4.2e6, 569e6), "full": (29.3e6, 4866e6)}


def family_of(model: str) -> str:
    return next((family for family, names in FAMILIES.items() if model in names), model)


def cost(name: str, mode: str, stem: str = "cifar", num_classes: int = 10, size: int = 32, width: float = 1.0,
         k: int = 3) -> dict[str, int]:
    model = models.create_model(name, num_classes=num_classes, stem=stem, width=width, conv_mode=mode,
                                pointwise_kernel_size=k)
    return models.profile(model, (1, 3, size, size))


def match_width(name: str, mode: str = "separable", target_mode: str = "full", target_width: float = 1.0,
                tol: float = 1e-3, **kw) -> dict:
    """The width at which `name` in `mode` costs (mult-adds) what it costs in `target_mode` at
    `target_width`. Channel counts are rounded (make_divisible), so mult-adds step with the width:
    bisection brackets the target and returns the bracket end whose mult-adds are closest."""
    target = cost(name, target_mode, width=target_width, **kw)["macs"]
    seen: dict[float, dict[str, int]] = {}  # each count builds a model: the bracket ends are asked twice

    def counted(w: float) -> dict[str, int]:
        if w not in seen:
            seen[w] = cost(name, mode, width=w, **kw)
        return seen[w]

    macs = lambda w: counted(w)["macs"]  # noqa: E731
    lo = hi = target_width
    if macs(lo) < target:
        while macs(hi) < target:
            lo, hi = hi, hi * 2
            if hi > 64:
                raise ValueError(f"{name} {mode} does not reach {target:,} mult-adds below width 64")
    else:
        while macs(lo) > target:
            lo, hi = lo / 2, lo
            if lo < 1e-3:
                raise ValueError(f"{name} {mode} stays above {target:,} mult-adds at any width")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs(mid) >= target else (mid, hi)
    width = min((lo, hi), key=lambda w: abs(macs(w) - target))
    found = counted(width)
    return {"model": name, "mode": mode, "width": round(width, 4), "macs": found["macs"], "params": found["params"],
            "target_mode": target_mode, "target_width": target_width, "target_macs": target}


def changed_layers(model: torch.nn.Module, mode: str, k: int = 3) -> str:
    """What `mode` changes in `model` (built separable), counted from its modules."""
    from models.layers import DepthwiseSeparableConv, InvertedResidual

    if mode == "separable":
        return "(as published)"
    if mode == "full":
        pairs: Counter = Counter()
        for m in model.modules():
            if isinstance(m, (DepthwiseSeparableConv, InvertedResidual)):
                kk = m.conv_dw.conv.kernel_size[0]
                what = "dw+pw" if isinstance(m, DepthwiseSeparableConv) else "dw+pwl"
                pairs[f"{what} {kk}x{kk}"] += 1
        return "; ".join(f"{n} {p} pairs -> dense {p.split()[1]}" for p, n in pairs.items()) or "nothing (no separable pairs)"
    roles: Counter = Counter()
    for name, m in model.named_modules():
        if isinstance(m, models.PointwiseConv):
            parts = name.split(".")
            if "se" in parts:
                roles["SE " + parts[-1].replace("conv_", "")] += 1
            elif "shortcut" in parts:
                roles["shortcut"] += 1
            elif parts[0] == "head":
                roles["head"] += 1
            else:
                roles[{"conv_pw": "pw", "conv_pwl": "pwl"}.get(parts[-2], parts[-2])] += 1
    order = ["pw", "pwl", "SE reduce", "SE expand", "shortcut", "head"]
    ranked = sorted(roles.items(), key=lambda rn: order.index(rn[0]) if rn[0] in order else len(order))
    return f"{sum(roles.values())} pointwise -> {k}x{k}: " + ", ".join(f"{n} {r}" for r, n in ranked)


def cost_tables(width: float = 1.0, k: int = 3) -> str:
    lines = [f"CIFAR stem, 10 classes, one 3x32x32 image, width {width}, pointwise_kxk with k={k}. "
             "Counted by `models.profile` (FlopCounterMode; mult-adds = FLOPs / 2). Layer roles: pw = expand/reduce "
             "pointwise, pwl = linear projection, SE reduce/expand, shortcut = projection shortcut, head = head conv(s).",
             ""]
    header = ["model", "mode", "params", "mult-adds", "params vs separable", "mult-adds vs separable", "what changes"]
    for family, names in FAMILIES.items():
        rows = []
        for name in names:
            base = None
            separable = models.create_model(name, width=width)
            for mode in MODES:
                c = cost(name, mode, width=width, k=k)
                base = base or c
                rows.append([f"`{name}`", mode, f"{c['params']:,}", f"{c['macs']:,}", f"{c['params'] / base['params']:.2f}x",
                             f"{c['macs'] / base['macs']:.2f}x", changed_layers(separable, mode, k)])
        lines += [f"#### {family}", "", md_table(header, rows, right=[False, False, True, True, True, True, False]), ""]
    return "\n".join(lines)


def imagenet_check() -> str:
    rows = []
    for mode in MODES:
        c = cost("mobilenet_v1", mode, stem="imagenet", num_classes=1000, size=224)
        paper = PAPER_TABLE4.get(mode)
        pp, pm = (f"{paper[0] / 1e6:.1f} M", f"{paper[1] / 1e6:,.0f} M") if paper else ("--", "--")
        rows.append([mode, f"{c['params'] / 1e6:.2f} M ({c['params']:,})", pp, f"{c['macs'] / 1e6:,.1f} M", pm])
    intro = ("`mobilenet_v1`, stem=imagenet, 1000 classes, one 3x224x224 image, width 1.0, against the MobileNets "
             "paper, Table 4 (\"Conv MobileNet\" = every depthwise-separable block as one full 3x3 conv):")
    table = md_table(["mode", "params (ours)", "params (paper)", "mult-adds (ours)", "mult-adds (paper)"], rows)
    return f"{intro}\n\n{table}\n"
