"""`python -m benchmarks.train_speed` runs end to end on tiny settings, and its torchvision CIFAR adaptation
is our mobilenet_v2 (same params, same final map). No timing assertions: the numbers live in
docs/train_speed.md."""

import csv
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks import train_speed as ts


def test_torchvision_cifar_adaptation_is_our_mobilenet_v2():
    tv, zoo = ts.torchvision_mobilenet_v2_cifar(), ts.zoo_mobilenet_v2()
    info = ts.check_twin(tv, zoo)
    assert info["tv_params"] == info["zoo_params"] == ts.CIFAR_PARAMS == 2_236_682
    assert info["tv_map"] == info["zoo_map"] == (4, 4)
    assert tv.features[0][0].stride == (1, 1) and tv.features[2].conv[1][0].stride == (1, 1)


def test_train_step_follows_the_settings():
    step = ts.TrainStep(ts.zoo_mobilenet_v2(width=0.25), ts.DEFAULT, batch=4)
    assert step.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert [g["weight_decay"] for g in step.opt.param_groups] == [ts.WEIGHT_DECAY, 0.0]
    # the norms' and biases' rate is the recipe's factor over the rest, as train.py sets it
    lrs = [g["lr"] for g in step.opt.param_groups]
    assert lrs[1] == pytest.approx(lrs[0] * OmegaConf.load(Path(__file__).parents[1] / "configs/optim/sgd.yaml").norm_lr_factor) and lrs[1] != lrs[0]
    assert step.opt.param_groups[0]["nesterov"]
    before = [p.detach().clone() for p in step.model.parameters()]
    loss = step()
    assert math.isfinite(loss.item()) and step.finite()
    assert any(not torch.equal(a, b) for a, b in zip(before, step.model.parameters()))  # it trained
    assert all(p.grad is None for p in step.model.parameters())  # zero_grad(set_to_none=True)
    plain = ts.TrainStep(ts.torchvision_mobilenet_v2_cifar(width=0.25), ts.PLAIN, batch=4)
    assert len(plain.opt.param_groups) == 1 and math.isfinite(plain().item())


def test_head_to_head_and_all_models_run():
    res = ts.head_to_head(batch=4, rounds=1, warmup=0, steps=1, width=0.25)
    assert [r["row"] for r in res["rows"]] == ["tv_plain", "tv_default", "zoo_plain", "zoo_default"]
    assert all(r["img_s"] > 0 and r["finite"] for r in res["rows"])
    assert res["rows"][0]["speedup_vs_tv_plain"] == 1.0
    assert "zoo_default/tv_plain (target >= 1.3)" in res["ratios"]
    assert "vs torchvision plain" in ts.head_to_head_table(res)

    rows = ts.all_models(batch=4, rounds=1, warmup=0, names=["resnet20", "mobilenet_v3_small"], width=0.25)
    assert [r["model"] for r in rows] == ["resnet20", "mobilenet_v3_small"]
    assert all(r["params"] > 0 and r["macs"] > 0 and r["img_s"] > 0 for r in rows)
    assert "| `resnet20` |" in ts.all_models_table(rows)


def test_command_line_prints_tables_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "ts.csv"
    threads = torch.get_num_threads()
    try:
        ts.main(["--batch", "4", "--rounds", "1", "--warmup", "0", "--all", "--all-batch", "4", "--all-rounds", "1",
                 "--models", "resnet20", "--out", str(out), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "Twin check: torchvision cifar-adapted 2,236,682 params, final map 4x4" in text
    assert "| model | params | mult-adds | train img/s |" in text
    with open(out) as f:
        tables = {row["table"] for row in csv.DictReader(f)}
    assert tables == {"mobilenet_v2", "ratios", "models"}


def test_precision_grid_times_every_setting_against_fp32_channels_last():
    rows = ts.precision_grid(["resnet20"], batch=2, rounds=1, warmup=0)
    assert [r["settings"] for r in rows] == [g.name for g in ts.GRID]
    assert all(r["img_s"] > 0 and r["finite"] for r in rows)
    assert [r["speedup_vs_fp32_cl"] for r in rows if r["settings"] == "fp32 channels-last"] == [1.0]
    assert ts.DEFAULT.amp_dtype in (None, torch.bfloat16) and ts.DEFAULT.channels_last


def test_step_traffic_counts_forward_and_backward_flops():
    # depthwise too: a grouped conv's FLOPs are not those of a dense one
    import models

    model = models.create_model("mobilenet_v2", width=0.25)
    t = ts.step_traffic(model, batch=2, settings=ts.PLAIN)
    fwd = models.profile(model, (2, 3, 32, 32))["macs"] * 2  # FLOPs of the forward
    assert t["flops"] == 3 * fwd  # backward: gradients of input and weights, a forward's cost each
    assert t["bytes"] > 7 * 4 * sum(p.numel() for p in model.parameters())


def test_roofline_rows():
    peaks, rows = ts.roofline(["resnet20"], batch=2, rounds=1, warmup=0)
    assert peaks["peak_gflops"] > 0 and peaks["bw_gbs"] > 0
    assert peaks["dtype"] == str(ts.DEFAULT.amp_dtype or torch.float32).replace("torch.", "")  # the step's compute dtype
    assert rows[0]["x_floor"] > 0 and rows[0]["bound"] in ("compute", "memory")


def test_steps_are_timed_by_the_shared_interleaved_helper():
    """benchmarks.common.bench with a fixed `inner`: no sizing call (a training step is expensive),
    `warmup` untimed calls, rotating order, and the per-round log the benchmark prints."""
    from benchmarks.common import bench

    calls, logged = [], []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    t = bench(fns, repeats=3, warmup=1, inner=2, on_round=ts.round_logger(logged.append))
    assert calls == ["a", "b"] + ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert [len(x.samples) for x in t.values()] == [3, 3] and t["a"].inner == 2
    assert len(logged) == 3 and logged[0].startswith("  round 1: a ")


def test_every_twin_is_the_zoo_architecture_and_times():
    # torchvision's MobileNets adapted as our cifar stem must be our networks (params and final
    # map); where there is no twin, the zoo model with its kernel dispatch off is one
    for name, (label, build) in ts.TWINS.items():
        info = ts.check_twin(build(), ts.models.create_model(name))
        assert info["tv_map"] == info["zoo_map"], name
    rows = ts.twins(["mobilenet_v3_small", "mobilenet_v1"], batch=2, rounds=1, warmup=0)
    assert [(r["model"], r["twin"]) for r in rows] == [("mobilenet_v3_small", "torchvision mobilenet_v3_small"),
                                                       ("mobilenet_v1", "zoo, plain kernels")]
    assert all(r["img_s"] > 0 and r["twin_img_s"] > 0 and r["speedup_vs_twin"] > 0 and r["finite"] for r in rows)
    assert "| `mobilenet_v1` | zoo, plain kernels |" in ts.twins_table(rows)


# float32 default settings: what train.py uses where the CPU has no native bf16, the case the float32 kernels'
# tests below are about, whatever this machine is (under bf16 autocast see tests/test_autocast_float32.py)
FLOAT32_DEFAULT = ts.Settings("default", None, True, True)


@pytest.fixture
def float32_default(monkeypatch):
    monkeypatch.setattr(ts, "DEFAULT", FLOAT32_DEFAULT)


@pytest.mark.skipif(not ts.models.norm_act.available(), reason="the fused batch-norm kernel cannot be built here")
def test_the_fused_norm_keeps_less_for_the_backward(float32_default):
    # mobilenet_v2's ReLU6 layers keep the norm's input and the activation's input apart; fused,
    # only the norm's input stays (models/norm_act.py), about a third less activation memory
    torch.manual_seed(0)
    zoo = ts.TrainStep(ts.models.create_model("mobilenet_v2", width=0.35), ts.DEFAULT, batch=4)
    plain = ts.TrainStep(ts.PlainKernels(ts.models.create_model("mobilenet_v2", width=0.35)), ts.DEFAULT, batch=4)
    fused_bytes, plain_bytes = zoo.kept_for_backward(), plain.kept_for_backward()
    assert 0 < fused_bytes < 0.8 * plain_bytes


@pytest.mark.skipif(not ts.models.native.lib(), reason="the C kernels cannot be built here")
def test_depthwise_rows_cover_every_depthwise_layer_and_say_which_kernel_runs():
    shapes = ts.depthwise_shapes(["mobilenet_v3_small"], batch=2)
    model = ts.models.create_model("mobilenet_v3_small")
    depthwise = [m for m in model.modules() if isinstance(m, ts.models.layers.DepthwiseConv)]
    counts = [int(w.rsplit("x", 1)[1]) for where in shapes.values() for w in where]
    assert sum(counts) == len(depthwise) == 11
    rows = ts.depthwise_layers(["mobilenet_v3_small"], batch=2, rounds=1, warmup=0)
    assert len(rows) == len(shapes) and all(r["onednn_ms"] > 0 and r["zoo_ms"] > 0 for r in rows)
    assert {r["used"] for r in rows if r["kernel"] == 5} == {True} and {r["used"] for r in rows if r["kernel"] == 3} == {False}
    assert "| 2x96x16x16 | 5 | 2 | mobilenet_v3_small x1 |" in ts.depthwise_table(rows)


@pytest.mark.skipif(not ts.models.native.lib(), reason="the C kernels cannot be built here")
def test_norm_act_depthwise_rows_cover_every_expanded_map_and_say_which_path_runs():
    shapes = ts.norm_act_dw_shapes(["mobilenet_v3_small"], batch=2)
    model = ts.models.create_model("mobilenet_v3_small")
    expanded = [b for b in model.modules() if isinstance(b, ts.models.layers.InvertedResidual)
                and isinstance(b.conv_pw, ts.models.layers.ConvNormAct)]
    counts = [int(w.rsplit("x", 1)[1]) for where in shapes.values() for w in where]
    assert sum(counts) == len(expanded) == 10  # the first block has no expand
    rows = ts.norm_act_dw_layers(["mobilenet_v3_small"], batch=2, rounds=1, warmup=0)
    assert len(rows) == len(shapes) and all(r["two_layers_ms"] > 0 and r["fused_ms"] > 0 for r in rows)
    assert {r["used"] for r in rows if r["kernel"] == 3} == {True}  # and 5x5 on 16x16 or more; not on 8x8
    fives = [(int(r["shape"].split("x")[2]), r["used"]) for r in rows if r["kernel"] == 5]
    assert {side for side, _ in fives} == {16, 8, 4} and all(used == (side >= 16) for side, used in fives)
    assert "| 2x72x32x32 | 3 | 2 | ReLU | mobilenet_v3_small x1 |" in ts.norm_act_dw_table(rows)
    steps = ts.norm_act_dw_steps(["mobilenet_v3_small"], batch=2, rounds=1, warmup=0)
    assert len(steps) == 1 and steps[0]["speedup"] > 0 and steps[0]["fused_img_s"] > 0
    assert ts.models.norm_act_depthwise.kernel_wins(3, 32, 32)  # the rule is back in place
    assert "| `mobilenet_v3_small` |" in ts.norm_act_dw_table(steps)


def test_step_groups_tell_convolutions_apart_by_their_weight():
    conv = "aten::mkldnn_convolution"
    assert ts.step_group(conv, [[2, 8, 4, 4], [16, 8, 1, 1]]) == "conv 1x1"
    assert ts.step_group(conv, [[2, 8, 4, 4], [8, 1, 3, 3]]) == "conv depthwise"
    assert ts.step_group(conv, [[2, 8, 4, 4], [16, 8, 3, 3]]) == "conv kxk"
    # a backward's weight is its third input (grad_out, x, weight)
    assert ts.step_group("aten::convolution_backward", [[2, 16, 4, 4], [2, 8, 4, 4], [16, 8, 1, 1]]) == "conv 1x1"
    assert ts.step_group("aten::_slow_conv2d_backward", [[2, 8, 4, 4], [2, 8, 4, 4], [8, 1, 5, 5]]) == "conv depthwise"
    assert ts.step_group("_NormActDepthwiseBackward", []) == "zoo kernels (norm + act, depthwise)"
    assert ts.step_group("aten::native_batch_norm_backward", []) == "batch norm"
    assert ts.step_group("aten::hardtanh_backward", []) == "activation"
    assert ts.step_group("aten::max_pool2d_with_indices", []) == "pooling"
    assert ts.step_group("aten::add", []) == "other"


def test_step_breakdown_puts_each_operator_of_a_step_in_its_group():
    # a step of known operators: a 1x1 conv, PyTorch's batch norm and ReLU, SGD; nothing pooled or depthwise
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 4, 8, 8)

    def step():
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    ms = ts.step_breakdown(step, steps=2, warmup=1)
    assert list(ms) == ts.STEP_GROUPS
    busy = {group for group, t in ms.items() if t > 0}
    assert {"conv 1x1", "batch norm", "activation", "optimizer"} <= busy
    assert not busy & {"conv depthwise", "conv kxk", "linear", "pooling", "zoo kernels (norm + act, depthwise)"}


def test_step_profile_splits_zoo_and_twin_steps_into_groups(float32_default):
    rows = ts.profile_steps(["mobilenet_v1"], batch=2, steps=1, warmup=1)
    groups = [r for r in rows if r["group"] != "step"]
    (step,) = [r for r in rows if r["group"] == "step"]
    assert [r["group"] for r in groups] == ts.STEP_GROUPS
    assert step["zoo_ms"] > 0 and step["twin_ms"] > 0
    by_group = {r["group"]: r for r in groups}
    assert by_group["conv 1x1"]["zoo_ms"] > 0 and by_group["conv 1x1"]["twin_ms"] > 0
    assert by_group["optimizer"]["zoo_ms"] > 0  # SGD's per-parameter ops, found under its step
    assert by_group["batch norm"]["twin_ms"] > 0  # the plain twin runs PyTorch's norm
    if ts.models.native.lib():  # the zoo runs its own kernels instead
        assert by_group["zoo kernels (norm + act, depthwise)"]["zoo_ms"] > 0 and by_group["batch norm"]["zoo_ms"] == 0
    assert step["bound_vs_twin"] == step["twin_ms"] / step["zoo_conv_ms"] > 1
    assert "`mobilenet_v1` against zoo, plain kernels" in ts.profile_table(rows)


@pytest.mark.skipif(not ts.models.native.lib(), reason="the C kernels cannot be built here")
def test_residual_end_steps_switch_only_the_blocks_end(monkeypatch, float32_default):
    calls = []
    real = ts.models.norm_act._BatchNormAdd.apply
    monkeypatch.setattr(ts.models.norm_act._BatchNormAdd, "apply", lambda *a: calls.append(1) or real(*a))
    with ts._residual_end(False):
        ts.TrainStep(ts.models.create_model("resnet20", width=0.25), ts.DEFAULT, batch=2)()
        ts.TrainStep(ts.models.create_model("mobilenet_v2", width=0.25), ts.DEFAULT, batch=2)()
    assert calls == []  # off for the inverted residuals' linear ends too
    assert ts.models.layers.batch_norm_add_act is ts.models.norm_act.batch_norm_add_act  # restored
    rows = ts.residual_end_steps(["resnet20"], batch=2, rounds=1, warmup=0)
    assert len(calls) >= 9 and rows[0]["speedup"] > 0 and rows[0]["fused_img_s"] > 0  # 9 blocks, on in its rounds
    assert "| `resnet20` |" in ts.norm_act_dw_table(rows) and "norm kernel, then sum and ReLU" in ts.norm_act_dw_table(rows)


@pytest.mark.skipif(not ts.models.native.lib(), reason="the C kernels cannot be built here")
def test_autocast_float32_steps_switch_the_float32_depthwise_rule(monkeypatch):
    calls = []
    real = ts.models.norm_act_depthwise._NormActDepthwise.apply
    # the calls with a float32 output (the one kernel's bf16-output calls are part 11's)
    monkeypatch.setattr(ts.models.norm_act_depthwise._NormActDepthwise, "apply",
                        lambda *a: (None if len(a) > 7 and a[7] else calls.append(1)) or real(*a))
    bf16 = ts.Settings("bf16", torch.bfloat16, True, True)
    with ts._autocast_float32(False):
        ts.TrainStep(ts.models.create_model("mobilenet_v2", width=0.25), bf16, batch=2)()
    assert calls == [] and ts.models.kernels.float32_depthwise.__name__ == "float32_depthwise"  # off, then restored
    rows = ts.autocast_float32_steps(["mobilenet_v2"], batch=2, rounds=1, warmup=0)
    assert len(calls) >= 3 and rows[0]["speedup"] > 0  # the three strided blocks, in the rounds with the rule on
    assert "| `mobilenet_v2` |" in ts.norm_act_dw_table(rows) and "all bf16" in ts.norm_act_dw_table(rows)


@pytest.mark.skipif(not ts.models.native.lib(), reason="the C kernels cannot be built here")
def test_norm_bf16_steps_switch_the_bf16_norm_kernels(monkeypatch):
    dtypes = []
    real = ts.models.norm_act._BatchNormAct.apply
    monkeypatch.setattr(ts.models.norm_act._BatchNormAct, "apply", lambda *a: dtypes.append(a[0].dtype) or real(*a))
    bf16 = ts.Settings("bf16", torch.bfloat16, True, True)
    with ts._norm_bf16(False):
        ts.TrainStep(ts.models.create_model("resnet20", width=0.25), bf16, batch=2)()
    assert torch.bfloat16 not in dtypes and ts.models.norm_act._fusable.__name__ == "_fusable"  # off, then restored
    rows = ts.norm_bf16_steps(["resnet20"], batch=2, rounds=1, warmup=0)
    assert dtypes.count(torch.bfloat16) >= 10 and rows[0]["speedup"] > 0  # the stem and each block's first norm
    assert "| `resnet20` |" in ts.norm_act_dw_table(rows) and "PyTorch's bf16 norms" in ts.norm_act_dw_table(rows)


@pytest.mark.skipif(not ts.models.native.lib(), reason="the C kernels cannot be built here")
def test_bf16_norm_act_depthwise_rows_cover_every_bf16_layer_and_the_steps_switch_its_rule(monkeypatch):
    # xception_small at batch 2: the units after each block's first reach the one kernel's dispatch in bf16
    # (2 at 32x32, 1 at 16x16, 9 at 8x8), each block's opening ReLU but the first block's with no norm before
    # (32x32, 16x16, 5 at 8x8), and the head's second unit does not (an nn.Sequential)
    shapes = ts.bf16_norm_act_dw_shapes(["xception_small"], batch=2)
    once = ["xception_small x1"]
    assert shapes == {(2, 64, 32, 32, 3, 1, "ReLU"): once, (2, 128, 32, 32, 3, 1, "ReLU"): once,
                      (2, 256, 16, 16, 3, 1, "ReLU"): once, (2, 256, 8, 8, 3, 1, "ReLU"): ["xception_small x9"],
                      (2, 64, 32, 32, 3, 1, "ReLU, no norm"): once, (2, 128, 16, 16, 3, 1, "ReLU, no norm"): once,
                      (2, 256, 8, 8, 3, 1, "ReLU, no norm"): ["xception_small x5"]}
    layer_rows = ts.bf16_norm_act_dw_layers(["xception_small"], batch=2, rounds=1, warmup=0)
    assert len(layer_rows) == 7 and all(r["two_layers_ms"] > 0 and r["fused_ms"] > 0 for r in layer_rows)
    assert "| 2x128x16x16 | 3 | 1 | ReLU, no norm | xception_small x1 |" in ts.norm_act_dw_table(layer_rows)
    assert all(r["used"] for r in layer_rows)  # all on maps of 8x8 or more
    # the spies are gone
    assert (ts.models.layers.norm_act_depthwise.__name__, ts.models.layers.act_depthwise.__name__) == (
        "norm_act_depthwise", "act_depthwise")
    rows = ts.bf16_norm_act_dw_layers(["mobilenet_v2"], batch=2, rounds=1, warmup=0)
    assert all(r["two_layers_ms"] > 0 and r["fused_ms"] > 0 and r["stride"] == 1 and r["kernel"] == 3 for r in rows)
    assert {(r["shape"], r["used"]) for r in rows} >= {("2x960x4x4", False), ("2x144x32x32", True)}
    assert "| 2x384x8x8 | 3 | 1 | ReLU6 | mobilenet_v2 x4 |" in ts.norm_act_dw_table(rows)
    calls = []
    real = ts.models.norm_act_depthwise._NormActDepthwise.apply
    monkeypatch.setattr(ts.models.norm_act_depthwise._NormActDepthwise, "apply",
                        lambda *a: calls.append(len(a) > 7 and a[7]) or real(*a))
    with ts._bf16_depthwise_rule(False):
        ts.TrainStep(ts.models.create_model("mobilenet_v2", width=0.5), ts.BF16, batch=2)()
    assert True not in calls and ts.models.norm_act_depthwise.bf16_kernel_wins.__name__ == "bf16_kernel_wins"
    steps = ts.bf16_norm_act_dw_steps(["mobilenet_v2"], batch=2, rounds=1, warmup=0)
    assert calls.count(True) >= 8 and steps[0]["speedup"] > 0  # its stride-1 3x3 layers on 8x8 maps or more, rule on
    assert "| `mobilenet_v2` |" in ts.norm_act_dw_table(steps) and "one bf16 kernel" in ts.norm_act_dw_table(steps)


@pytest.mark.skipif(not ts.models.native.lib(), reason="the C kernels cannot be built here")
def test_max_pool_rows_cover_every_pool_and_the_steps_switch_the_kernel(monkeypatch):
    rows = ts.max_pool_layers(["xception_small", "resnet20"], batch=2, rounds=1, warmup=0)
    assert [r["shape"] for r in rows] == ["2x128x32x32", "2x256x16x16", "2x384x8x8"]  # resnet20 has none
    assert all(r["pytorch_ms"] > 0 and r["kernel_ms"] > 0 and r["models"] == "xception_small x1" for r in rows)
    assert "| 2x256x16x16 |" in ts.max_pool_table(rows) and "3x3, stride 2, pad 1" in ts.max_pool_table(rows)
    calls = []
    real = ts.models.pool._MaxPool.apply
    monkeypatch.setattr(ts.models.pool._MaxPool, "apply", lambda *a: calls.append(1) or real(*a))
    with ts._max_pool_kernel(False):
        ts.TrainStep(ts.models.create_model("xception_small", width=0.25), ts.DEFAULT, batch=2)()
    assert calls == [] and ts.models.pool._covered.__name__ == "_covered"  # off, then restored
    steps = ts.max_pool_steps(["xception_small"], batch=2, rounds=1, warmup=0)
    assert len(calls) >= 3 and steps[0]["speedup"] > 0  # its three pools, in the rounds with the kernel on
    assert "| `xception_small` |" in ts.norm_act_dw_table(steps) and "max-pool kernel" in ts.norm_act_dw_table(steps)
