"""The vendor registry: one entry per vendor, carrying every fact about it.

The config loader, `check-config`, the probe and the runtime learn what a vendor is only
from its entry here: its client, options model, default poll interval, which credentials a
site needs, the checks beyond its options model, and its action kinds. So adding a vendor
means writing its module and registering one `Vendor`; nothing outside `vendors/` names it.

The built-in vendors are registered by `cms_ingest.vendors` when it is imported; tests and
plugins add their own with `register` (or `registered`, which also removes it again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cms_ingest.vendors.base import ActionSpec, SiteOptions, VendorClient, VendorContext

__all__ = [
    "NO_CREDENTIALS",
    "USERNAME_AND_PASSWORD",
    "CredentialRule",
    "GivenCredentials",
    "SiteCheck",
    "TokenOrOptions",
    "Vendor",
    "build_client",
    "register",
    "registered",
    "supported_vendors",
    "unregister",
    "vendor_registry",
]

# (options key, message) per problem a vendor finds in a site beyond its options model.
SiteCheck = Callable[[str, Mapping[str, Any]], list[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class GivenCredentials:
    """Which credentials a site's config gives, before any secret file is read (a named
    `password_file` counts as a password: its read errors are reported on their own)."""

    fields: frozenset[str]  # among "username", "password", "token": the ones set
    options: frozenset[str]  # the site's option keys set to a non-empty value


# A vendor's credential rule: (vendor name, what the site gives) -> (site key, message) per
# missing credential.
CredentialRule = Callable[[str, GivenCredentials], list[tuple[str, str]]]


def _username_and_password(vendor: str, given: GivenCredentials) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if "username" not in given.fields:
        problems.append(("username", f"{vendor} needs a username"))
    if "password" not in given.fields:
        problems.append(("password", f"{vendor} needs a password: set password or password_file"))
    return problems


def _no_credentials(vendor: str, given: GivenCredentials) -> list[tuple[str, str]]:
    return []


USERNAME_AND_PASSWORD: CredentialRule = _username_and_password
NO_CREDENTIALS: CredentialRule = _no_credentials


@dataclass(frozen=True, slots=True)
class TokenOrOptions:
    """A token, or else every one of these options (an OAuth client id and secret)."""

    options: tuple[str, ...]

    def __call__(self, vendor: str, given: GivenCredentials) -> list[tuple[str, str]]:
        if "token" in given.fields or all(key in given.options for key in self.options):
            return []
        alternative = " and ".join(f"options.{key}" for key in self.options)
        return [("token", f"{vendor} needs a token: set token or token_file, or {alternative}")]


@dataclass(frozen=True, slots=True)
class Vendor:
    """Everything cms-ingest knows about one vendor."""

    name: str  # the config's `vendor:` value, `alarms.vendor`, the metrics' `vendor` label
    client: Callable[[VendorContext, Any], VendorClient]  # built from (context, options)
    options: type[SiteOptions]  # validates a site's `options:`
    default_poll_interval_s: float  # when neither the site nor `defaults` sets poll_interval
    credentials: CredentialRule
    # Action kinds and whether each is idempotent (usually the client class's own `actions`).
    actions: Mapping[str, ActionSpec]
    # Rules beyond the options model, for check-config: (options key, message) per problem.
    check: SiteCheck | None = None

    def site_problems(self, url: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
        """What `check` finds in a site's url and options; [] for a vendor without one."""
        return self.check(url, options) if self.check is not None else []


_registry: dict[str, Vendor] = {}


def vendor_registry() -> Mapping[str, Vendor]:
    """Every registered vendor by name, in registration order (a live, read-only view)."""
    return MappingProxyType(_registry)


def supported_vendors() -> list[str]:
    return sorted(_registry)


def register(vendor: Vendor) -> Vendor:
    """Add a vendor; a name already taken is refused (two modules claiming one vendor)."""
    if vendor.name in _registry:
        raise ValueError(f"vendor {vendor.name!r} is already registered")
    _registry[vendor.name] = vendor
    return vendor


def unregister(name: str) -> None:
    _registry.pop(name, None)


@contextmanager
def registered(vendor: Vendor) -> Iterator[Vendor]:
    """The vendor registered for the duration of the block (a test's own vendor)."""
    register(vendor)
    try:
        yield vendor
    finally:
        unregister(vendor.name)


def vendor_entry(vendor: str) -> Vendor:
    """The registered vendor of that name; ValueError naming the supported ones otherwise."""
    try:
        return _registry[vendor]
    except KeyError:
        raise ValueError(
            f"vendor {vendor!r} is not supported by this build "
            f"(supported: {', '.join(supported_vendors())})"
        ) from None


def build_client(vendor: str, context: VendorContext, options: Mapping[str, Any]) -> VendorClient:
    entry = vendor_entry(vendor)
    return entry.client(context, entry.options.model_validate(options))
