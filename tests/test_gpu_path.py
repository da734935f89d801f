"""The GPU path's fixes that a CPU can show (issue 14); tests/test_gpu.py proves the rest on a GPU.

Real shards from the test photos, the real DALI pipelines in CPU mode and the real pytorch
backend: the eval pipeline built once and reused, the decoder hints scaled to the data, the
mixed decoder's arguments (checked by DALI when the graph is defined), normalize's cached
constants.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import PHOTOS, build_photo_shards
from PIL import Image

from loaders import make_loader

SIZE = 32


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_photo_shards(out, shard_samples=7, num_classes=4, copies=1, val_copies=1)
    return out


def batches(ld) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone(), v.clone()) for x, y, v in ld.with_valid()]


def test_eval_pipeline_is_built_once_and_reused(shard_dir):
    ld = make_loader(shard_dir, batch_size=5, train=False, backend="dali", image_size=SIZE, workers=1)
    first = batches(ld)
    for _ in range(2):  # the model, then its EMA; next epoch the same again
        ld.set_epoch(0)
        again = batches(ld)
        assert len(again) == len(first) == len(ld)
        for (x1, y1, v1), (x2, y2, v2) in zip(first, again, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(v1, v2)
    assert len(ld.backend.builds) == 1
    # A pass stopped half-way leaves the pipeline mid-epoch: it is not kept, the next pass is whole.
    next(iter(ld))
    ld.set_epoch(0)
    ld._done = 0
    after = batches(ld)
    assert len(ld.backend.builds) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, after, strict=True))


def test_train_pipeline_still_follows_each_epoch_plan(shard_dir):
    ld = make_loader(shard_dir, batch_size=4, train=True, backend="dali", image_size=SIZE, workers=1)
    orders = []
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        orders.append([y.tolist() for _, y in ld])
    assert orders[0] != orders[1] and len(ld.backend.builds) == 2


def test_gpu_decoder_hints_scale_to_the_data(shard_dir):
    from loaders.common import read_image_bytes
    from loaders.dali import IMAGENET_HINTS, MIN_PADDING, DaliOptions, gpu_decoder_hints
    from loaders.spec import open_shards

    shards, _ = open_shards(shard_dir, split="train")
    idx = shards[0].index()
    biggest = max(range(len(idx)), key=lambda i: int(idx.image_size[i]))
    with Image.open(io.BytesIO(read_image_bytes(shards[0], biggest))) as im:
        w, h = im.size
    hints = gpu_decoder_hints(shards, DaliOptions())
    assert (hints["preallocate_width_hint"], hints["preallocate_height_hint"]) == (w, h)
    assert w < 1000 and h < 1000  # the test photos are small: nothing like ImageNet's 5980 x 6430
    assert MIN_PADDING <= hints["device_memory_padding"] < IMAGENET_HINTS["device_memory_padding"] / 10
    assert MIN_PADDING <= hints["host_memory_padding"] < IMAGENET_HINTS["host_memory_padding"] / 10
    # An option given explicitly wins.
    assert gpu_decoder_hints(shards, DaliOptions(preallocate_width_hint=4000))["preallocate_width_hint"] == 4000


def decoder_args(pipe) -> dict:
    """The arguments the pipeline's image decoder was defined with (walking the graph back from its outputs)."""
    seen, stack = set(), [n.source for n in pipe._graph_out]
    while stack:
        op = stack.pop()
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        if op._op.__class__.__module__.endswith("decoders") or "decoders" in op._op._init_args.get("_module", ""):
            return {"device": op._op.device, **op._op._init_args}
        stack += [i.source for i in op.inputs if hasattr(i, "source")]
    raise AssertionError("no decoder in the graph")


@pytest.mark.parametrize("train", [True, False])
def test_mixed_decoder_arguments(train):
    # No GPU here: DALI still checks every operator argument while the graph is defined.
    from nvidia.dali import types

    from loaders.dali import IMAGENET_HINTS, DaliOptions, image_pipeline

    pipe = image_pipeline(
        ["x.tar"], ["x.idx"], train=train, image_size=224, gpu=True, out_dtype=types.FLOAT16, layout="HWC",
        opts=DaliOptions(), hints=IMAGENET_HINTS, batch_size=8, num_threads=2, device_id=0, seed=1,
    )  # fmt: skip
    assert [node.device for node in pipe._graph_out] == ["gpu", "gpu"]
    args = decoder_args(pipe)
    assert args["device"] == "mixed" and args["preallocate_width_hint"] == IMAGENET_HINTS["preallocate_width_hint"]
    # Eval upsamples chroma as libjpeg / PIL do (reference pixels); train keeps nvJPEG's default.
    assert args.get("jpeg_fancy_upsampling", False) is (not train)


def test_normalize_makes_its_constants_once_per_device():
    from loaders import pytorch

    batch = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    first = pytorch.normalize(batch, torch.float32, channels_last=False)
    cached = pytorch._mean_inv_std(torch.device("cpu"))
    second = pytorch.normalize(batch, torch.float32, channels_last=False)
    assert pytorch._mean_inv_std(torch.device("cpu"))[0] is cached[0]  # no new tensors per batch
    assert torch.equal(first, second)
    mean, std = torch.tensor([0.485, 0.456, 0.406]) * 255, torch.tensor([0.229, 0.224, 0.225]) * 255
    want = (batch.permute(0, 3, 1, 2).float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(first, want, atol=1e-5)


assert PHOTOS, "tests/data/photos holds the real photos these tests read"
