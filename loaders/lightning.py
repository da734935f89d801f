"""Lightning: `ShardDataModule`, make_loader() as a LightningDataModule (`pip install shardline[lightning]`).

    from loaders.lightning import ShardDataModule

    dm = ShardDataModule("/ssd/imagenet", batch_size=256, image_size=224, backend="dali")
    trainer = lightning.Trainer(accelerator="gpu", devices=8, strategy="ddp", max_epochs=90)
    trainer.fit(model, datamodule=dm)                    # ckpt_path=... resumes mid-epoch

What Lightning does for a DataLoader, done here for our Loader (which is not one):
- rank, world size and device come from the Trainer (`trainer.global_rank`, `world_size`,
  `strategy.root_device`) when it sets the module up, in each process;
- each training epoch starts with `set_epoch(trainer.current_epoch)`, so every epoch has its
  own order (deterministic in seed and epoch) and the same on every backend;
- the datamodule's state_dict() goes into Lightning's checkpoints: the epoch and how many
  batches of it the trainer has trained on (Lightning's own count, not the loader's, which
  would run ahead wherever Lightning prefetches). Resuming a checkpoint taken mid-epoch
  starts at exactly the next batch: no sample repeated or skipped.
- validation yields only real samples (padding rows dropped), so with any world size each
  sample is validated exactly once and every rank runs the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

try:
    import lightning as L
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError("loaders.lightning needs Lightning: pip install 'shardline[lightning]'") from e

from loaders.api import Loader, make_loader


class _TrainEpochs:
    """What train_dataloader() returns: each iteration is the trainer's current epoch, from where a resume left it."""

    def __init__(self, dm: ShardDataModule) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return len(self.dm.train_loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = self.dm.train_loader
        loader.set_epoch(self.dm.trainer.current_epoch)  # keeps a resumed position within that epoch
        return iter(loader)


class _ValPasses:
    """What val_dataloader() returns: every iteration is one whole pass over the real samples."""

    def __init__(self, dm: ShardDataModule) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return len(self.dm.val_loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = self.dm.val_loader
        # From batch 0 every time, also after a pass cut short (Lightning's sanity check).
        loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batches": 0})
        for images, labels, valid in loader.with_valid():
            yield (images, labels) if bool(valid.all()) else (images[valid], labels[valid])


class ShardDataModule(L.LightningDataModule):
    """Training and validation batches from shardline shards, for `lightning.Trainer`.

    data: a folder or URL holding manifest.json (its train and val splits), or give train= /
    val= SPECs (brace pattern, list, folder, s3:// URLs) instead. batch_size is per process,
    as make_loader's. The other arguments are make_loader's (DESIGN.md section 6).
    """

    def __init__(
        self,
        data: str | None = None,
        *,
        train: str | list | None = None,
        val: str | list | None = None,
        batch_size: int,
        image_size: int = 224,
        backend: str = "auto",
        workers: int | None = None,
        seed: int = 0,
        dtype: str = "float32",
        channels_last: bool = False,
        options: dict | None = None,
    ) -> None:
        super().__init__()
        if data is not None and (train is not None or val is not None):
            raise ValueError("give data= (a folder with manifest.json) or train=/val= SPECs, not both")
        if data is None and train is None and val is None:
            raise ValueError("no data: give data= (a folder with manifest.json) or train=/val= SPECs")
        self.train_spec, self.val_spec = (data, data) if data is not None else (train, val)
        self.from_manifest = data is not None
        self.loader_args = dict(
            batch_size=batch_size,
            image_size=image_size,
            backend=backend,
            workers=workers,
            seed=seed,
            dtype=dtype,
            channels_last=channels_last,
            options=options,
        )
        self.train_loader: Loader | None = None
        self.val_loader: Loader | None = None
        self._resume: dict | None = None

    def _make(self, spec, train: bool) -> Loader:
        t = self.trainer
        return make_loader(
            spec,
            train=train,
            split=("train" if train else "val") if self.from_manifest else None,
            device=t.strategy.root_device if t is not None else "cpu",
            rank=t.global_rank if t is not None else 0,
            world_size=t.world_size if t is not None else 1,
            **self.loader_args,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_spec is not None and self.train_loader is None:
            self.train_loader = self._make(self.train_spec, train=True)
            if self._resume is not None:
                self.train_loader.load_state_dict(self._resume)
        if stage in ("fit", "validate") and self.val_spec is not None and self.val_loader is None:
            self.val_loader = self._make(self.val_spec, train=False)

    @property
    def num_classes(self) -> int | None:
        """From manifest.json beside the shards (after setup)."""
        loader = self.train_loader or self.val_loader
        return loader.num_classes if loader is not None else None

    def train_dataloader(self) -> _TrainEpochs:
        if self.train_loader is None:
            raise RuntimeError("ShardDataModule has no training data (train= or data= not given)")
        return _TrainEpochs(self)

    def val_dataloader(self) -> _ValPasses | list:
        return _ValPasses(self) if self.val_loader is not None else []

    # -- resume: Lightning saves this in its checkpoints and hands it back before the first batch --
    def state_dict(self) -> dict:
        if self.train_loader is None:
            return {}
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        state = self.train_loader.state_dict()
        state.update(epoch=self.trainer.current_epoch if self.trainer else state["epoch"], batches=trained)
        return {"train": state}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state.get("train")
        if self._resume is not None and self.train_loader is not None:
            self.train_loader.load_state_dict(self._resume)

    def teardown(self, stage: str) -> None:
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()
        self.train_loader = self.val_loader = None
