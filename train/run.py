"""`python -m train`: read top to bottom, this is the whole run.

parse and check the command line -> join the process group -> build the loaders (fails fast
on missing shards) -> build the model and dry-run it (fails fast on a collapsing stem) ->
optimizer, schedule, scaler, EMA -> resume from the last checkpoint if there is one -> for
each epoch: train (checkpointing every --checkpoint-minutes), evaluate, write metrics and
checkpoints -> summary.json.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from loaders import CacheError, DecodeError, make_loader
from train import checkpoint as ckpt_io
from train import distributed
from train.config import Config, ConfigError, parse
from train.engine import EpochState, NonFiniteLoss, Trainer, evaluate, resolve_amp
from train.models import CollapseError, build_model, check_collapse, uses_small_stem
from train.recipe import MixupCutmix, ModelEma, WarmupCosine, make_loss, make_optimizer, peak_lr
from train.report import Reporter


class SetupError(RuntimeError):
    """Anything wrong before the first step (bad data, bad model): reported in one line."""


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    d = distributed.setup()
    try:
        return evaluate_only(cfg, d) if cfg.evaluate else train(cfg, d)
    except (SetupError, NonFiniteLoss, DecodeError, CacheError) as e:
        print(f"error{f' (rank {d.rank})' if d.enabled else ''}: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLoss) else 2
    finally:
        distributed.teardown()


# -- setup --------------------------------------------------------------------------------------


def _loader(cfg: Config, d: distributed.Dist, spec, *, train: bool, batch_size: int, split: str | None):
    try:
        return make_loader(
            spec,
            split=split,
            batch_size=batch_size,
            train=train,
            backend=cfg.backend,
            device=str(d.device),  # "cuda:N" names this rank's GPU, for DALI too
            rank=d.rank,
            world_size=d.world_size,
            seed=cfg.seed,
            workers=cfg.workers,
            image_size=cfg.image_size,
            channels_last=cfg.channels_last,
            cache_dir=cfg.cache_dir,
            cache_limit=cfg.cache_limit,
        )
    except (ValueError, OSError, ImportError, CacheError) as e:
        which = "training" if train else "validation"
        raise SetupError(f"{which} data: {e}") from None


def make_loaders(cfg: Config, d: distributed.Dist, micro_batch: int):
    if cfg.data:
        train_spec, val_spec = cfg.data, cfg.data
    else:
        train_spec, val_spec = (cfg.shards if cfg.shards and len(cfg.shards) > 1 else (cfg.shards or [None])[0]), None
        if cfg.val_shards:
            val_spec = cfg.val_shards if len(cfg.val_shards) > 1 else cfg.val_shards[0]
    train_loader = None
    if not cfg.evaluate:
        train_loader = _loader(
            cfg, d, train_spec, train=True, batch_size=micro_batch, split="train" if cfg.data else None
        )
    val_loader = None
    if val_spec is not None:
        val_loader = _loader(
            cfg, d, val_spec, train=False, batch_size=cfg.batch_size, split="val" if cfg.data else None
        )
    return train_loader, val_loader


def num_classes_of(cfg: Config, *loaders) -> tuple[int, list | None]:
    found = [ld.num_classes for ld in loaders if ld is not None and ld.num_classes]
    classes = next((ld.classes for ld in loaders if ld is not None and ld.classes), None)
    if cfg.num_classes is not None:
        if found and found[0] != cfg.num_classes:
            raise SetupError(f"--num-classes {cfg.num_classes} but the manifest lists {found[0]} classes")
        return cfg.num_classes, classes
    if not found:
        raise SetupError("no manifest beside the shards tells the number of classes: give --num-classes C")
    return found[0], classes


def make_model(cfg: Config, d: distributed.Dist, num_classes: int) -> nn.Module:
    try:
        model = build_model(
            cfg.arch,
            num_classes,
            stem=cfg.stem,
            image_size=cfg.image_size,
            zero_init_residual=cfg.zero_init_residual,
        )
        check_collapse(model, cfg.image_size, cfg.arch)
    except CollapseError as e:
        raise SetupError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise SetupError(f"cannot build --arch {cfg.arch}: {e}") from None
    if cfg.sync_bn and d.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return model.to(d.device, memory_format=fmt)


def seed_everything(cfg: Config) -> None:
    import random

    import numpy as np

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = not cfg.deterministic
    torch.backends.cudnn.allow_tf32 = not cfg.deterministic


# -- training -----------------------------------------------------------------------------------


def train(cfg: Config, d: distributed.Dist) -> int:
    t_start = time.time()
    seed_everything(cfg)
    reporter = Reporter(cfg.output, active=d.is_main, progress=cfg.progress)
    micro = cfg.batch_size // cfg.accum_steps
    train_loader, val_loader = make_loaders(cfg, d, micro)
    num_classes, classes = num_classes_of(cfg, train_loader, val_loader)
    model = make_model(cfg, d, num_classes)
    amp = resolve_amp(cfg.amp, d.device)

    batches = len(train_loader)
    steps_per_epoch = -(-batches // cfg.accum_steps)
    global_batch = cfg.batch_size * d.world_size
    peak = peak_lr(cfg.lr, global_batch)
    optimizer = make_optimizer(model, cfg.optimizer, peak, cfg.wd, cfg.momentum, cfg.nesterov)
    schedule = WarmupCosine(peak, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr)
    scaler = torch.amp.GradScaler(d.device.type) if amp == "fp16" else None
    ema = ModelEma(model, cfg.ema) if cfg.ema > 0 else None
    mixing = MixupCutmix(cfg.mixup, cfg.cutmix, num_classes, seed=cfg.seed * 1000 + d.rank)

    state = EpochState()
    history: list[dict] = []
    best = float("-inf")
    ckpt_dir = os.path.join(cfg.output, "checkpoints")
    last_path = os.path.join(ckpt_dir, ckpt_io.LAST)
    resume_from = cfg.resume if cfg.resume not in (None, "auto") else None
    if resume_from is None and not cfg.no_auto_resume and os.path.isfile(last_path):
        resume_from = last_path
    if resume_from:
        try:
            ck = ckpt_io.load(resume_from)
        except ValueError as e:
            raise SetupError(str(e)) from None
        _check_compatible(ck, cfg, num_classes, d, batches)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"], ck.get("ema_updates", 0))
        mine = ck["ranks"][d.rank] if len(ck["ranks"]) == d.world_size else None
        state = EpochState(ck["epoch"], ck["batches"], ck["global_step"])
        if mine is not None and state.batches > 0:
            state.loss_sum, state.seen = mine["loss_sum"], mine["seen"]
            state.seconds, state.wait_seconds, state.lr = mine["seconds"], mine["wait_seconds"], mine["lr"]
            train_loader.load_state_dict(mine["loader"])
        if mine is not None:
            ckpt_io.set_rng_state(mine["rng"])
            mixing.load_state_dict(mine["mixing"])
        history, best = list(ck.get("history", [])), ck.get("best_val_top1", float("-inf"))
        t_start -= ck.get("seconds", 0.0)
        reporter.rewrite_metrics(history)
        where = f"epoch {state.epoch}, batch {state.batches}/{batches}"
        reporter.log(f"resumed from {resume_from} at {where}")
    elif d.is_main and os.path.exists(reporter.metrics_path):
        os.remove(reporter.metrics_path)  # a fresh run: no lines from an earlier one

    raw = model
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model
    if d.enabled:
        kw = {"device_ids": [d.device.index]} if d.device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **kw)

    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        criterion=make_loss(cfg.label_smoothing),
        dist=d,
        amp=amp,
        accum_steps=cfg.accum_steps,
        clip_grad=cfg.clip_grad,
        scaler=scaler,
        ema=ema,
        mixing=mixing,
        channels_last=cfg.channels_last,
        raw_model=raw,
        on_first_batch=reporter.image_grid,
    )

    def payload(seconds_so_far: float) -> dict | None:
        rank_state = {
            "loader": train_loader.state_dict(),
            "rng": ckpt_io.rng_state(),
            "mixing": mixing.state_dict(),
            "loss_sum": state.loss_sum,
            "seen": state.seen,
            "seconds": state.seconds,
            "wait_seconds": state.wait_seconds,
            "lr": state.lr,
        }
        ranks = distributed.gather_objects(rank_state, d)
        if not d.is_main:
            return None
        return {
            "model": raw.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "ema_updates": ema.updates if ema is not None else 0,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": state.epoch,
            "batches": state.batches,
            "global_step": state.global_step,
            "ranks": ranks,
            "history": history,
            "best_val_top1": best,
            "seconds": seconds_so_far,
            "config": cfg.to_dict(),
            "arch": cfg.arch,
            "stem": "small" if uses_small_stem(cfg.stem, cfg.image_size) else "standard",
            "image_size": cfg.image_size,
            "num_classes": num_classes,
            "classes": classes,
            "world_size": d.world_size,
        }

    last_save = [time.monotonic()]

    def save_last() -> None:
        p = payload(time.time() - t_start)
        if p is not None:
            ckpt_io.save_atomic(p, last_path)
        last_save[0] = time.monotonic()

    def want_checkpoint() -> bool:
        return (
            d.is_main and cfg.checkpoint_minutes > 0 and time.monotonic() - last_save[0] >= cfg.checkpoint_minutes * 60
        )

    def on_step(st: EpochState, loss: float, group: int) -> None:
        due = st.global_step == 1 or st.global_step % cfg.log_every == 0
        reporter.step(group, {"loss": f"{loss:.3f}", "lr": f"{st.lr:.3g}"} if due else None)
        if due:
            reporter.scalars({"loss": loss, "lr": st.lr}, st.global_step, "step")

    reporter.log(
        f"training {cfg.arch} ({num_classes} classes, {cfg.image_size} px) on {d.world_size} x {d.device.type}, "
        f"loader {train_loader.backend_name}, global batch {global_batch}, peak lr {peak:.4g}, amp {amp}, "
        f"{batches} batches/epoch; output {cfg.output}"
    )
    val = {}
    try:
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            train_loader.set_epoch(epoch)  # keeps a resumed position within this epoch
            reporter.start_epoch(epoch, batches, state.batches)
            trainer.train_epoch(
                train_loader, state, want_checkpoint=want_checkpoint, save_checkpoint=save_last, on_step=on_step
            )
            reporter.end_epoch()
            loss_sum, seen, seconds, wait = distributed.all_reduce_sum(
                [state.loss_sum, state.seen, state.seconds, state.wait_seconds], d
            )
            line = {
                "epoch": epoch,
                "train_loss": loss_sum / max(seen, 1),
                "val_top1": None,
                "val_top5": None,
                "val_loss": None,
                "lr": state.lr,
                "images_per_sec": seen / max(seconds / d.world_size, 1e-9),
                "data_wait": wait / max(seconds, 1e-9),
                "epoch_seconds": seconds / d.world_size,
            }
            distributed.average_buffers(raw, d)  # one set of BN statistics: what every rank evaluates and saves
            if ema is not None:
                distributed.average_buffers(ema.module, d)
            if val_loader is not None:
                val = evaluate(eval_model, val_loader, d, amp, cfg.channels_last)
                line.update(val_top1=val["top1"], val_top5=val["top5"], val_loss=val["loss"])
                if ema is not None:
                    v = evaluate(ema.module, val_loader, d, amp, cfg.channels_last)
                    line.update(val_top1_ema=v["top1"], val_top5_ema=v["top5"])
            history.append(line)
            reporter.append_metrics(line)
            reporter.scalars({k: v for k, v in line.items() if k != "epoch" and v is not None}, epoch, "epoch")
            reporter.log(
                f"epoch {epoch}: train_loss {line['train_loss']:.4f}"
                + (f", val top-1 {line['val_top1']:.2f}%, top-5 {line['val_top5']:.2f}%" if val else "")
                + f", {line['images_per_sec']:.0f} img/s, data wait {100 * line['data_wait']:.1f}%"
            )
            improved = line["val_top1"] is not None and line["val_top1"] > best
            if improved:
                best = line["val_top1"]
            state.reset(epoch + 1)
            save_last()
            if improved and d.is_main:
                ckpt_io.save_atomic(ckpt_io.load(last_path), os.path.join(ckpt_dir, ckpt_io.BEST))
    except NonFiniteLoss as e:
        reporter.close()
        kept = f"; last good checkpoint: {last_path}" if os.path.exists(last_path) else " (no checkpoint written yet)"
        raise NonFiniteLoss(f"{e}{kept}; try a lower --lr, --clip-grad or --amp bf16") from None

    steps_per_rank = distributed.gather_objects(state.global_step, d)  # equal, or a rank would have hung
    final = history[-1] if history else {}
    summary = {
        "best_val_top1": best if best != float("-inf") else None,
        "final_val_top1": final.get("val_top1"),
        "final_val_top5": final.get("val_top5"),
        "final_train_loss": final.get("train_loss"),
        "epochs": cfg.epochs,
        "seconds": time.time() - t_start,
        "world_size": d.world_size,
        "global_batch": global_batch,
        "steps_per_rank": steps_per_rank,
        "tensorboard": os.path.join(cfg.output, "tb"),
    }
    reporter.summary(summary)
    metrics = {
        f"hparam/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k.endswith(("top1", "loss"))
    }
    reporter.hparams({k: v for k, v in cfg.to_dict().items() if v is not None}, metrics)
    reporter.log(
        f"done: final val top-1 {summary['final_val_top1']}, best {summary['best_val_top1']}, "
        f"{summary['seconds']:.0f} s; TensorBoard: tensorboard --logdir {summary['tensorboard']}"
    )
    reporter.close()
    distributed.barrier(d)
    return 0


def _check_compatible(ck: dict, cfg: Config, num_classes: int, d: distributed.Dist, batches: int) -> None:
    if ck.get("arch") != cfg.arch or ck.get("num_classes") != num_classes:
        raise SetupError(
            f"checkpoint is {ck.get('arch')} with {ck.get('num_classes')} classes, this run is {cfg.arch} with "
            f"{num_classes}: use another --output, or --no-auto-resume to start afresh"
        )
    if 0 < ck["batches"] < batches and ck.get("world_size") != d.world_size:
        raise SetupError(
            f"checkpoint stopped mid-epoch on world size {ck.get('world_size')}; resume it on the same world size "
            f"(this run has {d.world_size})"
        )


# -- evaluation only -------------------------------------------------------------------------------


def evaluate_only(cfg: Config, d: distributed.Dist) -> int:
    try:
        ck = ckpt_io.load(cfg.evaluate)
    except ValueError as e:
        raise SetupError(str(e)) from None
    # The model and its input size come from the checkpoint: it fixes what the weights mean.
    saved = ck.get("config", {})
    cfg.image_size = ck.get("image_size", cfg.image_size)
    cfg.arch, cfg.stem = ck.get("arch", cfg.arch), ck.get("stem", cfg.stem)
    cfg.zero_init_residual = saved.get("zero_init_residual", True)
    _, val_loader = make_loaders(cfg, d, cfg.batch_size)
    num_classes = ck["num_classes"]
    if val_loader.num_classes and val_loader.num_classes != num_classes:
        raise SetupError(f"checkpoint has {num_classes} classes, the validation data {val_loader.num_classes}")
    model = make_model(cfg, d, num_classes)
    model.load_state_dict(ck["model"])
    amp = resolve_amp(cfg.amp, d.device)
    result = {"checkpoint": cfg.evaluate, **{f"val_{k}": v for k, v in evaluate(model, val_loader, d, amp).items()}}
    if ck.get("ema") is not None:
        model.load_state_dict(ck["ema"])
        ev = evaluate(model, val_loader, d, amp)
        result.update(val_top1_ema=ev["top1"], val_top5_ema=ev["top5"])
    if d.is_main:
        import json

        print(
            f"val top-1 {result['val_top1']:.2f}%, top-5 {result['val_top5']:.2f}% on {result['val_samples']} images",
            file=sys.stderr,
        )
        print(json.dumps(result))
    return 0
