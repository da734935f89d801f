"""Guards for facts that drift when copied: one size parser, one cache root, a map naming every module.

Read from the product's source (ast and text), so they cost milliseconds and need no data.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("flows", "shards", "loaders", "train", "scripts")
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# Subpackages the map names with one package line ("loaders/cache/") instead of a line per module.
# Drop one from here once its modules have lines of their own, and the test holds them to it.
ONE_LINE_PACKAGES = {"loaders/cache"}


def product_modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py"))


def parsed(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(), filename=path)


def test_there_is_one_size_parser():
    defs = [
        f"{path}:{node.lineno}"
        for path in product_modules()
        for node in ast.walk(parsed(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "parse_size"
    ]
    assert len(defs) == 1 and defs[0].startswith("shards/sizes.py:"), defs


def test_the_cache_root_is_resolved_in_one_place():
    """No module but shards/cache_root.py names the variable or the default folder in code
    (help texts that mention them, inside longer strings, are not code)."""
    home = "shards/cache_root.py"
    found = [
        f"{path}:{node.lineno}: {node.value!r}"
        for path in product_modules()
        if path != home
        for node in ast.walk(parsed(path))
        if isinstance(node, ast.Constant) and node.value in ("SHARDLINE_CACHE_DIR", ".cache", "XDG_CACHE_HOME")
    ]
    assert not found, found
    assert {"SHARDLINE_CACHE_DIR", ".cache"} <= {n.value for n in ast.walk(parsed(home)) if isinstance(n, ast.Constant)}


def _named(path: str, text: str) -> bool:
    if re.search(rf"`{re.escape(path)}`|\b{re.escape(path)}\b", text):
        return True
    package = str(Path(path).parent)
    return package in ONE_LINE_PACKAGES and f"`{package}/`" in text


def test_the_architecture_map_names_every_module():
    text = ARCHITECTURE.read_text()
    missing = [
        path
        for path in product_modules()
        if Path(path).name not in ("__init__.py", "__main__.py") or path == "loaders/__init__.py"
        if not _named(path, text)
    ]
    assert not missing, f"docs/ARCHITECTURE.md has no line for {missing}"
    packages = {str(Path(p).parent) for p in product_modules()} - {"."}
    assert not [p for p in sorted(packages) if f"`{p}/`" not in text], "a package without its line"


def test_comments_say_why_not_which_issue():
    """History belongs in git log; a comment or docstring says why the code is so."""
    exempt = {"loaders/cache.py", "loaders/dali.py"}  # rewritten by their own issues
    hits = [
        f"{p}:{n}: {line.strip()}"
        for p in product_modules()
        if p not in exempt
        for n, line in enumerate((ROOT / p).read_text().splitlines(), 1)
        if re.search(r"\bissues? \d+", line, re.IGNORECASE)
    ]
    assert not hits, hits
