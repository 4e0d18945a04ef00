"""`forwarders:` in the config: the alarm-handling software's SIA DC-09 receivers.

One entry per receiver: its primary and backup address, the account numbers, the message
format, the AES key (a secret: `aes_key` from `${ENV}`, or `aes_key_file`, which may name a
systemd credential), timings, and which alarms it gets. Messages never quote the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cms_ingest.config.paths import resolve
from cms_ingest.domain import EventType, RouteFilter
from cms_ingest.forwarding.codes import EventCode, check_cid, check_sia, code_for
from cms_ingest.forwarding.dc09 import MessageFormat, check_account, check_hex_id, parse_key

_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")


def split_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port (IPv6 in brackets), e.g. 10.0.0.5:12000")
    return host, int(port)


class CodeOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sia: Annotated[str | None, Field(default=None)] = None
    cid: str | None = None

    @field_validator("sia")
    @classmethod
    def _sia(cls, value: str | None) -> str | None:
        return None if value is None else check_sia(value)

    @field_validator("cid", mode="before")
    @classmethod
    def _cid(cls, value: Any) -> Any:
        return None if value is None else check_cid(str(value))


class ForwarderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    primary: str  # host:port
    backup: str | None = None  # host:port, used after `attempts_per_path` failures
    transport: Literal["tcp", "udp"] = "tcp"
    format: MessageFormat = MessageFormat.SIA_DCS
    account: str  # the default account number (3-16 hex digits)
    accounts: dict[str, str] = Field(default_factory=dict)  # per site id
    receiver: str = "0"  # Rxxx: hex
    line: str = "0"  # Lxxx: hex
    area: int = Field(default=1, ge=0, le=99)  # SIA area / Contact ID partition
    aes_key: SecretStr | None = None
    aes_key_file: Path | None = None  # read at load; relative to the config file
    aes_key_encoding: Literal["hex", "text"] = "hex"
    ack_timeout_s: float = Field(default=10.0, gt=0, le=120)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    attempts_per_path: int = Field(default=2, ge=1)  # failures in a row, then the other path
    max_naks: int = Field(default=3, ge=1)  # NAKs in a row for one message, then back off
    supervision_interval_s: float | None = Field(default=None, gt=0)  # NULL messages; off
    sites: list[str] | None = None  # None: every site
    event_types: list[EventType] | None = None  # None: every type
    codes: dict[EventType, CodeOverride] = Field(default_factory=dict)
    zones: dict[str, int] = Field(default_factory=dict)  # camera id -> zone number
    media_base_url: str | None = None  # link to the alarm's media: <base>/<alarm id>

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("must be 1 to 64 characters of a-z, 0-9, '_' and '-'")
        return value

    @field_validator("primary", "backup")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            split_address(value)
        return value

    @field_validator("account")
    @classmethod
    def _account(cls, value: str) -> str:
        return check_account(value)

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, value: dict[str, str]) -> dict[str, str]:
        return {site: check_account(account) for site, account in value.items()}

    @field_validator("receiver")
    @classmethod
    def _receiver(cls, value: str) -> str:
        return check_hex_id(str(value), "receiver")

    @field_validator("line")
    @classmethod
    def _line(cls, value: str) -> str:
        return check_hex_id(str(value), "line")

    @field_validator("receiver", "line", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("zones")
    @classmethod
    def _zones(cls, value: dict[str, int]) -> dict[str, int]:
        for camera, zone in value.items():
            if not 0 <= zone <= 999:
                raise ValueError(f"zone of camera {camera!r} must be 0 to 999")
        return value

    @field_validator("media_base_url")
    @classmethod
    def _media_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if len(value) > 120:  # with the alarm id it must fit in one DC-09 message
            raise ValueError("must be at most 120 characters")
        return value.rstrip("/")

    @field_validator("aes_key_file")
    @classmethod
    def _read_later(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve(value, info)

    @model_validator(mode="after")
    def _key(self) -> ForwarderConfig:
        if self.aes_key is not None and self.aes_key_file is not None:
            raise ValueError("set either aes_key or aes_key_file, not both")
        if self.aes_key_file is not None:
            try:
                text = self.aes_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise ValueError(
                    f"cannot read aes_key_file {self.aes_key_file}: {reason}"
                ) from None
            except UnicodeDecodeError:  # its message would quote a byte of the key
                raise ValueError(f"aes_key_file {self.aes_key_file} is not UTF-8 text") from None
            object.__setattr__(self, "aes_key", SecretStr(text))
            object.__setattr__(self, "aes_key_file", None)
        if self.aes_key is not None:
            parse_key(self.aes_key.get_secret_value(), self.aes_key_encoding)
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("retry_max_s must be at least retry_base_s")
        return self

    # ------------------------------------------------------------------ derived

    def key(self) -> bytes | None:
        if self.aes_key is None:
            return None
        return parse_key(self.aes_key.get_secret_value(), self.aes_key_encoding)

    def account_of(self, site_id: str) -> str:
        return self.accounts.get(site_id, self.account)

    def zone_of(self, camera_id: str | None) -> int:
        """The configured zone of the camera, else its id when it is a number, else 0."""
        if camera_id is None:
            return 0
        if camera_id in self.zones:
            return self.zones[camera_id]
        return int(camera_id) if camera_id.isdigit() and int(camera_id) <= 999 else 0

    def code_of(self, event_type: EventType) -> EventCode:
        overrides = {
            kind: {k: v for k, v in override.model_dump().items() if v is not None}
            for kind, override in self.codes.items()
        }
        return code_for(event_type, overrides)

    def route(self) -> RouteFilter:
        return RouteFilter(
            self.name,
            None if self.sites is None else frozenset(self.sites),
            None if self.event_types is None else frozenset(self.event_types),
        )


def check_forwarders(forwarders: Iterable[ForwarderConfig], site_ids: set[str]) -> None:
    """Names unique; every site a forwarder names (sites, accounts) is configured."""
    seen: set[str] = set()
    for forwarder in forwarders:
        if forwarder.name in seen:
            raise ValueError(f"duplicate forwarder name {forwarder.name!r}")
        seen.add(forwarder.name)
        named = set(forwarder.sites or []) | set(forwarder.accounts)
        unknown = sorted(named - site_ids)
        if unknown:
            raise ValueError(f"forwarder {forwarder.name!r} names unknown site(s): {unknown}")
