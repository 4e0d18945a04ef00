"""The config's schema: the validated, frozen models the rest of the daemon reads.

`AppConfig` is the whole file, `SiteConfig` one guarded site. Validators here check single
values; what needs the whole file (defaults, secret files, vendor options) is the loader's.
Models hide their input in errors: a model built in code must not print a URL or password.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cms_ingest.config.forwarders import ForwarderConfig, check_forwarders
from cms_ingest.config.paths import resolve
from cms_ingest.config.vendor_facts import default_poll_interval, valid_vendor
from cms_ingest.domain import EventType, default_priority
from cms_ingest.eventloop import DEFAULT_EVENT_LOOP, EventLoopKind

Priority = Annotated[int, Field(ge=1, le=9)]

# A hold longer than a day is not a hold: the attempt deadline does not follow it further.
MAX_HOLD_S = 86400.0

_SITE_ID_RE = re.compile(r"[a-z0-9_-]{1,64}")
_PIN_RE = re.compile(r"[0-9a-f]{64}")
_DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")


class _Model(BaseModel):
    # hide_input_in_errors: a ValidationError raised outside the loader (a model built in
    # code) must not print a URL or password it was given.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    def model_post_init(self, context: Any, /) -> None:
        """Models with the same fields set share one set: ~0.7 KiB of every site's config
        (10,000 sites: 7 MiB of equal sets). Safe because the models are frozen: pydantic
        changes a model's set only on assignment, and copies it for `model_copy`."""
        fields = self.__pydantic_fields_set__
        shared = _FIELDS_SETS.setdefault(frozenset(fields), fields)
        if shared is not fields:
            object.__setattr__(self, "__pydantic_fields_set__", shared)


# One set per combination of fields given (few: a config's sites are written alike).
_FIELDS_SETS: dict[frozenset[str], set[str]] = {}
# One TlsConfig per distinct setting: thousands of sites have the default or a few CAs.
_TLS_CONFIGS: dict[TlsConfig, TlsConfig] = {}


def empty_mapping_if_none(value: Any) -> Any:
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
        path = resolve(value, info)
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
    vendor: Annotated[str, BeforeValidator(valid_vendor)]  # a registered vendor's name
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
        if data.get("poll_interval") is None:
            vendor_default = default_poll_interval(data.get("vendor"))
            if vendor_default is not None:
                data["poll_interval"] = vendor_default
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
        return empty_mapping_if_none(value)

    @field_validator("tls")
    @classmethod
    def _shared_tls(cls, value: TlsConfig) -> TlsConfig:
        """Equal TLS settings are one object (each was ~0.45 KiB of a site's config)."""
        return _TLS_CONFIGS.setdefault(value, value)

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
        # Vendor options may hold secrets (an OAuth client_secret) as plain strings when
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
    # A running attempt's claim on its row, renewed every third of it while the attempt
    # runs: when the daemon running it dies, the site's next holder settles the row by
    # rule once the claim ran out (about one lease period).
    running_timeout_s: float = Field(default=10.0, ge=1.0)
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
    # uvloop carries the idle polls of thousands of sites on far less CPU (cms_ingest/eventloop.py);
    # "asyncio" runs on the standard library's loop (debugging, or where uvloop does not build).
    event_loop: EventLoopKind = DEFAULT_EVENT_LOOP
    media: MediaConfig = Field(default_factory=MediaConfig)
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    flood: FloodConfig = Field(default_factory=FloodConfig)
    # Several daemons may share one database and this config: each site is polled by the
    # one holding its lease, renewed every lease_ttl/3; a dead daemon's sites move after this.
    lease_ttl: float = Field(default=15.0, ge=3.0, le=300.0)  # seconds
    # This daemon's name in leases and `cms-ingest status`; default: hostname and pid.
    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:@-]{1,100}$")
    sites: list[SiteConfig] = Field(min_length=1)
    # SIA DC-09 receivers every alarm is delivered to (exactly once, in order).
    forwarders: list[ForwarderConfig] = Field(default_factory=list)
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
        return resolve(value, info)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        _split_listen(value)
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("forwarders", mode="before")
    @classmethod
    def _null_is_no_forwarders(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("media", "actions", "flood", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return empty_mapping_if_none(value)

    @field_validator("sites")
    @classmethod
    def _unique_ids(cls, sites: list[SiteConfig]) -> list[SiteConfig]:
        seen: set[str] = set()
        for site in sites:
            if site.id in seen:
                raise ValueError(f"duplicate site id {site.id!r}")
            seen.add(site.id)
        return sites

    @model_validator(mode="after")
    def _forwarders_name_sites(self) -> AppConfig:
        check_forwarders(self.forwarders, {site.id for site in self.sites})
        return self

    def forwarder(self, name: str) -> ForwarderConfig:
        for forwarder in self.forwarders:
            if forwarder.name == name:
                return forwarder
        known = ", ".join(f.name for f in self.forwarders) or "none"
        raise KeyError(f"no forwarder named {name!r} in the config (forwarders: {known})")

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
