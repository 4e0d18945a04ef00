"""What a site's HTTP exchange can come out as: a whole small answer, or one of these errors.

Shared by `sitehttp` (the site's rules, on aiohttp) and `leanhttp` (its lean keep-alive
path for small GETs), so both raise the same exceptions and callers handle one set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from multidict import CIMultiDictProxy


class TransportError(Exception):
    """The device could not be talked to. `sent` says whether the request may have reached it."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class DeviceUnreachable(TransportError):
    pass


class DeviceTimeout(DeviceUnreachable):
    pass


class TlsFailure(TransportError):
    """Certificate verification or pin check failed: a configuration or security problem."""


class UnsafeUrl(TransportError):
    """A request refused before anything is sent: a URL outside the configured site's origin,
    or a URL or header that does not even form a valid request (device-supplied values)."""


class ResponseTooLarge(DeviceUnreachable):
    """The device answered, with more than the caller accepts: the rest is not read."""


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    verify: bool = True
    ca_file: Path | None = None
    pin_sha256: str | None = None  # lowercase hex of the DER certificate's SHA-256


@dataclass(frozen=True, slots=True)
class Answer:
    """A device's whole answer to one request, its body read within the caller's cap
    (decompressed when the device compressed it)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
