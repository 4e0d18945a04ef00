"""The config file's YAML read strictly, and its `${VAR}` references filled in.

Duplicate keys are refused (PyYAML keeps the last one silently, which hides typos), and no
error message quotes the file's text: a line may hold a secret.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from cms_ingest.config.problems import Loc, Problem

# systemd sets it for a unit with LoadCredential=: `password_file: ${CREDENTIALS_DIRECTORY}/x`.
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` legitimately repeats keys it merges
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_error_message(exc: yaml.YAMLError) -> str:
    # Built from parts, not str(exc): that quotes the offending line, which may hold a secret.
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = "; ".join(part for part in (exc.context, exc.problem) if part)
        return f"invalid YAML{where}: {detail or 'syntax error'}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"invalid YAML: {exc.reason} at byte {exc.position}"
    return "invalid YAML"


# `$${` first so that it wins over the `${` inside it; a lone `${` is an unterminated reference.
_REF_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_REF_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


@dataclass
class Interpolator:
    environ: Mapping[str, str]
    problems: list[Problem] = field(default_factory=list)
    # Paths whose value could not be interpolated: further errors there would be noise.
    failed: set[Loc] = field(default_factory=set)

    def tree(self, node: Any, loc: Loc) -> Any:
        if isinstance(node, str):
            return self.string(node, loc)
        if isinstance(node, dict):
            return {key: self.tree(value, (*loc, str(key))) for key, value in node.items()}
        if isinstance(node, list):
            return [self.tree(item, (*loc, index)) for index, item in enumerate(node)]
        return node

    def string(self, text: str, loc: Loc) -> str:
        if "${" not in text:
            return text
        errors: list[str] = []

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            body = match.group(1)
            parsed = _REF_BODY_RE.fullmatch(body) if body is not None else None
            if parsed is None:
                # Do not quote the text: a password may contain "${" by accident.
                errors.append(
                    "invalid ${...} reference: use ${NAME} or ${NAME:-default}, "
                    "or $${ for a literal ${"
                )
                return match.group(0)
            name, fallback = parsed.groups()
            value = self.environ.get(name)
            if fallback is not None and not value:  # shell semantics: unset or empty
                return fallback
            if value is None:
                errors.append(_unset_variable_message(name))
                return match.group(0)
            return value

        result = _REF_RE.sub(replace, text)
        if errors:
            self.failed.add(loc)
            self.problems.extend((loc, message) for message in errors)
        return result


def _unset_variable_message(name: str) -> str:
    if name == CREDENTIALS_VARIABLE:
        # Unset means "not started by systemd with credentials", not a typo in a variable.
        return (
            "systemd credentials are not available: start the daemon with LoadCredential= "
            f"or use another secret source ({name} is not set)"
        )
    return f"environment variable {name} is not set"
