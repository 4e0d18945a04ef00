"""Kept so that `from cms_ingest.configcheck import ...` still works: the complete check of a
config file now lives in `cms_ingest.config.checked`."""

from __future__ import annotations

from cms_ingest.config.checked import load_checked, vendor_problems

__all__ = ["load_checked", "vendor_problems"]
