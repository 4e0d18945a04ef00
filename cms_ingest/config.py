"""The YAML config file: schema, loading and validation.

`load_config` turns the file into an `AppConfig` or raises `ConfigError` listing *every*
problem at once, each with the YAML path it belongs to (``sites[2].vendor``), so an installer
fixes a file in one round trip instead of one error per run.

Loading happens in steps, each working on the raw YAML tree so that one bad value never hides
another:

1. parse the YAML (duplicate keys are refused: the last one silently winning hides typos);
2. replace ``${VAR}`` references from the environment;
3. merge ``defaults`` under every site, remembering which keys were inherited so that a bad
   inherited value is reported once at ``defaults.<key>`` rather than once per site;
4. read ``password_file`` / ``token_file`` (and the top-level ``database_url_file``), check
   each vendor has its credentials and validate vendor ``options``;
5. validate every site, then the top level, with pydantic.

Secrets never reach a message: pydantic messages are used without their input, our own
messages never quote a value that may hold a secret, and the models hide input in errors.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cms_ingest.domain import EventType, default_priority

__all__ = [
    "VENDOR_DEFAULT_POLL_INTERVAL",
    "ActionsConfig",
    "AppConfig",
    "ConfigError",
    "ConfigProblem",
    "FloodConfig",
    "MediaConfig",
    "SiteConfig",
    "TlsConfig",
    "VendorName",
    "check_config",
    "load_config",
    "load_config_text",
]

Priority = Annotated[int, Field(ge=1, le=9)]

VendorName = Literal["davantis", "camtrace", "videoloft", "exacq", "camstreamer"]
VENDORS: tuple[str, ...] = get_args(VendorName)

# Seconds between polls when neither the site nor `defaults` says otherwise.
VENDOR_DEFAULT_POLL_INTERVAL: dict[str, float] = {
    "davantis": 0.5,
    "camtrace": 1.0,
    "videoloft": 1.0,
    "exacq": 1.0,
    "camstreamer": 10.0,
}

# A hold longer than a day is not a hold: the attempt deadline does not follow it further.
MAX_HOLD_S = 86400.0

# Vendors that log in with username + password; camstreamer uses a token or OAuth client.
_PASSWORD_VENDORS = frozenset({"davantis", "camtrace", "videoloft", "exacq"})

_SITE_ID_RE = re.compile(r"[a-z0-9_-]{1,64}")
_PIN_RE = re.compile(r"[0-9a-f]{64}")
_DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")

# Keys accepted in a site (and in `defaults`) that are not SiteConfig fields: they are read
# into `password` / `token` by the loader.
_SECRET_FILE_KEYS = {"password": "password_file", "token": "token_file"}
# Site keys whose mappings are merged key by key with `defaults` instead of replaced.
_MERGED_KEY_BY_KEY = ("tls", "options", "priorities")

Loc = tuple[str | int, ...]
_Problem = tuple[Loc, str]


# --------------------------------------------------------------------------- models


class _Model(BaseModel):
    # hide_input_in_errors: a ValidationError raised outside the loader (a model built in
    # code) must not print a URL or password it was given.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _base_dir(info: ValidationInfo) -> Path | None:
    """The config file's folder, passed by the loader as validation context."""
    context = info.context
    if isinstance(context, Mapping):
        base = context.get("base_dir")
        if isinstance(base, Path):
            return base
    return None


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Relative paths in the file mean "next to the config file", not the daemon's cwd."""
    base = _base_dir(info)
    path = path.expanduser()
    if base is not None and not path.is_absolute():
        return base / path
    return path


def _empty_mapping_if_none(value: Any) -> Any:
    # `tls:` or `options:` with nothing after it is YAML null; the installer meant "defaults".
    return {} if value is None else value


class TlsConfig(_Model):
    verify: bool = True
    ca_file: Path | None = None
    pin_sha256: str | None = None

    @field_validator("ca_file")
    @classmethod
    def _ca_file_readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _resolve(value, info)
        try:
            path.open("rb").close()
        except OSError as exc:
            raise ValueError(f"cannot read CA file {path}: {exc.strerror or exc}") from None
        return path

    @field_validator("pin_sha256")
    @classmethod
    def _normalize_pin(cls, value: str | None) -> str | None:
        # Browsers and openssl print fingerprints as AB:CD:...; accept those as pasted.
        if value is None:
            return None
        pin = value.strip().replace(":", "").lower()
        if not _PIN_RE.fullmatch(pin):
            raise ValueError(
                "must be the SHA-256 of the DER certificate: 64 hex digits, colons allowed"
            )
        return pin


def _check_site_url(value: str) -> str:
    """Validate a device base URL; messages never quote it (it may embed a password)."""
    url = value.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError(
            "must not contain a user name or password; set username and password instead"
        )
    if not parts.hostname:
        raise ValueError("must include a host")
    try:
        parts.port  # noqa: B018 - evaluated for its ValueError on a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if "?" in url or "#" in url:
        raise ValueError("must not have a query (?...) or fragment (#...)")
    # Clients join paths onto it; a trailing "/" would give "//path".
    return url.rstrip("/")


class SiteConfig(_Model):
    id: str
    name: str = ""  # filled with `id` when not given
    vendor: VendorName
    url: str
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    # Always set after validation: the site's value, else `defaults`, else the vendor's.
    poll_interval: float = Field(default=1.0, gt=0)
    supervision_timeout: float = Field(default=60.0, gt=0)
    media_deadline_s: float | None = Field(default=None, gt=0)  # None: media.deadline_s
    request_timeout_s: float = Field(default=10.0, gt=0)  # per HTTP request to the device
    # The longest one poll (paging, logins included) may run; None: `poll_deadline()`'s rule.
    poll_deadline_s: float | None = Field(default=None, gt=0)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    options: dict[str, Any] = Field(default_factory=dict)
    # Alarm priority (1 most urgent .. 9) by event type, over the built-in CMS defaults;
    # `defaults.priorities` and the site's are merged key by key; cameras override both.
    priorities: dict[EventType, Priority] = Field(default_factory=dict)
    camera_priorities: dict[str, dict[EventType, Priority]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fill_derived_defaults(cls, data: Any) -> Any:
        # name and poll_interval default to other fields' values, which Field() cannot express.
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if data.get("name") is None and isinstance(data.get("id"), str):
            data["name"] = data["id"]
        vendor = data.get("vendor")
        known = isinstance(vendor, str) and vendor in VENDOR_DEFAULT_POLL_INTERVAL
        if data.get("poll_interval") is None and known:
            data["poll_interval"] = VENDOR_DEFAULT_POLL_INTERVAL[vendor]
        return data

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        # The id becomes alarms.site_id and a metrics label: keep it boring and stable.
        if not _SITE_ID_RE.fullmatch(value):
            raise ValueError("must be 1 to 64 characters of a-z, 0-9, '_' and '-'")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_site_url(value)

    @field_validator("tls", "options", "priorities", "camera_priorities", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return _empty_mapping_if_none(value)

    def poll_deadline(self) -> float:
        """Seconds one poll may take before it counts as failed (outcome `timeout`): the
        configured `poll_deadline_s`, else room for a few slow requests and for a vendor
        that spaces its requests over the interval, never under 30 s."""
        if self.poll_deadline_s is not None:
            return self.poll_deadline_s
        return max(30.0, 3 * self.request_timeout_s, 2 * self.poll_interval)

    def priority(self, event_type: EventType, camera_id: str | None) -> int:
        """The camera's override, else the site's (with defaults), else the CMS default."""
        camera = self.camera_priorities.get(camera_id or "", {})
        if event_type in camera:
            return camera[event_type]
        return self.priorities.get(event_type, default_priority(event_type))

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # Vendor options may hold secrets (camstreamer's client_secret) as plain strings when
        # the vendor has no options model; keep them out of logs.
        for name, value in super().__repr_args__():
            if name == "options" and isinstance(value, dict):
                yield name, {key: _mask_option(key, item) for key, item in value.items()}
            else:
                yield name, value


_SECRET_OPTION_RE = re.compile(r"secret|password|token|key", re.IGNORECASE)


def _mask_option(key: Any, value: Any) -> Any:
    if isinstance(value, str) and _SECRET_OPTION_RE.search(str(key)):
        return "**********"
    return value


class MediaConfig(_Model):
    max_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    workers: int = Field(default=4, ge=1, le=64)
    deadline_s: float = Field(default=600.0, gt=0)
    retry_base_s: float = Field(default=2.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    # One look at where a media file stands, and one download: a device that stops answering
    # mid-way frees the worker after this (the row is retried until `deadline_s`).
    probe_timeout_s: float = Field(default=30.0, gt=0)
    download_timeout_s: float = Field(default=300.0, gt=0)

    @field_validator("retry_max_s")
    @classmethod
    def _max_not_below_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("retry_base_s")
        if base is not None and value < base:
            raise ValueError(f"must be at least retry_base_s ({base})")
        return value


class FloodConfig(_Model):
    """A camera firing far above normal: its alarms beyond the limit are grouped."""

    max_per_minute: int = Field(default=20, ge=1)  # per site and camera
    quiet_s: float = Field(default=60.0, gt=0)  # the burst ends after this long without alarms
    fetch_media: bool = False  # media of grouped alarms (the burst's first alarm always gets it)


class ActionsConfig(_Model):
    workers: int = Field(default=4, ge=1, le=64)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    running_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # One attempt may run this long, plus its own `params.duration_s` (a hold); then its
    # outcome is unknown: retried only when the kind is idempotent.
    attempt_timeout_s: float = Field(default=60.0, gt=0)

    def attempt_deadline(self, params: Mapping[str, Any]) -> float:
        """Seconds an attempt of an action with these params may run."""
        return self.attempt_timeout_s + _hold_seconds(params.get("duration_s"))


def _hold_seconds(duration: Any) -> float:
    """An action's `params.duration_s` as seconds to allow for, 0 when it is not a number
    (the vendor refuses such an action itself)."""
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        return 0.0
    try:
        seconds = float(duration)
    except OverflowError:  # an integer too large for a float
        return MAX_HOLD_S
    return min(max(seconds, 0.0), MAX_HOLD_S) if math.isfinite(seconds) else 0.0


def _check_database_hosts(url: str) -> None:
    """The host list and ports parse as the daemon will parse them (several hosts too)."""
    from cms_ingest.db.engine import async_url  # the one parser; SQLAlchemy only when needed

    try:
        async_url(url)
    except ValueError as exc:
        message = str(exc)
        # Our parser's messages name hosts and ports only; anything else may quote the URL.
        if message.startswith(("database URL:", "not a PostgreSQL URL")):
            raise ValueError(message) from None
        raise ValueError("is not a valid URL (check the host list and ports)") from None
    except Exception:
        raise ValueError("is not a valid URL (check the host list and ports)") from None


def _split_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; the host is returned without brackets."""
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise ValueError("must be host:port, with IPv6 hosts in brackets: [::1]:9108")
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9108")
        if ":" in host:
            raise ValueError("IPv6 hosts need brackets: [::1]:9108")
    if not host:
        raise ValueError("needs a host, e.g. 0.0.0.0:9108 to listen on every interface")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError("port must be a number from 0 to 65535")
    return host, int(port_text)


class AppConfig(_Model):
    database_url: SecretStr | None = None  # None: embedded PostgreSQL under data_dir
    data_dir: Path = Path("/var/lib/cms-ingest")
    listen: str = "127.0.0.1:9108"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    media: MediaConfig = Field(default_factory=MediaConfig)
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    flood: FloodConfig = Field(default_factory=FloodConfig)
    # Several daemons may share one database and this config: each site is polled by the
    # one holding its lease, renewed every lease_ttl/3; a dead daemon's sites move after this.
    lease_ttl: float = Field(default=15.0, ge=3.0, le=300.0)  # seconds
    # This daemon's name in leases and `cms-ingest status`; default: hostname and pid.
    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:@-]{1,100}$")
    sites: list[SiteConfig] = Field(min_length=1)
    # Where the config was loaded from; set by load_config, never read from the YAML.
    config_path: Path | None = Field(default=None, exclude=True)

    @field_validator("database_url", mode="before")
    @classmethod
    def _empty_url_is_none(cls, value: Any) -> Any:
        # Lets `database_url: ${DATABASE_URL:-}` mean "embedded unless the env says otherwise".
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value()
        scheme = urlsplit(text).scheme
        if scheme not in _DATABASE_SCHEMES:
            # The scheme alone is safe to show; the rest may carry a password. Only a value that
            # looks like a URL has one: in "pass:word" (a password put where the URL belongs,
            # e.g. in database_url_file) urlsplit's "scheme" is part of the password.
            shown = f" (got {scheme}://)" if scheme and f"{scheme}://" in text else ""
            raise ValueError(
                "must be a PostgreSQL URL: postgresql://, postgres:// or "
                f"postgresql+asyncpg://{shown}"
            )
        _check_database_hosts(text)
        return value

    @field_validator("data_dir")
    @classmethod
    def _resolve_data_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        _split_listen(value)
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("media", "actions", "flood", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return _empty_mapping_if_none(value)

    @field_validator("sites")
    @classmethod
    def _unique_ids(cls, sites: list[SiteConfig]) -> list[SiteConfig]:
        seen: set[str] = set()
        for site in sites:
            if site.id in seen:
                raise ValueError(f"duplicate site id {site.id!r}")
            seen.add(site.id)
        return sites

    @property
    def listen_host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _split_listen(self.listen)[1]

    def site(self, site_id: str) -> SiteConfig:
        for site in self.sites:
            if site.id == site_id:
                return site
        known = ", ".join(site.id for site in self.sites)
        raise KeyError(f"no site with id {site_id!r} in the config (sites: {known})")


# --------------------------------------------------------------------------- problems


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


def _format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _loc_sort_key(problem: _Problem) -> tuple[tuple[int, int | str], ...]:
    # Natural order: sites[2] before sites[10]; file-level problems (empty loc) first.
    return tuple((0, part) if isinstance(part, int) else (1, part) for part in problem[0])


def _to_config_problems(problems: Iterable[_Problem]) -> list[ConfigProblem]:
    unique = list(dict.fromkeys(problems))  # an inherited problem comes once per site
    unique.sort(key=_loc_sort_key)
    return [ConfigProblem(_format_loc(loc), message) for loc, message in unique]


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


def _unknown_key_message(key: str, allowed: Iterable[str]) -> str:
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
        return _unknown_key_message(str(loc[-1]), allowed)
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


def _pydantic_problems(
    exc: ValidationError, root: type[BaseModel], extra_keys: Iterable[str] = ()
) -> list[_Problem]:
    extra = list(extra_keys)
    return [
        (tuple(error["loc"]), _error_message(error, root, extra))
        for error in exc.errors(include_url=False)
    ]


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
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


def _yaml_error_message(exc: yaml.YAMLError) -> str:
    # Built from parts, not str(exc): that quotes the offending line, which may hold a secret.
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = "; ".join(part for part in (exc.context, exc.problem) if part)
        return f"invalid YAML{where}: {detail or 'syntax error'}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"invalid YAML: {exc.reason} at byte {exc.position}"
    return "invalid YAML"


# --------------------------------------------------------------------------- ${VAR}

# `$${` first so that it wins over the `${` inside it; a lone `${` is an unterminated reference.
_REF_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_REF_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


@dataclass
class _Interpolator:
    environ: Mapping[str, str]
    problems: list[_Problem] = field(default_factory=list)
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


# systemd sets it for a unit with LoadCredential=: `password_file: ${CREDENTIALS_DIRECTORY}/x`.
_CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"


def _unset_variable_message(name: str) -> str:
    if name == _CREDENTIALS_VARIABLE:
        # Unset means "not started by systemd with credentials", not a typo in a variable.
        return (
            "systemd credentials are not available: start the daemon with LoadCredential= "
            f"or use another secret source ({name} is not set)"
        )
    return f"environment variable {name} is not set"


def _under_any(loc: Loc, prefixes: Iterable[Loc]) -> bool:
    return any(loc[: len(prefix)] == prefix for prefix in prefixes)


# --------------------------------------------------------------------------- sites


@dataclass
class _Loader:
    base_dir: Path
    options_models: Mapping[str, type[BaseModel]]
    problems: list[_Problem] = field(default_factory=list)
    # The environment `${VAR}` was read from: tells a missing systemd credential apart.
    environ: Mapping[str, str] = field(default_factory=dict)

    @property
    def context(self) -> dict[str, Any]:
        return {"base_dir": self.base_dir}

    def read_secret(self, file_value: str, what: str) -> tuple[str | None, str | None]:
        """(secret, None) or (None, error); the error names the file, never its content."""
        path = self.base_dir / Path(file_value).expanduser()
        value, error = _read_secret_file(path, what)
        credentials = self.environ.get(_CREDENTIALS_VARIABLE)
        in_credentials = bool(credentials) and path.parent == Path(str(credentials))
        if error is not None and in_credentials and _file_missing(path):
            error += (
                f" (the unit loads no credential named {path.name!r}: add "
                f"LoadCredential={path.name}:/path/to/file to it)"
            )
        return value, error

    def database_url_file(self, top: dict[str, Any]) -> bool:
        """Replace a top-level database_url_file in `top` by the URL the file holds (a Docker
        secret, a systemd credential); True when it did."""
        loc: Loc = ("database_url_file",)
        file_value = top.pop("database_url_file", None)
        if file_value is None or file_value == "":  # `${DATABASE_URL_FILE:-}`: not given
            return False
        if _is_set(top.get("database_url")):
            self.problems.append((loc, "set either database_url or database_url_file, not both"))
            return False
        if not isinstance(file_value, str):
            self.problems.append((loc, "must be a file path"))
            return False
        url, error = self.read_secret(file_value, "database_url")
        if error is not None:
            self.problems.append((loc, error))
            return False
        top["database_url"] = url
        return True

    def defaults(self, raw: Any) -> dict[str, Any]:
        """The usable part of `defaults`; problems with its keys are reported here."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append((("defaults",), "must be a mapping of site keys"))
            return {}
        allowed = [key for key in SiteConfig.model_fields if key != "id"]
        allowed += list(_SECRET_FILE_KEYS.values())
        usable: dict[str, Any] = {}
        for key, value in raw.items():
            loc: Loc = ("defaults", str(key))
            if key == "id":
                self.problems.append((loc, "cannot be set in defaults: every site needs its own"))
            elif key not in allowed:
                self.problems.append((loc, _unknown_key_message(str(key), allowed)))
            elif key in _MERGED_KEY_BY_KEY and value is not None and not isinstance(value, dict):
                self.problems.append((loc, "must be a mapping"))
            else:
                usable[key] = value
        return usable

    def sites(self, raw: Any, defaults: dict[str, Any]) -> list[SiteConfig]:
        if raw is None or raw == []:
            self.problems.append((("sites",), "at least one site is required"))
            return []
        if not isinstance(raw, list):
            self.problems.append((("sites",), "must be a list of sites (each one '- id: ...')"))
            return []
        loaded: list[SiteConfig] = []
        first_index: dict[str, int] = {}
        for index, raw_site in enumerate(raw):
            if not isinstance(raw_site, dict):
                self.problems.append((("sites", index), "each site must be a mapping"))
                continue
            site_id = raw_site.get("id")
            if isinstance(site_id, str):
                if site_id in first_index:
                    first = first_index[site_id]
                    message = f"duplicate site id {site_id!r} (already sites[{first}])"
                    self.problems.append((("sites", index, "id"), message))
                else:
                    first_index[site_id] = index
            site = self.site(index, raw_site, defaults)
            if site is not None:
                loaded.append(site)
        return loaded

    def site(self, index: int, raw: dict[str, Any], defaults: dict[str, Any]) -> SiteConfig | None:
        merged, inherited = _merge_site(defaults, raw)
        from_file = {secret for secret, key in _SECRET_FILE_KEYS.items() if merged.get(key)}
        problems = self.secret_files(merged, inherited)
        problems += _missing_credentials(merged, from_file)
        problems += self.options(merged)
        site: SiteConfig | None = None
        try:
            site = SiteConfig.model_validate(merged, context=self.context)
        except ValidationError as exc:
            problems += _pydantic_problems(exc, SiteConfig, _SECRET_FILE_KEYS.values())
        for loc, message in problems:
            self.problems.append((_origin(loc, index, inherited), message))
        return site if not problems else None

    def secret_files(self, merged: dict[str, Any], inherited: set[Loc]) -> list[_Problem]:
        """Replace password_file / token_file in `merged` by the secret they hold."""
        problems: list[_Problem] = []
        for secret, file_key in _SECRET_FILE_KEYS.items():
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
            value, error = self.read_secret(file_value, secret)
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

    def options(self, merged: dict[str, Any]) -> list[_Problem]:
        """Validate `options` with the vendor's model and store it back with defaults filled."""
        model = self.options_models.get(str(merged.get("vendor")))
        options = _empty_mapping_if_none(merged.get("options"))
        if model is None or not isinstance(options, dict):
            return []  # no model for this vendor; a non-mapping is SiteConfig's to report
        try:
            merged["options"] = model.model_validate(options).model_dump()
        except ValidationError as exc:
            return [(("options", *loc), msg) for loc, msg in _pydantic_problems(exc, model)]
        return []


def _merge_site(defaults: dict[str, Any], site: dict[str, Any]) -> tuple[dict[str, Any], set[Loc]]:
    """Merge `defaults` under a site; also return the locs whose values came from defaults."""
    merged = dict(defaults)
    inherited: set[Loc] = {(key,) for key in defaults}
    for key, value in site.items():
        base = merged.get(key)
        if key in _MERGED_KEY_BY_KEY and isinstance(value, dict) and isinstance(base, dict):
            merged[key] = {**base, **value}
            inherited |= {(key, sub) for sub in base if sub not in value}
        else:
            merged[key] = value
        inherited.discard((key,))
    return merged, inherited


def _origin(loc: Loc, index: int, inherited: set[Loc]) -> Loc:
    """Where in the file a site-relative loc was written: the site or `defaults`."""
    if loc[:1] in inherited or loc[:2] in inherited:
        return ("defaults", *loc)
    return ("sites", index, *loc)


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


def _is_set(value: Any) -> bool:
    return value is not None and value != ""


def _missing_credentials(merged: dict[str, Any], from_file: set[str]) -> list[_Problem]:
    """Each vendor's required credentials; a secret file counts as given (read errors apart)."""
    vendor = merged.get("vendor")
    if not isinstance(vendor, str):
        return []  # SiteConfig reports the vendor itself

    def given(secret: str) -> bool:
        return secret in from_file or _is_set(merged.get(secret))

    problems: list[_Problem] = []
    if vendor in _PASSWORD_VENDORS:
        if not _is_set(merged.get("username")):
            problems.append((("username",), f"{vendor} needs a username"))
        if not given("password"):
            problems.append(
                (("password",), f"{vendor} needs a password: set password or password_file")
            )
    elif vendor == "camstreamer" and not given("token"):
        options = merged.get("options")
        client = isinstance(options, dict) and all(
            _is_set(options.get(key)) for key in ("client_id", "client_secret")
        )
        if not client:
            problems.append(
                (
                    ("token",),
                    "camstreamer needs a token: set token or token_file, "
                    "or options.client_id and options.client_secret",
                )
            )
    return problems


# --------------------------------------------------------------------------- entry points


def _default_options_models() -> Mapping[str, type[BaseModel]]:
    # Lazy: the vendor modules are heavier than the config and not needed to parse it.
    from cms_ingest.vendors import OPTIONS_MODELS

    return OPTIONS_MODELS


def load_config_text(
    text: str,
    *,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
    options_models: Mapping[str, type[BaseModel]] | None = None,
    source: str = "<config>",
) -> AppConfig:
    """Parse and validate config text; relative paths are relative to `base_dir`.

    Raises ConfigError listing every problem; `source` names the text in its message.
    """
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem("", _yaml_error_message(exc))], source) from None
    if raw is None:
        raw = {}  # an empty file: reported below as "no sites"
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem("", "the top level must be a mapping of keys")], source)

    interpolator = _Interpolator(os.environ if environ is None else environ)
    try:
        raw = interpolator.tree(raw, ())
    except RecursionError:  # `x: &x [*x]`: YAML allows an alias inside itself
        raise ConfigError([ConfigProblem("", "invalid YAML: a recursive alias")], source) from None
    if options_models is None:
        options_models = _default_options_models()
    loader = _Loader(base_dir, options_models, environ=interpolator.environ)
    sites = loader.sites(raw.get("sites"), loader.defaults(raw.get("defaults")))

    top = {key: value for key, value in raw.items() if key not in ("defaults", "sites")}
    if "config_path" in top:  # a field, but set by load_config, not by the file
        del top["config_path"]
        loader.problems.append((("config_path",), "unknown key 'config_path'"))
    url_from_file = loader.database_url_file(top)
    config: AppConfig | None = None
    try:
        config = AppConfig.model_validate({**top, "sites": sites}, context=loader.context)
    except ValidationError as exc:
        loader.problems += [
            # A bad URL read from database_url_file is reported where the file was named.
            (("database_url_file", *loc[1:]), message)
            if url_from_file and loc[:1] == ("database_url",)
            else (loc, message)
            for loc, message in _pydantic_problems(
                exc, AppConfig, ["defaults", "database_url_file"]
            )
            if loc[:1] != ("sites",)  # the sites were reported one by one above
        ]

    problems = [
        problem for problem in loader.problems if not _under_any(problem[0], interpolator.failed)
    ]
    problems += interpolator.problems
    if problems or config is None:
        raise ConfigError(_to_config_problems(problems), source)
    return config


def load_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    options_models: Mapping[str, type[BaseModel]] | None = None,
) -> AppConfig:
    """Load the config file at `path`; raises ConfigError listing every problem."""
    config_path = Path(path).expanduser().absolute()
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = ConfigProblem("", f"cannot read the config file: {exc.strerror or exc}")
        raise ConfigError([problem], str(path)) from None
    except UnicodeDecodeError:
        problem = ConfigProblem("", "the config file is not UTF-8 text")
        raise ConfigError([problem], str(path)) from None
    config = load_config_text(
        text,
        base_dir=config_path.parent,
        environ=environ,
        options_models=options_models,
        source=str(path),
    )
    return config.model_copy(update={"config_path": config_path})


def check_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    options_models: Mapping[str, type[BaseModel]] | None = None,
) -> list[ConfigProblem]:
    """Every problem in the config file at `path`; [] when it is valid."""
    try:
        load_config(path, environ=environ, options_models=options_models)
    except ConfigError as exc:
        return exc.problems
    return []
