"""The import layers of cms_ingest, checked on every CI run.

- `domain` imports nothing of ours: it is the vocabulary every other part shares.
- `vendors` import neither `db`, `runtime`, `metrics` nor `simulators`: a vendor turns a
  device's API into domain values and reports through its context, nothing more.
- `db` and the storage ports (`storage_ports`) import only `domain`: storage knows rows, not
  devices, tasks or metrics.
- `runtime` never imports `simulators` or a concrete vendor module: it knows vendors only
  through the registry and `vendors.base`.
- `forwarding` (the SIA DC-09 protocol and the code table) imports only `domain`: pure code,
  testable on its own, that the config, the runtime and the CLI all use.
- Nothing is imported from `cms_ingest.metrics` but its `Metrics` class, and the module
  defines no collector of its own: the metrics object is built per daemon and handed to the
  parts that count (two daemons in one process keep their own figures).

Every import counts: at module level, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import cms_ingest
import cms_ingest.metrics

PACKAGE_DIR = Path(cms_ingest.__file__).parent
# Modules of `cms_ingest.vendors` that are shared machinery, not a vendor.
VENDOR_MACHINERY = {"base", "common", "registry", "tasks"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (a `from x import y` naming a module gives x.y)
    line: int
    name: str | None = None  # y of a `from x import y` where y is not a module


# What may be imported from metrics: the per-daemon object and the per-site figures it
# hands out, never a collector.
METRICS_CLASSES = frozenset({"Metrics", "PollSeries"})


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    base = PACKAGE_DIR / relative
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(importer: str, source: str, *, is_package: bool = False) -> Iterator[Import]:
    package = importer if is_package else importer.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(importer, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                named_module = candidate.startswith("cms_ingest") and _is_module(candidate)
                if named_module:
                    yield Import(importer, candidate, node.lineno)
                else:
                    yield Import(importer, base, node.lineno, alias.name)


def all_imports() -> list[Import]:
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name = module_name(path)
        found.extend(imports_of(name, path.read_text(), is_package=path.name == "__init__.py"))
    return [i for i in found if i.imported == "cms_ingest" or i.imported.startswith("cms_ingest.")]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _concrete_vendor(module: str) -> bool:
    if not module.startswith("cms_ingest.vendors."):
        return False
    return module.split(".")[2] not in VENDOR_MACHINERY


def violations(imports: list[Import]) -> list[str]:
    found = []
    for i in imports:
        rule = _broken_rule(i)
        if rule:
            found.append(f"{i.importer}:{i.line} imports {i.imported}: {rule}")
    return found


def _broken_rule(i: Import) -> str | None:
    own = i.importer
    target = i.imported
    if _within(own, "cms_ingest.domain"):
        return "domain imports nothing of ours"
    if _within(own, "cms_ingest.vendors"):
        for banned in ("db", "runtime", "metrics", "simulators"):
            if _within(target, f"cms_ingest.{banned}"):
                return f"vendors never import {banned}"
    in_db = _within(own, "cms_ingest.db") and _within(target, "cms_ingest.db")
    storage = _within(own, "cms_ingest.db") or _within(own, "cms_ingest.storage_ports")
    if storage and not (in_db or _within(target, "cms_ingest.domain")):
        return "db and the storage ports import only domain"
    in_forwarding = _within(own, "cms_ingest.forwarding")
    if in_forwarding and not (
        _within(target, "cms_ingest.forwarding") or _within(target, "cms_ingest.domain")
    ):
        return "forwarding imports only domain"
    if target == "cms_ingest.metrics" and own != target and i.name not in METRICS_CLASSES:
        return "only the Metrics class is imported from metrics (no module-level collector)"
    if _within(own, "cms_ingest.runtime"):
        if _within(target, "cms_ingest.simulators"):
            return "runtime never imports simulators"
        if _concrete_vendor(target):
            return "runtime never imports a concrete vendor module"
    return None


def test_the_package_keeps_its_import_layers() -> None:
    assert violations(all_imports()) == []


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("cms_ingest.domain", "from cms_ingest import units", "domain imports nothing"),
        ("cms_ingest.vendors.davantis", "from cms_ingest import metrics", "never import metrics"),
        ("cms_ingest.vendors.davantis", "import cms_ingest.db.store", "never import db"),
        (
            "cms_ingest.vendors.davantis",
            "def f():\n    from cms_ingest.runtime.poller import SitePoller",
            "never import runtime",
        ),
        ("cms_ingest.db.store", "from ..vendors.common import clean_text", "only domain"),
        ("cms_ingest.db.store", "from cms_ingest.retry import RetryPolicy", "only domain"),
        ("cms_ingest.storage_ports", "from cms_ingest.db import store", "only domain"),
        ("cms_ingest.runtime.sites", "from cms_ingest.vendors import davantis", "concrete vendor"),
        ("cms_ingest.runtime.sites", "from cms_ingest.simulators import base", "simulators"),
        ("cms_ingest.runtime.poller", "from cms_ingest import metrics", "only the Metrics class"),
        ("cms_ingest.forwarding.dc09", "from cms_ingest.db import store", "forwarding imports"),
        ("cms_ingest.runtime.poller", "import cms_ingest.metrics", "only the Metrics class"),
        (
            "cms_ingest.simulators.fuzzing",
            "from cms_ingest.metrics import REGISTRY",
            "only the Metrics class",
        ),
    ],
)
def test_the_checker_catches_each_kind_of_violation(
    importer: str, source: str, expected: str
) -> None:
    found = violations(list(imports_of(importer, source)))
    assert len(found) == 1
    assert expected in found[0]


def test_allowed_imports_are_not_flagged() -> None:
    allowed = [
        ("cms_ingest.db.store", "from cms_ingest.domain import Alarm\nfrom . import schema"),
        ("cms_ingest.runtime.sites", "from cms_ingest.vendors import base, registry"),
        ("cms_ingest.vendors.davantis", "from cms_ingest.vendors.common import as_id"),
        ("cms_ingest.runtime.poller", "from cms_ingest.metrics import Metrics"),
    ]
    for importer, source in allowed:
        assert violations(list(imports_of(importer, source))) == []


def test_metrics_defines_no_module_level_collector() -> None:
    """A collector or registry at module level would be shared by every daemon of a process."""
    shared = [
        name
        for name, value in vars(cms_ingest.metrics).items()
        if isinstance(value, (MetricWrapperBase, CollectorRegistry))
    ]
    assert shared == []
