"""The GPU path's trainer and bench fixes that a CPU can show; tests/test_gpu.py shows the rest on a GPU.

The step's flags read through their own copy's event (never by waiting on the stream), DDP
wrapped before torch.compile with bucket views, loaders closed before the process group and
the interpreter go, a torch stream of its own for each rank, --evaluate's kernel flags, and
the loader bench's pipeline-build figures and machine-default threads. Real gloo, real
loaders over real photo shards, the real python -m train main().
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import build_photo_shards
from torch import nn

from loaders import bench
from loaders.api import Loader
from train import distributed
from train import run as train_run
from train.engine import Trainer, _Pending, copy_to_host, ddp_of
from train.recipe import WarmupCosine

TINY = ["--arch", "train.nets:NarrowResNet", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--backend", "pytorch", "--warmup-epochs", "0", "--progress", "never"]  # fmt: skip


class Collective(distributed.Dist):
    """A world of one that still goes through DDP and the collectives, as with many ranks."""

    @property
    def enabled(self) -> bool:
        return True


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    build_photo_shards(out, shard_samples=7, num_classes=4, copies=1, val_copies=1)
    return out


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield Collective()
    dist.destroy_process_group()


def trainer(model: nn.Module, accum_steps: int = 1) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return Trainer(model=model, optimizer=opt, schedule=WarmupCosine(0.01, 10, 0), criterion=nn.CrossEntropyLoss(),
                   dist=distributed.Dist(), amp="none", accum_steps=accum_steps)  # fmt: skip


# -- a step never waits for the stream ---------------------------------------------------------------
def test_pending_flags_are_read_after_their_copy_event_and_never_the_newest(one_torch_thread):
    on_cpu = torch.tensor([0, 1], dtype=torch.int32)
    assert copy_to_host(on_cpu) == (on_cpu, None)  # CPU: the tensor itself, nothing to wait for
    events = []

    class Copied:  # stands for the CUDA event recorded behind a step's copy
        def __init__(self, step):
            self.step = step

        def synchronize(self):
            events.append(("waited", self.step))

    class Flags:  # the pinned host copy: read only after its own event
        def __init__(self, step, values):
            self.step, self.values = step, values

        def tolist(self):
            assert events[-1] == ("waited", self.step), events
            events.append(("read", self.step))
            return self.values

    t = trainer(nn.Linear(2, 2))
    t._pending = [_Pending(Flags(s, [0, s == 1]), Copied(s), 0, s, s, 0.1, torch.tensor(0.0)) for s in range(3)]
    assert t._settle(keep=1) is True  # step 1 asked for a checkpoint
    assert events == [("waited", 0), ("read", 0), ("waited", 1), ("read", 1)]  # step 2, just queued, untouched
    assert [p.step for p in t._pending] == [2]


def test_a_cpu_epoch_trains_as_before(one_torch_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(5)]
    from train.engine import EpochState

    state = EpochState()
    trainer(model, accum_steps=2).train_epoch(batches, state, want_checkpoint=lambda: False, save_checkpoint=None)
    assert (state.batches, state.global_step, state.seen) == (5, 3, 20) and state.loss_sum > 0


# -- DDP first, torch.compile over it ----------------------------------------------------------------
def test_ddp_wraps_first_then_compile_with_bucket_views(gloo_world_of_one, one_torch_thread):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    stepped, evaluated = distributed.wrap_model(model, gloo_world_of_one, compile=True)
    ddp = ddp_of(stepped)
    assert stepped is not ddp and stepped._orig_mod is ddp  # compile over DDP, not DDP over a compiled module
    assert ddp.module is model and ddp.gradient_as_bucket_view
    assert evaluated._orig_mod is model  # evaluation: the plain model, compiled on its own (no DDP)
    plain, same = distributed.wrap_model(model, gloo_world_of_one, compile=False)
    assert ddp_of(plain) is plain and same is model
    alone, alone_eval = distributed.wrap_model(model, distributed.Dist(), compile=False)
    assert alone is alone_eval is model and ddp_of(alone) is None


def test_accumulation_skips_the_all_reduce_but_on_the_last_micro_batch(gloo_world_of_one, one_torch_thread):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    stepped, _ = distributed.wrap_model(model, gloo_world_of_one, compile=False)
    entered = []
    real_no_sync = stepped.no_sync
    stepped.no_sync = lambda: (entered.append(1), real_no_sync())[1]
    t = trainer(stepped, accum_steps=3)
    from train.engine import EpochState

    batches = [(torch.randn(2, 3, 2, 2), torch.randint(0, 3, (2,))) for _ in range(6)]
    t.train_epoch(batches, EpochState(), want_checkpoint=lambda: False, save_checkpoint=None)
    assert len(entered) == 4  # 2 steps x (3 micro-batches - the last)


# -- loaders closed before teardown; per-rank seeds; --evaluate's kernel flags ----------------------------
def test_loaders_are_closed_before_the_process_group_goes(photos, tmp_path, monkeypatch, capsys, one_torch_thread):
    events = []
    real_close, real_teardown = Loader.close, distributed.teardown
    monkeypatch.setattr(Loader, "close", lambda self: (events.append(id(self)), real_close(self))[1])
    monkeypatch.setattr(Loader, "__del__", lambda self: None)  # only the explicit closes count
    monkeypatch.setattr(distributed, "teardown", lambda: (events.append("teardown"), real_teardown())[1])
    out = tmp_path / "run"
    assert train_run.main(["--data", str(photos), *TINY, "--epochs", "1", "--output", str(out)]) == 0
    # The train and val loaders, then the process group.
    assert len(events) == 3 and events[-1] == "teardown" and len(set(events[:-1])) == 2
    events.clear()
    argv = ["--evaluate", str(out / "checkpoints" / "last.pt"), "--data", str(photos), "--batch-size", "8",
            "--workers", "0", "--backend", "pytorch"]  # fmt: skip
    flags = (torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")  # fmt: skip
    before = [getattr(obj, name) for obj, name in flags]
    try:
        for obj, name in flags:
            setattr(obj, name, False)  # torch's defaults
        assert train_run.main(argv) == 0
        # --evaluate: the kernel flags training uses (cudnn autotuning, TF32)
        assert [getattr(obj, name) for obj, name in flags] == [True, True, True]
    finally:
        for (obj, name), value in zip(flags, before):
            setattr(obj, name, value)
    assert len(events) == 2 and events[-1] == "teardown"


def test_each_rank_draws_its_own_torch_stream_and_a_world_of_one_keeps_its_own():
    cfg = train_run.parse(["--shards", "x.tar", "--seed", "3"])
    draws = {}
    for rank in (0, 1):
        train_run.seed_rank(cfg, distributed.Dist(rank=rank, world_size=2))
        draws[rank] = torch.rand(4)
    assert not torch.equal(draws[0], draws[1])  # dropout masks differ across ranks
    train_run.seed_rank(cfg, distributed.Dist(rank=1, world_size=2))
    assert torch.equal(torch.rand(4), draws[1])  # and repeat for the same (seed, rank)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    train_run.seed_rank(cfg, distributed.Dist())
    assert torch.equal(torch.rand(4), expected)  # one process: the stream is not reseeded


def test_throughput_closes_its_loader(photos, monkeypatch, capsys, one_torch_thread):
    from train import throughput

    closed = []
    real_close = Loader.close
    monkeypatch.setattr(Loader, "close", lambda self: (closed.append(self.backend_name), real_close(self))[1])
    monkeypatch.setattr(Loader, "__del__", lambda self: None)  # only the explicit close counts
    args = throughput.parse(["--data", str(photos), "--arch", "train.nets:NarrowResNet", "--batch-size", "4",
                             "--image-size", "32", "--steps", "1", "--warmup", "1", "--backend", "pytorch",
                             "--device", "cpu"])  # fmt: skip
    r = throughput.run(args)
    assert closed == ["pytorch"] and r["real"]["images"] == 4 and r["real"]["compile"] is False


# -- the loader bench --------------------------------------------------------------------------------------
def test_bench_reports_pipeline_builds_and_their_share_of_the_measured_time():
    assert bench.build_figures([0.5, 0.1, 0.2], before=1, wall=6.0) == {
        "pipeline_builds": 3,
        "pipeline_build_seconds": 0.8,
        "pipeline_builds_measured": 2,
        "build_share": 0.05,
    }


def test_bench_threads_and_workers_default_to_the_machines_as_training():
    workers = next(p for p in bench.main.params if p.name == "workers")
    assert workers.default is None  # make_loader decides, as for python -m train
    assert bench.baseline_workers(None) >= 1 and bench.baseline_workers(3) == 3
