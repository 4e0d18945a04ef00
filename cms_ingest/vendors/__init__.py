"""The vendors cms-ingest speaks, each one module behind `base.VendorClient`.

To add a vendor: a module with an options model and a client class taking
`(VendorContext, options)`, one entry in `VENDORS` below, and a simulator in
`cms_ingest.simulators`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cms_ingest.vendors import camstreamer, camtrace, davantis, exacq, videoloft
from cms_ingest.vendors.base import SiteOptions, VendorClient, VendorContext

SiteCheck = Callable[[str, Mapping[str, Any]], list[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class Vendor:
    client: Callable[[VendorContext, Any], VendorClient]
    options: type[SiteOptions]
    # Rules beyond the options model, for check-config: (options key, message) per problem.
    check: SiteCheck | None = None


VENDORS: Mapping[str, Vendor] = {
    "davantis": Vendor(davantis.DavantisClient, davantis.DavantisOptions),
    "camtrace": Vendor(camtrace.CamTraceClient, camtrace.CamTraceOptions, camtrace.check_site),
    "videoloft": Vendor(videoloft.VideoloftClient, videoloft.VideoloftOptions),
    "exacq": Vendor(exacq.ExacqClient, exacq.ExacqOptions),
    "camstreamer": Vendor(
        camstreamer.CamStreamerClient, camstreamer.CamStreamerOptions, camstreamer.check_site
    ),
}

# What the config loader validates each site's `options` with.
OPTIONS_MODELS: Mapping[str, type[SiteOptions]] = {name: v.options for name, v in VENDORS.items()}
SITE_CHECKS: Mapping[str, SiteCheck] = {
    name: v.check for name, v in VENDORS.items() if v.check is not None
}


def supported_vendors() -> list[str]:
    return sorted(VENDORS)


def build_client(vendor: str, context: VendorContext, options: Mapping[str, Any]) -> VendorClient:
    try:
        spec = VENDORS[vendor]
    except KeyError:
        raise ValueError(
            f"vendor {vendor!r} is not supported by this build "
            f"(supported: {', '.join(supported_vendors())})"
        ) from None
    return spec.client(context, spec.options.model_validate(options))
