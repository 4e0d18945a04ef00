"""Config problems: each with the YAML path it belongs to, and pydantic's errors put so.

Every problem is reported at once, at the place in the file where it was written, and no
message quotes a value that may hold a secret.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

# A place in the YAML tree: ("sites", 2, "tls", "pin_sha256").
Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]


@dataclass(frozen=True)
class ConfigProblem:
    path: str  # YAML path, e.g. "sites[1].password"; "" for the file as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The config file is unusable; `problems` holds every problem found."""

    def __init__(self, problems: Iterable[ConfigProblem], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        # One line per problem, each starting with the file, like a compiler: greppable and
        # readable in journald where multi-line messages get split.
        return "\n".join(f"{self.source}: {problem}" for problem in self.problems)


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _loc_sort_key(problem: Problem) -> tuple[tuple[int, int | str], ...]:
    # Natural order: sites[2] before sites[10]; file-level problems (empty loc) first.
    return tuple((0, part) if isinstance(part, int) else (1, part) for part in problem[0])


def to_config_problems(problems: Iterable[Problem]) -> list[ConfigProblem]:
    unique = list(dict.fromkeys(problems))  # an inherited problem comes once per site
    unique.sort(key=_loc_sort_key)
    return [ConfigProblem(format_loc(loc), message) for loc, message in unique]


def under_any(loc: Loc, prefixes: Iterable[Loc]) -> bool:
    return any(loc[: len(prefix)] == prefix for prefix in prefixes)


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model that validates the mapping at `loc` below `model`, if there is one."""
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: same item model
        info = model.model_fields.get(part)
        sub = _find_model(info.annotation) if info is not None else None
        if sub is None:
            return None
        model = sub
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def unknown_key_message(key: str, allowed: Iterable[str]) -> str:
    message = f"unknown key {key!r}"
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.7)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message


def _error_message(
    error: Mapping[str, Any], root: type[BaseModel], extra_keys: Iterable[str]
) -> str:
    """A readable message for one pydantic error, never quoting a possibly secret input."""
    kind = error["type"]
    loc: Loc = tuple(error["loc"])
    msg: str = error["msg"]
    if kind == "extra_forbidden" and loc:
        parent = _model_at(root, loc[:-1])
        allowed = list(parent.model_fields) if parent is not None else []
        if len(loc) == 1:
            allowed += list(extra_keys)
        allowed = [key for key in allowed if key != "config_path"]
        return unknown_key_message(str(loc[-1]), allowed)
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        if isinstance(error.get("input"), str):
            # Choices (vendor, log level) are not secrets: echoing the typo helps.
            return f"{error['input']!r} is not valid; expected {expected}"
        return f"expected {expected}"
    if kind == "string_type":
        return "must be a string (put quotes around it in the YAML)"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")  # our own validators' messages
    # pydantic's own messages ("Input should be ...") follow "path: " in lower case.
    return msg[:1].lower() + msg[1:]


def pydantic_problems(
    exc: ValidationError, root: type[BaseModel], extra_keys: Iterable[str] = ()
) -> list[Problem]:
    extra = list(extra_keys)
    return [
        (tuple(error["loc"]), _error_message(error, root, extra))
        for error in exc.errors(include_url=False)
    ]
