"""Loading a config file: from YAML text to a validated `AppConfig`, every problem at once.

Loading happens in steps, each working on the raw YAML tree so that one bad value never hides
another:

1. parse the YAML (duplicate keys are refused: the last one silently winning hides typos);
2. replace ``${VAR}`` references from the environment;
3. merge ``defaults`` under every site, remembering which keys were inherited so that a bad
   inherited value is reported once at ``defaults.<key>`` rather than once per site;
4. read ``password_file`` / ``token_file`` (and the top-level ``database_url_file``), check
   each vendor has its credentials and validate vendor ``options``;
5. validate every site, then the top level, with pydantic.

Secrets never reach a message: pydantic messages are used without their input, our own
messages never quote a value that may hold a secret, and the models hide input in errors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cms_ingest.config.models import AppConfig, SiteConfig, empty_mapping_if_none
from cms_ingest.config.problems import (
    ConfigError,
    ConfigProblem,
    Loc,
    Problem,
    pydantic_problems,
    to_config_problems,
    under_any,
    unknown_key_message,
)
from cms_ingest.config.secrets import SECRET_FILE_KEYS, SecretReader, credential_problems
from cms_ingest.config.vendor_facts import options_models as registered_options_models
from cms_ingest.config.yaml_loading import Interpolator, StrictLoader, yaml_error_message

# Site keys whose mappings are merged key by key with `defaults` instead of replaced.
_MERGED_KEY_BY_KEY = ("tls", "options", "priorities")


@dataclass
class _Loader:
    secrets: SecretReader
    options_models: Mapping[str, type[BaseModel]]
    problems: list[Problem] = field(default_factory=list)

    @property
    def context(self) -> dict[str, Any]:
        return {"base_dir": self.secrets.base_dir}

    def defaults(self, raw: Any) -> dict[str, Any]:
        """The usable part of `defaults`; problems with its keys are reported here."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append((("defaults",), "must be a mapping of site keys"))
            return {}
        allowed = [key for key in SiteConfig.model_fields if key != "id"]
        allowed += list(SECRET_FILE_KEYS.values())
        usable: dict[str, Any] = {}
        for key, value in raw.items():
            loc: Loc = ("defaults", str(key))
            if key == "id":
                self.problems.append((loc, "cannot be set in defaults: every site needs its own"))
            elif key not in allowed:
                self.problems.append((loc, unknown_key_message(str(key), allowed)))
            elif key in _MERGED_KEY_BY_KEY and value is not None and not isinstance(value, dict):
                self.problems.append((loc, "must be a mapping"))
            else:
                usable[key] = value
        return usable

    def sites(self, raw: Any, defaults: dict[str, Any]) -> list[SiteConfig]:
        if raw is None or raw == []:
            self.problems.append((("sites",), "at least one site is required"))
            return []
        if not isinstance(raw, list):
            self.problems.append((("sites",), "must be a list of sites (each one '- id: ...')"))
            return []
        loaded: list[SiteConfig] = []
        first_index: dict[str, int] = {}
        for index, raw_site in enumerate(raw):
            if not isinstance(raw_site, dict):
                self.problems.append((("sites", index), "each site must be a mapping"))
                continue
            site_id = raw_site.get("id")
            if isinstance(site_id, str):
                if site_id in first_index:
                    first = first_index[site_id]
                    message = f"duplicate site id {site_id!r} (already sites[{first}])"
                    self.problems.append((("sites", index, "id"), message))
                else:
                    first_index[site_id] = index
            site = self.site(index, raw_site, defaults)
            if site is not None:
                loaded.append(site)
        return loaded

    def site(self, index: int, raw: dict[str, Any], defaults: dict[str, Any]) -> SiteConfig | None:
        merged, inherited = _merge_site(defaults, raw)
        from_file = {secret for secret, key in SECRET_FILE_KEYS.items() if merged.get(key)}
        problems = self.secrets.site_files(merged, inherited)
        problems += credential_problems(merged, from_file)
        problems += self.options(merged)
        site: SiteConfig | None = None
        try:
            site = SiteConfig.model_validate(merged, context=self.context)
        except ValidationError as exc:
            problems += pydantic_problems(exc, SiteConfig, SECRET_FILE_KEYS.values())
        for loc, message in problems:
            self.problems.append((_origin(loc, index, inherited), message))
        return site if not problems else None

    def options(self, merged: dict[str, Any]) -> list[Problem]:
        """Validate `options` with the vendor's model and store it back with defaults filled."""
        model = self.options_models.get(str(merged.get("vendor")))
        options = empty_mapping_if_none(merged.get("options"))
        if model is None or not isinstance(options, dict):
            return []  # no model for this vendor; a non-mapping is SiteConfig's to report
        try:
            merged["options"] = model.model_validate(options).model_dump()
        except ValidationError as exc:
            return [(("options", *loc), msg) for loc, msg in pydantic_problems(exc, model)]
        return []


def _merge_site(defaults: dict[str, Any], site: dict[str, Any]) -> tuple[dict[str, Any], set[Loc]]:
    """Merge `defaults` under a site; also return the locs whose values came from defaults."""
    merged = dict(defaults)
    inherited: set[Loc] = {(key,) for key in defaults}
    for key, value in site.items():
        base = merged.get(key)
        if key in _MERGED_KEY_BY_KEY and isinstance(value, dict) and isinstance(base, dict):
            merged[key] = {**base, **value}
            inherited |= {(key, sub) for sub in base if sub not in value}
        else:
            merged[key] = value
        inherited.discard((key,))
    return merged, inherited


def _origin(loc: Loc, index: int, inherited: set[Loc]) -> Loc:
    """Where in the file a site-relative loc was written: the site or `defaults`."""
    if loc[:1] in inherited or loc[:2] in inherited:
        return ("defaults", *loc)
    return ("sites", index, *loc)


# --------------------------------------------------------------------------- entry points


def load_config_text(
    text: str,
    *,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
    options_models: Mapping[str, type[BaseModel]] | None = None,
    source: str = "<config>",
) -> AppConfig:
    """Parse and validate config text; relative paths are relative to `base_dir`.

    `options_models` (vendor name -> model) defaults to the registered vendors' models.
    Raises ConfigError listing every problem; `source` names the text in its message.
    """
    try:
        raw = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem("", yaml_error_message(exc))], source) from None
    if raw is None:
        raw = {}  # an empty file: reported below as "no sites"
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem("", "the top level must be a mapping of keys")], source)

    interpolator = Interpolator(os.environ if environ is None else environ)
    try:
        raw = interpolator.tree(raw, ())
    except RecursionError:  # `x: &x [*x]`: YAML allows an alias inside itself
        raise ConfigError([ConfigProblem("", "invalid YAML: a recursive alias")], source) from None
    if options_models is None:
        options_models = registered_options_models()
    loader = _Loader(SecretReader(base_dir, interpolator.environ), options_models)
    sites = loader.sites(raw.get("sites"), loader.defaults(raw.get("defaults")))

    top = {key: value for key, value in raw.items() if key not in ("defaults", "sites")}
    if "config_path" in top:  # a field, but set by load_config, not by the file
        del top["config_path"]
        loader.problems.append((("config_path",), "unknown key 'config_path'"))
    url_from_file = loader.secrets.database_url_file(top, loader.problems)
    config: AppConfig | None = None
    try:
        config = AppConfig.model_validate({**top, "sites": sites}, context=loader.context)
    except ValidationError as exc:
        loader.problems += [
            # A bad URL read from database_url_file is reported where the file was named.
            (("database_url_file", *loc[1:]), message)
            if url_from_file and loc[:1] == ("database_url",)
            else (loc, message)
            for loc, message in pydantic_problems(exc, AppConfig, ["defaults", "database_url_file"])
            if loc[:1] != ("sites",)  # the sites were reported one by one above
        ]

    problems = [
        problem for problem in loader.problems if not under_any(problem[0], interpolator.failed)
    ]
    problems += interpolator.problems
    if problems or config is None:
        raise ConfigError(to_config_problems(problems), source)
    return config


def load_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    options_models: Mapping[str, type[BaseModel]] | None = None,
) -> AppConfig:
    """Load the config file at `path`; raises ConfigError listing every problem."""
    config_path = Path(path).expanduser().absolute()
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = ConfigProblem("", f"cannot read the config file: {exc.strerror or exc}")
        raise ConfigError([problem], str(path)) from None
    except UnicodeDecodeError:
        problem = ConfigProblem("", "the config file is not UTF-8 text")
        raise ConfigError([problem], str(path)) from None
    config = load_config_text(
        text,
        base_dir=config_path.parent,
        environ=environ,
        options_models=options_models,
        source=str(path),
    )
    return config.model_copy(update={"config_path": config_path})


def check_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    options_models: Mapping[str, type[BaseModel]] | None = None,
) -> list[ConfigProblem]:
    """Every problem in the config file at `path`; [] when it is valid."""
    try:
        load_config(path, environ=environ, options_models=options_models)
    except ConfigError as exc:
        return exc.problems
    return []
