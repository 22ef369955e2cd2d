"""ONNX export of zoo models and onnxruntime sessions (onnx, onnxscript and onnxruntime are the
`int8` extra: `pip install -e '.[int8]'`; imported only when these functions run)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed for ONNX export and int8 inference: pip install -e '.[int8]' "
                          "(onnx, onnxscript, onnxruntime)") from err


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, dynamo: bool = True) -> Path:
    """Export `model` (put in eval mode first) to `path` with a dynamic batch dimension, input
    "input" and output "logits"; the torch.export-based exporter unless `dynamo=False`."""
    _require("onnxscript" if dynamo else "onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # exporter chatter
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model, (example,), str(path), input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: batch},), dynamo=True, verbose=False, external_data=False,
            )  # fmt: skip
        else:
            torch.onnx.export(
                model, (example,), str(path), input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17,
            )  # fmt: skip
    return path


def ort_session(model: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session with every graph optimisation; `threads` intra-op threads
    (None: torch's current thread count, so both frameworks get the same cores)."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"])
