"""The site registry as a daemon builds it: what each site holds is its own, and what sites
can share (their vendor options, frozen models) is shared."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cms_ingest.runtime import sites as sites_module
from cms_ingest.runtime.sites import SHARED_OPTIONS_MAX, shared_options
from cms_ingest.vendors.davantis import DavantisOptions
from tests.support import app_config, camtrace_site, davantis_site, site_registry


async def test_sites_with_equal_options_share_one_model(tmp_path: Path) -> None:
    sites = [
        davantis_site("plain-1", "http://127.0.0.1:9"),
        davantis_site("plain-2", "http://127.0.0.1:9"),
        davantis_site("capped-1", "http://127.0.0.1:9", options={"page_cap": 50}),
        davantis_site("capped-2", "http://127.0.0.1:9", options={"page_cap": 50}),
        davantis_site("zoned", "http://127.0.0.1:9", options={"time_zone": "Europe/Madrid"}),
        camtrace_site("other-vendor", "http://127.0.0.1:9"),
    ]
    config = app_config("postgresql://nobody@127.0.0.1:9/none", tmp_path, sites)
    async with site_registry(config) as registry:
        options = {site.config.id: site.options for site in registry}
        clients = {id(site.client) for site in registry}
    assert options["plain-1"] is options["plain-2"]
    assert options["capped-1"] is options["capped-2"]
    assert isinstance(options["capped-1"], DavantisOptions) and options["capped-1"].page_cap == 50
    assert options["plain-1"].page_cap == 300
    assert options["zoned"] is not options["plain-1"] and options["zoned"].time_zone
    assert type(options["other-vendor"]) is not DavantisOptions
    assert len(clients) == len(sites), "clients are every site's own"


def test_shared_options_still_refuse_what_the_model_refuses() -> None:
    with pytest.raises(ValidationError):
        shared_options("davantis", {"page_cap": 0})
    with pytest.raises(ValidationError):
        shared_options("davantis", {"page_cap": 0})  # a refusal is not remembered as a model
    odd = shared_options("davantis", {"page_cap": 7, "time_zone": None})
    assert odd.page_cap == 7


def test_shared_options_stay_bounded_when_every_site_differs() -> None:
    first = shared_options("davantis", {"page_cap": 1})
    for cap in range(2, SHARED_OPTIONS_MAX + 10):
        assert shared_options("davantis", {"page_cap": cap}).page_cap == cap
        assert len(sites_module._SHARED_OPTIONS) <= SHARED_OPTIONS_MAX
    again = shared_options("davantis", {"page_cap": 1})
    assert again == first and again.page_cap == 1
