"""The YAML config file: schema, loading and validation.

`load_config` turns the file into an `AppConfig` or raises `ConfigError` listing *every*
problem at once, each with the YAML path it belongs to (``sites[2].vendor``), so an installer
fixes a file in one round trip instead of one error per run; `load_checked` adds each
vendor's own rules (what `run`, `check-config` and a reload use).

One module per job: `models` (the schema), `loader` (defaults, sites, the entry points),
`yaml_loading` (strict YAML, ``${VAR}``), `secrets` (secret files, required credentials),
`problems` (problems with their YAML paths), `vendor_facts` (what the vendor registry says),
`checked` (vendor rules). No vendor is named here: every vendor fact comes from
`cms_ingest.vendors.registry`.
"""

from __future__ import annotations

from cms_ingest.config.checked import load_checked, vendor_problems
from cms_ingest.config.loader import check_config, load_config, load_config_text
from cms_ingest.config.models import (
    ActionsConfig,
    AppConfig,
    FloodConfig,
    MediaConfig,
    SiteConfig,
    TlsConfig,
)
from cms_ingest.config.problems import ConfigError, ConfigProblem

__all__ = [
    "ActionsConfig",
    "AppConfig",
    "ConfigError",
    "ConfigProblem",
    "FloodConfig",
    "MediaConfig",
    "SiteConfig",
    "TlsConfig",
    "check_config",
    "load_checked",
    "load_config",
    "load_config_text",
    "vendor_problems",
]
