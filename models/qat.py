"""Quantization-aware fine-tuning: simulate in float, while training, what `models.quantize` does.

`prepare_qat(model)` returns a `QATSimulator`; `simulator(model, x)` runs `model(x)` with
- every conv/linear weight that `models.quantize` turns into int8 fake-quantized as onnxruntime will
  store it: per output channel, symmetric int8 in [-127, 127], scale max|w_c| / 127;
- the input of each of those layers fake-quantized as its QDQ graph will: per tensor, asymmetric
  uint8, over a range that tracks an exponential moving average of the batches' min and max while
  training and stays frozen in eval mode (onnxruntime's range always includes 0).
Both round in the forward pass and pass gradients straight through (zero outside the activation
range), so the float weights learn to sit well on the int8 grid. The layers `float_layers` keeps in
float32 ("first": the stem conv, `quantize`'s default) are left alone.

The model is not changed: no parametrizations or swapped modules, so its state_dict keys stay those
every checkpoint, eval.py and the export tools expect. The weights are swapped per call with
`torch.func.functional_call`, the activation fake-quant runs from forward pre-hooks that exist only
during the call, and the range buffers live in the simulator, a module of its own to keep next to
the model (training/module.py keeps it as the LightningModule's `qat`, so checkpoints carry it).

Not simulated: the quantize/dequantize pairs onnxruntime also puts around additions, pooling and
other ops (a residual sum is quantized once more before the next conv reads it), int32 biases, and
the int16 saturation of uint8 x int8 products on CPUs without VNNI (docs/int8.md). After fine-tuning
`models.quantize` calibrates the activation ranges afresh, with its own method, on training images.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from .int8 import DEFAULT_FLOAT_LAYERS, FLOAT_LAYERS

WEIGHT_QMAX = 127  # symmetric int8 weights use [-127, 127] (onnxruntime's symmetric int8 range)
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations
QUANTIZED_TYPES = (nn.Conv2d, nn.Linear)  # exported as Conv and Gemm/MatMul, the ops `quantize` makes int8; PointwiseConv is a Conv2d


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """`w` rounded to onnxruntime's per-channel int8 grid (scale max|w_c| / 127), straight-through
    gradient. Why the raw conv weight, when `quantize` quantizes it after `models.fuse` folded the
    batch norm in: folding multiplies output channel c by one number k_c, and this grid scales with
    the channel's max, so fake_quantize(w_c * k_c) == k_c * fake_quantize(w_c) (rounding is odd-
    symmetric, so a negative k_c changes nothing). The raw weight's grid is the folded weight's."""
    scale = w.detach().abs().amax(dim=tuple(range(1, w.ndim))).float() / WEIGHT_QMAX
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero channel stays zero
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX).to(w.dtype)


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake-quant of a layer's input over an observed range: an
    exponential moving average (weight `momentum`, torch's MovingAverageMinMaxObserver's 0.01) of the
    training batches' min and max, frozen in eval mode. Computed in float32 (bf16 autocast hands
    bf16 activations in; the result goes back in their dtype). No host syncs: a GPU step never waits."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))  # no batch seen yet: use the batch's own range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = (v.float() for v in x.detach().aminmax())
        if self.training:
            with torch.no_grad():
                self.min_val.copy_(torch.where(self.observed, torch.lerp(self.min_val, lo, self.momentum), lo))
                self.max_val.copy_(torch.where(self.observed, torch.lerp(self.max_val, hi, self.momentum), hi))
                self.observed.fill_(True)
        # onnxruntime's compute_scale_zp: the range is widened to include 0, then 256 levels span it
        lo = torch.where(self.observed, self.min_val, lo).clamp(max=0.0)
        hi = torch.where(self.observed, self.max_val, hi).clamp(min=0.0)
        scale = ((hi - lo) / (ACT_QMAX - ACT_QMIN)).clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
        zero = (ACT_QMIN - lo / scale).round().clamp(ACT_QMIN, ACT_QMAX).to(torch.int32).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, ACT_QMIN, ACT_QMAX).to(x.dtype)


def _key(name: str) -> str:
    return name.replace(".", "-")  # module names hold no "-", and a ModuleDict key may not hold "."


class QATSimulator(nn.Module):
    """Runs a model as its int8 version will compute, in float, with straight-through gradients
    (the module docstring says what is simulated). Holds one `ActivationFakeQuant` per conv/linear
    layer of the model (state_dict keys `act.<layer name, dots as dashes>.min_val`, ...), including
    the one of a float layer, which stays unused: the keys then do not depend on which layers run
    in float. Call it as `simulator(model, x)`; the model is not a submodule, so neither module's
    state_dict holds the other's tensors."""

    def __init__(self, model: nn.Module, float_layers: str | None = DEFAULT_FLOAT_LAYERS, momentum: float = 0.01):
        super().__init__()
        if float_layers not in FLOAT_LAYERS:
            raise ValueError(f"float_layers={float_layers!r}: choose None, 'first', 'last' or 'ends'")
        self.float_layers = float_layers
        self.layer_names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)]
        self.act = nn.ModuleDict({_key(n): ActivationFakeQuant(momentum) for n in self.layer_names})
        self._float_names: list[str] | None = None  # resolved at the first call: it needs a forward pass

    def float_names(self, model: nn.Module, x: torch.Tensor) -> list[str]:
        """The layers kept in float32: the first and/or last conv/linear *called*, as `quantize`
        picks the first/last Conv/Gemm/MatMul node of the exported graph, which is in call order
        (not necessarily the order the modules were registered in). Found by one no-grad,
        eval-mode forward pass of one image, once."""
        if self._float_names is None:
            if self.float_layers is None:
                self._float_names = []
            else:
                called: list[str] = []
                names = {m: n for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}
                hooks = [m.register_forward_pre_hook(lambda mod, args: called.append(names[mod])) for m in names]
                was_training = model.training
                try:
                    with torch.no_grad():
                        model.eval()(x[:1])
                finally:
                    model.train(was_training)
                    for h in hooks:
                        h.remove()
                self._float_names = ([called[0]] if self.float_layers in ("first", "ends") else []) + \
                                    ([called[-1]] if self.float_layers in ("last", "ends") else [])
        return self._float_names

    def quantized_layers(self, model: nn.Module, x: torch.Tensor) -> dict[str, nn.Module]:
        kept = set(self.float_names(model, x))
        modules = dict(model.named_modules())
        return {n: modules[n] for n in self.layer_names if n not in kept}

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layers = self.quantized_layers(model, x)
        hooks = [m.register_forward_pre_hook(self._input_hook(self.act[_key(n)])) for n, m in layers.items()]
        try:
            # the weights as int8 will store them; gradients reach the float parameters through the STE
            weights = {f"{n}.weight": fake_quantize_weight(m.weight) for n, m in layers.items()}
            return functional_call(model, weights, (x,))
        finally:
            for h in hooks:
                h.remove()

    @staticmethod
    def _input_hook(fake_quant: ActivationFakeQuant):
        return lambda module, args: (fake_quant(args[0]), *args[1:])

    def extra_repr(self) -> str:
        return f"layers={len(self.layer_names)}, float_layers={self.float_layers!r}"


def prepare_qat(model: nn.Module, float_layers: str | None = DEFAULT_FLOAT_LAYERS, momentum: float = 0.01) -> QATSimulator:
    """A `QATSimulator` for `model` (see the module docstring): fine-tune with
    `loss(simulator(model, x), y)` in place of `loss(model(x), y)`, keep `simulator.train()`/`.eval()`
    in step with the model, then `models.quantize(model, calibration, float_layers=...)` with the
    same `float_layers`. The simulator's state_dict (the activation ranges) is separate from the
    model's, which is unchanged."""
    return QATSimulator(model, float_layers=float_layers, momentum=momentum)
