"""Command line of `python -m train`: options, presets, and the checks that run before any work.

Precedence, lowest first: built-in defaults (the Config fields), then the --preset's values,
then flags given on the command line. Every option is declared once, as a Config field whose
metadata holds its help and argparse form; the parser is generated from the fields (the
pattern of flows/params.py, whose click options come from BuildParams' fields the same way),
so the help text, the defaults and the presets cannot drift apart.

Batch size is per process (per GPU), as in torchvision's reference scripts: --batch-size 256
on 8 GPUs is a global batch of 2048, and the learning rate is scaled to --lr x 2048 / 256.
It is the batch of one optimizer step; with --accum-steps K each of the K forward/backward
passes sees batch-size / K images, so K trades memory for time without changing the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any

ARCH_HELP = "torchvision classification model name (resnet50, alexnet, ...) or package.module:Class"


class ConfigError(ValueError):
    """A bad command line, found before any work; its message is one line."""


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
        amp="auto",  # bf16 where the GPU has it, else fp16: the same preset runs on any GPU
        channels_last=True,
        workers=8,
    ),
    # FFCV's ResNet-50 24-epoch recipe (github.com/libffcv/ffcv-imagenet, rn50_configs/rn50_24_epochs.yaml):
    # 24 epochs, train at 160 px rising to 192 px over epochs 17..20, validate at 256 px with flip
    # TTA (their lr_tta), label smoothing 0.1, weight decay 1e-4 without BN decay, SGD momentum 0.9.
    # Kept from this trainer's recipe rather than theirs: warmup + cosine instead of their
    # triangular cycle peaking at epoch 2 (so 2 warmup epochs), lr 0.1 x batch/256 (their 1.7 is
    # for batch 512 on each of 8 GPUs), no blurpool. FFCV reports 75.6% top-1 for their recipe;
    # this preset's accuracy has not been measured here.
    "imagenet-resnet50-fast": dict(
        arch="resnet50",
        stem="standard",
        image_size=192,
        min_image_size=160,
        ramp_epochs="17:20",
        eval_image_size=256,
        tta="flip",
        epochs=24,
        batch_size=256,
        lr=0.1,
        wd=1e-4,
        warmup_epochs=2,
        label_smoothing=0.1,
        amp="auto",
        channels_last=True,
        workers=8,
    ),
}


_PRESET_HELP = (
    "a named recipe: "
    + "; ".join(
        f"{k}: {v['arch']} at {v['image_size']} px, {v['epochs']} epochs, batch {v['batch_size']}"
        for k, v in PRESETS.items()
    )
    + "; flags given explicitly override it"
)


def _opt(help: str, default: Any, flag: str | None = None, **argparse_kw: Any) -> Any:
    """A Config field: its --help text, its default, and its argparse form (`flag` when it is
    not --the-field-name; type, metavar, choices, nargs, action...). Help ends with the default,
    added by build_parser()."""
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_kw})


@dataclass
class Config:
    """Every option of `python -m train`, in --help's order."""

    # data
    data: list[str] | None = _opt(  # noqa: RUF009 (_opt returns a dataclasses.field)
        "folder (or URL) holding manifest.json: train and val splits and the classes come from it; "
        "repeat it for several sets in one stream (one joint class list, by class id; see --weights)",
        None,
        metavar="DIR",
        action="append",
    )
    weights: str | None = _opt(
        "with several --data: each set's share of an epoch, in --data's order (e.g. 3,1); "
        "without it, each set gives as many samples as it holds",
        None,
        metavar="W,W",
    )
    shards: list[str] | None = _opt(  # noqa: RUF009 (_opt returns a dataclasses.field)
        "training shards: a brace pattern (quoted), several paths, a folder with manifest.json, or s3:// URLs",
        None,
        metavar="SPEC",
        nargs="+",
    )
    val_shards: list[str] | None = _opt(  # noqa: RUF009 (_opt returns a dataclasses.field)
        "validation shards, as --shards; without them, the val split of the manifest beside --shards (when it has one)",
        None,
        metavar="SPEC",
        nargs="+",
    )
    num_classes: int | None = _opt(
        "number of classes; read from the manifest when there is one, needed when there is none",
        None,
        type=int,
        metavar="C",
    )
    backend: str = _opt(
        "loader backend: dali (nvJPEG on GPU, CPU operators otherwise), pytorch (DataLoader workers), auto (dali when it imports)",
        "auto",
        choices=["auto", "dali", "pytorch"],
    )
    workers: int | None = _opt(
        "loader worker threads (dali) or processes (pytorch) per rank (default: the loader's, from the machine's cores and GPUs)",
        None,
        type=int,
        metavar="N",
    )
    cache_dir: str | None = _opt(
        "remote (s3://, gs://, http) shards are downloaded whole into this local folder ahead of use, shared by every rank on the machine; default ~/.cache/shardline/shards/<hash of the set URL> ($SHARDLINE_CACHE_DIR replaces ~/.cache/shardline)",
        None,
        metavar="DIR",
    )
    cache_limit: str | None = _opt(
        "most bytes the shard cache may hold, e.g. 200GB (bytes, or kB/MB/GB/TB, KiB..TiB); default 80%% of the cache disk's free space; the whole set makes later epochs network-free",
        None,
        metavar="SIZE",
    )
    image_size: int = _opt(
        "side of the square crop the model sees (train: random-resized-crop; val: resize to size/0.875, center crop)",
        224,
        type=int,
        metavar="PX",
    )
    min_image_size: int | None = _opt(
        "progressive resizing: train at PX at the start of --ramp-epochs, rising linearly to --image-size at its end (multiples of 8; each epoch's size is in metrics.jsonl); off by default",
        None,
        type=int,
        metavar="PX",
    )
    ramp_epochs: str | None = _opt(
        "epochs A:B of the --min-image-size ramp: --min-image-size up to epoch A, --image-size from epoch B on",
        None,
        metavar="A:B",
    )
    eval_image_size: int | None = _opt(
        "validation (and --evaluate) crop side, e.g. above --image-size for FFCV's train-test resolution gain (default: --image-size)",
        None,
        type=int,
        metavar="PX",
    )
    auto_augment: str = _opt(
        "training augmentation after the crop and flip, with timm's semantics: randaugment (2 ops at magnitude 9 of 10) or trivialaugment (one op, random magnitude); inside the DALI graph on the dali backend (GPU or CPU), torchvision v2 on pytorch; seeded per sample like the crops",
        "none",
        choices=["none", "randaugment", "trivialaugment"],
    )
    random_erasing: float = _opt(
        "training: probability P of erasing one rectangle (2%%..1/3 of the image, aspect 0.3..3.3) with the mean colour, as timm's RandomErasing; 0 disables",
        0.0,
        type=float,
        metavar="P",
    )
    tta: str = _opt(
        "test-time augmentation: flip = validation averages the logits of each image and its mirror",
        "none",
        choices=["none", "flip"],
    )
    # model
    arch: str = _opt(
        ARCH_HELP + "; a custom Class is called as Class(num_classes=C)",
        "resnet50",
        metavar="NAME",
    )
    stem: str = _opt(
        "input stem: standard (torchvision's), small (3x3 stride-1 first conv, no max-pool, for 32-64 px data), auto (small when --image-size <= 64)",
        "auto",
        choices=["auto", "standard", "small"],
    )
    zero_init_residual: bool = _opt(
        "keep the default init of each residual block's last BN gamma instead of zero (zero-init is a Bag of Tricks item) (default: zero-init on)",
        True,
        flag="--no-zero-init-residual",
        action="store_false",
    )
    # recipe
    epochs: int = _opt(
        "training epochs",
        90,
        type=int,
        metavar="N",
    )
    batch_size: int = _opt(
        "images per optimizer step PER PROCESS (per GPU); the global batch is this x world size",
        256,
        type=int,
        metavar="N",
    )
    accum_steps: int = _opt(
        "gradient accumulation: each step runs K forward/backward passes of batch-size/K images (must divide --batch-size)",
        1,
        type=int,
        metavar="K",
    )
    optimizer: str = _opt(
        "SGD with momentum, or AdamW",
        "sgd",
        choices=["sgd", "adamw"],
    )
    lr: float = _opt(
        "base learning rate for a global batch of 256; the peak lr is LR x global_batch / 256",
        0.1,
        type=float,
        metavar="LR",
    )
    momentum: float = _opt(
        "SGD momentum (AdamW: beta1)",
        0.9,
        type=float,
        metavar="M",
    )
    nesterov: bool = _opt(
        "Nesterov momentum for SGD",
        False,
        action="store_true",
    )
    wd: float = _opt(
        "weight decay, applied to weights only (never to biases or norm layers)",
        0.0001,
        type=float,
        metavar="WD",
    )
    warmup_epochs: float = _opt(
        "linear warmup from 0 to the peak lr over E epochs (per iteration), then cosine decay",
        5.0,
        type=float,
        metavar="E",
    )
    min_lr: float = _opt(
        "learning rate at the end of the cosine decay (absolute, not scaled)",
        0.0,
        type=float,
        metavar="LR",
    )
    label_smoothing: float = _opt(
        "label smoothing of the cross-entropy targets",
        0.1,
        type=float,
        metavar="EPS",
    )
    mixup: float = _opt(
        "mixup with Beta(ALPHA, ALPHA) weights; 0 disables (with --cutmix too, each batch picks one)",
        0.0,
        type=float,
        metavar="ALPHA",
    )
    cutmix: float = _opt(
        "cutmix with Beta(ALPHA, ALPHA) box areas; 0 disables",
        0.0,
        type=float,
        metavar="ALPHA",
    )
    ema: float = _opt(
        "keep an exponential moving average of the weights with this decay per step (e.g. 0.9998), evaluated beside the model; 0 disables",
        0.0,
        type=float,
        metavar="DECAY",
    )
    clip_grad: float = _opt(
        "clip the global gradient norm to NORM; 0 disables",
        0.0,
        type=float,
        metavar="NORM",
    )
    # speed
    amp: str = _opt(
        "mixed precision: bf16 autocast, fp16 autocast with a gradient scaler, none; auto = bf16 on GPUs that support it, fp16 on older GPUs, none on CPU",
        "auto",
        choices=["auto", "bf16", "fp16", "none"],
    )
    channels_last: bool = _opt(
        "channels-last memory format for model and images (faster convolutions on tensor cores)",
        False,
        action="store_true",
    )
    compile: bool = _opt(
        "torch.compile the model",
        False,
        action="store_true",
    )
    sync_bn: bool = _opt(
        "synchronize BatchNorm statistics across ranks (needs GPUs)",
        False,
        action="store_true",
    )
    # run
    preset: str | None = _opt(
        _PRESET_HELP,
        None,
        choices=sorted(PRESETS),
    )
    output: str = _opt(
        "run folder: checkpoints/{last,best}.pt, metrics.jsonl, summary.json, tb/ (TensorBoard)",
        "runs/train",
        metavar="DIR",
    )
    resume: str | None = _opt(
        "resume from CKPT (or, without a value, OUTPUT/checkpoints/last.pt), mid-epoch included; a run resumes from OUTPUT/checkpoints/last.pt by default anyway",
        None,
        metavar="CKPT",
        nargs="?",
        const="auto",
    )
    no_auto_resume: bool = _opt(
        "start afresh even when OUTPUT/checkpoints/last.pt exists (it is overwritten)",
        False,
        action="store_true",
    )
    checkpoint_minutes: float = _opt(
        "also write last.pt every MIN minutes mid-epoch (it is always written at each epoch end); 0 = only at epoch ends",
        10.0,
        type=float,
        metavar="MIN",
    )
    evaluate: str | None = _opt(
        "only evaluate the checkpoint CKPT on the validation data (--data or --val-shards) and print top-1/top-5 (and a JSON line); the model, its stem and the image size come from the checkpoint",
        None,
        metavar="CKPT",
    )
    deterministic: bool = _opt(
        "deterministic algorithms only, so a run (and a resumed run) repeats bit for bit on the same machine; either backend seeds each sample's crop and flip from (seed, epoch, sample), so a mid-epoch resume reads the same crops",
        False,
        action="store_true",
    )
    seed: int = _opt(
        "seed for the model init, the data order and augmentation, mixup/cutmix",
        0,
        type=int,
        metavar="N",
    )
    log_every: int = _opt(
        "update the progress bar and TensorBoard step scalars every STEPS optimizer steps",
        20,
        type=int,
        metavar="STEPS",
    )
    # sanity check (train/overfit.py)
    overfit_batches: int | None = _opt(
        'sanity check instead of a run: take the first N training batches once, without augmentation, and train on them until they are memorized (loss near 0, train top-1 100%%); writes "overfit" to OUTPUT/summary.json and exits 1 if it fails within --overfit-steps',
        None,
        type=int,
        metavar="N",
    )
    overfit_steps: int = _opt(
        "optimizer-step budget of --overfit-batches",
        500,
        type=int,
        metavar="STEPS",
    )
    progress: str = _opt(
        "progress bar on rank 0: auto shows it when stderr is a terminal",
        "auto",
        choices=["auto", "always", "never"],
    )

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
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
    for f in dataclasses.fields(Config):
        _add_option(p, f)
    return p


def _add_option(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """One --option from one Config field. Its parsed default is None, so parse() can tell a
    flag given on the command line from one left out (and let a preset's value stand)."""
    kw = dict(f.metadata["argparse"])
    help = f.metadata["help"]
    if kw.get("action") not in ("store_true", "store_false") and f.default is not None:
        help += f" (default: {f.default})"
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    p.add_argument(flag, dest=f.name, default=None, help=help, **kw)


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
        _check_weights(cfg)
        return
    if cfg.data and cfg.shards:
        raise ConfigError("give either --data DIR or --shards SPEC, not both")
    if not (cfg.data or cfg.shards):
        raise ConfigError("no training data: give --data DIR (with manifest.json) or --shards SPEC")
    if cfg.data and cfg.val_shards:
        raise ConfigError("--val-shards goes with --shards; with --data the val split of the manifest is used")
    _check_weights(cfg)
    check_arch(cfg.arch)


def set_weights(cfg: Config) -> list[float] | None:
    """--weights as numbers, one per --data set; None when not given."""
    if cfg.weights is None:
        return None
    try:
        weights = [float(w) for w in cfg.weights.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {cfg.weights}: expected numbers separated by commas, e.g. 3,1") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--weights {cfg.weights}: weights are >= 0 with a positive sum")
    return weights


def _check_weights(cfg: Config) -> None:
    sets = len(cfg.data or [])
    if cfg.evaluate and sets > 1:
        raise ConfigError("--evaluate takes one --data set")
    weights = set_weights(cfg)
    if weights is not None and len(weights) != sets:
        raise ConfigError(f"--weights gives {len(weights)} weights for {sets} --data set(s): one per --data")


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
    _check_sizes(cfg)


def _check_sizes(cfg: Config) -> None:
    """--min-image-size and --ramp-epochs go together; every size is at least 16 px."""
    from train.resolution import parse_ramp

    if (cfg.min_image_size is None) != (cfg.ramp_epochs is None):
        raise ConfigError("--min-image-size and --ramp-epochs go together: give both (or neither)")
    if cfg.ramp_epochs is not None:
        try:
            parse_ramp(cfg.ramp_epochs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 16 <= cfg.min_image_size <= cfg.image_size:
            raise ConfigError(
                f"--min-image-size must be in 16..--image-size ({cfg.image_size}), not {cfg.min_image_size}"
            )
    if not 0 <= cfg.random_erasing <= 1:
        raise ConfigError(f"--random-erasing is a probability in [0, 1], not {cfg.random_erasing}")
    if cfg.eval_image_size is not None and cfg.eval_image_size < 16:
        raise ConfigError(f"--eval-image-size must be at least 16 px, not {cfg.eval_image_size}")


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
