"""What `python -m flows build-shards` does once its options are good: run the flow, fast.

With no Prefect server configured, the CLI starts its own temporary one (flows/server.py)
first thing, and while it starts, imports Prefect and indexes the source. The server is the
CLI's: it dies with it, kill -9 included. At the end the CLI does not wait for Prefect's
teardown (its log and event flushes go to a server about to vanish): it prints the summary
and exits, which also ends the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from flows.credentials import hide
from flows.params import BuildParams
from flows.server import TemporaryServer, abandon, configured_api_url, prefect_defaults
from shards.redact import redact_text


def run_build(params: BuildParams) -> tuple[int, TemporaryServer | None]:
    """Run the flow; returns (exit status, the temporary server this run started, if any)."""
    prefect_defaults()
    server = None
    if configured_api_url() is None:
        server = TemporaryServer()
        server.start()  # its ~5 s start overlaps the imports and the indexing below
    from flows.build_shards import build_shards, index_ahead, indexed_ahead  # imports Prefect
    from flows.report import print_summary

    ahead = index_ahead(params)
    # The server stores the flow's parameters as given: it gets the redacted source, and the
    # download task finds the real one in this process (flows/credentials.py).
    kwargs = params.flow_kwargs() | {"source": hide(params.source)}
    try:
        with _using(server), indexed_ahead(ahead):
            result = build_shards(**kwargs)
    except Exception as e:  # the flow's logs already hold the traceback; end with one line
        reason = redact_text(str(e), params.source, params.output)
        click.echo(f"error: build-shards failed: {type(e).__name__}: {reason}", err=True)
        return 1, server
    print_summary(result)
    return 0, server


@contextlib.contextmanager
def _using(server: TemporaryServer | None) -> Iterator[None]:
    """Point Prefect at our temporary server, once it answers; with none, at what is configured."""
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:  # configured where the quick look did not see (prefect.toml, .env)
        abandon(server)
        yield
        return
    server.wait_ready()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield
