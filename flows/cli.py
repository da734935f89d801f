"""`python -m flows build-shards ...` and `python -m flows serve`.

Options are checked here (flows/params.py) before Prefect is even imported, so a bad option
costs a one-line error and exit status 2, not a server start. build-shards then runs the flow
in this process; with no PREFECT_API_URL set, Prefect starts a temporary local server.
"""

from __future__ import annotations

import os
import sys

import click

from flows.params import (
    IMAGE_EXTS,
    RUNNERS,
    VERIFY_MODES,
    BuildParams,
    ParamError,
    default_cache_dir,
    parse_md5,
    parse_size,
    parse_splits,
)
from shards.sources import DATASETS


def _prefect_defaults() -> None:
    # The temporary server's first start (database migration) can take longer than Prefect's
    # default wait on a busy machine; and its telemetry only logs errors where there is no internet.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """shardline's Prefect flows: build datasets into verified WebDataset shards."""


@cli.command("build-shards")
@click.option(
    "--dataset",
    required=True,
    metavar="|".join(DATASETS),
    help="Source kind: imagenet (folder with the three ILSVRC2012 archives), imagefolder (class-per-"
    "subfolder tree), cifar10 (cifar-10-python.tar.gz) or demo (generated, no --source).",
)
@click.option(
    "--source",
    default=None,
    metavar="PATH_OR_URL",
    help="Where the dataset is: a folder or file, or an http(s):// or s3:// URL (imagenet: of the folder "
    "holding the three archives under their official names; cifar10/imagefolder: of the one archive), "
    "downloaded into --cache-dir with resume, retries and MD5 checks. Required except for --dataset demo.",
)
@click.option(
    "--cache-dir",
    default=None,
    metavar="DIR",
    help=f"Local folder for the downloads of a URL --source; verified downloads are reused by the next run "
    f"and an interrupted one resumes. Default: $XDG_CACHE_HOME/shardline, else ~/.cache/shardline "
    f"(here: {default_cache_dir()}).",
)
@click.option(
    "--output",
    required=True,
    metavar="PATH_OR_URL",
    help="Folder or fsspec URL (s3://...) to write shards, .idx indexes and manifest.json into.",
)
@click.option(
    "--splits",
    default=None,
    metavar="LIST",
    help="Comma-separated splits to build, e.g. train,val. Default: every split the source has.",
)
@click.option(
    "--shard-size",
    default=None,
    metavar="SIZE",
    help="Target shard size: bytes or a size such as 1GB, 500MB, 64MiB. Default 1GB. Excludes --shard-samples.",
)
@click.option(
    "--shard-samples",
    type=int,
    default=None,
    metavar="N",
    help="Exactly N images per shard (the last one fewer), instead of --shard-size.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the global shuffle (and of the demo set and --val-fraction split): same seed, same bytes.",
)
@click.option(
    "--verify",
    default="decode",
    show_default=True,
    metavar="|".join(VERIFY_MODES),
    help="How hard to check each image: decode fully, parse headers only, or trust it (none). "
    "Bad images are quarantined and listed in the manifest.",
)
@click.option(
    "--max-side",
    type=int,
    default=None,
    metavar="N",
    help="Downsize images whose longer side exceeds N pixels (re-encoded JPEG). Default: keep sizes.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    metavar="N",
    help="Processes decoding and writing shards in parallel (bounds CPU and memory). Default: CPU count. "
    "With --runner dask and no --dask-address: the LocalCluster's worker processes.",
)
@click.option(
    "--runner",
    default="local",
    show_default=True,
    metavar="|".join(RUNNERS),
    help="Where the shard-writing tasks run: local (threads feeding a process pool on this machine) or "
    "dask (a dask.distributed cluster through prefect-dask; its workers must import shardline and reach "
    "--source and --output by the same path or URL).",
)
@click.option(
    "--dask-address",
    default=None,
    metavar="ADDR",
    help="With --runner dask: the scheduler to use, e.g. tcp://scheduler:8786. Default: start a LocalCluster "
    "of --workers processes, one thread each, for this run.",
)
@click.option(
    "--md5",
    multiple=True,
    metavar="NAME=HEX",
    help="Expected MD5 of an archive, by file name; repeatable. Wins over the built-in ILSVRC2012 digests "
    "(downloads are always checked; a mismatch costs one fresh download, then fails naming both digests).",
)
@click.option(
    "--check-md5",
    is_flag=True,
    help="ImageNet: verify local archives against the official (or --md5) digests before indexing.",
)
@click.option(
    "--val-fraction",
    type=float,
    default=None,
    metavar="F",
    help="imagefolder without train/ and val/ subfolders: hold out this fraction (0..1) per class "
    "as val, chosen with --seed.",
)
@click.option(
    "--image-ext",
    default=None,
    metavar="|".join(IMAGE_EXTS),
    help="Image member format. Default jpg; cifar10 defaults to png (lossless). jpg re-encodes "
    "lossless sources at --jpeg-quality.",
)
@click.option(
    "--jpeg-quality",
    type=int,
    default=95,
    show_default=True,
    metavar="Q",
    help="JPEG quality for images that are re-encoded (repaired, resized, or from a lossless source).",
)
@click.option(
    "--train-per-class", type=int, default=None, metavar="N", help="demo only: training images per class (default 500)."
)
@click.option(
    "--val-per-class", type=int, default=None, metavar="N", help="demo only: validation images per class (default 100)."
)
@click.option("--demo-size", type=int, default=None, metavar="PX", help="demo only: image side in pixels (default 96).")
def build_shards_cmd(**kw) -> None:
    """Build a dataset into shuffled, verified WebDataset shards with DALI indexes and a manifest.

    Runs the `build-shards` Prefect flow in this process (a temporary local Prefect server
    starts unless PREFECT_API_URL points at one). Rerunning the same command after a crash
    finishes the set and reuses the shards already written; on a complete set it does nothing.
    """
    try:
        kw["md5"] = parse_md5(kw["md5"]) or None
        kw["splits"] = parse_splits(kw["splits"])
        if kw["shard_size"] is not None:
            kw["shard_size"] = parse_size(kw["shard_size"])
        BuildParams(**kw).check()  # the flow checks again; here it fails before Prefect starts
    except ParamError as e:
        raise click.UsageError(str(e)) from None

    _prefect_defaults()
    from flows.build_shards import build_shards  # imports Prefect: only once the options are good
    from flows.report import print_summary

    try:
        result = build_shards(**kw)
    except Exception as e:  # the flow's logs already hold the traceback; end with one line
        click.echo(f"error: build-shards failed: {type(e).__name__}: {e}", err=True)
        sys.exit(1)
    print_summary(result)


@cli.command("serve")
@click.option("--limit", type=int, default=None, metavar="N", help="At most N flow runs at once. Default: no limit.")
def serve_cmd(limit: int | None) -> None:
    """Serve deployments build-shards/imagenet, /imagefolder, /cifar10 and /demo.

    Needs a Prefect server (PREFECT_API_URL, e.g. from `prefect server start`). Then:
    prefect deployment run build-shards/imagenet -p source=/data/ilsvrc -p output=/ssd/imagenet --watch
    """
    _prefect_defaults()
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:  # a temporary server would vanish with this process
        raise click.UsageError(
            "serve needs a running Prefect server: start `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)"
        )
    from flows.deployments import serve

    serve(limit=limit)


def main(argv: list[str] | None = None) -> None:
    """Entry point: click, but usage errors are one line (`error: ...`) with exit status 2."""
    try:
        rc = cli.main(args=argv, prog_name="python -m flows", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
