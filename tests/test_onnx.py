"""ONNX export: fused zoo models exported with torch.onnx.export run in onnxruntime and give the
PyTorch model's outputs (1e-4, relative to the output scale), at a batch size other than the one
exported with (the batch dimension is dynamic)."""

import contextlib
import io

import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[dev]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[dev]')")

import models  # noqa: E402
from conftest import model_with_bn_statistics  # noqa: E402
from benchmarks.onnx_export import export_onnx, max_rel_error, ort_run, ort_session  # noqa: E402




def _model(name, stem):
    return model_with_bn_statistics(name, num_classes=7, stem=stem)


@pytest.mark.parametrize(
    "name, stem, size, dynamo",
    [
        ("mobilenet_v2", "cifar", 32, True),
        ("mobilenet_v3_small", "imagenet", 64, False),  # SE, hard-swish; the legacy TorchScript exporter
        ("resnet20", "cifar", 32, False),
    ],
)
def test_fused_model_exports_and_matches_in_onnxruntime(tmp_path, name, stem, size, dynamo):
    model = _model(name, stem)
    fused = models.fuse(model)
    with contextlib.redirect_stdout(io.StringIO()):
        path = export_onnx(fused, torch.randn(2, 3, size, size), tmp_path / f"{name}.onnx", dynamo=dynamo)
    session = ort_session(path, threads=1)
    for batch in (2, 5):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            ref = model(x)
        out = ort_run(session, x)
        assert out.shape == tuple(ref.shape)
        assert max_rel_error(out, ref) <= 1e-4
