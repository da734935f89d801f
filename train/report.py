"""What a run tells its user, all from rank 0: progress bar, TensorBoard, metrics.jsonl, summary.json.

OUTPUT/metrics.jsonl  one JSON line per finished epoch: epoch, train_loss, val_top1, val_top5
                      (percent), val_loss, lr, images_per_sec, data_wait (fraction of step time
                      spent waiting for the loader), epoch_seconds, image_size (the epoch's
                      training size: progressive resizing) [, val_top1_ema, val_top5_ema]
OUTPUT/summary.json   at the end: best_val_top1, final_val_top1, final_val_top5, epochs, seconds
OUTPUT/tb/            TensorBoard: step and epoch scalars, hparams, and train/first_batch, a
                      grid of the first augmented batch turned back into pixels
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import torch

from loaders import batch_grid, redact_text, redact_values


def write_json_atomic(path: str, obj: object) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class Reporter:
    """Rank 0's outputs. Other ranks get a Reporter with active=False that does nothing."""

    def __init__(self, output: str, active: bool, progress: str = "auto") -> None:
        self.output, self.active = output, active
        self.metrics_path = os.path.join(output, "metrics.jsonl")
        self.summary_path = os.path.join(output, "summary.json")
        self.tb_dir = os.path.join(output, "tb")
        self.show_bar = active and (progress == "always" or (progress == "auto" and sys.stderr.isatty()))
        self._tb = None
        self._bar = None
        if active:
            os.makedirs(output, exist_ok=True)

    @property
    def tb(self):
        if self._tb is None and self.active:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir)
        return self._tb

    # -- progress ---------------------------------------------------------------------------
    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        if self.show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True)

    def step(self, n: int, postfix: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, message: str) -> None:
        if self.active:
            print(redact_text(message), file=sys.stderr, flush=True)  # a SPEC's token never on screen

    # -- TensorBoard ------------------------------------------------------------------------
    def scalars(self, values: dict, step: int, prefix: str) -> None:
        if self.active:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def image_grid(self, images: torch.Tensor, tag: str = "train/first_batch", max_images: int = 64) -> None:
        """The batch as the model sees it, drawn by the same grid as `python -m loaders.show`."""
        if self.active:
            grid = np.asarray(batch_grid(images[:max_images]))
            self.tb.add_image(tag, grid, 0, dataformats="HWC")
            self.tb.flush()

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """Write the hparams plugin's records into the run's own folder (not a timestamped subfolder)."""
        if self.active:
            from torch.utils.tensorboard.summary import hparams as hp

            # TensorBoard shows these to whoever reads the logs: no URL's credentials among them
            hparams = redact_values(hparams)
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            exp, ssi, sei = hp(clean, metrics)
            writer = self.tb._get_file_writer()
            for s in (exp, ssi, sei):
                writer.add_summary(s)
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, 0)
            self.tb.flush()

    # -- files ------------------------------------------------------------------------------
    def rewrite_metrics(self, history: list[dict]) -> None:
        """metrics.jsonl as the checkpoint knows it: drops lines of epochs the resumed run redoes."""
        if self.active:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.output)
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in history)
            os.replace(tmp, self.metrics_path)

    def append_metrics(self, line: dict) -> None:
        if self.active:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def summary(self, summary: dict) -> None:
        if self.active:
            write_json_atomic(self.summary_path, redact_values(summary))

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
