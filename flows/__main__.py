"""`python -m flows build-shards ...` | `python -m flows serve` (see flows/cli.py)."""

from flows.cli import main

if __name__ == "__main__":
    main()
