"""Paths in the config file: relative ones mean "next to the config file"."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationInfo


def base_dir(info: ValidationInfo) -> Path | None:
    """The config file's folder, passed by the loader as validation context."""
    context = info.context
    if isinstance(context, Mapping):
        base = context.get("base_dir")
        if isinstance(base, Path):
            return base
    return None


def resolve(path: Path, info: ValidationInfo) -> Path:
    """Relative paths in the file mean "next to the config file", not the daemon's cwd."""
    base = base_dir(info)
    path = path.expanduser()
    if base is not None and not path.is_absolute():
        return base / path
    return path
