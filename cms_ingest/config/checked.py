"""A config file checked completely: the schema and each vendor's own rules.

`cms-ingest run`, `check-config` and a SIGHUP reload all accept a file only through here.
"""

from __future__ import annotations

from pathlib import Path

from cms_ingest.config.loader import load_config
from cms_ingest.config.models import AppConfig
from cms_ingest.config.problems import ConfigError, ConfigProblem
from cms_ingest.config.vendor_facts import vendor_registry


def vendor_problems(config: AppConfig) -> list[ConfigProblem]:
    """What the config schema cannot see: vendors this build lacks, vendor-specific rules."""
    registry = vendor_registry()
    problems: list[ConfigProblem] = []
    for index, site in enumerate(config.sites):
        entry = registry.get(site.vendor)
        if entry is None:  # a config built before its vendor was unregistered
            problems.append(
                ConfigProblem(
                    f"sites[{index}].vendor",
                    f"vendor {site.vendor!r} is not supported by this build yet "
                    f"(supported: {', '.join(sorted(registry))})",
                )
            )
            continue
        for key, message in entry.site_problems(site.url, site.options):
            problems.append(ConfigProblem(f"sites[{index}].options.{key}", message))
    return problems


def load_checked(path: str | Path) -> AppConfig:
    """The config at `path`; raises ConfigError listing every problem found."""
    config = load_config(path)
    problems = vendor_problems(config)
    if problems:
        raise ConfigError(problems, source=str(path))
    return config
