"""`fuse(model)`: an inference-ready copy of a model, outputs equal to the original's in eval mode.

What it does, each step measured to pay on this project's CPU (docs/speed.md):

1. Batch norm folded into the convolution before it: w' = w * g / sqrt(v + eps) per output
   channel, b' = (b - m) * g / sqrt(v + eps) + beta; the norm becomes `nn.Identity`. Pairs are
   found two ways, both safe by construction:
   - structurally: a `ConvNormAct` (attributes `conv`, `bn`, forward `act(bn(conv(x)))`), and two
     consecutive children (conv, bn) of an `nn.Sequential`;
   - by data flow, when the model traces with torch.fx: a BatchNorm2d whose input is the output of
     a conv (nn.Conv2d, PointwiseConv included) used by nothing else, each module called exactly once.
2. Activations in place (`inplace=True`) where the input is a fresh tensor nobody else reads: the
   activation of a `ConvNormAct`, and, when the model traces, any activation module whose input
   is produced by a conv / norm / linear module or an addition and has no other user. (Xception's
   leading ReLU, whose input also feeds the shortcut, stays out of place.)
3. Channels-last memory for the weights, and a forward pre-hook that makes 4-D inputs
   channels-last, so every convolution runs oneDNN's NHWC kernels without reorders.
4. On CPU builds with oneDNN (`onednn=True`): the conv of each `ConvNormAct` becomes a
   `OneDNNConv` -- one oneDNN primitive computing conv + bias + activation (ReLU, ReLU6,
   Hardswish, SiLU, sigmoids as post-ops, the op torch.compile's CPU backend emits) with its
   weight reordered into oneDNN's blocked layout once per input shape, not on every call. It
   keeps the dense weight and bias as parameters and falls back to F.conv2d + activation whenever the fast
   op does not apply (not float32, autocast on, autograd recording, tracing or exporting), so the
   model still exports to ONNX and runs under autocast.

The copy is a module of the same class (so `model.classifier`, `forward_features` and most of the
state_dict keep working; folded norms lose their entries), in eval mode, with `requires_grad=False`
parameters. Nothing is traced or compiled: it accepts any input size the original accepts.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvNormAct
from .pointwise import PointwiseConv

__all__ = ["fuse", "fold_batchnorms", "OneDNNConv", "MicroBatch"]

_CONVS = (nn.Conv2d,)  # PointwiseConv is an nn.Conv2d
_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Mish)
_FRESH_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)  # outputs a new tensor
_FRESH_FUNCTIONS = (operator.add, torch.add, operator.mul, torch.mul)


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode `bn` into `conv` (in place): conv(x) then bn == the new conv(x)."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = conv.weight
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    conv.weight = nn.Parameter((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _CONVS)
        and type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.weight.shape[0]
    )


class _Tracer(fx.Tracer):
    """Keeps PointwiseConv a leaf, a conv module like nn.Conv2d (which fx keeps a leaf by default)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PointwiseConv) or super().is_leaf_module(m, qualname)


def _traced_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """(conv name, bn name) pairs and names of activations safe to run in place, by data flow.
    Empty when the model does not trace symbolically."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow etc.: fall back to the structural rules
        return [], []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    once = lambda name: calls.get(name) == 1  # noqa: E731 -- a shared module is never touched
    pairs, acts = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not once(node.target) or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        module = modules[node.target]
        if (
            isinstance(module, nn.BatchNorm2d)
            and src.op == "call_module"
            and once(src.target)
            and _foldable(modules[src.target], module)
        ):
            pairs.append((src.target, node.target))
        elif isinstance(module, _ACTS) and hasattr(module, "inplace"):
            while src.op == "call_module" and type(modules[src.target]) is nn.Identity:  # see through
                if len(src.args) != 1 or not isinstance(src.args[0], fx.Node) or len(src.args[0].users) != 1:
                    break
                src = src.args[0]
            fresh = (src.op == "call_module" and isinstance(modules[src.target], _FRESH_MODULES)) or (
                src.op == "call_function" and src.target in _FRESH_FUNCTIONS
            )
            if fresh:
                acts.append(node.target)
    return pairs, acts


def _set(model: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, value)


def fold_batchnorms(model: nn.Module, inplace_acts: bool = True) -> tuple[int, int]:
    """Fold every safely identified conv -> BatchNorm2d pair of an eval-mode `model` in place,
    and switch safe activations to in place; returns (norms folded, activations made in place)."""
    pairs, acts = _traced_pairs(model)
    for name, module in model.named_modules():
        if isinstance(module, ConvNormAct):
            if _foldable(module.conv, module.bn):
                pairs.append((f"{name}.conv" if name else "conv", f"{name}.bn" if name else "bn"))
            if isinstance(module.act, _ACTS) and hasattr(module.act, "inplace"):
                acts.append(f"{name}.act" if name else "act")
        elif isinstance(module, nn.Sequential):
            kids = list(module.named_children())
            for (cname, conv), (bname, bn) in zip(kids, kids[1:]):
                if _foldable(conv, bn):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + cname, prefix + bname))
    modules = dict(model.named_modules())
    done: set[str] = set()
    for conv_name, bn_name in pairs:
        if bn_name in done or conv_name in done:
            continue
        _fold(modules[conv_name], modules[bn_name])
        _set(model, bn_name, nn.Identity())
        done.update((conv_name, bn_name))
    n_acts = 0
    if inplace_acts:
        for name in dict.fromkeys(acts):
            modules[name].inplace = True
            n_acts += 1
    return len(done) // 2, n_acts


# activation module -> (oneDNN post-op name, its scalars)
_POST_OPS = {
    nn.Identity: lambda m: ("none", []),
    nn.ReLU: lambda m: ("relu", []),
    nn.ReLU6: lambda m: ("hardtanh", [0.0, 6.0]),
    nn.Hardtanh: lambda m: ("hardtanh", [float(m.min_val), float(m.max_val)]),
    nn.Hardswish: lambda m: ("hardswish", []),
    nn.SiLU: lambda m: ("swish", []),
    nn.Sigmoid: lambda m: ("sigmoid", []),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", []),
}


def _onednn_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_convolution_pointwise")
        and hasattr(mkldnn, "_reorder_convolution_weight")
    )


class OneDNNConv(nn.Module):
    """Inference-only conv + bias + activation as one oneDNN primitive (activation as a post-op),
    with the weight prepacked into oneDNN's blocked layout for the input shape (cached per shape,
    `max_cached_shapes` of them).

    `weight` and `bias` stay ordinary (dense, channels-last) parameters; the packed copy is a
    cache, dropped on copy/pickle and on `.to()`. Anything the fast op does not cover -- another
    dtype or device, autocast, autograd recording, TorchScript tracing, torch.export / ONNX export
    -- runs `act(F.conv2d(...))` on the dense weight instead, with the same result.
    """

    max_cached_shapes = 4

    def __init__(self, conv: nn.Module, act: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last), requires_grad=False)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.weight.shape[0], dtype=conv.weight.dtype)
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]  # noqa: E731
        self.stride = pair(conv.stride)
        self.padding = pair(getattr(conv, "padding", 0))
        self.dilation = pair(getattr(conv, "dilation", 1))
        self.groups = conv.groups
        self.act = act
        self.post_op, self.post_op_scalars = _POST_OPS[type(act)](act)
        self._packed = None

    @staticmethod
    def supports(conv: nn.Module, act: nn.Module) -> bool:
        if type(act) not in _POST_OPS or conv.weight.dtype != torch.float32:
            return False
        if isinstance(conv, PointwiseConv):
            return True
        return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            type(x) is torch.Tensor  # not a FakeTensor (torch.export, torch.compile)
            and x.dtype == torch.float32
            and x.is_cpu
            and self.weight.is_cpu
            and not torch.jit.is_tracing()
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            packed = self._packed.get(x.shape) if self._packed is not None else None
            if packed is None:
                # oneDNN picks the weight layout for the problem size: packing without the input
                # size measured up to 50x slower on large-channel 1x1 convs (docs/speed.md), so the
                # cache is per input shape (a few shapes at most; a new one costs one reorder,
                # which F.conv2d pays on every call).
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight, self.padding, self.stride, self.dilation, self.groups, list(x.shape)
                )
                if self._packed is None or len(self._packed) >= self.max_cached_shapes:
                    self._packed = {}
                self._packed[x.shape] = packed
            return torch.ops.mkldnn._convolution_pointwise(
                x, packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.post_op, self.post_op_scalars, "",
            )  # fmt: skip
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.act(y)

    def _apply(self, fn, recurse=True):
        self._packed = None  # the weight may be moved or cast: repack on next use
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None  # an opaque oneDNN tensor: neither copyable nor picklable
        return state

    def extra_repr(self) -> str:
        w = self.weight.shape
        return (
            f"{w[1] * self.groups}, {w[0]}, kernel_size={tuple(w[2:])}, stride={tuple(self.stride)}, "
            f"padding={tuple(self.padding)}, groups={self.groups}, post_op={self.post_op}"
        )


def _use_onednn_convs(model: nn.Module) -> int:
    """Replace conv + activation of every ConvNormAct whose norm is gone (folded, or never there)."""
    n = 0
    for module in model.modules():
        if isinstance(module, ConvNormAct) and type(module.bn) is nn.Identity and OneDNNConv.supports(module.conv, module.act):
            module.conv = OneDNNConv(module.conv, module.act)
            module.act = nn.Identity()
            n += 1
    return n


def _to_channels_last(module: nn.Module, args):
    (x, *rest) = args
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *rest)
    return None


def fuse(model: nn.Module, channels_last: bool = True, inplace_acts: bool = True, onednn: bool | None = None) -> nn.Module:
    """An inference-ready copy of `model` (the original is untouched): eval mode, batch norms
    folded into the preceding convs, safe activations in place, channels-last weights and
    inputs, conv + activation as single prepacked oneDNN primitives, gradients off. Outputs
    match `model.eval()` to float rounding (1e-4 in the tests).

    onednn: use `OneDNNConv` (default: when channels_last and this PyTorch has oneDNN's fused
    conv op). `fuse(model, onednn=False)` gives a plain-PyTorch module (BN folded, channels-last).
    `fused.fuse_stats` counts what was done.
    """
    fused = copy.deepcopy(model).eval()
    fused.requires_grad_(False)
    folded, inplace = fold_batchnorms(fused, inplace_acts)
    stats = {"bn_folded": folded, "inplace_acts": inplace, "onednn_convs": 0}
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        fused.register_forward_pre_hook(_to_channels_last)
        if onednn or (onednn is None and _onednn_available()):
            stats["onednn_convs"] = _use_onednn_convs(fused)
    fused.fuse_stats = stats
    return fused


class MicroBatch(nn.Module):
    """Run `module` on slices of at most `batch` images and concatenate the outputs.

    For models whose outputs are per-image (any eval-mode CNN here), the result is the same. On a
    small CPU it can be much faster for large batches: activations of a few images stay in cache
    and under the allocator's mmap threshold, where a 256-image batch allocates 100 MB maps that
    the kernel must fault in page by page (benchmarks/inference.py measures both).
    """

    def __init__(self, module: nn.Module, batch: int = 32):
        super().__init__()
        if batch < 1:
            raise ValueError(f"MicroBatch: batch must be >= 1, got {batch}")
        self.module, self.batch = module, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.batch:
            return self.module(x)
        return torch.cat([self.module(chunk) for chunk in x.split(self.batch)])
