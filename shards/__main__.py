"""`python -m shards verify PATH_OR_URL [--decode]`."""

from __future__ import annotations

import sys

import click
from tqdm import tqdm

from shards.manifest import ManifestError, read_manifest
from shards.verify import verify


@click.group()
def cli() -> None:
    """shardline's shard tools (no Prefect needed)."""


@cli.command("verify")
@click.argument("path")
@click.option("--decode", is_flag=True, help="Also decode every image (slower; catches corrupt pixels).")
def verify_cmd(path: str, decode: bool) -> None:
    """Recheck every shard under PATH (folder or s3:// URL with manifest.json): sha256, sizes,
    sample counts and the DALI index; exits 1 naming the bad shards."""
    try:
        m = read_manifest(path)
    except (ManifestError, OSError) as e:
        raise click.ClickException(str(e)) from None
    total = sum(len(s["shards"]) for s in m["splits"].values())
    with tqdm(total=total, unit="shard", desc="verify", disable=None) as bar:
        checks = verify(path, decode=decode, progress=lambda c: bar.update())
    bad = [c for c in checks if c.problems]
    for c in bad:
        click.echo(f"BAD {c.name}: {'; '.join(c.problems)}", err=True)
    samples = sum(s["samples"] for s in m["splits"].values())
    if bad:
        click.echo(f"{len(bad)} of {len(checks)} shards are bad", err=True)
        sys.exit(1)
    click.echo(f"ok: {len(checks)} shards, {samples} samples, {len(m.get('quarantine', []))} quarantined at build")


if __name__ == "__main__":
    cli()
