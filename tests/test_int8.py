"""models.quantize: post-training static int8 (onnxruntime) for every family, end to end on data
made here. Error bound, stated: on random weights with non-trivial BN statistics, calibrated and
evaluated on inputs of the same distribution, the int8 logits stay within 20% of the float logits
in relative L2 norm (measured 0.8-11% across the families at width 0.25)."""

import pytest
import torch
import torch.nn as nn

import models
from conftest import model_with_bn_statistics
from models.int8 import Int8Model, quantize

# one model of each architecture file's families (mobilenet_v3_large is built by the same code as _small)
FAMILIES = ["resnet20", "se_resnet20", "resnet38_bottleneck", "mobilenet_v1", "mobilenet_v2",
            "mobilenet_v3_small", "xception_small"]


def random_model(name: str) -> nn.Module:
    return model_with_bn_statistics(name)


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_logits_stay_close_to_float(name):
    model = random_model(name)
    q = quantize(model, torch.randn(32, 3, 32, 32))
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert out.shape == ref.shape == (16, 10) and out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 0.2
    assert q(x[:1]).shape == (1, 10)  # dynamic batch


def float_inputs(q: Int8Model) -> list[str]:
    """The conv/linear ops whose weight is a plain float initializer, not a DequantizeLinear output."""
    import onnx

    graph = onnx.load_from_string(q.onnx_bytes).graph
    consts = {t.name for t in graph.initializer}
    return [n.op_type for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in consts]


@pytest.mark.parametrize("method, float_layers, kept", [("percentile", None, []), ("entropy", "ends", ["Conv", "Gemm"])])
def test_calibration_methods_and_float_layers(method, float_layers, kept):
    model = random_model("resnet20")
    q = quantize(model, torch.randn(64, 3, 32, 32), method=method, float_layers=float_layers)
    assert float_inputs(q) == kept
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert ((q(x) - ref).norm() / ref.norm()).item() < 0.2


def weight_types(q: Int8Model) -> list[tuple[str, str]]:
    """(op, element type of its stored weight) for each conv/linear op whose weight is quantized: the
    initializer that the DequantizeLinear feeding the op's weight input reads."""
    import onnx

    graph = onnx.load_from_string(q.onnx_bytes).graph
    consts = {t.name: t for t in graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return [(n.op_type, onnx.helper.tensor_dtype_to_np_dtype(consts[dequantized[n.input[1]]].data_type).name)
            for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in dequantized]


@pytest.mark.parametrize("weight_type, card, stored", [("uint8", None, "uint8"), ("int8", "uint8", "int8")])
def test_weight_type_sets_the_stored_weights_type(weight_type, card, stored):
    """uint8 weights: uint8 x uint8 products, which CPUs without VNNI do not saturate in int16 (quantize).
    An explicit weight type wins over the card's (`card`: as create_model(entry, pretrained=True) sets it)."""
    model = random_model("resnet20")
    if card:
        model.pretrained_cfg = {**model.pretrained_cfg, "int8_weight_type": card}
    q = quantize(model, torch.randn(64, 3, 32, 32), weight_type=weight_type)
    found = weight_types(q)
    assert {op for op, _ in found} == {"Conv", "Gemm"} and {t for _, t in found} == {stored}
    assert float_inputs(q) == ["Conv"]  # the stem stays float32 either way
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert ((q(x) - ref).norm() / ref.norm()).item() < 0.2


def test_quantize_leaves_the_callers_model_as_it_was():
    """A training loop that quantizes to check int8 accuracy keeps a model in train mode (its BN
    statistics still update) with the same weights and buffers."""
    model = random_model("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, torch.randn(8, 3, 32, 32))
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_calibration_accepts_batches_and_the_file_round_trips(tmp_path):
    model = random_model("resnet20")
    loader = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    q = quantize(model, loader, max_images=16)
    assert float_inputs(q) == ["Conv"]  # the default: the stem stays float32 (see quantize)
    assert {t for _, t in weight_types(q)} == {"int8"}  # and the weights are int8
    again = Int8Model.load(q.save(tmp_path / "r20.int8.onnx"))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(q(x), again(x))


def test_short_names_keep_the_graph_and_shrink_the_file(tmp_path):
    from models.int8 import _short_names
    from models.onnx import export_onnx, ort_session

    model = random_model("se_resnet20")
    path = export_onnx(models.fuse(model), torch.randn(2, 3, 32, 32), tmp_path / "m.onnx")
    long = path.read_bytes()
    short = _short_names(long)
    x = torch.randn(4, 3, 32, 32).numpy()
    a, b = ort_session(long), ort_session(short)
    assert [i.name for i in a.get_inputs()] == [i.name for i in b.get_inputs()]
    assert (a.run(None, {a.get_inputs()[0].name: x})[0] == b.run(None, {b.get_inputs()[0].name: x})[0]).all()
    assert len(short) < len(long)


@pytest.mark.parametrize("name", ["resnet20", "se_resnet20"])  # se_resnet20: the smallest weights per layer
def test_int8_file_is_under_a_third_of_the_float_weights(name):
    model = models.create_model(name).eval()
    float_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    assert quantize(model, torch.randn(8, 3, 32, 32)).size_bytes < float_bytes / 3


def test_bad_input_is_named():
    model = random_model("resnet20")
    with pytest.raises(ValueError, match="unknown int8 backend 'tensorrt'; valid backends: onnxruntime"):
        quantize(model, torch.randn(2, 3, 32, 32), backend="tensorrt")
    with pytest.raises(ValueError, match="unknown calibration method 'kl'; valid methods: minmax, percentile, entropy"):
        quantize(model, torch.randn(2, 3, 32, 32), method="kl")
    with pytest.raises(ValueError, match="unknown weight type 'int4'; valid weight types: int8, uint8"):
        quantize(model, torch.randn(2, 3, 32, 32), weight_type="int4")
    with pytest.raises(ValueError, match="float_layers='stem'"):
        quantize(model, torch.randn(2, 3, 32, 32), float_layers="stem")
    with pytest.raises(ValueError, match="calibration holds no images"):
        quantize(model, [])
    with pytest.raises(ValueError, match="N x C x H x W"):
        quantize(model, [torch.randn(3, 32, 32)])


def test_int8_benchmark_runs_on_a_shipped_entry(tmp_path, capsys):
    from benchmarks import int8 as bench

    bench.main(["--entries", "resnet20", "--repeats", "1", "--budget", "0.1", "--calib", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| `resnet20` |" in out and "int8 vs fuse" in out and (tmp_path / "int8.csv").is_file()


def test_a_card_names_the_calibration_method_quantize_uses(tmp_path, monkeypatch):
    """`benchmarks.int8 --update-cards` writes the measured method into the card; create_model copies it
    into pretrained_cfg, and quantize(method=None) calibrates with it (explicit methods still win)."""
    import json
    import shutil

    import onnxruntime.quantization as ortq

    from benchmarks import int8 as bench
    from models import pretrained
    from tools import export_weights

    weights, cards = tmp_path / "weights", tmp_path / "cards"
    shutil.copytree(pretrained.WEIGHTS_DIR, weights, ignore=shutil.ignore_patterns("mobilenet*", "xception*", "resnet56*"))
    cards.mkdir()
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(export_weights, "CARDS_DIR", cards)
    row = {"entry": "resnet20", "method": "entropy", "weight_type": "int8", "float_layers": "first",
           "val_acc_int8": 0.8512, "val_acc_float32": 0.8552}
    with pytest.raises(SystemExit):  # argparse names the missing --data-root
        bench.main(["--update-cards"])
    args = bench.build_parser().parse_args(["--data-root", "data/cifar10", "--method", "entropy", "--update-cards"])
    bench.update_card(row, args)
    card = json.loads((weights / "resnet20.json").read_text())
    assert card["int8"]["method"] == "entropy" and card["int8"]["val_acc"] == 85.12 and card["int8"]["calibration_images"] == 1024
    assert card["int8"]["weight_type"] == "int8"
    assert card["int8"]["command"] == ("python -m benchmarks.int8 --accuracy-only --data-root data/cifar10 --calib 1024 "
                                       "--entries resnet20 --method entropy")
    assert "85.12% validation top-1 against 85.52% float32 (-0.40); entropy ranges" in (cards / "resnet20.md").read_text()

    model = models.create_model("resnet20", pretrained=True).eval()
    assert model.pretrained_cfg["int8_method"] == "entropy" and models.int8.default_method(model) == "entropy"
    assert models.int8.default_method(models.create_model("resnet20")) == models.int8.DEFAULT_METHOD

    seen = []

    def spy(*args, calibrate_method, **kwargs):
        seen.append(calibrate_method)
        raise InterruptedError  # what quantize passes on is all this test needs

    monkeypatch.setattr(ortq, "quantize_static", spy)
    for method in (None, "minmax"):
        with pytest.raises(InterruptedError):
            quantize(model, torch.randn(2, 3, 32, 32), method=method)
    assert seen == [ortq.CalibrationMethod.Entropy, ortq.CalibrationMethod.MinMax]


def test_a_card_names_the_weight_type_quantize_uses(tmp_path, monkeypatch):
    """The command that measures mobilenet_v3_small with uint8 weights writes the weight type into its
    card (and the command into it); create_model copies it into pretrained_cfg, and
    quantize(weight_type=None) uses it (test_weight_type_sets_the_stored_weights_type: an explicit one
    wins). A card written before weight types existed means int8."""
    import csv
    import json
    import shutil

    import onnxruntime.quantization as ortq

    from benchmarks import int8 as bench
    from models import pretrained
    from tools import export_weights

    entry = "mobilenet_v3_small"
    old = dict(pretrained.pretrained_meta(entry))
    old["int8"] = {k: v for k, v in old["int8"].items() if k != "weight_type"}
    assert pretrained._cfg_from_card(old)["int8_weight_type"] == "int8"

    weights, cards = tmp_path / "weights", tmp_path / "cards"
    weights.mkdir()
    cards.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(pretrained.WEIGHTS_DIR / f"{entry}{suffix}", weights)
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(export_weights, "CARDS_DIR", cards)

    def data(data_root, split, limit=None, overrides=()):  # CIFAR stand-in: a few random images
        assert data_root == "../shared/data/cifar10"
        g = torch.Generator().manual_seed(len(split))
        return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)

    asked = []

    def fake_quantize(model, calibration, **options):  # the options the benchmark passes on, without the minutes
        asked.append(options)
        fused = models.fuse(model)
        fused.size_bytes = 1000
        return fused

    monkeypatch.setattr(bench, "cifar_split", data)
    monkeypatch.setattr(models, "quantize", fake_quantize)
    command = ("--accuracy-only --data-root ../shared/data/cifar10 --threads 1 --update-cards --entries mobilenet_v3_small "
               "--method percentile --weight-type uint8")
    assert bench.main([*command.split(), "--out", str(tmp_path / "out")]) == 0
    assert asked == [{"threads": 1, "method": "percentile", "weight_type": "uint8"}]
    with open(tmp_path / "out" / "int8.csv") as f:
        assert [r["weight_type"] for r in csv.DictReader(f)] == ["uint8"]
    card = json.loads((weights / f"{entry}.json").read_text())
    assert card["int8"]["method"] == "percentile" and card["int8"]["weight_type"] == "uint8"
    assert card["int8"]["command"] == ("python -m benchmarks.int8 --accuracy-only --data-root ../shared/data/cifar10 "
                                       "--calib 1024 --entries mobilenet_v3_small --method percentile --weight-type uint8")
    assert "percentile ranges from 1024 training images, uint8 weights (uint8 x uint8 products), stem conv" in (
        cards / f"{entry}.md").read_text()
    with pytest.raises(SystemExit):  # argparse names the valid weight types
        bench.build_parser().parse_args(["--weight-type", "int4"])

    model = models.create_model(entry, pretrained=True).eval()
    assert model.pretrained_cfg["int8_weight_type"] == "uint8" and models.int8.default_weight_type(model) == "uint8"
    assert models.int8.default_weight_type(models.create_model(entry)) == models.int8.DEFAULT_WEIGHT_TYPE == "int8"

    seen = []

    def spy(*args, weight_type, **kwargs):
        seen.append(weight_type)
        raise InterruptedError  # what quantize passes on is all this test needs

    monkeypatch.setattr(ortq, "quantize_static", spy)
    small = random_model("resnet20")  # exports in seconds where mobilenet_v3_small takes tens
    small.pretrained_cfg = model.pretrained_cfg
    with pytest.raises(InterruptedError):
        quantize(small, torch.randn(2, 3, 32, 32))
    assert seen == [ortq.QuantType.QUInt8]
