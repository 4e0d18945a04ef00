"""The vendors cms-ingest speaks, each one module behind `base.VendorClient`.

Importing this package registers the built-in vendors below in `registry`, the one place
that says what a vendor is. To add a vendor: a module with an options model and a client
class taking `(VendorContext, options)`, one `Vendor` entry in `BUILT_IN` below, and a
simulator in `cms_ingest.simulators`; the config, `check-config` and the runtime need no
change.
"""

from __future__ import annotations

from cms_ingest.vendors import camstreamer, camtrace, davantis, exacq, videoloft
from cms_ingest.vendors.registry import (
    USERNAME_AND_PASSWORD,
    TokenOrOptions,
    Vendor,
    build_client,
    register,
    registered,
    supported_vendors,
    vendor_registry,
)

__all__ = [
    "BUILT_IN",
    "Vendor",
    "build_client",
    "register",
    "registered",
    "supported_vendors",
    "vendor_registry",
]

BUILT_IN: tuple[Vendor, ...] = (
    Vendor(
        name="davantis",
        client=davantis.DavantisClient,
        options=davantis.DavantisOptions,
        default_poll_interval_s=0.5,
        credentials=USERNAME_AND_PASSWORD,
        actions=davantis.DavantisClient.actions,
    ),
    Vendor(
        name="camtrace",
        client=camtrace.CamTraceClient,
        options=camtrace.CamTraceOptions,
        default_poll_interval_s=1.0,
        credentials=USERNAME_AND_PASSWORD,
        actions=camtrace.CamTraceClient.actions,
        check=camtrace.check_site,
    ),
    Vendor(
        name="videoloft",
        client=videoloft.VideoloftClient,
        options=videoloft.VideoloftOptions,
        default_poll_interval_s=1.0,
        credentials=USERNAME_AND_PASSWORD,
        actions=videoloft.VideoloftClient.actions,
    ),
    Vendor(
        name="exacq",
        client=exacq.ExacqClient,
        options=exacq.ExacqOptions,
        default_poll_interval_s=1.0,
        credentials=USERNAME_AND_PASSWORD,
        actions=exacq.ExacqClient.actions,
    ),
    Vendor(
        name="camstreamer",
        client=camstreamer.CamStreamerClient,
        options=camstreamer.CamStreamerOptions,
        # One query per poll of the account's daily budget: 10 s spends 8,640 a day.
        default_poll_interval_s=10.0,
        # An API token, or an OAuth client the daemon gets its tokens with.
        credentials=TokenOrOptions(("client_id", "client_secret")),
        actions=camstreamer.CamStreamerClient.actions,
        check=camstreamer.check_site,
    ),
)

for _vendor in BUILT_IN:
    register(_vendor)
