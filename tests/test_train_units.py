"""train/: the command line, the recipe and the model helpers, on plain tensors (no data, no subprocess)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torchvision
from torch import nn

from train import checkpoint as ckpt_io
from train.config import OPTIONS, PRESETS, ConfigError, build_parser, parse
from train.engine import evaluate  # noqa: F401  (import check: the engine imports cleanly)
from train.models import CollapseError, build_model, check_collapse, unwrap
from train.recipe import MixupCutmix, ModelEma, WarmupCosine, make_optimizer, param_groups, peak_lr


# -- command line ---------------------------------------------------------------------------------
def test_help_explains_every_option():
    text = build_parser().format_help()
    for flags, _, kw in OPTIONS:
        assert flags[0] in text
        assert kw["help"].split()[0] in text
    for name in PRESETS:
        assert name in text


def test_preset_then_explicit_flags_win(tmp_path):
    cfg = parse(["--shards", str(tmp_path / "x.tar"), "--preset", "imagenet-resnet50", "--epochs", "30", "--lr", "0.2"])
    assert cfg.arch == "resnet50" and cfg.amp == "bf16" and cfg.channels_last  # from the preset
    assert cfg.epochs == 30 and cfg.lr == 0.2  # explicit flags override it
    assert parse(["--shards", "x.tar"]).epochs == 90  # built-in default without a preset


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no training data"),
        (["--data", "d", "--shards", "s.tar"], "not both"),
        (["--shards", "s.tar", "--arch", "resnet5"], "unknown --arch 'resnet5'"),
        (["--shards", "s.tar", "--arch", "nosuchpkg.mod:Net"], "cannot import module"),
        (["--shards", "s.tar", "--arch", "torch.nn:NoSuchNet"], "has no class"),
        (["--shards", "s.tar", "--batch-size", "10", "--accum-steps", "3"], "not divisible by --accum-steps 3"),
        (["--shards", "s.tar", "--epochs", "0"], "--epochs must be > 0"),
        (["--shards", "s.tar", "--lr", "-1"], "--lr must be > 0"),
        (["--shards", "s.tar", "--label-smoothing", "1.5"], "--label-smoothing"),
        (["--shards", "s.tar", "--epochs", "3", "--warmup-epochs", "3"], "shorter than --epochs"),
        (["--shards", "s.tar", "--sync-bn"], "--sync-bn needs CUDA"),
        (["--shards", "s.tar", "--amp", "fp16"], "needs a CUDA GPU"),
        (["--shards", "s.tar", "--image-size", "8"], "at least 16 px"),
        (["--shards", "s.tar", "--resume", "/nonexistent/last.pt"], "no such checkpoint"),
        (["--evaluate", "/nonexistent/best.pt", "--data", "d"], "no such checkpoint"),
    ],
)
def test_bad_command_lines_fail_in_one_line(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_evaluate_needs_validation_data(tmp_path):
    p = tmp_path / "best.pt"
    p.write_bytes(b"x")
    with pytest.raises(ConfigError, match="needs validation data"):
        parse(["--evaluate", str(p)])


# -- models ---------------------------------------------------------------------------------------
def test_alexnet_collapses_at_32px_and_names_the_layer():
    model = build_model("alexnet", 10, stem="standard", image_size=32)
    with pytest.raises(CollapseError) as e:
        check_collapse(model, 32, "alexnet")
    msg = str(e.value)
    assert "features." in msg and "MaxPool2d" in msg and "--stem small" in msg and "\n" not in msg
    # The small-input stem fixes it: 3x3 stride-1 first conv, stem max-pool gone.
    small = build_model("alexnet", 10, stem="small", image_size=32)
    check_collapse(small, 32, "alexnet")
    assert small.features[0].kernel_size == (3, 3) and small.features[0].stride == (1, 1)
    assert isinstance(small.features[2], nn.Identity)


def test_resnet_small_stem_and_plain_torchvision_keys():
    model = build_model("resnet18", 7, stem="auto", image_size=32)  # auto: small at <= 64 px
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    standard = build_model("resnet50", 5, stem="auto", image_size=224)
    torchvision.models.resnet50(num_classes=5).load_state_dict(standard.state_dict(), strict=True)
    # zero-init of each residual block's last BN gamma (Bag of Tricks)
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in standard.layer1)


def test_custom_class_and_unwrap():
    model = build_model("train.nets:NarrowResNet", 3, stem="standard", image_size=64)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    compiled_like = nn.Module()
    compiled_like._orig_mod = model
    assert unwrap(compiled_like) is model


# -- recipe ---------------------------------------------------------------------------------------
def test_no_weight_decay_on_bias_and_norm():
    model = build_model("resnet18", 10, stem="standard", image_size=224)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {
        id(model.fc.bias),
        *[id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()],
    }
    assert any(p is model.fc.weight for p in decay["params"])
    opt = make_optimizer(model, "sgd", 0.4, 1e-4, nesterov=True)
    assert opt.param_groups[0]["nesterov"] and len(opt.param_groups) == 2


def test_lr_scaling_warmup_and_cosine():
    assert peak_lr(0.1, 1024) == pytest.approx(0.4)  # Bag of Tricks: 0.1 x 1024 / 256
    s = WarmupCosine(peak=0.4, total_steps=100, warmup_steps=10)
    assert s(0) == pytest.approx(0.04) and s(9) == pytest.approx(0.4)  # linear, per iteration
    assert s(10) == pytest.approx(0.4)
    assert s(55) == pytest.approx(0.2)  # halfway through the cosine
    assert s(99) < 0.001 and all(s(i) >= s(i + 1) for i in range(10, 99))


def test_mixup_cutmix_targets_and_resumable_rng():
    images = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % 4
    a = MixupCutmix(0.2, 1.0, num_classes=4, seed=3)
    state = a.state_dict()
    out1 = [a(images, labels) for _ in range(5)]
    for x, t in out1:
        assert x.shape == images.shape and t.shape == (8, 4)
        assert torch.allclose(t.sum(1), torch.ones(8))
    b = MixupCutmix(0.2, 1.0, num_classes=4, seed=99)
    b.load_state_dict(state)  # a resumed run draws the same mixes
    for (x1, t1), (x2, t2) in zip(out1, [b(images, labels) for _ in range(5)], strict=True):
        assert torch.equal(x1, x2) and torch.equal(t1, t2)


def test_ema_follows_the_weights():
    model = nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(100):
        ema.update(model)
    assert torch.allclose(ema.module.weight, torch.ones_like(model.weight), atol=1e-6)
    assert not ema.module.weight.requires_grad


# -- checkpoint files -----------------------------------------------------------------------------
def test_atomic_save_replaces_whole_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "ck" / "last.pt")
    ckpt_io.save_atomic({"model": {"w": torch.ones(2)}, "epoch": 1}, path)
    ckpt_io.save_atomic({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    assert ckpt_io.load(path)["epoch"] == 2
    assert os.listdir(tmp_path / "ck") == ["last.pt"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        ckpt_io.load(str(bad))


def test_rng_state_roundtrip():
    state = ckpt_io.rng_state()
    a = (torch.rand(3), float(__import__("numpy").random.rand()), __import__("random").random())
    ckpt_io.set_rng_state(state)
    b = (torch.rand(3), float(__import__("numpy").random.rand()), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert math.isfinite(b[1])
