"""What the config knows about vendors: only what their registry entries say.

No vendor is named in the config package. The registry is imported on first use, not with
the config: the vendor modules are heavier than the config, and are only needed once a site
is validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from cms_ingest.vendors.registry import GivenCredentials, Vendor


def vendor_registry() -> Mapping[str, Vendor]:
    from cms_ingest.vendors import vendor_registry as registry  # registers the built-ins

    return registry()


def valid_vendor(value: Any) -> str:
    """A registered vendor's name; otherwise the error a `Literal` of the names would give,
    so the message lists every vendor (and echoes a typo) as before."""
    names = list(vendor_registry())
    if isinstance(value, str) and value in names:
        return value
    quoted = [repr(name) for name in names]
    expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


def default_poll_interval(vendor: Any) -> float | None:
    """The vendor's own poll interval; None for a value that is no registered vendor."""
    entry = vendor_registry().get(vendor) if isinstance(vendor, str) else None
    return entry.default_poll_interval_s if entry is not None else None


def options_models() -> Mapping[str, type[BaseModel]]:
    """Each vendor's options model by name, as the loader validates `options:` with."""
    return {name: entry.options for name, entry in vendor_registry().items()}


def missing_credentials(vendor: str, given: GivenCredentials) -> list[tuple[str, str]]:
    """(site key, message) per credential the vendor needs and the site does not give."""
    entry = vendor_registry().get(vendor)
    return entry.credentials(vendor, given) if entry is not None else []


def given_credentials(fields: set[str], options: Any) -> GivenCredentials:
    from cms_ingest.vendors.registry import GivenCredentials

    set_options = (
        frozenset(key for key, value in options.items() if value is not None and value != "")
        if isinstance(options, dict)
        else frozenset()
    )
    return GivenCredentials(frozenset(fields), set_options)
