"""`python -m shards verify PATH_OR_URL [--decode]` and `python -m shards show PATH_OR_URL --output FILE.png`."""

from __future__ import annotations

import sys

import click
from tqdm import tqdm

from shards.interop import check_reader_files
from shards.interop import write_reader_files as write_files
from shards.manifest import ManifestError, read_manifest
from shards.storage import Storage
from shards.verify import ShardCheck, verify


@click.group()
def cli() -> None:
    """shardline's shard tools (no Prefect needed)."""


@cli.command("verify")
@click.argument("path")
@click.option("--decode", is_flag=True, help="Also decode every image (slower; catches corrupt pixels).")
@click.option(
    "--write-reader-files",
    is_flag=True,
    help="First (re)write _info.json and the wids indexes from the manifest (for sets built before they existed).",
)
def verify_cmd(path: str, decode: bool, write_reader_files: bool) -> None:
    """Recheck every shard under PATH (folder or s3:// URL with manifest.json): sha256, sizes,
    sample counts and the DALI index, then the files for other readers (timm's _info.json, the
    wids indexes) against the manifest; exits 1 naming the bad files."""
    try:
        m = read_manifest(path)
    except (ManifestError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if write_reader_files:
        click.echo(f"wrote {', '.join(write_files(Storage(path), m))}")
    total = sum(len(s["shards"]) for s in m["splits"].values())
    with tqdm(total=total, unit="shard", desc="verify", disable=None) as bar:
        checks = verify(path, decode=decode, progress=lambda c: bar.update())
    checks += [ShardCheck(name, problems) for name, problems in check_reader_files(Storage(path), m).items()]
    bad = [c for c in checks if c.problems]
    for c in bad:
        click.echo(f"BAD {c.name}: {'; '.join(c.problems)}", err=True)
    samples = sum(s["samples"] for s in m["splits"].values())
    if bad:
        click.echo(
            f"{len(bad)} of {len(checks)} files are bad ({total} shards, {len(checks) - total} reader files)", err=True
        )
        sys.exit(1)
    click.echo(
        f"ok: {total} shards, {samples} samples, {len(checks) - total} reader files, "
        f"{len(m.get('quarantine', []))} quarantined at build"
    )


@cli.command("show")
@click.argument("path")
@click.option("--split", default="train", show_default=True, help="Which split of the manifest to draw from.")
@click.option("--count", default=32, show_default=True, type=click.IntRange(1), help="How many samples to show.")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the random pick: same seed, same samples."
)
@click.option("--columns", default=8, show_default=True, type=click.IntRange(1), help="Cells per grid row.")
@click.option("--cell", default=160, show_default=True, type=click.IntRange(16), help="Side of each cell in pixels.")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write the grid to.")
def show_cmd(path: str, split: str, count: int, seed: int, columns: int, cell: int, output: str) -> None:
    """Draw stored samples of PATH (folder or s3:// URL with manifest.json) as a PNG grid: each image
    as stored, its label and class name, its key; repaired samples (and any whose .cls and .json
    disagree) are framed in red with the reason. Only the picked samples' bytes are read."""
    from shards.show import show

    try:
        grid, samples = show(path, split=split, count=count, seed=seed, columns=columns, cell=cell)
    except (ManifestError, OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    grid.save(output, format="PNG")
    marked = sum(bool(s.meta.get("repaired") or s.problem) for s in samples)
    click.echo(f"wrote {output}: {len(samples)} samples of {split}, {marked} marked (repaired or suspect)")


if __name__ == "__main__":
    cli()
