"""int8 inference on the CPU: post-training static quantization of any zoo model (`models.quantize`).

Route: the model (batch norms folded by `models.fuse`) is exported to ONNX, calibrated on images
the caller gives (training images, never the validation split) and quantized by onnxruntime's
static quantizer: int8 weights per output channel (or uint8: `quantize`'s `weight_type`), uint8
activations, QDQ format, which onnxruntime's CPU kernels run as integer convolutions and matmuls;
the stem conv stays float32 unless asked otherwise (`quantize`'s `float_layers` says why).
Chosen by measurement on the project's 2-core Xeon sandbox (docs/int8.md): PyTorch's own PT2E
flow goes through `torch.compile`, whose minutes of compilation per model never paid off on this
CPU, and eager `torch.ao.quantization` is deprecated.

`quantize` returns an `Int8Model`: an nn.Module that takes the usual float NCHW batch (normalised
as for the float model) and returns float logits, so evaluation code needs no change.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

from .fuse import fuse
from .onnx import _require, export_onnx, ort_session

BACKENDS = ("onnxruntime",)


class Int8Model(nn.Module):
    """A quantized model held as an ONNX graph and run by onnxruntime on the CPU."""

    def __init__(self, onnx_bytes: bytes, threads: int | None = None):
        super().__init__()
        self.onnx_bytes = onnx_bytes
        self.session = ort_session(onnx_bytes, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        out = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)

    @property
    def size_bytes(self) -> int:
        return len(self.onnx_bytes)

    def save(self, path: str | Path) -> Path:
        """Write the int8 ONNX file (it runs in any onnxruntime, no Python of ours needed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_bytes)
        return path

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "Int8Model":
        return cls(Path(path).read_bytes(), threads)


def _calibration_batches(calibration, max_images: int) -> list[np.ndarray]:
    """Float32 NCHW numpy batches from a tensor, or an iterable of tensors or (images, labels)."""
    if isinstance(calibration, torch.Tensor):
        calibration = calibration.split(32)
    batches, seen = [], 0
    for item in calibration:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError("calibration must be a float N x C x H x W tensor, or an iterable of such tensors "
                             "or of (images, labels) batches, normalised as the model expects")
        x = x[: max_images - seen].detach().float().cpu().contiguous(memory_format=torch.contiguous_format)
        batches.append(x.numpy())
        seen += len(x)
        if seen >= max_images:
            break
    if not batches:
        raise ValueError("calibration holds no images: pass some training images (never the validation split)")
    return batches


METHODS = ("minmax", "percentile", "entropy")
FLOAT_LAYERS = (None, "first", "last", "ends")
DEFAULT_FLOAT_LAYERS = "first"  # the stem conv stays float32: `quantize` says why; QAT simulates the same choice
DEFAULT_METHOD = "percentile"  # chosen by measurement on the shipped entries (docs/int8.md): 7 of 8 within 0.5 pts, minmax 5
WEIGHT_TYPES = ("int8", "uint8")  # the weights' integer type; the activations are uint8 either way
DEFAULT_WEIGHT_TYPE = "int8"  # also what a card without a weight type measured (cards before weight_type existed)


def card_choice(model: nn.Module, option: str) -> str:
    """What `quantize` uses for `option` ("method" or "weight_type") when not told: the choice a
    shipped entry's card names (`create_model(entry, pretrained=True)` copies the card's int8 block
    into `model.pretrained_cfg["int8_<option>"]`; written by `python -m benchmarks.int8
    --update-cards`, the settings measured for those weights), else DEFAULT_METHOD or
    DEFAULT_WEIGHT_TYPE."""
    defaults = {"method": DEFAULT_METHOD, "weight_type": DEFAULT_WEIGHT_TYPE}
    if option not in defaults:
        raise ValueError(f"unknown int8 option {option!r}; valid options: {', '.join(defaults)}")
    return (getattr(model, "pretrained_cfg", None) or {}).get(f"int8_{option}") or defaults[option]


def default_method(model: nn.Module) -> str:
    """The calibration method `quantize` uses when not told (`card_choice(model, "method")`): the one
    a shipped entry's card names, the method measured best for those weights, else DEFAULT_METHOD."""
    return card_choice(model, "method")


def default_weight_type(model: nn.Module) -> str:
    """The weight type `quantize` uses when not told (`card_choice(model, "weight_type")`): the one a
    shipped entry's card names, else DEFAULT_WEIGHT_TYPE ("int8")."""
    return card_choice(model, "weight_type")


class _Batches:
    """onnxruntime calibration reader over numpy batches. `set_range` lets the quantizer feed them a
    few at a time (its CalibStridedMinMax option): every calibrator then folds each chunk's
    activations into its ranges or histograms and drops them, instead of holding every intermediate
    tensor of every image (1,024 CIFAR images through mobilenet_v2 would hold ~8 GB)."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches, self.items = batches, iter(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.items = iter(self.batches[start_index:end_index])

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {"input": x}


def _float_nodes(onnx_path: Path, float_layers: str | None) -> list[str]:
    """Names of the ONNX nodes `float_layers` keeps in float32: "first" (the first Conv), "last" (the
    last Conv/Gemm/MatMul, the classifier), "ends" (both), None (none)."""
    if float_layers is None:
        return []
    import onnx

    nodes = [n for n in onnx.load(str(onnx_path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    chosen = ([nodes[0]] if float_layers in ("first", "ends") else []) + ([nodes[-1]] if float_layers in ("last", "ends") else [])
    return [n.name for n in chosen]


def _short_names(onnx_bytes: bytes) -> bytes:
    """The same graph with every internal tensor named by a short number and node names dropped
    (they are optional in ONNX). The quantizer's names (`/layer1/layer1.0/conv1/Conv_output_0_quantized`,
    ...) spell each tensor's path, once per use: 13% of se_resnet20's int8 file, whose weights are
    small. The graph's input and output names stay, so callers feed and read it as before."""
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            number = len(names)
            while format(number, "x") in keep:  # never the graph's own input or output name
                number += 1
            names[name] = format(number, "x")
        return names[name]

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for info in graph.value_info:
        info.name = short(info.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    return proto.SerializeToString()


def quantize(model: nn.Module, calibration: torch.Tensor | Iterable, backend: str | None = None,
             max_images: int = 1024, threads: int | None = None, method: str | None = None,
             percentile: float = 99.999, float_layers: str | None = DEFAULT_FLOAT_LAYERS, short_names: bool = True,
             weight_type: str | None = None) -> Int8Model:
    """Post-training static int8 quantization of `model` for CPU inference.

    calibration: training images as the model sees them (float, normalised, N x C x H x W), a
        tensor or an iterable of batches (a DataLoader of (images, labels) works); at most
        `max_images` are used to set the activation ranges.
    backend: None or "onnxruntime" (the only one today; see the module docstring for why).
    method: how each activation's range is set from the calibration images -- "minmax" (their
        extremes), "percentile" (clip at the `percentile`-th percentile of |x|), "entropy" (the clip
        that keeps the int8 histogram closest to the float one in KL divergence). docs/int8.md has
        the accuracy of each per shipped entry; None: `default_method(model)`, the method of the
        shipped entry's card when the model was created with its weights, else DEFAULT_METHOD.
    weight_type: the weights' integer type -- "int8" (uint8 activations times int8 weights, per
        channel, symmetric) or "uint8" (uint8 x uint8, per channel, asymmetric). Why uint8: on CPUs
        without AVX-512 VNNI onnxruntime multiplies uint8 by int8 with `vpmaddubsw`, which adds
        pairs of products in int16 and saturates (see `float_layers`); its uint8 x uint8 kernels do
        not (docs/int8.md: mobilenet_v3_small with percentile ranges lost 0.36 points with uint8
        weights, 1.52 with int8). None: `default_weight_type(model)`, the weight type of the
        shipped entry's card when the model was created with its weights, else "int8"
        (DEFAULT_WEIGHT_TYPE).
    float_layers: keep "first" (the stem conv, the default), "last" (the classifier), "ends" (both)
        or None (nothing) in float32; the rest runs in int8. Why the stem: on CPUs without VNNI,
        onnxruntime multiplies uint8 activations by int8 weights with an instruction that adds
        pairs of products in int16 and saturates. All-int8 resnet20 lost 1.1 points of accuracy
        and mobilenet_v1 0.9 that way; a float stem alone won them back (docs/int8.md), for one
        small layer's speed: the stem's input, the normalised image, spans the whole uint8 range.
    short_names: rename the graph's internal tensors to short numbers (a smaller file, same
        computation; see `_short_names`); False keeps the quantizer's names, which spell each
        tensor's module path (`<layer>.weight_quantized`, ...), for reading the graph.
    """
    backend = backend or "onnxruntime"
    if backend not in BACKENDS:
        raise ValueError(f"unknown int8 backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    method = method or default_method(model)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid methods: {', '.join(METHODS)}")
    weight_type = weight_type or default_weight_type(model)
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {weight_type!r}; valid weight types: {', '.join(WEIGHT_TYPES)}")
    if float_layers not in FLOAT_LAYERS:
        raise ValueError(f"float_layers={float_layers!r}: choose None, 'first', 'last' or 'ends'")
    quantization = _require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = _calibration_batches(calibration, max_images)
    fused = fuse(model)  # an eval-mode copy: the caller's model keeps its mode (a training loop's BN statistics)
    calibrate_method = {"minmax": quantization.CalibrationMethod.MinMax,
                        "percentile": quantization.CalibrationMethod.Percentile,
                        "entropy": quantization.CalibrationMethod.Entropy}[method]
    weights = {"int8": quantization.QuantType.QInt8, "uint8": quantization.QuantType.QUInt8}[weight_type]

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        export_onnx(fused, torch.from_numpy(batches[0][:2]), fp32)
        quant_pre_process(str(fp32), str(pre))  # shape inference + graph cleanup the quantizer expects
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print per batch
            quantization.quantize_static(
                str(pre), str(int8), _Batches(batches), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8, weight_type=weights,
                calibrate_method=calibrate_method, nodes_to_exclude=_float_nodes(pre, float_layers),
                # one batch at a time through the calibrator (see _Batches); it needs a stride dividing the count
                extra_options={"CalibStridedMinMax": 1, "CalibPercentile": percentile},
            )  # fmt: skip
        onnx_bytes = int8.read_bytes()
        return Int8Model(_short_names(onnx_bytes) if short_names else onnx_bytes, threads)
