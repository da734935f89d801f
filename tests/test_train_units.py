"""train/: the command line, the recipe and the model helpers, on plain tensors (no data, no subprocess)."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from train import checkpoint as ckpt_io
from train.config import PRESETS, Config, ConfigError, build_parser, parse
from train.distributed import TooManyRanks, pick_gpu
from train.engine import choose_amp
from train.models import CollapseError, build_model, check_collapse, check_deterministic, unwrap
from train.recipe import MixupCutmix, ModelEma, WarmupCosine, make_optimizer, param_groups, peak_lr

# -- command line ---------------------------------------------------------------------------------
# A value other than the default for each Config field, as typed on a command line.
NON_DEFAULTS = {
    "val_shards": ["v.tar"], "num_classes": "7", "backend": "dali", "workers": "3", "image_size": "64",
    "arch": "resnet18", "stem": "small", "zero_init_residual": None, "epochs": "100", "batch_size": "32",
    "accum_steps": "2", "optimizer": "adamw", "lr": "0.3", "momentum": "0.8", "nesterov": None, "wd": "0.01",
    "warmup_epochs": "1.5", "min_lr": "0.001", "label_smoothing": "0.2", "mixup": "0.4", "cutmix": "0.5",
    "ema": "0.99", "clip_grad": "2", "amp": "bf16", "channels_last": None, "compile": None,
    "preset": "cifar10-resnet18", "output": "runs/x", "no_auto_resume": None, "checkpoint_minutes": "3",
    "deterministic": None, "seed": "9", "log_every": "7", "progress": "never", "overfit_batches": "3",
    "overfit_steps": "50", "cache_dir": "/tmp/shard-cache", "cache_limit": "20GB",
    "eval_image_size": "64", "tta": "flip", "auto_augment": "randaugment", "random_erasing": "0.25",
}  # fmt: skip
# each tested by its own checks (the ramp's two flags in tests/test_resolution.py: they go together)
NOT_COMBINABLE = {"data", "shards", "resume", "evaluate", "sync_bn", "min_image_size", "ramp_epochs", "weights"}


def test_every_config_field_has_a_flag_that_sets_it_and_help_shows_its_default():
    parser = build_parser()
    dests = {a.dest: a for a in parser._actions}
    defaults = Config()
    for f in dataclasses.fields(Config):
        assert f.name in dests, f"Config.{f.name} has no command-line option"
        action = dests[f.name]
        assert action.help and len(action.help) > 20, f"--{f.name}: no real help text"
        if f.name in NOT_COMBINABLE:
            continue
        flag, value = action.option_strings[0], NON_DEFAULTS[f.name]
        argv = ["--shards", "s.tar", flag, *(value if isinstance(value, list) else [] if value is None else [value])]
        cfg = parse(argv)
        got, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if f.name != "preset":
            assert got != default, f"{flag} {value} left Config.{f.name} at its default {default!r}"
        typed = action.type(value) if action.type and not isinstance(value, list) else got
        assert got == typed or value is None, (flag, got)
    help_text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    for name in ("epochs", "batch_size", "lr", "wd", "log_every", "checkpoint_minutes"):
        flag = "--" + name.replace("_", "-")
        shown = dests[name].help.split("(default: ")[-1].rstrip(")")
        assert shown == str(getattr(defaults, name)) and f"(default: {shown})" in help_text, flag
    assert all(name in help_text for name in PRESETS)


def test_workers_default_is_the_loaders():
    # Config.workers used to be 4 and always overrode the loader's machine-based default.
    assert parse(["--shards", "s.tar"]).workers is None
    assert parse(["--shards", "s.tar", "--preset", "demo"]).workers == PRESETS["demo"]["workers"]
    assert parse(["--shards", "s.tar", "--workers", "0"]).workers == 0


def test_preset_then_explicit_flags_win(tmp_path):
    cfg = parse(["--shards", str(tmp_path / "x.tar"), "--preset", "imagenet-resnet50", "--epochs", "30", "--lr", "0.2"])
    assert cfg.arch == "resnet50" and cfg.workers == 8 and cfg.channels_last  # from the preset
    assert cfg.amp == "auto"  # bf16 where the GPU computes it, fp16 on older ones: the preset runs on any GPU
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


def old_ema_update(ema: ModelEma, model: nn.Module) -> None:
    """The per-tensor loop ModelEma.update was before torch._foreach_lerp_ (issue 14, item 6)."""
    with torch.no_grad():
        ema.updates += 1
        d = min(ema.decay, (1 + ema.updates) / (10 + ema.updates))
        src = model.state_dict()
        for name, ema_t in ema.module.state_dict().items():
            t = src[name].detach()
            if ema_t.is_floating_point():
                ema_t.mul_(d).add_(t.to(ema_t.dtype), alpha=1 - d)
            else:
                ema_t.copy_(t)


def test_ema_equals_the_old_per_tensor_loop():
    torch.manual_seed(0)
    # Conv weights, BN affine parameters, running statistics and the integer step count.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    )
    new, old = ModelEma(model, decay=0.9), ModelEma(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(12):  # real steps: weights and BN statistics move, num_batches_tracked counts
        model.train()
        loss = model(torch.randn(4, 3, 8, 8)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        new.update(model)
        old_ema_update(old, model)
    a, b = new.state_dict(), old.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6), k
    assert int(a["1.num_batches_tracked"]) == 12
    assert not torch.equal(a["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy
    # Loading a state (resume) keeps the cached tensor lists valid: updates land in the loaded EMA.
    resumed = ModelEma(model, decay=0.9)
    resumed.update(model)
    resumed.load_state_dict(copy.deepcopy(b), updates=old.updates)
    resumed.update(model)
    old_ema_update(old, model)
    assert all(torch.allclose(resumed.state_dict()[k].double(), old.state_dict()[k].double(), atol=1e-6) for k in b)


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


def test_rng_state_roundtrip_and_layout():
    cpu = torch.device("cpu")
    state = ckpt_io.rng_state(cpu)
    # This rank's generators only: no per-GPU list that a process seeing fewer GPUs would index past.
    assert set(state) == {"torch", "cuda", "numpy", "python"} and state["cuda"] is None
    a = (torch.rand(3), float(np.random.rand()), random.random())
    ckpt_io.set_rng_state(state, cpu)
    b = (torch.rand(3), float(np.random.rand()), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert math.isfinite(b[1])
    # A checkpoint from before (a list of every visible GPU's state) still restores on CPU.
    old_layout = {**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    ckpt_io.set_rng_state(old_layout, cpu)
    assert torch.equal(torch.rand(3), a[0])


# -- devices ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device_type, native_bf16, want",
    [("cuda", True, "bf16"), ("cuda", False, "fp16"), ("cpu", False, "none"), ("cpu", True, "none")],
)
def test_amp_auto_is_bf16_only_where_the_gpu_has_it_natively(device_type, native_bf16, want):
    assert choose_amp("auto", device_type, native_bf16) == want
    assert choose_amp("fp16", device_type, native_bf16) == "fp16"  # an explicit choice stands


def test_amp_auto_asks_torch_without_emulation(monkeypatch):
    # V100/T4: is_bf16_supported() says yes only through emulation; --amp auto must pick fp16 there.
    from train import engine

    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return including_emulation  # a GPU whose bf16 is emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert engine.resolve_amp("auto", torch.device("cuda", 0)) == "fp16"
    assert asked == {"including_emulation": False}
    assert engine.resolve_amp("auto", torch.device("cpu")) == "none"


def test_deterministic_on_cuda_rejects_models_pooling_to_more_than_1x1():
    alexnet = build_model("alexnet", 10, stem="standard", image_size=224)
    with pytest.raises(ValueError) as e:
        check_deterministic(alexnet, "cuda", "alexnet")
    msg = str(e.value)
    assert "avgpool (AdaptiveAvgPool2d to 6x6)" in msg and "--deterministic" in msg and "\n" not in msg
    check_deterministic(alexnet, "cpu", "alexnet")  # CPU kernels are deterministic
    vgg_like = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(196, 2))
    with pytest.raises(ValueError, match="to 7x7"):
        check_deterministic(vgg_like, "cuda")
    check_deterministic(build_model("resnet18", 10, stem="small", image_size=32), "cuda", "resnet18")  # 1x1: a mean


def test_more_ranks_than_gpus_fails_at_once():
    assert [pick_gpu(r, 4, 4, False) for r in range(4)] == [0, 1, 2, 3]
    assert pick_gpu(3, 4, 1, one_per_process=True) == 0  # the launcher bound one GPU to each process
    with pytest.raises(TooManyRanks, match=r"local rank 2 of 4 but this process sees 2 GPU\(s\).*nproc_per_node=2"):
        pick_gpu(2, 4, 2, False)
    with pytest.raises(TooManyRanks):
        pick_gpu(1, 2, 1, one_per_process=False)
