"""loaders: read shardline shards into batches for training (DESIGN.md section 6).

    from loaders import make_loader

    loader = make_loader("/ssd/imagenet-train-{000..146}.tar", batch_size=256, train=True,
                         device="cuda", rank=rank, world_size=world, seed=0)
    loader.num_classes, loader.classes      # from manifest.json (None when there is none)
    for epoch in range(start_epoch, 90):
        loader.set_epoch(epoch)
        for images, labels in loader:       # images N x 3 x H x W float, labels int64, on `device`
            ...
        state = loader.state_dict()          # save with the checkpoint, any time mid-epoch

    # validation: padding samples are flagged so metrics can leave them out
    val = make_loader("/ssd/imagenet/", split="val", batch_size=256, train=False, device="cuda",
                      rank=rank, world_size=world)
    for images, labels, valid in val.with_valid():   # valid: bool tensor [N] on `device`
        correct += (model(images).argmax(1) == labels)[valid].sum()
        seen += valid.sum()

Contract (the trainer can rely on every point):

- len(loader) is the number of batches this rank yields in one epoch; it is the same on every
  rank, whatever the shard sizes, so no rank waits at a collective on another.
- Every batch has exactly `batch_size` rows. Each epoch the loader takes one global order of all
  samples from (seed, epoch) (shards in a permuted order, samples permuted inside each shard;
  the shards are already shuffled across the whole split when written) and gives rank r the
  r-th of `world_size` near-equal contiguous parts.
  * drop_last=True (default for train=True): each rank gets floor(N / world_size / batch_size)
    batches; the few samples left over differ from epoch to epoch. No padding.
  * drop_last=False (default for train=False): together the ranks read every sample exactly
    once per epoch; each rank's part is padded to len(loader) * batch_size by repeating its own
    samples. Padding rows always come last (at the end of the epoch); `with_valid()` yields a
    third element, a bool tensor that is False on padding rows, and `loader.num_valid` is the
    number of real samples this rank yields this epoch.
- set_epoch(e) selects epoch e's order (deterministic in (seed, e), same on every backend).
  Call it before each epoch; without a call the loader repeats the current epoch.
- set_image_size(px) changes the side of the images from the next iteration on (progressive
  resizing: the trainer sets each epoch's, a function of the epoch alone, so it is no part of
  state_dict()). The pytorch backend forks new workers on a change; the DALI train pipeline is
  built per epoch anyway, and a kept eval pipeline of another size is dropped.
- options=dict(auto_augment="randaugment"|"trivialaugment", random_erasing=P) (a field of both
  backends' options) adds timm's augmentations to train=True (loaders/augment.py): torchvision
  v2 on pytorch, nvidia.dali.auto_aug inside the graph on dali; drawn per sample like the crops.
- state_dict() -> {"format", "version", "epoch", "batches", ...}: plain ints and lists, versioned
  (loaders/sharding.py; an unknown version fails with a clear message). load_state_dict(state)
  makes the next iteration start at exactly the next batch of that epoch (samples before it are
  skipped in the sample list, not decoded). set_epoch(state["epoch"]) after load_state_dict keeps
  that position; set_epoch of another epoch starts it from batch 0. Another seed or data set is
  refused.
  * Same world_size and batch_size: the same plan at the same batch, so the rest of the epoch
    is exactly what the uninterrupted run would have read, batch for batch.
  * Elastic: a state taken on any rank at a batch boundary loads into loaders of another
    world_size and/or per-rank batch_size. Together the new ranks read exactly the samples the
    old ones had not read this epoch (for drop_last, those the old plan would have read), each
    once, in their order, cut into near-equal contiguous parts; every rank gets the same len(),
    padded by repeating its own rows, padding flagged by with_valid() and last. For that epoch
    len() counts the samples read before the change as whole batches of the new shape
    (state_dict()["batches"] starts there), so len() - state["batches"] batches are left;
    loader.progress is the share of the epoch read so far. The next epoch is the normal plan
    of the new world size.
- Random crops and flips are a function of (seed, epoch, sample) on both backends (the pytorch
  backend seeds torch's generator per sample; the dali backend feeds per-sample uniforms to the
  graph, loaders/dali_crops.py), so a resumed epoch, at any world size or batch size, crops and
  flips every sample as the uninterrupted run does. On one placement the pixels are identical;
  between DALI on CPU and on GPU the crop rectangle and flip of a sample are the same while the
  pixels agree only to the decoders' and resamplers' rounding (libjpeg-turbo vs nvJPEG), and the
  two backends draw different rectangles from the same distribution.
- train=True: random-resized-crop (area 0.08..1, ratio 3/4..4/3) to image_size + horizontal flip;
  train=False: resize shorter side to int(image_size / 0.875), center crop image_size.
  Normalized with the ImageNet mean/std; dtype torch.float32 / float16 / bfloat16;
  channels_last=True gives channels-last memory format (shape stays N x 3 x H x W).
- An image that cannot be decoded raises loaders.DecodeError naming the shard and sample key.
- Remote shards (s3://, gs://, http(s)://, any fsspec URL) are read through a local shard cache
  (loaders/cache/; make_loader's cache_dir= and cache_limit=): whole shards are downloaded
  ahead of use in plan order and checked against the manifest's sha256, every process on the
  machine shares the folder, and the backends read only local files, so batches are the same
  as from local disk. A shard that cannot be had raises loaders.CacheError, in one line.

Backends: "dali" (NVIDIA DALI over fn.readers.webdataset: nvJPEG / hardware decoder on
device="cuda", the same graph on CPU operators otherwise), "pytorch" (index-based reads,
torchvision decoding and RandomResizedCrop semantics in DataLoader workers), "auto" (dali when
it imports, else pytorch). `options=` takes each backend's knobs (DaliOptions in
loaders/dali.py, TorchOptions in loaders/pytorch.py); defaults come from the machine.
Other attributes: loader.batch_size, loader.num_samples (whole split), loader.epoch,
loader.backend_name, loader.progress, loader.plan() (this rank's rows for the epoch, for debugging).
batch_grid(images) draws a normalized batch back as pixels (python -m loaders.show, TensorBoard).
manifest_folder(SPEC) is where SPEC's manifest.json is looked for (the trainer finds a val split there).
Several sets in one stream: make_loader({SPEC_A: 3, SPEC_B: 1}, ...) or a list of set SPECs
(folders; weights by size), epoch_size= to resize the epoch; loader.classes is the joint class
list by class id, loader.mix the sets' plan (loaders/mix.py). Local sets only, for now.
"""

from loaders.api import Loader, make_loader
from loaders.cache import CacheError
from loaders.common import DTYPES, IMAGENET_MEAN, IMAGENET_STD, DecodeError
from loaders.pixels import batch_grid
from shards.manifest import manifest_folder
from shards.redact import redact_text, redact_url, redact_values

__all__ = [
    "DTYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CacheError",
    "DecodeError",
    "Loader",
    "batch_grid",
    "make_loader",
    "manifest_folder",
    "redact_text",
    "redact_url",
    "redact_values",
]
