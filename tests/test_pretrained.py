"""Pretrained weights: every shipped entry loads through every path (package, hub, local file,
URL on 127.0.0.1), and damaged or mismatched files are refused with a clear error."""

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import models
from models import pretrained as pretrained_mod
from models.pretrained import PretrainedError

REPO = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {"val_acc", "mean", "std", "sha256", "params", "macs", "recipe"}


@pytest.fixture
def fake_weights_dir(tmp_path, monkeypatch):
    """A weights folder with one tiny entry made here, so the loading mechanics are tested
    independently of what is shipped."""
    torch.manual_seed(0)
    model = models.create_model("resnet20", width=0.25)
    from safetensors.torch import save_file

    file = tmp_path / "resnet20.tiny.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, str(file))
    card = {
        "entry": "resnet20.tiny", "model": "resnet20", "file": file.name,
        "build": {"num_classes": 10, "stem": "cifar", "width": 0.25, "conv_mode": "separable"},
        "sha256": pretrained_mod.sha256_of(file), "val_acc": 10.0, "mean": [0.5] * 3, "std": [0.25] * 3,
        "params": 1, "macs": 1, "recipe": {},
    }  # fmt: skip
    (tmp_path / "resnet20.tiny.json").write_text(json.dumps(card))
    monkeypatch.setattr(pretrained_mod, "WEIGHTS_DIR", tmp_path)
    return tmp_path, model


@pytest.fixture
def http_server(tmp_path):
    """Serve a folder on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _same_outputs(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)


def test_mechanics_package_path_url_and_hub(fake_weights_dir, http_server, tmp_path, monkeypatch):
    folder, original = fake_weights_dir
    original = original.half().float()  # what fp16 storage keeps
    assert models.list_pretrained() == ["resnet20.tiny"]
    assert REQUIRED_KEYS <= set(models.pretrained_meta("resnet20.tiny"))

    from_package = models.create_model("resnet20.tiny", pretrained=True)
    _same_outputs(from_package, original)

    copy = tmp_path / "copy.safetensors"
    shutil.copy(folder / "resnet20.tiny.safetensors", copy)
    _same_outputs(models.create_model("resnet20.tiny", pretrained=True, weights=copy), original)

    served, base = http_server
    shutil.copy(copy, served / "w.safetensors")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _same_outputs(models.create_model("resnet20.tiny", pretrained=True, weights=f"{base}/w.safetensors"), original)

    hub_model = torch.hub.load(str(REPO), "resnet20", source="local", pretrained=True, tag="tiny")
    _same_outputs(hub_model, original)


def test_fine_tuning_head(fake_weights_dir):
    _, original = fake_weights_dir
    model = models.create_model("resnet20.tiny", pretrained=True, num_classes=100)
    assert model.classifier.out_features == 100
    ours, theirs = model.state_dict(), original.half().float().state_dict()
    backbone = [k for k in theirs if not k.startswith("classifier.")]
    assert len(backbone) == len(theirs) - 2
    for key in backbone:
        torch.testing.assert_close(ours[key], theirs[key])


def test_refuses_damaged_and_foreign_files(fake_weights_dir, http_server, tmp_path, monkeypatch):
    folder, _ = fake_weights_dir
    data = (folder / "resnet20.tiny.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedError, match="sha256 .* does not match"):
        models.create_model("resnet20.tiny", pretrained=True, weights=truncated)

    served, base = http_server
    (served / "bad.safetensors").write_bytes(data[:-10] + b"0123456789")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PretrainedError, match="refusing weights from http://127.0.0.1.*sha256"):
        models.create_model("resnet20.tiny", pretrained=True, weights=f"{base}/bad.safetensors")
    with pytest.raises(PretrainedError, match="could not download"):
        models.create_model("resnet20.tiny", pretrained=True, weights=f"{base}/missing.safetensors")

    # A file that passes no hash check: read directly, it still gets a clear error, not a traceback.
    with pytest.raises(PretrainedError, match="corrupt or truncated"):
        pretrained_mod.load_weights_file(truncated)
    foreign = models.create_model("resnet56", width=0.25)
    with pytest.raises(PretrainedError, match=r"(?s)does not fit the model.*unexpected in the checkpoint"):
        pretrained_mod.load_into(models.create_model("resnet20", width=0.25), foreign.state_dict(), "test")


def test_unknown_entry_and_conflicting_options(fake_weights_dir):
    with pytest.raises(PretrainedError, match="no pretrained weights for 'vgg16'; available entries: resnet20.tiny"):
        models.create_model("vgg16", pretrained=True)
    with pytest.raises(PretrainedError, match=r"no pretrained 'resnet20' is built with stem='cifar', width=0.5.*shipped: resnet20.tiny \(stem='cifar', width=0.25"):
        models.create_model("resnet20.tiny", pretrained=True, width=0.5)
    # a model name plus the entry's width finds the entry
    assert pretrained_mod.resolve_entry("resnet20", width=0.25) == "resnet20.tiny"


# ---- the shipped entries --------------------------------------------------------------------

SHIPPED = models.list_pretrained()


def test_the_required_entries_are_shipped():
    required = {"mobilenet_v2", "mobilenet_v2.w0_5", "mobilenet_v1", "xception_small", "resnet38_bottleneck",
                "se_resnet20", "resnet20", "resnet56", "mobilenet_v3_small", "mobilenet_v3_large"}  # fmt: skip
    assert required <= set(SHIPPED)
    assert models.pretrained_meta("mobilenet_v2.w0_5")["build"]["width"] == 0.5


def test_weights_budget_and_files():
    total = sum((pretrained_mod.WEIGHTS_DIR / models.pretrained_meta(e)["file"]).stat().st_size for e in SHIPPED)
    assert total < 60e6, f"shipped weights take {total / 1e6:.1f} MB; the budget is 60 MB"
    assert sorted(p.stem for p in pretrained_mod.WEIGHTS_DIR.glob("*.safetensors")) == SHIPPED


@pytest.mark.parametrize("entry", SHIPPED)
def test_shipped_entry_loads_through_every_path(entry, http_server, tmp_path, monkeypatch):
    meta = models.pretrained_meta(entry)
    assert REQUIRED_KEYS <= set(meta)
    assert 10 < meta["val_acc"] <= 100 and len(meta["mean"]) == len(meta["std"]) == 3
    file = pretrained_mod.WEIGHTS_DIR / meta["file"]
    assert pretrained_mod.sha256_of(file) == meta["sha256"] and file.stat().st_size == meta["file_size"]

    model = models.create_model(entry, pretrained=True).eval()
    cost = models.profile(model, (1, 3, 32, 32))
    assert (cost["params"], cost["macs"]) == (meta["params"], meta["macs"])
    # the card's build, given as options, finds the same entry
    build = meta["build"]
    assert pretrained_mod.resolve_entry(meta["model"], build["stem"], build["width"], build["conv_mode"]) == entry

    served, base = http_server
    shutil.copy(file, served / meta["file"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _same_outputs(models.create_model(entry, pretrained=True, weights=f"{base}/{meta['file']}"), model)
    _same_outputs(models.create_model(entry, pretrained=True, weights=file), model)
    tag = entry.partition(".")[2] or None
    _same_outputs(torch.hub.load(str(REPO), meta["model"], source="local", pretrained=True, tag=tag), model)


# ---- the shipped entries' outputs, recorded ---------------------------------------------------
# Code changes (a fused kernel, a block rearranged) must leave what the shipped weights compute as it
# was. Each entry's logits on two fixed images are recorded with the sha256 of the weights file that
# gave them; only new weights may change them, and then the record is rewritten on purpose:
#     python tests/test_pretrained.py --record-outputs <entry> [...]

RECORDED_OUTPUTS = Path(__file__).with_name("shipped_outputs.json")


def _probe_images() -> torch.Tensor:
    """Two deterministic images with the spread of normalised inputs (no RNG: same on every torch)."""
    i = torch.arange(2 * 3 * 32 * 32, dtype=torch.float64)
    return (1.5 * torch.sin(0.37 * i) + 0.5 * torch.cos(0.0113 * i)).reshape(2, 3, 32, 32).float()


def _probe_logits(entry: str) -> torch.Tensor:
    with torch.no_grad():
        return models.create_model(entry, pretrained=True).eval()(_probe_images())


def _record_outputs(entries: list[str]) -> None:
    record = json.loads(RECORDED_OUTPUTS.read_text()) if RECORDED_OUTPUTS.exists() else {}
    for entry in entries:
        logits = _probe_logits(entry)
        record[entry] = {"sha256": models.pretrained_meta(entry)["sha256"],
                         "logits": [[round(v, 5) for v in row] for row in logits.tolist()]}
        print(f"recorded {entry}")
    lines = [f'  "{e}": {{"sha256": "{r["sha256"]}", "logits": {json.dumps(r["logits"])}}}' for e, r in sorted(record.items())]
    RECORDED_OUTPUTS.write_text("{\n" + ",\n".join(lines) + "\n}\n")


@pytest.mark.parametrize("entry", SHIPPED)
def test_shipped_outputs_are_the_recorded_ones(entry):
    record = json.loads(RECORDED_OUTPUTS.read_text()).get(entry)
    fix = f"record them with `python tests/test_pretrained.py --record-outputs {entry}`"
    assert record is not None, f"{entry} ships without recorded outputs: {fix}"
    assert record["sha256"] == models.pretrained_meta(entry)["sha256"], (
        f"{entry}'s weights file is not the one its outputs were recorded with; if the new weights are "
        f"meant, {fix}")
    expected = torch.tensor(record["logits"])
    # float32 kernels differ between CPUs and versions by ~1e-5 of the logits; a changed computation by far more
    torch.testing.assert_close(_probe_logits(entry), expected, atol=2e-3, rtol=1e-3)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["--record-outputs"] or not sys.argv[2:]:
        sys.exit(f"usage: python {sys.argv[0]} --record-outputs ENTRY [...]   (shipped: {' '.join(SHIPPED)})")
    unknown = sorted(set(sys.argv[2:]) - set(SHIPPED))
    if unknown:
        sys.exit(f"not shipped: {', '.join(unknown)}; shipped: {' '.join(SHIPPED)}")
    _record_outputs(sys.argv[2:])
