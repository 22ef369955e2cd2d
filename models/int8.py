"""int8 inference on the CPU: post-training static quantization of any zoo model (`models.quantize`).

Route: the model (batch norms folded by `models.fuse`) is exported to ONNX, calibrated on images
the caller gives (training images, never the validation split) and quantized by onnxruntime's
static quantizer: int8 weights per output channel, uint8 activations, QDQ format, which
onnxruntime's CPU kernels run as integer convolutions and matmuls. Chosen by measurement on the
project's 2-core Xeon sandbox (docs/int8.md): PyTorch's own PT2E flow goes through
`torch.compile`, whose minutes of compilation per model never paid off on this CPU, and eager
`torch.ao.quantization` is deprecated.

`quantize` returns an `Int8Model`: an nn.Module that takes the usual float NCHW batch (normalised
as for the float model) and returns float logits, so evaluation code needs no change.
"""

from __future__ import annotations

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


def _chunk(n_batches: int, at_least: int = 4) -> int:
    """Batches per min/max update. onnxruntime (1.32) raises "No data is collected" when the number
    of batches is a multiple of it (its last update finds nothing), so pick one that is not."""
    k = at_least
    while n_batches % k == 0:
        k += 1
    return k


def quantize(model: nn.Module, calibration: torch.Tensor | Iterable, backend: str | None = None,
             max_images: int = 1024, threads: int | None = None) -> Int8Model:
    """Post-training static int8 quantization of `model` for CPU inference.

    calibration: training images as the model sees them (float, normalised, N x C x H x W), a
        tensor or an iterable of batches (a DataLoader of (images, labels) works); at most
        `max_images` are used to set the activation ranges (min/max per tensor).
    backend: None or "onnxruntime" (the only one today; see the module docstring for why).
    """
    backend = backend or "onnxruntime"
    if backend not in BACKENDS:
        raise ValueError(f"unknown int8 backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    quantization = _require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = _calibration_batches(calibration, max_images)
    fused = fuse(model.eval())

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"input": x}

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        export_onnx(fused, torch.from_numpy(batches[0][:2]), fp32)
        quant_pre_process(str(fp32), str(pre))  # shape inference + graph cleanup the quantizer expects
        quantization.quantize_static(
            str(pre), str(int8), Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
            # fold each few batches' activations into the running min/max instead of keeping all of
            # them (1,024 CIFAR images through mobilenet_v2 would otherwise hold ~8 GB)
            extra_options={"CalibMaxIntermediateOutputs": _chunk(len(batches))},
        )  # fmt: skip
        return Int8Model(int8.read_bytes(), threads)
