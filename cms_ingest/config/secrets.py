"""Secrets given as files (`password_file`, `token_file`, `database_url_file`), and which
credentials each site's vendor requires.

A file's content replaces its key in the raw tree before validation. Errors name the file,
never its content; a file missing from systemd's credentials folder says which
`LoadCredential=` line would bring it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cms_ingest.config.problems import Loc, Problem
from cms_ingest.config.vendor_facts import given_credentials, missing_credentials
from cms_ingest.config.yaml_loading import CREDENTIALS_VARIABLE

# Keys accepted in a site (and in `defaults`) that are not SiteConfig fields: they are read
# into `password` / `token` by the loader.
SECRET_FILE_KEYS = {"password": "password_file", "token": "token_file"}


@dataclass
class SecretReader:
    """Reads secret files named in a config file, relative to its folder."""

    base_dir: Path
    # The environment `${VAR}` was read from: tells a missing systemd credential apart.
    environ: Mapping[str, str] = field(default_factory=dict)

    def read(self, file_value: str, what: str) -> tuple[str | None, str | None]:
        """(secret, None) or (None, error); the error names the file, never its content."""
        path = self.base_dir / Path(file_value).expanduser()
        value, error = _read_secret_file(path, what)
        credentials = self.environ.get(CREDENTIALS_VARIABLE)
        in_credentials = bool(credentials) and path.parent == Path(str(credentials))
        if error is not None and in_credentials and _file_missing(path):
            error += (
                f" (the unit loads no credential named {path.name!r}: add "
                f"LoadCredential={path.name}:/path/to/file to it)"
            )
        return value, error

    def database_url_file(self, top: dict[str, Any], problems: list[Problem]) -> bool:
        """Replace a top-level database_url_file in `top` by the URL the file holds (a Docker
        secret, a systemd credential); True when it did."""
        loc: Loc = ("database_url_file",)
        file_value = top.pop("database_url_file", None)
        if file_value is None or file_value == "":  # `${DATABASE_URL_FILE:-}`: not given
            return False
        if is_set(top.get("database_url")):
            problems.append((loc, "set either database_url or database_url_file, not both"))
            return False
        if not isinstance(file_value, str):
            problems.append((loc, "must be a file path"))
            return False
        url, error = self.read(file_value, "database_url")
        if error is not None:
            problems.append((loc, error))
            return False
        top["database_url"] = url
        return True

    def site_files(self, merged: dict[str, Any], inherited: set[Loc]) -> list[Problem]:
        """Replace password_file / token_file in a merged site by the secret they hold."""
        problems: list[Problem] = []
        for secret, file_key in SECRET_FILE_KEYS.items():
            file_value = merged.pop(file_key, None)
            if file_value is None:
                continue
            if merged.get(secret) is not None:
                file_inherited = (file_key,) in inherited
                if file_inherited == ((secret,) in inherited):
                    problems.append(((file_key,), f"set either {secret} or {file_key}, not both"))
                    continue
                if file_inherited:
                    continue  # the site's own secret beats the one from defaults
            if not isinstance(file_value, str):
                problems.append(((file_key,), "must be a file path"))
                continue
            value, error = self.read(file_value, secret)
            if error is not None:
                problems.append(((file_key,), error))
                continue
            merged[secret] = value
            # Errors about the secret now belong where the file was named.
            if (file_key,) in inherited:
                inherited.add((secret,))
            else:
                inherited.discard((secret,))
        return problems


def _file_missing(path: Path) -> bool:
    try:
        path.stat()
    except FileNotFoundError:
        return True
    except OSError:
        return False  # there, but not readable: the error already says why
    return False


def _read_secret_file(path: Path, what: str) -> tuple[str | None, str | None]:
    """(secret, None) or (None, error message naming the file but not its content)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, f"cannot read {what} file {path}: {exc.strerror or exc}"
    except UnicodeDecodeError:
        return None, f"{what} file {path} is not UTF-8 text"
    # Files written with `echo` or an editor end with a newline that is not part of the secret.
    secret = text.rstrip("\r\n")
    if not secret:
        return None, f"{what} file {path} is empty"
    return secret, None


def is_set(value: Any) -> bool:
    return value is not None and value != ""


def credential_problems(merged: dict[str, Any], from_file: set[str]) -> list[Problem]:
    """The credentials the site's vendor requires and the site lacks (its registry entry's
    rule); a secret file counts as given (its read errors are reported on their own)."""
    vendor = merged.get("vendor")
    if not isinstance(vendor, str):
        return []  # SiteConfig reports the vendor itself
    fields = {key for key in ("username", "password", "token") if is_set(merged.get(key))}
    given = given_credentials(fields | from_file, merged.get("options"))
    return [((key,), message) for key, message in missing_credentials(vendor, given)]
