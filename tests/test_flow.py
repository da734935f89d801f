"""The build-shards flow run in-process against a real (temporary) Prefect server.

Checks what a user relies on: a complete, verified shard set; the summary table and progress
artifacts with the right numbers; a rerun that reuses everything; resume from shards a dead
run left; quarantine counts; a retried transient read error; and CLI options rejected in one
line before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PHOTOS, PhotoSource
from prefect.client.orchestration import get_client

import flows.cli as cli
import shards.build_request as build_request
from flows.build_shards import PROGRESS_KEY, SUMMARY_KEY, build_shards
from flows.cli import main
from flows.params import BuildParams, ParamError, shard_size_bytes
from shards.build import build, prepare, write_shard
from shards.build_request import BuildRequest
from shards.manifest import read_manifest
from shards.storage import TMP_MARK, Storage
from shards.types import Item
from shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]
# Small demo set: 80 train and 30 val images of 48 px, 25 per shard -> 4 + 2 uneven shards.
DEMO = {"dataset": "demo", "shard_samples": 25, "train_per_class": 8, "val_per_class": 3, "demo_size": 48}


def run(**kw):
    """Run the flow; returns (result dict, flow run id)."""
    state = build_shards(**kw, return_state=True)
    return state.result(), state.state_details.flow_run_id


def artifact(flow_run_id, key: str) -> dict:
    # The REST filter directly: the sync client's read_artifacts sends unset options as null,
    # which the server rejects, and its empty run filters match nothing.
    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}, "key": {"any_": [key]}}, "limit": 10}
    found = get_client(sync_client=True).request("POST", "/artifacts/filter", json=body).json()
    assert len(found) == 1, f"expected one {key} artifact, found {len(found)}"
    return found[0]


def table(flow_run_id) -> list[dict]:
    data = artifact(flow_run_id, SUMMARY_KEY)["data"]
    return json.loads(data) if isinstance(data, str) else data


def mtimes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in root.iterdir()}


@pytest.fixture(scope="module")
def first_build(prefect_harness, tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "demo"
    result, run_id = run(output=str(out), workers=2, **DEMO)  # workers=2: the process-pool path
    return out, result, run_id


def test_flow_builds_a_complete_verified_set(first_build):
    out, result, _ = first_build
    m = read_manifest(str(out))
    assert result["output"] == str(out) and not result["complete_before"]
    assert m["dataset"] == "demo" and m["image_ext"] == "jpg"
    assert m["splits"]["train"]["samples"] == 80 and m["splits"]["val"]["samples"] == 30
    assert m["splits"]["train"]["pattern"] == "demo-train-{000..003}.tar"
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [25, 25, 25, 5]
    assert m["params"]["shard_samples"] == 25 and m["params"]["train_per_class"] == 8
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == [
        *(f"demo-train-00{i}.tar" for i in range(4)),
        "demo-val-000.tar",
        "demo-val-001.tar",
    ]
    assert not (out / "_progress").exists()
    checks = verify(str(out), decode=True)
    assert len(checks) == 6 and all(not c.problems for c in checks), [c.problems for c in checks]


def test_summary_table_and_progress_artifacts(first_build):
    out, result, run_id = first_build
    m = read_manifest(str(out))
    rows = {r["split"]: r for r in table(run_id)}
    assert rows.keys() == {"train", "val"}
    for split, entry in m["splits"].items():
        r = rows[split]
        assert r["samples"] == entry["samples"]
        assert r["shards"] == len(entry["shards"])
        assert r["bytes"] == sum(s["bytes"] for s in entry["shards"])
        assert r["quarantined"] == 0 and r["reused"] == 0
        assert r["seconds"] > 0 and r["images_per_sec"] > 0
    assert result["rows"] == table(run_id)
    assert artifact(run_id, PROGRESS_KEY)["data"] == 100.0


def test_rerun_is_a_no_op(first_build):
    out, _, _ = first_build
    before, manifest = mtimes(out), (out / "manifest.json").read_bytes()
    result, run_id = run(output=str(out), workers=2, **DEMO)
    assert result["complete_before"]
    assert mtimes(out) == before and (out / "manifest.json").read_bytes() == manifest
    rows = table(run_id)
    assert [(r["split"], r["shards"], r["reused"], r["samples"]) for r in rows] == [
        ("train", 4, 4, 80),
        ("val", 2, 2, 30),
    ]


def test_rerun_with_other_parameters_fails_without_touching_the_set(first_build):
    out, _, _ = first_build
    before = mtimes(out)
    state = build_shards(output=str(out), workers=1, **(DEMO | {"shard_samples": 30}), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="already holds a finished demo set"):
        state.result()
    assert mtimes(out) == before


def test_resume_reuses_shards_a_dead_run_published(first_build, tmp_path):
    """Shards published before a crash are kept; leftovers are cleaned; the result equals a clean build."""
    clean = read_manifest(str(first_build[0]))
    out = tmp_path / "resumed"
    # What a killed run leaves: two shards published with their progress records, a half-written file.
    request = BuildParams(output=str(out), **DEMO).request()
    options = request.options()
    source = request.open_source()
    plan = prepare(source, options)
    storage = Storage(out)
    storage.makedirs()
    for spec in plan.shards[:2]:
        write_shard(source, spec, storage, options, plan.params)
    (out / f".demo-train-002.tar{TMP_MARK}dead").write_bytes(b"half a shard")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    result, _ = run(output=str(out), workers=1, **DEMO)
    assert sum(r["reused"] for r in result["rows"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in kept} == kept
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]
    resumed = read_manifest(str(out))
    assert resumed["splits"] == clean["splits"]  # same names, sizes and sha256: byte-identical shards


def test_splits_parameter_builds_only_those_splits(prefect_harness, tmp_path):
    out = tmp_path / "val-only"
    result, _ = run(output=str(out), splits="val", workers=1, **DEMO)
    assert [r["split"] for r in result["rows"]] == ["val"]
    m = read_manifest(str(out))
    assert list(m["splits"]) == ["val"] and m["params"]["splits"] == ["val"]


class PhotosWithBadFiles(PhotoSource):
    """The test photos plus a truncated and an empty JPEG in train, to be quarantined."""

    def __init__(self, bad_dir: Path) -> None:
        super().__init__(num_classes=4, copies=1, val_copies=1)
        self.bad = []
        good = PHOTOS[0].read_bytes()
        for name, data in (("truncated", good[: len(good) // 3]), ("empty", b"")):
            p = bad_dir / f"{name}.JPEG"
            p.write_bytes(data)
            self.bad.append(Item(f"bad_{name}", 0, "c0", p.name, (str(p),), len(data)))

    def items(self, split: str) -> list[Item]:
        return super().items(split) + (self.bad if split == "train" else [])


def test_quarantined_images_are_counted_in_summary_and_manifest(prefect_harness, tmp_path, monkeypatch):
    source = PhotosWithBadFiles(tmp_path)
    monkeypatch.setattr(build_request, "open_source", lambda *a, **k: source)
    out = tmp_path / "photos"
    args = {"dataset": "imagefolder", "source": str(tmp_path), "output": str(out), "shard_samples": 10, "workers": 1}
    _, run_id = run(**args)
    rows = {r["split"]: r for r in table(run_id)}
    assert rows["train"]["quarantined"] == 2 and rows["val"]["quarantined"] == 0
    assert rows["train"]["samples"] == len(PHOTOS) and rows["val"]["samples"] == len(PHOTOS)
    m = read_manifest(str(out))
    assert sorted(q["key"] for q in m["quarantine"]) == ["bad_empty", "bad_truncated"]
    assert all(q["reason"] for q in m["quarantine"])
    # A no-op rerun reports the same quarantine counts, now read back from the manifest.
    again, _ = run(**args)
    assert again["complete_before"] and [r["quarantined"] for r in again["rows"]] == [2, 0]


class FlakyPhotos(PhotoSource):
    """Fails the first read of one image with an I/O error (a network blip), then works."""

    def __init__(self, marker: Path) -> None:
        super().__init__(num_classes=2, copies=1, val_copies=1)
        self.marker = marker

    def read(self, item: Item) -> bytes:
        if item.key.startswith("train_") and not self.marker.exists():
            self.marker.write_text("failed once")
            raise OSError("connection reset by peer")
        return super().read(item)


def test_a_transient_read_error_is_retried(prefect_harness, tmp_path, monkeypatch):
    marker = tmp_path / "failed-once"
    monkeypatch.setattr(build_request, "open_source", lambda *a, **k: FlakyPhotos(marker))
    out = tmp_path / "flaky"
    run(dataset="imagefolder", source=str(tmp_path), output=str(out), shard_samples=30, workers=1)
    assert marker.exists()  # the error did happen, and the retry got past it
    assert read_manifest(str(out))["splits"]["train"]["samples"] == len(PHOTOS)
    assert all(not c.problems for c in verify(str(out)))


class DyingPhotos(PhotoSource):
    """The first read kills the worker process outright, as the OOM killer would."""

    def __init__(self, marker: Path) -> None:
        super().__init__(num_classes=2, copies=2, val_copies=1)
        self.marker = marker

    def read(self, item: Item) -> bytes:
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().read(item)


def test_a_killed_worker_process_is_replaced_and_its_shards_retried(prefect_harness, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setattr(build_request, "open_source", lambda *a, **k: DyingPhotos(marker))
    out = tmp_path / "dying"
    result, _ = run(dataset="imagefolder", source=str(tmp_path), output=str(out), shard_samples=8, workers=2)
    assert int(marker.read_text()) != os.getpid()  # it was a pool process that died
    assert [r["samples"] for r in result["rows"]] == [2 * len(PHOTOS), len(PHOTOS)]
    assert all(not c.problems for c in verify(str(out)))
    assert not [p.name for p in out.iterdir() if TMP_MARK in p.name]  # the dead worker's partial files are gone


def test_cli_builds_and_prints_the_summary(prefect_harness, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "build-shards",
        "--dataset",
        "demo",
        "--output",
        str(out),
        "--shard-samples",
        "20",
        "--train-per-class",
        "2",
        "--val-per-class",
        "2",
        "--demo-size",
        "32",
        "--workers",
        "1",
    ]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert f"output: {out}" in printed and "train" in printed and "val" in printed
    assert read_manifest(str(out))["splits"]["train"]["samples"] == 20


def test_a_plain_script_writes_the_same_manifest_as_the_cli(prefect_harness, tmp_path, monkeypatch):
    """shards.build.build() with a BuildRequest, as any script or other orchestrator would call
    it, writes manifest.json byte for byte as the CLI does (but for its creation time)."""
    options = {"shard_size": "100KB", "seed": 3, "verify": "header", "train_per_class": 3, "val_per_class": 1}
    options |= {"demo_size": 32, "jpeg_quality": 80}
    argv = ["build-shards", "--dataset", "demo", "--output", str(tmp_path / "cli"), "--workers", "1"]
    argv += [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    opened = []
    open_source = build_request.open_source
    monkeypatch.setattr(build_request, "open_source", lambda *a, **k: opened.append(a) or open_source(*a, **k))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert len(opened) == 1  # indexed once, ahead of the flow, which took that plan
    monkeypatch.undo()
    request = BuildRequest("demo", shard_bytes=100_000, **{k: v for k, v in options.items() if k != "shard_size"})
    build(request.open_source(), str(tmp_path / "script"), request.options(), workers=2)

    def manifest(name: str) -> bytes:
        data = (tmp_path / name / "manifest.json").read_bytes()
        return re.sub(rb'"created": "[^"]*"', b'"created": ""', data, count=1)

    assert manifest("cli") == manifest("script")
    assert json.loads(manifest("cli"))["params"]["shard_size"] == 100_000


def test_cli_reports_a_bad_source_in_one_final_line(prefect_harness, tmp_path, capsys):
    """A source that fails while indexing (here: an empty image folder) ends with one error line, exit 1."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["build-shards", "--dataset", "imagefolder", "--source", str(tmp_path / "empty"), "--output", str(out)])
    assert e.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: build-shards failed: ImageFolderError: no class folders in"), last
    assert not (out / "manifest.json").exists()


BAD_OPTIONS = {
    "unknown dataset": (["--dataset", "mnist"], "--dataset 'mnist': unknown"),
    "both sizes": (["--dataset", "demo", "--shard-size", "1GB", "--shard-samples", "10"], "exclude each other"),
    "bad size": (["--dataset", "demo", "--shard-size", "12 parsecs"], "--shard-size '12 parsecs': not a size"),
    "bad md5": (["--dataset", "imagenet", "--source", ".", "--md5", "ILSVRC2012_img_val.tar"], "expected NAME=HEX"),
    "short md5": (["--dataset", "imagenet", "--source", ".", "--md5", "a.tar=abc"], "32-digit hex"),
    "misspelt md5 name": (
        ["--dataset", "imagenet", "--source", ".", "--md5", "ILSVRC2012_img_vall.tar=" + "0" * 32],
        "--md5 ILSVRC2012_img_vall.tar: not an archive of this source (expected: ILSVRC2012_devkit_t12.tar.gz, "
        "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar)",
    ),
    "md5 for a folder": (["--dataset", "imagefolder", "--source", ".", "--md5", "x.tar=" + "0" * 32], "no archive"),
    "missing source": (["--dataset", "cifar10"], "--source is required for --dataset cifar10"),
    "absent source": (["--dataset", "imagefolder", "--source", "/nonexistent/x"], "no such file or folder"),
    "zero workers": (["--dataset", "demo", "--workers", "0"], "--workers 0: must be at least 1"),
    "bad verify": (["--dataset", "demo", "--verify", "all"], "--verify 'all'"),
    "demo option elsewhere": (["--dataset", "imagenet", "--source", ".", "--train-per-class", "3"], "demo only"),
    "zero max pixels": (["--dataset", "demo", "--max-pixels", "0"], "--max-pixels 0: must be at least 1"),
    "empty classes elsewhere": (["--dataset", "demo", "--allow-empty-classes"], "imagefolder only"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_cli_rejects_bad_options_in_one_line(case, tmp_path, capsys, monkeypatch):
    """In-process: the options are checked before the flow (or a server) is reached at all."""
    args, message = BAD_OPTIONS[case]
    monkeypatch.setattr(cli, "run_build", lambda p: pytest.fail("a bad option reached the build"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["build-shards", *args, "--output", str(out)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert not out.exists()


def test_a_bad_option_costs_no_prefect_import(tmp_path):
    """The real command: one line on stderr, exit status 2, and Prefect never imported."""
    probe = (
        "import sys; from flows.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "finally:\n    print('prefect imported' if 'prefect' in sys.modules else 'no prefect', file=sys.stderr)\n"
    )
    args = ["build-shards", "--dataset", "demo", "--shard-size", "12 parsecs", "--output", str(tmp_path / "o")]
    env = os.environ | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}  # any server contact would fail loudly
    p = subprocess.run(
        [sys.executable, "-c", probe, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "error: --shard-size '12 parsecs': not a size (examples: 1GB, 500MB, 64MiB, 1000000)",
        "no prefect",
    ]


def test_md5_names_may_be_paths_and_are_checked_for_local_archives():
    p = BuildParams(
        dataset="imagenet", source=".", output="x", md5=["/data/ILSVRC2012_img_val.tar=" + "A" * 32]
    ).check()
    assert p.md5 == {"ILSVRC2012_img_val.tar": "a" * 32}  # the path's file name counts, not the path
    assert p.request().source_kwargs()["md5"] == p.md5  # a local archive with an explicit --md5 is checked
    url = BuildParams(dataset="imagenet", source="https://m.example/i/", output="x", md5=p.md5).check()
    assert url.request().source_kwargs()["md5"] == {}  # downloads are checked as they arrive, not hashed twice


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1GB", 10**9),
        ("500MB", 500 * 10**6),
        ("64MiB", 64 * 2**20),
        ("1.5gb", 1_500_000_000),
        ("12345", 12345),
        (4096, 4096),
    ],
)
def test_shard_sizes_parse(text, expected):
    assert shard_size_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "1 parsec", "-1GB", "0", "1e9"])
def test_bad_shard_sizes_are_refused(text):
    with pytest.raises(ParamError, match="--shard-size"):
        shard_size_bytes(text)


def test_val_fraction_zero_means_no_val_split_and_one_is_refused(tmp_path):
    BuildParams(dataset="imagefolder", source=str(tmp_path), output="x", val_fraction=0).check()
    with pytest.raises(ParamError, match=r"--val-fraction 1\.0: must be at least 0"):
        BuildParams(dataset="imagefolder", source=str(tmp_path), output="x", val_fraction=1.0).check()


def test_params_record_what_changes_the_bytes():
    """Source options that change the images go to manifest params; check-only ones do not."""
    p = BuildParams(dataset="demo", output="x", **{k: v for k, v in DEMO.items() if k != "dataset"}).check()
    params = p.request().options().params()
    assert params["train_per_class"] == 8 and params["size"] == 48
    md5 = {"ILSVRC2012_img_val.tar": "0" * 32}
    inet = BuildParams(dataset="imagenet", source=".", output="x", md5=md5, check_md5=True).check().request()
    assert "md5" not in inet.options().params() and inet.source_kwargs()["md5"] == md5
    assert BuildParams(dataset="cifar10", source=".", output="x").check().request().options().image_ext == "png"


def test_every_build_request_field_comes_from_a_build_parameter():
    """BuildParams.request() copies the fields of the same name: a BuildRequest field with no
    option behind it would silently keep its default."""
    own = {f.name for f in dataclasses.fields(BuildParams)}
    assert {f.name for f in dataclasses.fields(BuildRequest)} - own == {"shard_bytes", "downloaded"}


def test_a_second_build_into_a_held_output_fails_at_once(prefect_harness, tmp_path, capsys):
    """As when a deployment run is triggered twice: the CLI (and the flow under it) takes the lock."""
    from shards.lock import output_lock

    out = tmp_path / "held"
    argv = ["build-shards", "--dataset", "demo", "--output", str(out), "--train-per-class", "1", "--val-per-class", "1"]
    with output_lock(str(out), {"seed": 7}):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: build-shards failed: LockHeld: {out} is locked by build pid {os.getpid()}")
        assert "wait, or choose another --output" in last
        assert sorted(p.name for p in out.iterdir()) == [".shardline.lock"]  # nothing written
