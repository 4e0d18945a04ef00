"""A config file checked completely: the schema (config.py) and each vendor's own rules.

`cms-ingest run`, `check-config` and a SIGHUP reload all accept a file only through here.
"""

from __future__ import annotations

from pathlib import Path

from cms_ingest.config import AppConfig, ConfigError, ConfigProblem, load_config
from cms_ingest.vendors import SITE_CHECKS, VENDORS, supported_vendors


def vendor_problems(config: AppConfig) -> list[ConfigProblem]:
    """What the config schema cannot see: vendors this build lacks, vendor-specific rules."""
    problems: list[ConfigProblem] = []
    for index, site in enumerate(config.sites):
        if site.vendor not in VENDORS:
            problems.append(
                ConfigProblem(
                    f"sites[{index}].vendor",
                    f"vendor {site.vendor!r} is not supported by this build yet "
                    f"(supported: {', '.join(supported_vendors())})",
                )
            )
            continue
        check = SITE_CHECKS.get(site.vendor)
        for key, message in check(site.url, site.options) if check else []:
            problems.append(ConfigProblem(f"sites[{index}].options.{key}", message))
    return problems


def load_checked(path: str | Path) -> AppConfig:
    """The config at `path`; raises ConfigError listing every problem found."""
    config = load_config(path)
    problems = vendor_problems(config)
    if problems:
        raise ConfigError(problems, source=str(path))
    return config
