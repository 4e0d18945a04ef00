"""The vendors cms-ingest speaks, each one module behind `base.VendorClient`.

To add a vendor: a module with an options model and a `build(...)` returning a VendorClient,
registered in both tables below, and a simulator in `cms_ingest.simulators`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from cms_ingest.vendors import camstreamer, camtrace, davantis, exacq, videoloft
from cms_ingest.vendors.base import VendorClient

OPTIONS_MODELS: Mapping[str, type[BaseModel]] = {
    "davantis": davantis.DavantisOptions,
    "camtrace": camtrace.CamTraceOptions,
    "videoloft": videoloft.VideoloftOptions,
    "exacq": exacq.ExacqOptions,
    "camstreamer": camstreamer.CamStreamerOptions,
}

BUILDERS: Mapping[str, Callable[..., VendorClient]] = {
    "davantis": davantis.build,
    "camtrace": camtrace.build,
    "videoloft": videoloft.build,
    "exacq": exacq.build,
    "camstreamer": camstreamer.build,
}


# Optional per-vendor checks of a site beyond its options model: (options key, message).
SITE_CHECKS: Mapping[str, Callable[[str, Mapping[str, Any]], list[tuple[str, str]]]] = {
    "camtrace": camtrace.check_site,
    "camstreamer": camstreamer.check_site,
}


def supported_vendors() -> list[str]:
    return sorted(BUILDERS)


def build_client(vendor: str, **kwargs: Any) -> VendorClient:
    try:
        builder = BUILDERS[vendor]
    except KeyError:
        raise ValueError(
            f"vendor {vendor!r} is not supported by this build "
            f"(supported: {', '.join(supported_vendors())})"
        ) from None
    return builder(**kwargs)
