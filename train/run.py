"""`python -m train`: read top to bottom, this is the whole run.

parse and check the command line -> join the process group -> build the loaders (fails fast
on missing shards) -> build the model and dry-run it (fails fast on a collapsing stem) ->
optimizer, schedule, scaler, EMA -> resume from the last checkpoint if there is one -> for
each epoch: train (checkpointing every --checkpoint-minutes), evaluate, write metrics and
checkpoints -> summary.json.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time

import torch
from torch import nn

from loaders import CacheError, DecodeError, make_loader, manifest_folder, redact_text, redact_url
from train import checkpoint as ckpt_io
from train import distributed, elastic
from train.config import Config, ConfigError, parse, set_weights
from train.engine import EpochState, NonFiniteLoss, Trainer, epoch_totals, evaluate, resolve_amp
from train.models import CollapseError, build_model, check_collapse, check_deterministic, uses_small_stem
from train.overfit import TooFewBatches, run_overfit
from train.recipe import ModelEma, Recipe, make_loss, make_recipe
from train.report import Reporter
from train.resolution import schedule


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
    try:
        d = distributed.setup()
    except distributed.TooManyRanks as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if cfg.overfit_batches:
            return overfit(cfg, d)
        return evaluate_only(cfg, d) if cfg.evaluate else train(cfg, d)
    except (SetupError, NonFiniteLoss, DecodeError, CacheError) as e:
        print(f"error{f' (rank {d.rank})' if d.enabled else ''}: {redact_text(str(e))}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteLoss) else 2
    finally:
        close_loaders()
        distributed.teardown()


# -- setup --------------------------------------------------------------------------------------


_open_loaders: list = []  # every loader this process made, closed by close_loaders()


def close_loaders() -> None:
    """Close every loader while CUDA and the process group are still up: DALI GPU pipelines left
    to interpreter teardown can abort the process after it has printed its results."""
    while _open_loaders:
        _open_loaders.pop().close()
    gc.collect()  # a pipeline held in a reference cycle goes now, not at teardown


def _loader(
    cfg: Config, d: distributed.Dist, spec, *, train: bool, batch_size: int, split: str | None, epoch_size=None
):
    # validation at --eval-image-size; training starts at the first epoch's size (train_one_epoch sets each)
    size = cfg.image_size if train else cfg.eval_image_size or cfg.image_size
    try:
        loader = make_loader(
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
            image_size=size,
            channels_last=cfg.channels_last,
            cache_dir=cfg.cache_dir,
            cache_limit=cfg.cache_limit,
            epoch_size=epoch_size,
            options=dict(auto_augment=cfg.auto_augment, random_erasing=cfg.random_erasing) if train else None,
        )
    except (ValueError, OSError, ImportError, CacheError) as e:
        which = "training" if train else "validation"
        raise SetupError(f"{which} data: {e}") from None
    _open_loaders.append(loader)
    return loader


def data_spec(cfg: Config):
    """--data as make_loader takes it: one folder, or several sets ({folder: weight}, or by size)."""
    if len(cfg.data) == 1:
        return cfg.data[0]
    weights = set_weights(cfg)
    return dict(zip(cfg.data, weights, strict=True)) if weights else list(cfg.data)


def make_loaders(cfg: Config, d: distributed.Dist, micro_batch: int):
    """(train loader, [(set name, val loader)], where val comes from, in words for the start line)."""
    if cfg.data and len(cfg.data) > 1 and not cfg.evaluate:
        return mixed_loaders(cfg, d, micro_batch)
    if cfg.data:
        train_spec, val_spec, val_split = cfg.data[0], cfg.data[0], "val"
    else:
        train_spec, val_split = (cfg.shards if cfg.shards and len(cfg.shards) > 1 else (cfg.shards or [None])[0]), None
        val_spec = (cfg.val_shards if len(cfg.val_shards) > 1 else cfg.val_shards[0]) if cfg.val_shards else None
    train_loader = None
    if not cfg.evaluate:
        train_loader = _loader(
            cfg, d, train_spec, train=True, batch_size=micro_batch, split="train" if cfg.data else None
        )
    origin = "from --val-shards" if cfg.val_shards else "from the manifest's val split"
    if train_loader is not None and not cfg.val_shards:
        # The design's own command names only --shards: a val split beside them is used, and said so.
        val_spec, val_split = _val_beside(train_loader, train_spec), "val"
        origin = origin if cfg.data else "from the manifest beside the shards; --val-shards to choose"
    if val_spec is None:
        return train_loader, [], _no_val_reason(cfg)
    val_loader = _loader(cfg, d, val_spec, train=False, batch_size=cfg.batch_size, split=val_split)
    return train_loader, [("val", val_loader)], origin


def mixed_loaders(cfg: Config, d: distributed.Dist, micro_batch: int):
    """Several --data sets: one training stream, and each set's val split on its own (in the joint labels)."""
    train_loader = _loader(cfg, d, data_spec(cfg), train=True, batch_size=micro_batch, split="train")
    sizes = [((m.get("splits") or {}).get("val") or {}).get("samples", 0) for m in train_loader.mix.manifests]
    if not all(sizes):
        return train_loader, [], "not every --data set has a val split"
    vals = []
    for k, folder in enumerate(cfg.data):
        # Every set named (the same joint class list), only set k read: each of its val samples once.
        only_k = {f: float(j == k) for j, f in enumerate(cfg.data)}
        loader = _loader(cfg, d, only_k, train=False, batch_size=cfg.batch_size, split="val", epoch_size=sizes[k])
        vals.append((redact_url(folder), loader))
    return train_loader, vals, "from each --data set's val split"


def _val_beside(train_loader, train_spec) -> str | None:
    """The folder of the training data's manifest when it lists a val split with samples in it."""
    split = ((train_loader.manifest or {}).get("splits") or {}).get("val")
    if not split or not split.get("samples"):
        return None
    return manifest_folder(train_spec)


def _no_val_reason(cfg: Config) -> str:
    if cfg.data:
        return "the manifest has no val split"
    return "no --val-shards, and no manifest with a val split beside the shards"


def val_line(val_loaders: list, origin: str) -> str:
    """The start line's word on validation: how many samples and from where, or that there is none."""
    if not val_loaders:
        return f"no validation: {origin}"
    return f"val: {sum(ld.num_samples for _, ld in val_loaders):,} samples {origin}"


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
        check_collapse(model, cfg.min_image_size or cfg.image_size, cfg.arch)  # the smallest it will see
    except CollapseError as e:
        raise SetupError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise SetupError(f"cannot build --arch {cfg.arch}: {e}") from None
    if cfg.deterministic:
        try:
            check_deterministic(model, d.device.type, cfg.arch)
        except ValueError as e:
            raise SetupError(str(e)) from None
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
    set_kernel_flags(cfg.deterministic)


def set_kernel_flags(deterministic: bool) -> None:
    """cudnn autotuning and TF32 matmuls/convolutions, unless --deterministic: training and --evaluate alike."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


def seed_rank(cfg: Config, d: distributed.Dist) -> None:
    """Each rank its own torch stream from here on (dropout masks, stochastic depth), mixed from
    (seed, rank) as the mixup seed is. Called after the model and its EMA are built, so every
    rank starts from the same weights; a world of one keeps the single-process stream."""
    if d.enabled:
        torch.manual_seed(cfg.seed * 1000 + d.rank)


# -- training -----------------------------------------------------------------------------------


def resume(
    cfg: Config, d: distributed.Dist, parts: ckpt_io.Stateful, recipe: Recipe, num_classes: int, reporter: Reporter
) -> tuple[EpochState, ckpt_io.RunProgress]:
    """Continue from --resume, or from OUTPUT/checkpoints/last.pt (previous.pt) when there is one; else start afresh.

    The same shape (processes, batch sizes) continues exactly; another continues the epoch in
    progress and the schedule by samples seen (train/elastic.py).
    """
    ckpt_dir = os.path.join(cfg.output, "checkpoints")
    last_path = os.path.join(ckpt_dir, ckpt_io.LAST)
    path = cfg.resume if cfg.resume not in (None, "auto") else None
    if path is None and not cfg.no_auto_resume and ckpt_io.has_checkpoint(ckpt_dir):
        path = last_path
    if not path:
        if d.is_main and os.path.exists(reporter.metrics_path):
            os.remove(reporter.metrics_path)  # a fresh run: no lines from an earlier one
        return EpochState(), ckpt_io.RunProgress()
    ck, path = _read_checkpoint(path, last_path, reporter)
    batches, saved = len(parts.loader), ckpt_io.saved(ck)
    _check_compatible(saved, cfg, num_classes)
    if elastic.same_shape(saved, d.world_size, cfg.batch_size, cfg.batch_size // cfg.accum_steps):
        state = ckpt_io.restore(ck, parts, d.rank, d.device)
    else:  # another number of processes or batch size: continue the epoch (train/elastic.py)
        ckpt_io.restore_weights(ck, parts)
        state, change = elastic.resume(
            saved,
            parts.loader,
            rank=d.rank,
            world_size=d.world_size,
            global_batch=recipe.global_batch,
            peak=recipe.peak_lr,
        )
        reporter.log(change)
    progress = ckpt_io.progress_of(ck)
    reporter.rewrite_metrics(progress.history)
    reporter.log(f"resumed from {path} at epoch {state.epoch}, batch {state.batches}/{batches}")
    return state, progress


def log_step(reporter: Reporter, every: int, st: EpochState, loss: torch.Tensor, group: int) -> None:
    """Progress bar and step scalars; the loss is read from the device only on the steps that show it."""
    due = st.global_step == 1 or st.global_step % every == 0
    value = float(loss) if due else None
    reporter.step(group, {"loss": f"{value:.3f}", "lr": f"{st.lr:.3g}"} if due else None)
    if due:
        reporter.scalars({"loss": value, "lr": st.lr}, st.global_step, "step")


def train_one_epoch(
    trainer: Trainer,
    loader,
    state: EpochState,
    saver: ckpt_io.Checkpointer,
    progress: ckpt_io.RunProgress,
    reporter: Reporter,
    cfg: Config,
    d: distributed.Dist,
) -> dict:
    """Train to the end of state.epoch; its metrics line (validation fields still empty)."""
    epoch = state.epoch
    size = schedule(cfg.image_size, cfg.min_image_size, cfg.ramp_epochs)(epoch)  # of the epoch alone: resumes agree
    loader.set_image_size(size)
    loader.set_epoch(epoch)  # keeps a resumed position within this epoch
    reporter.start_epoch(epoch, len(loader), state.batches)
    trainer.train_epoch(
        loader,
        state,
        want_checkpoint=saver.due,
        save_checkpoint=lambda: saver.save_last(state, progress),
        on_step=functools.partial(log_step, reporter, cfg.log_every),
    )
    reporter.end_epoch()
    total = epoch_totals(state, d)
    loss_sum, seen, seconds, wait = total["loss_sum"], total["seen"], total["seconds"], total["wait_seconds"]
    progress.samples_base += int(seen)  # the schedule's clock for the checkpoint at this epoch's end
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "val_top1": None,
        "val_top5": None,
        "val_loss": None,
        "lr": state.lr,
        "images_per_sec": seen / max(seconds / d.world_size, 1e-9),
        "data_wait": wait / max(seconds, 1e-9),
        "epoch_seconds": seconds / d.world_size,
        "image_size": size,
    }


def validate(
    eval_model: nn.Module, raw: nn.Module, ema: ModelEma | None, val_loaders, d, amp: str, cfg: Config
) -> dict:
    """One set of BN statistics on every rank, then the exact evaluation of the model (and its EMA).

    Several val sets: each evaluated on its own (val_sets), the val_* fields over all their samples."""
    distributed.average_buffers(raw, d)  # what every rank evaluates and saves
    if ema is not None:
        distributed.average_buffers(ema.module, d)
    if not val_loaders:
        return {}
    per = {name: evaluate(eval_model, ld, d, amp, cfg.channels_last, cfg.tta) for name, ld in val_loaders}
    out = {f"val_{k}": _pooled(per.values(), k) for k in ("top1", "top5", "loss")}
    if len(per) > 1:
        out["val_sets"] = {
            name: {"top1": v["top1"], "top5": v["top5"], "samples": v["samples"]} for name, v in per.items()
        }
    if ema is not None:
        per = [evaluate(ema.module, ld, d, amp, cfg.channels_last, cfg.tta) for _, ld in val_loaders]
        out.update(val_top1_ema=_pooled(per, "top1"), val_top5_ema=_pooled(per, "top5"))
    return out


def _pooled(results, key: str) -> float:
    """A metric over every sample of several evaluations: their sample-weighted mean."""
    results = list(results)
    return sum(r[key] * r["samples"] for r in results) / max(sum(r["samples"] for r in results), 1)


def report_epoch(reporter: Reporter, line: dict) -> None:
    reporter.append_metrics(line)
    scalars = {k: v for k, v in line.items() if k != "epoch" and isinstance(v, (int, float))}
    for k, v in enumerate(line.get("val_sets", {}).values()):
        scalars[f"val_top1_set{k}"] = v["top1"]  # TensorBoard tags: no folder names (they may be URLs)
    reporter.scalars(scalars, line["epoch"], "epoch")
    val = f", val top-1 {line['val_top1']:.2f}%, top-5 {line['val_top5']:.2f}%" if line["val_top1"] is not None else ""
    if "val_sets" in line:
        val += " (" + ", ".join(f"{n}: {v['top1']:.2f}%" for n, v in line["val_sets"].items()) + ")"
    reporter.log(
        f"epoch {line['epoch']}: train_loss {line['train_loss']:.4f}{val}"
        f", {line['images_per_sec']:.0f} img/s, data wait {100 * line['data_wait']:.1f}%"
    )


def train(cfg: Config, d: distributed.Dist) -> int:
    t_start = time.time()
    seed_everything(cfg)
    reporter = Reporter(cfg.output, active=d.is_main, progress=cfg.progress)
    train_loader, val_loaders, val_origin = make_loaders(cfg, d, cfg.batch_size // cfg.accum_steps)
    num_classes, classes = num_classes_of(cfg, train_loader, *(ld for _, ld in val_loaders))
    model = make_model(cfg, d, num_classes)
    amp = resolve_amp(cfg.amp, d.device)
    recipe = make_recipe(cfg, d, model, num_classes, len(train_loader), amp)
    seed_rank(cfg, d)
    parts = ckpt_io.Stateful(model, recipe.optimizer, recipe.scaler, recipe.ema, recipe.mixing, train_loader)
    state, progress = resume(cfg, d, parts, recipe, num_classes, reporter)
    train_model, eval_model = distributed.wrap_model(model, d, compile=bool(cfg.compile))
    trainer = Trainer(
        model=train_model,
        optimizer=recipe.optimizer,
        schedule=recipe.schedule,
        criterion=make_loss(cfg.label_smoothing),
        dist=d,
        amp=amp,
        accum_steps=cfg.accum_steps,
        clip_grad=cfg.clip_grad,
        scaler=recipe.scaler,
        ema=recipe.ema,
        mixing=recipe.mixing,
        channels_last=cfg.channels_last,
        raw_model=model,
        on_first_batch=reporter.image_grid,
    )
    stem = "small" if uses_small_stem(cfg.stem, cfg.image_size) else "standard"
    meta = dict(config=cfg.to_dict(), arch=cfg.arch, stem=stem, image_size=cfg.image_size)
    meta.update(num_classes=num_classes, classes=classes, world_size=d.world_size)
    saver = ckpt_io.Checkpointer(
        os.path.join(cfg.output, "checkpoints"), parts, d, meta, cfg.checkpoint_minutes, t_start - progress.seconds
    )
    reporter.log(
        f"training {cfg.arch} ({num_classes} classes, {cfg.image_size} px) on {d.world_size} x {d.device.type}, "
        f"loader {train_loader.backend_name}, global batch {recipe.global_batch}, peak lr {recipe.peak_lr:.4g}, "
        f"amp {amp}, {len(train_loader)} batches/epoch; {val_line(val_loaders, val_origin)}; output {cfg.output}"
    )
    try:
        while state.epoch < cfg.epochs:
            line = train_one_epoch(trainer, train_loader, state, saver, progress, reporter, cfg, d)
            line.update(validate(eval_model, model, recipe.ema, val_loaders, d, amp, cfg))
            progress.history.append(line)
            report_epoch(reporter, line)
            improved = line["val_top1"] is not None and line["val_top1"] > progress.best
            if improved:
                progress.best = line["val_top1"]
            state.reset(state.epoch + 1)
            written = saver.save_last(state, progress)
            if improved:
                saver.save_best(written)  # the payload just written, not last.pt read back
    except NonFiniteLoss as e:
        reporter.close()
        kept = f"; last good checkpoint: {saver.last_path}" if os.path.exists(saver.last_path) else ""
        raise NonFiniteLoss(
            f"{e}{kept or ' (no checkpoint written yet)'}; try a lower --lr, --clip-grad or --amp bf16"
        ) from None
    val_samples = sum(ld.num_samples for _, ld in val_loaders)
    val = f"{val_samples} samples {val_origin}" if val_loaders else f"none: {val_origin}"
    return finish(cfg, d, reporter, state, progress, saver.t_start, recipe.global_batch, val)


def finish(
    cfg: Config,
    d: distributed.Dist,
    reporter: Reporter,
    state: EpochState,
    progress: ckpt_io.RunProgress,
    t_start: float,
    global_batch: int,
    val: str,
) -> int:
    """summary.json, the hparams record and the last log line. `val`: where validation came
    from, or "none: why" (then the top-1 fields are null and the last line says so in words)."""
    steps_per_rank = distributed.gather_objects(state.global_step, d)  # equal, or a rank would have hung
    final = progress.history[-1] if progress.history else {}
    summary = {
        "best_val_top1": progress.best if progress.best != float("-inf") else None,
        "final_val_top1": final.get("val_top1"),
        "final_val_top5": final.get("val_top5"),
        **({"final_val_sets": final["val_sets"]} if "val_sets" in final else {}),
        "final_train_loss": final.get("train_loss"),
        "val": val,
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
        f"done: {_top1_words(summary)}, {summary['seconds']:.0f} s; "
        f"TensorBoard: tensorboard --logdir {summary['tensorboard']}"
    )
    reporter.close()
    distributed.barrier(d)
    return 0


def _top1_words(summary: dict) -> str:
    if summary["final_val_top1"] is None:
        return f"no validation ({summary['val']})"
    return f"final val top-1 {summary['final_val_top1']:.2f}%, best {summary['best_val_top1']:.2f}%"


def _check_compatible(ck: ckpt_io.Saved, cfg: Config, num_classes: int) -> None:
    if ck.arch != cfg.arch or ck.num_classes != num_classes:
        raise SetupError(
            f"checkpoint is {ck.arch} with {ck.num_classes} classes, this run is {cfg.arch} with "
            f"{num_classes}: use another --output, or --no-auto-resume to start afresh"
        )


def _read_checkpoint(path: str, last_path: str, reporter: Reporter) -> tuple[dict, str]:
    """The checkpoint to resume from; the run's own last.pt falls back to previous.pt when damaged."""
    try:
        if os.path.abspath(path) != os.path.abspath(last_path):
            return ckpt_io.load(path), path
        ck, used, warning = ckpt_io.load_latest(os.path.dirname(last_path))
    except ValueError as e:
        raise SetupError(str(e)) from None
    if warning:
        reporter.log(warning)
    return ck, used


# -- sanity check: --overfit-batches N (train/overfit.py) -------------------------------------------


def overfit(cfg: Config, d: distributed.Dist) -> int:
    if d.enabled:
        raise SetupError("--overfit-batches runs in one process: start it with python -m train, not torchrun")
    seed_everything(cfg)
    spec = data_spec(cfg) if cfg.data else (cfg.shards if len(cfg.shards) > 1 else cfg.shards[0])
    # train=False: the evaluation transform, i.e. the same pixels in every pass (no augmentation)
    loader = _loader(cfg, d, spec, train=False, batch_size=cfg.batch_size, split="train")
    num_classes, _ = num_classes_of(cfg, loader)
    try:
        return run_overfit(cfg, loader, make_model(cfg, d, num_classes), d.device)
    except TooFewBatches as e:
        raise SetupError(str(e)) from None


# -- evaluation only -------------------------------------------------------------------------------


def evaluate_only(cfg: Config, d: distributed.Dist) -> int:
    set_kernel_flags(cfg.deterministic)  # as training: cudnn autotuning and TF32 unless --deterministic
    try:
        raw = ckpt_io.load(cfg.evaluate)
        ck = ckpt_io.saved(raw)
    except ValueError as e:
        raise SetupError(str(e)) from None
    # The model and its input size come from the checkpoint: it fixes what the weights mean.
    cfg.image_size = ck.image_size or cfg.image_size
    # evaluated at --eval-image-size when given, else at the size the run validated at
    cfg.eval_image_size = cfg.eval_image_size or raw.get("config", {}).get("eval_image_size") or cfg.image_size
    cfg.arch, cfg.stem = ck.arch or cfg.arch, ck.stem or cfg.stem
    cfg.zero_init_residual = ck.zero_init_residual
    _, val_loaders, _ = make_loaders(cfg, d, cfg.batch_size)
    val_loader = val_loaders[0][1]
    num_classes = ck.num_classes
    if val_loader.num_classes and val_loader.num_classes != num_classes:
        raise SetupError(f"checkpoint has {num_classes} classes, the validation data {val_loader.num_classes}")
    model = make_model(cfg, d, num_classes)
    model.load_state_dict(ck.model)
    amp = resolve_amp(cfg.amp, d.device)
    ev = evaluate(model, val_loader, d, amp, tta=cfg.tta)
    result = {"checkpoint": cfg.evaluate, "image_size": cfg.eval_image_size, "tta": cfg.tta}
    result.update({f"val_{k}": v for k, v in ev.items()})
    if ck.ema is not None:
        model.load_state_dict(ck.ema)
        ev = evaluate(model, val_loader, d, amp, tta=cfg.tta)
        result.update(val_top1_ema=ev["top1"], val_top5_ema=ev["top5"])
    if d.is_main:
        import json

        print(
            f"val top-1 {result['val_top1']:.2f}%, top-5 {result['val_top5']:.2f}% on {result['val_samples']} images",
            file=sys.stderr,
        )
        print(json.dumps(result))
    return 0
