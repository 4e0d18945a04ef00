"""Videoloft cloud accounts: the client (`client.VideoloftClient`) and its options, with the
names other modules and tests use from here."""

from cms_ingest.vendors.videoloft.alerts import VlAlert, normalize_alert
from cms_ingest.vendors.videoloft.auth import token_lifetime
from cms_ingest.vendors.videoloft.catchup import CATCH_UP_WAIT_S
from cms_ingest.vendors.videoloft.client import VideoloftClient
from cms_ingest.vendors.videoloft.decoder import StreamDecoder
from cms_ingest.vendors.videoloft.options import VENDOR, VideoloftOptions

__all__ = [
    "CATCH_UP_WAIT_S",
    "VENDOR",
    "StreamDecoder",
    "VideoloftClient",
    "VideoloftOptions",
    "VlAlert",
    "normalize_alert",
    "token_lifetime",
]
