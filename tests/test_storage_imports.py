"""The storage layer's imports: `db` and the ports import nothing of ours but the domain,
and the domain nothing of ours at all (so each can be read, and replaced, on its own)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cms_ingest"


def _our_imports(path: Path) -> set[str]:
    """The cms_ingest modules a file imports (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] == "cms_ingest"}
    return found


@pytest.mark.parametrize(
    ("files", "allowed"),
    [
        (sorted((PACKAGE / "db").glob("*.py")), ("cms_ingest.domain", "cms_ingest.db")),
        ([PACKAGE / "storage_ports.py"], ("cms_ingest.domain",)),
        ([PACKAGE / "domain.py"], ()),
    ],
    ids=["db", "storage_ports", "domain"],
)
def test_the_storage_layer_imports_only_the_domain(
    files: list[Path], allowed: tuple[str, ...]
) -> None:
    assert files
    wrong = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in files
        for name in _our_imports(path)
        if not any(name == prefix or name.startswith(prefix + ".") for prefix in allowed)
    }
    assert not wrong, sorted(wrong)
