"""`python -m flows build-shards ...` and `python -m flows serve`.

Options are checked here (flows/params.py) before Prefect is even imported, so a bad option
costs a one-line error and exit status 2, not a server start. build-shards then runs the flow
in this process (flows/run.py); with no Prefect server configured, it starts a temporary one
of its own that dies with it (flows/server.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import click

from flows.params import BuildParams, ParamError
from flows.run import run_build
from flows.server import owned_server, prefect_defaults


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """shardline's Prefect flows: build datasets into verified WebDataset shards."""


def _click_option(f: dataclasses.Field) -> Callable:
    """One --option from one BuildParams field: its help, metavar, type and default."""
    meta = dict(f.metadata)
    flag = f"--{f.name.replace('_', '-')}"
    if isinstance(f.default, bool):
        return click.option(flag, f.name, is_flag=True, default=f.default, help=meta["help"])
    default = None if f.default is dataclasses.MISSING else f.default
    return click.option(
        flag,
        f.name,
        help=meta.pop("help"),
        default=() if meta.get("multiple") else default,
        show_default=default is not None,
        **meta,
    )


def _build_options(cmd: Callable) -> Callable:
    for f in reversed(dataclasses.fields(BuildParams)):
        cmd = _click_option(f)(cmd)
    return cmd


@cli.command("build-shards")
@_build_options
def build_shards_cmd(**kw) -> None:
    """Build a dataset into shuffled, verified WebDataset shards with DALI indexes and a manifest.

    Runs the `build-shards` Prefect flow in this process (a temporary local Prefect server
    starts unless PREFECT_API_URL points at one). Rerunning the same command after a crash
    finishes the set and reuses the shards already written; on a complete set it does nothing.
    One build at a time per --output: another one fails at once, or waits with --wait.
    """
    try:
        params = BuildParams(**kw).check()  # the flow checks again; here it fails before Prefect starts
    except ParamError as e:
        raise click.UsageError(str(e)) from None
    return run_build(params)[0]


@cli.command("serve")
@click.option("--limit", type=int, default=None, metavar="N", help="At most N flow runs at once. Default: no limit.")
def serve_cmd(limit: int | None) -> None:
    """Serve deployments build-shards/imagenet, /imagefolder, /cifar10 and /demo.

    Needs a Prefect server (PREFECT_API_URL, e.g. from `prefect server start`). Then:
    prefect deployment run build-shards/imagenet -p source=/data/ilsvrc -p output=/ssd/imagenet --watch
    """
    prefect_defaults()
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
    rc = _run(argv)
    if owned_server() is not None:
        # Our own temporary server ends with us: nothing else needs Prefect's teardown (its
        # flushes of logs and events to that server), so exit now rather than wait for it.
        sys.stdout.flush()
        sys.stderr.flush()
        owned_server().stop()
        os._exit(rc)
    sys.exit(rc)


def _run(argv: list[str] | None) -> int:
    try:
        rc = cli.main(args=argv, prog_name="python -m flows", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    return rc if isinstance(rc, int) else 0
