"""ShardDataModule under a real lightning.Trainer on CPU, over a small demo build.

The model records what each training step received (epoch, labels, a checksum of the pixels),
so the tests compare the batches Lightning fed with the loader contract: each epoch's own
order (set_epoch), every validation sample once, and a mid-epoch resume that continues at
exactly the next batch of an uninterrupted run.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from loaders import make_loader
from loaders.lightning import ShardDataModule
from shards.build import build
from shards.sources.demo import DemoSource
from shards.types import Options

ARGS = dict(batch_size=4, image_size=16, backend="pytorch", workers=0, seed=3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lightning") / "demo"
    build(
        DemoSource(seed=1, train_per_class=3, val_per_class=1, size=24), str(out), Options(shard_samples=8), workers=1
    )
    return out  # 30 train (7 batches of 4), 10 val (3 batches, the last of 2 real samples)


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 16 * 16, 10)
        self.seen: list[tuple[int, tuple, float]] = []
        self.val_samples: list[int] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append((self.current_epoch, tuple(labels.tolist()), round(float(images.double().sum()), 3)))
        return nn.functional.cross_entropy(self.net(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx):
        _images, labels = batch
        self.val_samples.append(len(labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


def expected(demo: Path, epoch: int) -> list[tuple[int, tuple, float]]:
    loader = make_loader(str(demo), train=True, **ARGS)
    loader.set_epoch(epoch)
    return [(epoch, tuple(y.tolist()), round(float(x.double().sum()), 3)) for x, y in loader]


def test_trainer_reads_each_epoch_in_its_own_order_and_every_val_sample_once(demo, tmp_path):
    model, dm = Recorder(), ShardDataModule(str(demo), **ARGS)
    trainer(tmp_path, num_sanity_val_steps=2).fit(model, datamodule=dm)
    assert model.seen == expected(demo, 0) + expected(demo, 1)
    assert model.seen[:7] != model.seen[7:]  # set_epoch: epoch 1 is not epoch 0 again
    # the sanity check (2 batches) and one whole pass per epoch, padding rows left out
    assert model.val_samples == [4, 4] + [4, 4, 2] * 2


class KillAfter(L.Callback):
    """Save a checkpoint at global step `step` (as ModelCheckpoint would), then die."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise SystemExit("killed")


def test_mid_epoch_resume_continues_at_the_next_batch(demo, tmp_path):
    straight = Recorder()
    trainer(tmp_path / "a", limit_val_batches=0).fit(straight, datamodule=ShardDataModule(str(demo), **ARGS))
    assert len(straight.seen) == 14

    ckpt = tmp_path / "mid.ckpt"
    first = Recorder()
    with pytest.raises(SystemExit):
        trainer(tmp_path / "b", limit_val_batches=0, callbacks=[KillAfter(10, ckpt)]).fit(
            first, datamodule=ShardDataModule(str(demo), **ARGS)
        )
    assert first.seen == straight.seen[:10]  # 7 batches of epoch 0, 3 of epoch 1
    state = torch.load(ckpt, weights_only=False)["ShardDataModule"]["train"]
    assert (state["epoch"], state["batches"]) == (1, 3)

    resumed = Recorder()
    trainer(tmp_path / "c", limit_val_batches=0).fit(
        resumed, datamodule=ShardDataModule(str(demo), **ARGS), ckpt_path=str(ckpt)
    )
    assert resumed.seen == straight.seen[10:]


def test_datamodule_refuses_unclear_data(demo):
    with pytest.raises(ValueError, match="not both"):
        ShardDataModule(str(demo), train=str(demo), batch_size=4)
    with pytest.raises(ValueError, match="no data"):
        ShardDataModule(batch_size=4)


class RankRecorder(Recorder):
    """Writes what its rank trained on to a file: ddp_spawn's processes keep their own lists."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def on_train_end(self) -> None:
        torch.save(self.seen, self.out / f"rank{self.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SHARDLINE_DDP_TESTS"),
    reason="spawns two Lightning processes (45 s on the shared 2-core machine): set SHARDLINE_DDP_TESTS=1",
)
def test_two_ddp_ranks_take_rank_and_world_size_from_the_trainer(demo, tmp_path):
    t = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    t.fit(RankRecorder(tmp_path), datamodule=ShardDataModule(str(demo), **ARGS))
    for rank in (0, 1):
        loader = make_loader(str(demo), train=True, rank=rank, world_size=2, **ARGS)
        want = [(0, tuple(y.tolist()), round(float(x.double().sum()), 3)) for x, y in loader]
        assert torch.load(tmp_path / f"rank{rank}.pt") == want
        assert len(want) == 3  # 30 samples, 2 ranks, batches of 4: 3 batches each, equal on both ranks
