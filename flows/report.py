"""The summary table printed at the end of `python -m flows build-shards` (rich)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from shards.redact import redact_url

COLUMNS = ("split", "samples", "shards", "bytes", "quarantined", "reused", "seconds", "images_per_sec")
HEADERS = {"bytes": "size", "images_per_sec": "images/s"}


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key == "bytes":
        return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.1f} MB"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_summary(result: dict, console: Console | None = None) -> None:
    """Print the flow's per-split rows as a table, then the output location."""
    console = console or Console()
    title = f"build-shards {result['dataset']}" + (
        " (already complete: nothing written)" if result["complete_before"] else ""
    )
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for c in COLUMNS:
        table.add_column(HEADERS.get(c, c), justify="left" if c == "split" else "right")
    for row in result["rows"]:
        table.add_row(*(_cell(c, row.get(c)) for c in COLUMNS))
    console.print(table)
    # soft_wrap: a long path stays on one line, whole, so it can be copied (and grepped)
    console.print(f"output: {redact_url(result['output'])}", soft_wrap=True, highlight=False)
