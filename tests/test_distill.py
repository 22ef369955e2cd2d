"""Distillation from cached teacher logits: tools/teacher_logits.py writes them, the fast loader
serves each sample's view, the module's loss mixes the KD term in, and a file made for other data
is refused with the command that re-makes it."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config, one_thread, tiny_overrides
from training.config import to_plain
from training.data import CifarDataModule, DeviceBatchLoader, EpochOrder, epoch_generator, grid_views, view_ids
from training.errors import ConfigError, DataError
from training.models import build_model
from training.module import distillation_loss
from training.pipeline import native_bf16_cpu, train

PAD, STEP = 4, 2  # the default grid: 5 x 5 offsets x 2 flips
FILE_PAD = 2  # the tool's file in these tests: 3 x 3 x 2 = 18 views keep the teacher's forwards few


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, imagefolder_root):
    """A teacher checkpoint (a run's layout: state_dict with `model.` keys + config), the logits file
    the tool makes from it, and the training split it was made on."""
    tmp = tmp_path_factory.mktemp("distill")
    config = to_plain(compose_config("train", tiny_overrides(imagefolder_root, tmp / "run", tmp / "cache")))
    torch.manual_seed(0)
    model = build_model(config["model"], 10)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp / "teacher" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 7,
                "hyper_parameters": {"config": config}}, ckpt)

    from tools.teacher_logits import make

    with one_thread():
        out = make(str(ckpt), str(imagefolder_root), tmp / "logits.pt", step=STEP, progress=False,
                   overrides=[f"data.cache_dir={tmp / 'cache'}", "data.val_size=20", f"data.augment.crop_padding={FILE_PAD}"],
                   device="cpu")
    dm = CifarDataModule(config["data"])
    dm.setup()
    return {"ckpt": ckpt, "file": out, "model": model.eval(), "config": config, "split": dm.splits["train"], "tmp": tmp}


def test_the_tool_writes_each_views_teacher_logits_with_its_metadata(tiny):
    blob = torch.load(tiny["file"], weights_only=True)
    logits, meta = blob["logits"], blob["meta"]
    images, labels = tiny["split"]
    assert not list(tiny["file"].parent.glob("*.partial"))  # the resume file goes once the logits are written
    assert logits.dtype == torch.float16 and logits.shape == (60, 18, 10) == (len(images), meta["views"], 10)
    assert meta["teacher"]["kind"] == "checkpoint" and meta["teacher"]["epoch"] == 7 and str(tiny["ckpt"]) in meta["teacher"]["name"]
    assert (meta["val_size"], meta["split_seed"], meta["crop_padding"], meta["grid_step"], meta["n_train"]) == (20, 0, FILE_PAD, STEP, 60)
    assert len(meta["fingerprint"]) == 16 and meta["mean"] == tiny["config"]["data"]["mean"]

    # each (image, view) against the teacher's own forward on that crop + flip, made by hand
    mean, std = torch.tensor(meta["mean"])[:, None, None], torch.tensor(meta["std"])[:, None, None]
    views = grid_views(FILE_PAD, STEP)
    # the forwards ran under bf16 autocast where this CPU computes bf16 natively (as training would), else in float32
    bf16 = native_bf16_cpu()
    assert meta["teacher_precision"] == ("bf16-mixed" if bf16 else "32-true")
    for i, v in [(0, 0), (5, 17), (31, 9), (59, 4)]:
        dx, dy, flip = views[v]
        crop = F.pad(images[i], (FILE_PAD,) * 4)[:, dy:dy + 32, dx:dx + 32]
        crop = crop.flip(-1) if flip else crop
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            expected = tiny["model"](((crop.float() / 255 - mean) / std)[None])[0].float()
        assert torch.allclose(logits[i, v].float(), expected.flatten(), atol=2e-2, rtol=1e-2), (i, v)
        if bf16:  # computed in bf16, not in float32 and only stored in fp16
            with torch.no_grad():
                exact = tiny["model"](((crop.float() / 255 - mean) / std)[None])[0].half()
            assert not torch.equal(logits[i, v], exact.flatten()), (i, v)
    plain = views.index((FILE_PAD, FILE_PAD, False))
    assert meta["teacher_train_acc"] == pytest.approx(float((logits[:, plain].float().argmax(-1) == labels).float().mean()))


def test_a_killed_teacher_run_resumes_from_its_partial_file(tmp_path):
    from tools.teacher_logits import teacher_logits

    class Dies(torch.nn.Module):  # a teacher whose process is killed during its `die_at`-th forward
        def __init__(self, die_at=None):
            super().__init__()
            self.conv, self.calls, self.die_at = torch.nn.Conv2d(3, 10, 3), 0, die_at

        def forward(self, x):
            self.calls += 1
            if self.calls == self.die_at:
                raise KeyboardInterrupt
            return self.conv(x).mean((2, 3))

    torch.manual_seed(0)
    teacher = Dies()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    args = (images, [0.5] * 3, [0.25] * 3, FILE_PAD, STEP, 4)  # 3 batches of 18 views
    whole = teacher_logits(teacher, *args, progress=False)
    partial = tmp_path / "t.partial"
    teacher.calls, teacher.die_at = 0, 18 * 2 + 5  # inside the third batch: two are saved
    with pytest.raises(KeyboardInterrupt):
        teacher_logits(teacher, *args, progress=False, partial=partial, key="k", save_every_s=0)
    teacher.calls, teacher.die_at = 0, None
    assert torch.equal(teacher_logits(teacher, *args, progress=False, partial=partial, key="k"), whole)
    assert teacher.calls == 18  # the last batch only
    teacher.calls = 0
    teacher_logits(teacher, *args, progress=False, partial=partial, key="other teacher")
    assert teacher.calls == 3 * 18  # a partial file of other logits is not used


def test_the_loader_draws_on_the_grid_and_serves_each_samples_view():
    n = 12
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    teacher = torch.zeros(n, 50, 10, dtype=torch.float16)
    teacher[:, :, 0] = torch.arange(n)[:, None].half()  # row = (image index, view id)
    teacher[:, :, 1] = torch.arange(50).half()
    loader = DeviceBatchLoader(images, torch.zeros(n, dtype=torch.long), 5, [0.0] * 3, [1 / 255] * 3, train=True,
                               seed=3, crop_padding=PAD, teacher=teacher, grid_step=STEP)
    loader.sampler.set_epoch(2)
    order, dx, dy, flip = loader.sampler.draw()
    assert (dx % STEP == 0).all() and (dy % STEP == 0).all() and dx.max() <= 2 * PAD
    views = grid_views(PAD, STEP)
    seen = 0
    for x, _, t in loader:
        for j in range(len(x)):
            k = seen + j
            i, v = int(t[j, 0]), int(t[j, 1])
            assert i == int(order[k]) and views[v] == (int(dx[k]), int(dy[k]), bool(flip[k]))
            crop = F.pad(images[i], (PAD,) * 4)[:, views[v][1]:views[v][1] + 8, views[v][0]:views[v][0] + 8]
            assert torch.equal(x[j], (crop.flip(-1) if views[v][2] else crop).float())
        seen += len(x)
    assert seen == n  # every image served once, so every row above was checked
    assert torch.equal(view_ids(dx, dy, flip, PAD, STEP), torch.tensor([views.index((int(a), int(b), bool(c))) for a, b, c in zip(dx, dy, flip)]))

    # a resumed run's fresh loader at the same epoch serves the same batches: draws are (seed, epoch) only
    again = DeviceBatchLoader(images, torch.zeros(n, dtype=torch.long), 5, [0.0] * 3, [1 / 255] * 3, train=True,
                              seed=3, crop_padding=PAD, teacher=teacher, grid_step=STEP)
    again.sampler.set_epoch(2)
    batches, batches_again = list(loader), list(again)
    assert len(batches) == len(batches_again) > 0 and all(len(a) == len(b) == 3 for a, b in zip(batches, batches_again))
    assert all(torch.equal(a, b) for first, second in zip(batches, batches_again) for a, b in zip(first, second))

    # data.augment.crop_step alone (a distillation A/B's control): the same crops, no teacher rows
    control = DeviceBatchLoader(images, torch.zeros(n, dtype=torch.long), 5, [0.0] * 3, [1 / 255] * 3, train=True,
                                seed=3, crop_padding=PAD, grid_step=STEP)
    control.sampler.set_epoch(2)
    control_batches = list(control)
    assert len(control_batches) == len(batches)
    assert all(len(c) == 2 and torch.equal(c[0], t[0]) for c, t in zip(control_batches, batches))


def test_without_a_teacher_the_draws_are_the_ones_runs_before_the_grid_made():
    # checkpoints of runs started before distillation resume onto the same crops
    gen = epoch_generator(0, 5)
    torch.randperm(30, generator=gen)
    before = torch.randint(0, 2 * PAD + 1, (30,), generator=gen), torch.randint(0, 2 * PAD + 1, (30,), generator=gen)
    sampler = EpochOrder(30, shuffle=True, seed=0, pad=PAD)
    sampler.set_epoch(5)
    _, dx, dy, _ = sampler.draw()
    assert torch.equal(dx, before[0]) and torch.equal(dy, before[1])


def test_distillation_loss_is_t2_kl_of_the_softened_distributions():
    s, t, T = torch.randn(6, 10), torch.randn(6, 10), 4.0
    p = (t / T).softmax(-1)
    expected = (p * (p.log() - (s / T).log_softmax(-1))).sum(-1).mean() * T * T
    assert distillation_loss(s, t, T) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


class FirstStepLoss(L.Callback):
    """The first training step's loss, with the plain label-smoothed CE and KD term of that batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            x, y, t = batch
            with torch.no_grad():  # a copy in train mode: the same BN batch statistics as the real step
                logits = copy.deepcopy(pl_module.model)(x.contiguous(memory_format=torch.channels_last)).float()
            self.ce = float(F.cross_entropy(logits, y, label_smoothing=pl_module.label_smoothing))
            self.kd = float(distillation_loss(logits, t, 4.0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.loss = float(outputs["loss"])


def edited_file(tiny, name: str, logits=None, **meta_changes):
    blob = torch.load(tiny["file"], weights_only=True)
    blob["meta"].update(meta_changes)
    if logits is not None:
        blob["logits"] = logits
    path = tiny["tmp"] / name
    torch.save(blob, path)
    return path


def test_a_distilled_run_trains_on_the_mixed_loss_and_records_its_teacher(tiny, compose_train):
    logits = torch.load(tiny["file"], weights_only=True)["logits"]
    one_hot = torch.zeros_like(logits)
    one_hot[..., 0] = 10.0  # a teacher sure of class 0 everywhere: far from the labels' CE
    path = edited_file(tiny, "one_hot.pt", logits=one_hot)
    probe = FirstStepLoss()
    summary = train(compose_train(f"distill.logits={path}", "distill.alpha=0.5", "trainer.max_epochs=1",
                                  f"data.augment.crop_padding={FILE_PAD}", "trainer.precision=32-true"), callbacks=[probe])
    assert probe.loss == pytest.approx(0.5 * probe.ce + 0.5 * probe.kd, rel=1e-4)
    assert not math.isclose(probe.loss, probe.ce, rel_tol=1e-3)  # what alpha=0 would train on
    teacher = torch.load(summary["last_ckpt"], weights_only=True)["hyper_parameters"]["config"]["distill"]["teacher"]
    assert teacher["epoch"] == 7 and summary["teacher"] == teacher["name"] and str(tiny["ckpt"]) in teacher["name"]

    import json

    from models.pretrained import WEIGHTS_DIR
    from tools.export_weights import model_card

    card = {**json.loads((WEIGHTS_DIR / "resnet20.json").read_text()), "teacher": teacher["name"]}
    assert f"| teacher | distilled from {teacher['name']} |" in model_card(card)


def test_a_file_made_for_other_data_names_the_mismatch_and_the_command(tiny, compose_train, tmp_path):
    data_cfg = {**tiny["config"]["data"], "augment": {"crop_padding": FILE_PAD, "flip": True}}
    for change, named in [({"val_size": 500}, "val_size: file 500, run 20"),
                          ({"fingerprint": "0123456789abcdef"}, "fingerprint: file '0123456789abcdef'"),
                          ({"num_classes": 100}, "num_classes: file 100, run 10")]:
        path = edited_file(tiny, "other.pt", **change)
        with pytest.raises(DataError) as err:
            CifarDataModule(data_cfg, distill={"logits": str(path)}).check_teacher()
        msg = str(err.value)
        assert named in msg and f"python -m tools.teacher_logits --teacher {tiny['ckpt']}" in msg, msg
    # train.py stops before building anything; here the run's padding (4) is not the file's (2)
    with pytest.raises(DataError, match=r"(?s)crop_padding: file 2, run 4.*data.augment.crop_padding=4"):
        train(compose_train(f"distill.logits={tiny['file']}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_file_and_the_torchvision_loader_are_refused(tiny, compose_train):
    data_cfg = tiny["config"]["data"]
    with pytest.raises(ConfigError, match="does not exist; make it with python -m tools.teacher_logits"):
        CifarDataModule(data_cfg, distill={"logits": str(tiny["tmp"] / "nope.pt")}).check_teacher()
    with pytest.raises(ConfigError, match="needs data.loader=fast"):
        train(compose_train(f"distill.logits={tiny['file']}", "data.loader=torchvision"))
    with pytest.raises(ConfigError, match=r"crop_step=3 but .* grid of step 2: drop the override"):
        CifarDataModule({**data_cfg, "augment": {"crop_padding": FILE_PAD, "crop_step": 3}},
                        distill={"logits": str(tiny["file"])}).check_teacher()


def test_a_shipped_teacher_is_named_by_entry_and_sha256():
    import models
    from tools.teacher_logits import data_config, load_teacher

    model, identity, norm, dataset = load_teacher("resnet20")
    card = models.pretrained_meta("resnet20")
    assert identity["sha256"] == card["sha256"] and identity["entry"] == "resnet20" and not model.training
    assert norm == {"mean": card["mean"], "std": card["std"]} and dataset == "cifar10"
    with pytest.raises(ConfigError, match="neither a checkpoint file nor a shipped entry"):
        load_teacher("no_such_entry")
    with pytest.raises(ConfigError, match="only data.* overrides"):
        data_config("cifar10", "x", ["optim.lr=1"])
