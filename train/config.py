"""Command line of `python -m train`: options, presets, and the checks that run before any work.

Precedence, lowest first: built-in defaults (the Config fields), then the --preset's values,
then flags given on the command line. Every option is one entry in OPTIONS (flags, Config
field, argparse kwargs); its default is the Config field's, which --help shows, so the help
text, the defaults and the presets cannot drift apart.

Batch size is per process (per GPU), as in torchvision's reference scripts: --batch-size 256
on 8 GPUs is a global batch of 2048, and the learning rate is scaled to --lr x 2048 / 256.
It is the batch of one optimizer step; with --accum-steps K each of the K forward/backward
passes sees batch-size / K images, so K trades memory for time without changing the recipe.
"""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import asdict, dataclass

ARCH_HELP = "torchvision classification model name (resnet50, alexnet, ...) or package.module:Class"


class ConfigError(ValueError):
    """A bad command line, found before any work; its message is one line."""


@dataclass
class Config:
    # data
    data: str | None = None
    shards: list[str] | None = None
    val_shards: list[str] | None = None
    num_classes: int | None = None
    backend: str = "auto"
    workers: int | None = None  # None: the loader's default for this machine (loaders/dali.py, pytorch.py)
    image_size: int = 224
    cache_dir: str | None = None
    cache_limit: str | None = None
    # model
    arch: str = "resnet50"
    stem: str = "auto"
    zero_init_residual: bool = True
    # recipe
    epochs: int = 90
    batch_size: int = 256
    accum_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    wd: float = 1e-4
    warmup_epochs: float = 5.0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema: float = 0.0
    clip_grad: float = 0.0
    # speed
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    # run
    preset: str | None = None
    output: str = "runs/train"
    resume: str | None = None
    no_auto_resume: bool = False
    checkpoint_minutes: float = 10.0
    evaluate: str | None = None
    deterministic: bool = False
    seed: int = 0
    log_every: int = 20
    progress: str = "auto"
    # sanity check (train/overfit.py)
    overfit_batches: int | None = None
    overfit_steps: int = 500

    def to_dict(self) -> dict:
        return asdict(self)


# Presets name whole recipes. The demo preset is sized for the demo set on a 2-core CPU.
PRESETS: dict[str, dict] = {
    "demo": dict(
        arch="train.nets:SmallConvNet",
        stem="standard",
        image_size=48,
        epochs=20,
        batch_size=64,
        optimizer="adamw",
        lr=0.04,
        wd=5e-4,
        warmup_epochs=1,
        label_smoothing=0.1,
        amp="none",
        backend="pytorch",  # its augmentation is seeded per sample: resumed runs repeat exactly
        workers=1,
        checkpoint_minutes=2.0,
    ),
    # CIFAR-10 (32 px): the usual 3x3-stem ResNet-18 recipe.
    "cifar10-resnet18": dict(
        arch="resnet18",
        stem="small",
        image_size=32,
        epochs=40,
        batch_size=128,
        lr=0.2,
        nesterov=True,
        wd=5e-4,
        warmup_epochs=1,
        label_smoothing=0.1,
    ),
    # Bag of Tricks (He et al. 2018): lr 0.1 x batch/256, 5 warmup epochs, cosine, label
    # smoothing 0.1, no decay on bias/norm, zero-init last BN gamma, mixed precision.
    "imagenet-resnet50": dict(
        arch="resnet50",
        stem="standard",
        image_size=224,
        epochs=90,
        batch_size=256,
        lr=0.1,
        wd=1e-4,
        warmup_epochs=5,
        label_smoothing=0.1,
        amp="bf16",
        channels_last=True,
        workers=8,
    ),
}


# (flags, Config field, argparse kwargs). Help strings end with the default, added below.
OPTIONS: list[tuple[tuple[str, ...], str, dict]] = [
    # data
    (
        ("--data",),
        "data",
        dict(
            metavar="DIR",
            help="folder (or URL) holding manifest.json: train and val splits and the classes come from it",
        ),
    ),
    (
        ("--shards",),
        "shards",
        dict(
            metavar="SPEC",
            nargs="+",
            help="training shards: a brace pattern (quoted), several paths, a folder with manifest.json, or s3:// URLs",
        ),
    ),
    (
        ("--val-shards",),
        "val_shards",
        dict(
            metavar="SPEC",
            nargs="+",
            help="validation shards, as --shards; without them (and without --data) no validation is run",
        ),
    ),
    (
        ("--num-classes",),
        "num_classes",
        dict(
            type=int,
            metavar="C",
            help="number of classes; read from the manifest when there is one, needed when there is none",
        ),
    ),
    (
        ("--backend",),
        "backend",
        dict(
            choices=["auto", "dali", "pytorch"],
            help="loader backend: dali (nvJPEG on GPU, CPU operators otherwise), pytorch (DataLoader workers), auto (dali when it imports)",
        ),
    ),
    (
        ("--workers",),
        "workers",
        dict(
            type=int,
            metavar="N",
            help="loader worker threads (dali) or processes (pytorch) per rank (default: the loader's, from the "
            "machine's cores and GPUs)",
        ),
    ),
    (
        ("--cache-dir",),
        "cache_dir",
        dict(
            metavar="DIR",
            help="remote (s3://, gs://, http) shards are downloaded whole into this local folder ahead of use, "
            "shared by every rank on the machine; default ~/.cache/shardline/shards/<hash of the set URL> ($SHARDLINE_CACHE_DIR replaces ~/.cache/shardline)",
        ),
    ),
    (
        ("--cache-limit",),
        "cache_limit",
        dict(
            metavar="SIZE",
            help="most bytes the shard cache may hold, e.g. 200GB (bytes, or kB/MB/GB/TB, KiB..TiB); "
            "default 80%% of the cache disk's free space; the whole set makes later epochs network-free",
        ),
    ),
    (
        ("--image-size",),
        "image_size",
        dict(
            type=int,
            metavar="PX",
            help="side of the square crop the model sees (train: random-resized-crop; val: resize to size/0.875, center crop)",
        ),
    ),
    # model
    (("--arch",), "arch", dict(metavar="NAME", help=ARCH_HELP + "; a custom Class is called as Class(num_classes=C)")),
    (
        ("--stem",),
        "stem",
        dict(
            choices=["auto", "standard", "small"],
            help="input stem: standard (torchvision's), small (3x3 stride-1 first conv, no max-pool, for 32-64 px data), auto (small when --image-size <= 64)",
        ),
    ),
    (
        ("--no-zero-init-residual",),
        "zero_init_residual",
        dict(
            action="store_false",
            default=None,
            help="keep the default init of each residual block's last BN gamma instead of zero (zero-init is a Bag of Tricks item)",
        ),
    ),
    # recipe
    (("--epochs",), "epochs", dict(type=int, metavar="N", help="training epochs")),
    (
        ("--batch-size",),
        "batch_size",
        dict(
            type=int,
            metavar="N",
            help="images per optimizer step PER PROCESS (per GPU); the global batch is this x world size",
        ),
    ),
    (
        ("--accum-steps",),
        "accum_steps",
        dict(
            type=int,
            metavar="K",
            help="gradient accumulation: each step runs K forward/backward passes of batch-size/K images (must divide --batch-size)",
        ),
    ),
    (("--optimizer",), "optimizer", dict(choices=["sgd", "adamw"], help="SGD with momentum, or AdamW")),
    (
        ("--lr",),
        "lr",
        dict(
            type=float,
            metavar="LR",
            help="base learning rate for a global batch of 256; the peak lr is LR x global_batch / 256",
        ),
    ),
    (("--momentum",), "momentum", dict(type=float, metavar="M", help="SGD momentum (AdamW: beta1)")),
    (("--nesterov",), "nesterov", dict(action="store_true", default=None, help="Nesterov momentum for SGD")),
    (
        ("--wd",),
        "wd",
        dict(type=float, metavar="WD", help="weight decay, applied to weights only (never to biases or norm layers)"),
    ),
    (
        ("--warmup-epochs",),
        "warmup_epochs",
        dict(
            type=float,
            metavar="E",
            help="linear warmup from 0 to the peak lr over E epochs (per iteration), then cosine decay",
        ),
    ),
    (
        ("--min-lr",),
        "min_lr",
        dict(type=float, metavar="LR", help="learning rate at the end of the cosine decay (absolute, not scaled)"),
    ),
    (
        ("--label-smoothing",),
        "label_smoothing",
        dict(type=float, metavar="EPS", help="label smoothing of the cross-entropy targets"),
    ),
    (
        ("--mixup",),
        "mixup",
        dict(
            type=float,
            metavar="ALPHA",
            help="mixup with Beta(ALPHA, ALPHA) weights; 0 disables (with --cutmix too, each batch picks one)",
        ),
    ),
    (
        ("--cutmix",),
        "cutmix",
        dict(type=float, metavar="ALPHA", help="cutmix with Beta(ALPHA, ALPHA) box areas; 0 disables"),
    ),
    (
        ("--ema",),
        "ema",
        dict(
            type=float,
            metavar="DECAY",
            help="keep an exponential moving average of the weights with this decay per step (e.g. 0.9998), evaluated beside the model; 0 disables",
        ),
    ),
    (
        ("--clip-grad",),
        "clip_grad",
        dict(type=float, metavar="NORM", help="clip the global gradient norm to NORM; 0 disables"),
    ),
    # speed
    (
        ("--amp",),
        "amp",
        dict(
            choices=["auto", "bf16", "fp16", "none"],
            help="mixed precision: bf16 autocast, fp16 autocast with a gradient scaler, none; auto = bf16 on GPUs that support it, fp16 on older GPUs, none on CPU",
        ),
    ),
    (
        ("--channels-last",),
        "channels_last",
        dict(
            action="store_true",
            default=None,
            help="channels-last memory format for model and images (faster convolutions on tensor cores)",
        ),
    ),
    (("--compile",), "compile", dict(action="store_true", default=None, help="torch.compile the model")),
    (
        ("--sync-bn",),
        "sync_bn",
        dict(action="store_true", default=None, help="synchronize BatchNorm statistics across ranks (needs GPUs)"),
    ),
    # run
    (
        ("--preset",),
        "preset",
        dict(
            choices=sorted(PRESETS),
            help="a named recipe: "
            + "; ".join(
                f"{k}: {v['arch']} at {v['image_size']} px, {v['epochs']} epochs, batch {v['batch_size']}"
                for k, v in PRESETS.items()
            )
            + "; flags given explicitly override it",
        ),
    ),
    (
        ("--output",),
        "output",
        dict(
            metavar="DIR", help="run folder: checkpoints/{last,best}.pt, metrics.jsonl, summary.json, tb/ (TensorBoard)"
        ),
    ),
    (
        ("--resume",),
        "resume",
        dict(
            metavar="CKPT",
            nargs="?",
            const="auto",
            help="resume from CKPT (or, without a value, OUTPUT/checkpoints/last.pt), mid-epoch included; a run resumes from OUTPUT/checkpoints/last.pt by default anyway",
        ),
    ),
    (
        ("--no-auto-resume",),
        "no_auto_resume",
        dict(
            action="store_true",
            default=None,
            help="start afresh even when OUTPUT/checkpoints/last.pt exists (it is overwritten)",
        ),
    ),
    (
        ("--checkpoint-minutes",),
        "checkpoint_minutes",
        dict(
            type=float,
            metavar="MIN",
            help="also write last.pt every MIN minutes mid-epoch (it is always written at each epoch end); 0 = only at epoch ends",
        ),
    ),
    (
        ("--evaluate",),
        "evaluate",
        dict(
            metavar="CKPT",
            help="only evaluate the checkpoint CKPT on the validation data (--data or --val-shards) and print top-1/top-5 "
            "(and a JSON line); the model, its stem and the image size come from the checkpoint",
        ),
    ),
    (
        ("--deterministic",),
        "deterministic",
        dict(
            action="store_true",
            default=None,
            help="deterministic algorithms only, so a run (and a resumed run) repeats bit for bit on the same machine; "
            "either backend seeds each sample's crop and flip from (seed, epoch, sample), so a mid-epoch resume "
            "reads the same crops",
        ),
    ),
    (
        ("--seed",),
        "seed",
        dict(type=int, metavar="N", help="seed for the model init, the data order and augmentation, mixup/cutmix"),
    ),
    (
        ("--log-every",),
        "log_every",
        dict(
            type=int,
            metavar="STEPS",
            help="update the progress bar and TensorBoard step scalars every STEPS optimizer steps",
        ),
    ),
    (
        ("--overfit-batches",),
        "overfit_batches",
        dict(
            type=int,
            metavar="N",
            help="sanity check instead of a run: take the first N training batches once, without augmentation, "
            "and train on them until they are memorized (loss near 0, train top-1 100%%); writes "
            '"overfit" to OUTPUT/summary.json and exits 1 if it fails within --overfit-steps',
        ),
    ),
    (
        ("--overfit-steps",),
        "overfit_steps",
        dict(type=int, metavar="STEPS", help="optimizer-step budget of --overfit-batches"),
    ),
    (
        ("--progress",),
        "progress",
        dict(
            choices=["auto", "always", "never"], help="progress bar on rank 0: auto shows it when stderr is a terminal"
        ),
    ),
]


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="python -m train",
        description=(
            "Train an image classifier from shardline shards (one process, or under torchrun: nccl on GPUs, "
            "gloo on CPU). Writes OUTPUT/metrics.jsonl, OUTPUT/summary.json, OUTPUT/tb and OUTPUT/checkpoints."
        ),
        epilog=(
            "examples:\n"
            "  python -m train --data ./data/demo --preset demo --output runs/demo\n"
            "  torchrun --nproc_per_node=8 -m train --shards '/ssd/imagenet-train-{000..146}.tar' \\\n"
            "      --val-shards '/ssd/imagenet-val-{000..006}.tar' --preset imagenet-resnet50 --output runs/rn50\n"
            "  python -m train --evaluate runs/rn50/checkpoints/best.pt --data /ssd/imagenet"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flags, name, kw in OPTIONS:
        kw = dict(kw)
        default = getattr(defaults, name)
        if kw.get("action") == "store_false":
            kw["help"] += " (default: zero-init on)"
        elif kw.get("action") != "store_true":
            kw["help"] += f" (default: {default})" if default is not None else ""
        kw.setdefault("default", None)
        p.add_argument(*flags, dest=name, **kw)
    return p


def parse(argv: list[str] | None = None) -> Config:
    """Defaults < preset < explicit flags; then validate(). Raises ConfigError (one line)."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    cfg = Config()
    if "preset" in given:
        for k, v in PRESETS[given["preset"]].items():
            setattr(cfg, k, v)
    for k, v in given.items():
        setattr(cfg, k, v)
    validate(cfg)
    return cfg


def _positive(cfg: Config, name: str, allow_zero: bool = False) -> None:
    v = getattr(cfg, name)
    if v < 0 or (v == 0 and not allow_zero):
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, not {v}")


def check_arch(arch: str) -> None:
    """Unknown names fail here, in one line, before any data is touched."""
    if ":" in arch:
        module, _, cls = arch.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"--arch {arch}: cannot import module {module!r}: {e}") from None
        if not callable(getattr(mod, cls, None)):
            raise ConfigError(f"--arch {arch}: module {module!r} has no class {cls!r}")
        return
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        close = [n for n in names if n.startswith(arch[:4])][:6]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"unknown --arch {arch!r}: not a torchvision classification model nor package.module:Class{hint}"
        )


def validate(cfg: Config) -> None:
    _check_data(cfg)
    _check_numbers(cfg)
    _check_run(cfg)


def _check_data(cfg: Config) -> None:
    if cfg.evaluate:
        if not os.path.isfile(cfg.evaluate):
            raise ConfigError(f"--evaluate {cfg.evaluate}: no such checkpoint file")
        if not (cfg.data or cfg.val_shards):
            raise ConfigError("--evaluate needs validation data: --data DIR or --val-shards SPEC")
        if cfg.shards:
            raise ConfigError("--evaluate takes --data or --val-shards, not --shards (training shards)")
        return
    if cfg.data and cfg.shards:
        raise ConfigError("give either --data DIR or --shards SPEC, not both")
    if not (cfg.data or cfg.shards):
        raise ConfigError("no training data: give --data DIR (with manifest.json) or --shards SPEC")
    if cfg.data and cfg.val_shards:
        raise ConfigError("--val-shards goes with --shards; with --data the val split of the manifest is used")
    check_arch(cfg.arch)


def _check_numbers(cfg: Config) -> None:
    if cfg.overfit_batches is not None:
        if cfg.evaluate:
            raise ConfigError("--overfit-batches trains; it does not go with --evaluate")
        _positive(cfg, "overfit_batches")
    for name in ("epochs", "batch_size", "accum_steps", "lr", "image_size", "log_every", "overfit_steps"):
        _positive(cfg, name)
    for name in ("wd", "warmup_epochs", "min_lr", "mixup", "cutmix", "clip_grad", "checkpoint_minutes"):
        _positive(cfg, name, allow_zero=True)
    if cfg.workers is not None:
        _positive(cfg, "workers", allow_zero=True)
    if cfg.batch_size % cfg.accum_steps:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --accum-steps {cfg.accum_steps}")
    if not cfg.evaluate and cfg.warmup_epochs >= cfg.epochs and cfg.epochs > 1:
        raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs} must be shorter than --epochs {cfg.epochs}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing must be in [0, 1), not {cfg.label_smoothing}")
    if not 0 <= cfg.ema < 1:
        raise ConfigError(f"--ema must be a decay in [0, 1), not {cfg.ema}")
    if cfg.image_size < 16:
        raise ConfigError(f"--image-size must be at least 16 px, not {cfg.image_size}")
    if cfg.num_classes is not None and cfg.num_classes < 2:
        raise ConfigError(f"--num-classes must be at least 2, not {cfg.num_classes}")


def _check_run(cfg: Config) -> None:
    if cfg.resume and cfg.resume != "auto" and not os.path.isfile(cfg.resume):
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint file")
    if cfg.resume and cfg.no_auto_resume:
        raise ConfigError("--resume and --no-auto-resume contradict each other")
    import torch

    if cfg.sync_bn and not torch.cuda.is_available():
        raise ConfigError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU kernel); drop it on CPU")
    if cfg.amp == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--amp fp16 needs a CUDA GPU; on CPU use --amp bf16 or none")
