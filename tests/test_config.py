"""Tests for cms_ingest.config: loading, merging, interpolation and error reporting."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from cms_ingest.config import (
    AppConfig,
    ConfigError,
    ConfigProblem,
    SiteConfig,
    check_config,
    load_config,
    load_config_text,
)
from cms_ingest.vendors import vendor_registry

PIN = "AB:" * 31 + "AB"  # 32 bytes as openssl prints them
PIN_NORMALIZED = "ab" * 32

DAVANTIS = """\
  - id: acme-north
    vendor: davantis
    url: http://192.0.2.10:21000
    username: cms
    password: pw
"""


def write(tmp_path: Path, text: str, name: str = "cms.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, **kwargs: Any) -> AppConfig:
    # options_models={} keeps these tests independent of the vendors' real options models.
    kwargs.setdefault("environ", {})
    kwargs.setdefault("options_models", {})
    return load_config(write(tmp_path, text), **kwargs)


def problems(tmp_path: Path, text: str, **kwargs: Any) -> dict[str, str]:
    """path -> message of every problem; fails when the config loads."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, **kwargs)
    return {problem.path: problem.message for problem in caught.value.problems}


def secret(value: SecretStr | None) -> str:
    assert value is not None
    return value.get_secret_value()


def sites(*entries: str) -> str:
    return "sites:\n" + "".join(entries)


# --------------------------------------------------------------------------- a valid file


FULL = """\
database_url: postgresql://cms_ingest:dbpw@db.internal/cms
data_dir: data
listen: 0.0.0.0:9200
log_level: DEBUG
log_format: json
defaults:
  poll_interval: 2.0
  supervision_timeout: 30
  tls: {verify: false}
  options: {shared: 1}
sites:
  - id: acme-north
    name: ACME North Gate
    vendor: davantis
    url: https://192.0.2.10:21000/api/
    username: cms
    password: ${ACME_PW}
    poll_interval: 0.5
    tls: {ca_file: ca.pem, pin_sha256: "PIN"}
    options: {own: 2}
  - id: acme-south
    vendor: camtrace
    url: http://192.0.2.11
    username: cms
    password_file: secrets/south.txt
  - id: cloud
    vendor: camstreamer
    url: https://camstreamer.example
    token: ${CS_TOKEN:-fallback-token}
media: {workers: 8}
actions: {max_attempts: 5}
""".replace("PIN", PIN)


@pytest.fixture
def full_config(tmp_path: Path) -> AppConfig:
    (tmp_path / "ca.pem").write_text("not checked for content\n")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "south.txt").write_text("south-pw\n")
    return load(tmp_path, FULL, environ={"ACME_PW": "north-pw"})


def test_full_file_top_level(full_config: AppConfig, tmp_path: Path) -> None:
    assert full_config.database_url is not None
    assert full_config.database_url.get_secret_value().endswith("@db.internal/cms")
    assert full_config.data_dir == tmp_path / "data"
    assert (full_config.listen_host, full_config.listen_port) == ("0.0.0.0", 9200)
    assert full_config.log_level == "debug"
    assert full_config.media.workers == 8
    assert full_config.media.max_bytes == 100 * 1024 * 1024
    assert full_config.actions.max_attempts == 5
    assert full_config.config_path == tmp_path / "cms.yaml"


def test_full_file_sites(full_config: AppConfig, tmp_path: Path) -> None:
    north, south, cloud = full_config.sites
    assert north.url == "https://192.0.2.10:21000/api"  # trailing slash stripped
    assert north.poll_interval == 0.5  # site beats defaults
    assert south.poll_interval == 2.0  # defaults beat the vendor default
    assert south.name == "acme-south"  # name defaults to id
    assert south.supervision_timeout == 30
    assert secret(north.password) == "north-pw"
    assert secret(south.password) == "south-pw"
    assert secret(cloud.token) == "fallback-token"
    assert north.tls.pin_sha256 == PIN_NORMALIZED
    assert north.tls.ca_file == tmp_path / "ca.pem"


def test_tls_and_options_merge_key_by_key(full_config: AppConfig) -> None:
    north, south, _ = full_config.sites
    assert north.tls.verify is False  # from defaults, next to the site's own ca_file
    assert north.options == {"shared": 1, "own": 2}
    assert south.options == {"shared": 1}


def test_site_lookup(full_config: AppConfig) -> None:
    assert full_config.site("cloud").vendor == "camstreamer"
    with pytest.raises(KeyError, match="no site with id 'nope'"):
        full_config.site("nope")


def test_vendor_default_poll_interval(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        sites(
            DAVANTIS,
            "  - {id: cs, vendor: camstreamer, url: 'http://h', token: t}\n",
        ),
    )
    # The vendors' own defaults, as their registry entries give them.
    registry = vendor_registry()
    assert config.sites[0].poll_interval == registry["davantis"].default_poll_interval_s == 0.5
    assert config.sites[1].poll_interval == registry["camstreamer"].default_poll_interval_s == 10


def test_defaults_for_omitted_sections(tmp_path: Path) -> None:
    config = load(tmp_path, sites(DAVANTIS))
    assert config.database_url is None
    assert config.listen == "127.0.0.1:9108"
    assert config.media.deadline_s == 600
    assert config.sites[0].media_deadline_s is None
    assert config.sites[0].request_timeout_s == 10


def test_load_config_text_resolves_against_base_dir(tmp_path: Path) -> None:
    config = load_config_text(
        "data_dir: d\n" + sites(DAVANTIS), base_dir=tmp_path, options_models={}
    )
    assert config.data_dir == tmp_path / "d"
    assert config.config_path is None


# --------------------------------------------------------------------------- secrets


def test_secrets_hidden_in_repr(full_config: AppConfig) -> None:
    text = repr(full_config) + str(full_config)
    for secret in ("north-pw", "south-pw", "fallback-token", "dbpw"):
        assert secret not in text


def test_secret_options_hidden_in_repr(tmp_path: Path) -> None:
    site = "  - {id: cs, vendor: camstreamer, url: 'http://h', "
    site += "options: {client_id: app, client_secret: s3cret}}\n"
    config = load(tmp_path, sites(site))
    assert "s3cret" not in repr(config)
    assert "app" in repr(config)
    assert config.sites[0].options["client_secret"] == "s3cret"


def test_password_in_url_not_leaked(tmp_path: Path) -> None:
    site = DAVANTIS.replace("http://192.0.2.10", "http://cms:hunter2@192.0.2.10")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "database_url: mysql://u:dbsecret@h/db\n" + sites(site))
    paths = [problem.path for problem in caught.value.problems]
    assert paths == ["database_url", "sites[0].url"]
    assert "hunter2" not in str(caught.value)
    assert "dbsecret" not in str(caught.value)


def test_password_not_leaked_by_yaml_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'password: "hunter2\n  bad: [')
    assert "hunter2" not in " ".join(map(str, check_config(path)))


def test_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\r\n")
    site = DAVANTIS.replace("password: pw", "password_file: pw")
    config = load(tmp_path, sites(site))
    assert secret(config.sites[0].password) == "from-file"


def test_unreadable_password_file_names_the_file(tmp_path: Path) -> None:
    site = DAVANTIS.replace("password: pw", "password_file: nope.txt")
    found = problems(tmp_path, sites(site))
    assert list(found) == ["sites[0].password_file"]  # not also "needs a password"
    assert str(tmp_path / "nope.txt") in found["sites[0].password_file"]


def test_password_and_password_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    site = DAVANTIS + "    password_file: pw\n"
    assert "not both" in problems(tmp_path, sites(site))["sites[0].password_file"]


def test_site_password_beats_defaults_password_file(tmp_path: Path) -> None:
    config = load(tmp_path, "defaults: {password_file: missing}\n" + sites(DAVANTIS))
    assert secret(config.sites[0].password) == "pw"


@pytest.mark.parametrize("vendor", ["davantis", "camtrace", "videoloft", "exacq"])
def test_password_vendors_need_username_and_password(tmp_path: Path, vendor: str) -> None:
    found = problems(tmp_path, sites(f"  - {{id: s, vendor: {vendor}, url: 'http://h'}}\n"))
    assert found == {
        "sites[0].username": f"{vendor} needs a username",
        "sites[0].password": f"{vendor} needs a password: set password or password_file",
    }


def test_camstreamer_needs_token_or_client(tmp_path: Path) -> None:
    bare = "  - {id: cs, vendor: camstreamer, url: 'http://h'}\n"
    assert "needs a token" in problems(tmp_path, sites(bare))["sites[0].token"]
    client = bare.replace("}", ", options: {client_id: a, client_secret: b}}")
    assert load(tmp_path, sites(client)).sites[0].token is None


# --------------------------------------------------------------------------- ${VAR}


def test_interpolation_forms(tmp_path: Path) -> None:
    site = DAVANTIS.replace("username: cms", "username: ${USER_A}-$${LITERAL}-${UNSET:-fb}")
    config = load(tmp_path, sites(site), environ={"USER_A": "u"})
    assert config.sites[0].username == "u-${LITERAL}-fb"


def test_interpolated_numbers_are_converted(tmp_path: Path) -> None:
    config = load(
        tmp_path, "defaults: {poll_interval: '${POLL}'}\n" + sites(DAVANTIS), environ={"POLL": "3"}
    )
    assert config.sites[0].poll_interval == 3.0


def test_unset_variable(tmp_path: Path) -> None:
    site = DAVANTIS.replace("password: pw", "password: ${ACME_PW}")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, sites(site))
    assert [str(p) for p in caught.value.problems] == [
        "sites[0].password: environment variable ACME_PW is not set"
    ]


def test_unset_variable_in_url_reports_only_the_variable(tmp_path: Path) -> None:
    site = DAVANTIS.replace("http://192.0.2.10:21000", "${SITE_URL}")
    assert problems(tmp_path, sites(site)) == {
        "sites[0].url": "environment variable SITE_URL is not set"
    }


def test_uses_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMS_TEST_PW", "env-pw")
    site = DAVANTIS.replace("password: pw", "password: ${CMS_TEST_PW}")
    config = load(tmp_path, sites(site), environ=None)
    assert secret(config.sites[0].password) == "env-pw"


# --------------------------------------------------------------------------- structure


def test_unknown_keys_everywhere(tmp_path: Path) -> None:
    text = """\
    lisen: 1.2.3.4:1
    media: {wrokers: 2}
    defaults: {poll_intervall: 1}
    sites:
      - id: a
        vendor: davantis
        url: http://h
        username: u
        password: p
        colour: red
        tls: {verfy: false}
    """
    found = problems(tmp_path, text)
    assert set(found) == {
        "lisen",
        "media.wrokers",
        "defaults.poll_intervall",
        "sites[0].colour",
        "sites[0].tls.verfy",
    }
    assert found["defaults.poll_intervall"] == (
        "unknown key 'poll_intervall' (did you mean 'poll_interval'?)"
    )


def test_bad_vendor_lists_valid_vendors(tmp_path: Path) -> None:
    message = problems(tmp_path, sites(DAVANTIS.replace("davantis", "davantiss")))[
        "sites[0].vendor"
    ]
    for vendor in ("davantis", "camtrace", "videoloft", "exacq", "camstreamer"):
        assert vendor in message


def test_duplicate_site_id(tmp_path: Path) -> None:
    other = DAVANTIS.replace("acme-north", "other")
    found = problems(tmp_path, sites(DAVANTIS, other, other, DAVANTIS))
    assert found == {
        "sites[2].id": "duplicate site id 'other' (already sites[1])",
        "sites[3].id": "duplicate site id 'acme-north' (already sites[0])",
    }


@pytest.mark.parametrize("text", ["", "sites: []\n", "sites:\n", "listen: 1.2.3.4:5\n"])
def test_sites_required(tmp_path: Path, text: str) -> None:
    assert problems(tmp_path, text) == {"sites": "at least one site is required"}


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- a\n- b\n") == {"": "the top level must be a mapping of keys"}


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    (problem,) = check_config(write(tmp_path, "listen: a:1\nlisten: b:2\n"))
    assert "duplicate key 'listen'" in problem.message
    assert "line 2" in problem.message


@pytest.mark.parametrize("bad_id", ["Acme", "a b", "x" * 65, ""])
def test_site_id_pattern(tmp_path: Path, bad_id: str) -> None:
    found = problems(tmp_path, sites(DAVANTIS.replace("acme-north", f"'{bad_id}'")))
    assert "a-z, 0-9" in found["sites[0].id"]


# --------------------------------------------------------------------------- defaults


def test_bad_default_reported_once_at_defaults(tmp_path: Path) -> None:
    other = DAVANTIS.replace("acme-north", "other")
    text = "defaults: {poll_interval: -1, tls: {pin_sha256: nope}}\n" + sites(DAVANTIS, other)
    found = problems(tmp_path, text)
    assert set(found) == {"defaults.poll_interval", "defaults.tls.pin_sha256"}


def test_defaults_cannot_set_id(tmp_path: Path) -> None:
    found = problems(tmp_path, "defaults: {id: x}\n" + sites(DAVANTIS))
    assert list(found) == ["defaults.id"]


def test_defaults_may_set_vendor_and_credentials(tmp_path: Path) -> None:
    text = "defaults: {vendor: exacq, username: u, password: p}\n" + sites(
        "  - {id: a, url: 'http://h'}\n"
    )
    site = load(tmp_path, text).sites[0]
    assert (site.vendor, site.username, site.poll_interval) == ("exacq", "u", 1.0)


# --------------------------------------------------------------------------- field rules


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h/", "http://h"),
        ("https://h:8443/prefix/api/", "https://h:8443/prefix/api"),
        ("http://[2001:db8::1]:80", "http://[2001:db8::1]:80"),
    ],
)
def test_good_urls(tmp_path: Path, url: str, expected: str) -> None:
    site = DAVANTIS.replace("http://192.0.2.10:21000", f"'{url}'")
    assert load(tmp_path, sites(site)).sites[0].url == expected


@pytest.mark.parametrize(
    "url",
    ["ftp://h", "h:80", "http://", "http://h?x=1", "http://h#frag", "http://u@h", "http://h:x"],
)
def test_bad_urls(tmp_path: Path, url: str) -> None:
    site = DAVANTIS.replace("http://192.0.2.10:21000", f"'{url}'")
    assert list(problems(tmp_path, sites(site))) == ["sites[0].url"]


def test_bad_pin_and_missing_ca_file(tmp_path: Path) -> None:
    site = DAVANTIS + "    tls: {pin_sha256: abcd, ca_file: nope.pem}\n"
    found = problems(tmp_path, sites(site))
    assert "64 hex digits" in found["sites[0].tls.pin_sha256"]
    assert str(tmp_path / "nope.pem") in found["sites[0].tls.ca_file"]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h/db",
        "postgres://h/db",
        "postgresql+asyncpg://u:p@h:5432/db",
        "postgresql:///db?host=/run/postgresql",
    ],
)
def test_database_url_schemes(tmp_path: Path, url: str) -> None:
    config = load(tmp_path, f"database_url: '{url}'\n" + sites(DAVANTIS))
    assert config.database_url is not None
    assert config.database_url.get_secret_value() == url


def test_empty_database_url_means_embedded(tmp_path: Path) -> None:
    config = load(tmp_path, "database_url: ${DATABASE_URL:-}\n" + sites(DAVANTIS))
    assert config.database_url is None


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("127.0.0.1:9108", "127.0.0.1", 9108), ("[::1]:80", "::1", 80), ("myhost:0", "myhost", 0)],
)
def test_listen(tmp_path: Path, listen: str, host: str, port: int) -> None:
    config = load(tmp_path, f"listen: '{listen}'\n" + sites(DAVANTIS))
    assert (config.listen_host, config.listen_port) == (host, port)


@pytest.mark.parametrize("listen", ["9108", "::1:9108", ":9108", "h:99999", "h:", "[::1]9108"])
def test_bad_listen(tmp_path: Path, listen: str) -> None:
    assert list(problems(tmp_path, f"listen: '{listen}'\n" + sites(DAVANTIS))) == ["listen"]


def test_media_and_actions_limits(tmp_path: Path) -> None:
    text = "media: {workers: 0, max_bytes: 0}\nactions: {max_attempts: 0}\n" + sites(DAVANTIS)
    assert set(problems(tmp_path, text)) == {
        "media.workers",
        "media.max_bytes",
        "actions.max_attempts",
    }


def test_numeric_password_must_be_quoted(tmp_path: Path) -> None:
    # YAML reads 0123 as the octal number 83: silently converting it would be wrong.
    found = problems(tmp_path, sites(DAVANTIS.replace("password: pw", "password: 0123")))
    assert "quotes" in found["sites[0].password"]


# --------------------------------------------------------------------------- vendor options


def test_options_model_fills_defaults(tmp_path: Path) -> None:
    site = DAVANTIS + "    options: {page_cap: 50}\n"
    config = load(tmp_path, sites(site), options_models=None)  # the vendors' real models
    assert config.sites[0].options == {
        "restore_after_s": 10.0,
        "armed_only": True,
        "backfill": None,
        "page_cap": 50,
        "time_zone": None,
    }


def test_options_model_errors(tmp_path: Path) -> None:
    site = DAVANTIS + "    options: {page_cap: many, colour: red}\n"
    found = problems(tmp_path, sites(site), options_models=None)
    assert set(found) == {"sites[0].options.page_cap", "sites[0].options.colour"}


def test_real_davantis_options_are_validated_and_filled(tmp_path: Path) -> None:
    config = load(tmp_path, sites(DAVANTIS + "    options: {backfill: 2h}\n"), options_models=None)
    assert config.sites[0].options == {
        "restore_after_s": 10.0,
        "armed_only": True,
        "backfill": 7200.0,
        "page_cap": 300,
        "time_zone": None,
    }
    found = problems(
        tmp_path,
        sites(DAVANTIS + "    options: {backfill: soon, armed_onyl: false}\n"),
        options_models=None,
    )
    assert set(found) == {"sites[0].options.backfill", "sites[0].options.armed_onyl"}
    assert "15m" in found["sites[0].options.backfill"]


# --------------------------------------------------------------------------- reporting


def test_many_problems_at_once(tmp_path: Path) -> None:
    text = """\
    database_url: mysql://h/db
    media: {workers: 100}
    defaults: {poll_intervall: 1}
    sites:
      - id: a
        vendor: davantis
        url: http://h
        username: u
        password: ${A_PW}
      - id: b
        vendor: nope
        url: http://h
      - id: c
        vendor: camtrace
        url: ftp://h
        username: u
        password: p
        tls: {pin_sha256: xyz}
    """
    assert set(problems(tmp_path, text)) == {
        "database_url",
        "media.workers",
        "defaults.poll_intervall",
        "sites[0].password",
        "sites[1].vendor",
        "sites[2].url",
        "sites[2].tls.pin_sha256",
    }


def test_config_error_text_lists_file_then_each_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "media: {workers: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={}, options_models={})
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert lines[1] == f"{path}: sites: at least one site is required"


def test_problem_str() -> None:
    problem = ConfigProblem("sites[1].password", "environment variable ACME_PW is not set")
    assert str(problem) == "sites[1].password: environment variable ACME_PW is not set"


def test_check_config_valid(tmp_path: Path) -> None:
    assert check_config(write(tmp_path, sites(DAVANTIS)), options_models={}) == []


def test_check_config_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: x:1\nsites:\n  - id: a\n   vendor: b\n")
    (problem,) = check_config(path)
    assert problem.path == ""
    assert problem.message.startswith("invalid YAML at line 4, column")


def test_check_config_missing_file(tmp_path: Path) -> None:
    (problem,) = check_config(tmp_path / "missing.yaml")
    assert "cannot read the config file" in problem.message
    assert "No such file" in problem.message


def test_site_config_built_in_code() -> None:
    # The demo builds sites directly: derived defaults apply there too.
    site = SiteConfig(id="sim", vendor="camstreamer", url="http://127.0.0.1:1/")
    assert (site.name, site.poll_interval, site.url) == ("sim", 10.0, "http://127.0.0.1:1")


def test_priorities_merge_from_defaults_and_cameras_override(tmp_path: Path) -> None:
    from cms_ingest.domain import EventType

    text = "defaults:\n  priorities: {motion: 6, system: 9}\n" + sites(
        DAVANTIS + "    priorities: {motion: 4}\n    camera_priorities: {'3': {intrusion: 2}}\n"
    )
    site = load(tmp_path, text).sites[0]
    assert site.priority(EventType.MOTION, "1") == 4  # the site's own over defaults
    assert site.priority(EventType.SYSTEM, "1") == 9  # defaults, merged key by key
    assert site.priority(EventType.INTRUSION, "3") == 2  # the camera's over everything
    assert site.priority(EventType.INTRUSION, "1") == 1  # the built-in CMS default
    assert site.priority(EventType.CAMERA_ONLINE, None) == 8


def test_bad_priorities_name_their_path(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        sites(
            DAVANTIS
            + "    priorities: {motion: 0, burglary: 1}\n    camera_priorities: {'3': {person: 12}}\n"
        ),
    )
    assert any(path.startswith("sites[0].priorities.motion") for path in found), found
    assert any("burglary" in path for path in found), found
    assert any(path.startswith("sites[0].camera_priorities.3.person") for path in found), found


# --------------------------------------------------------------------------- secret files
# Docker secrets (/run/secrets/NAME) and systemd credentials ($CREDENTIALS_DIRECTORY/NAME)
# are both plain files: `database_url_file` and `${CREDENTIALS_DIRECTORY}` in `*_file` paths.

DB_SECRET = "postgresql://cms:Db-Canary-7f3a@db.internal:5432/cms"


def error_text(tmp_path: Path, text: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, **kwargs)
    return str(caught.value)


def test_database_url_file_is_read_and_its_newline_dropped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "database_url").write_text(DB_SECRET + "\n")
    config = load(tmp_path, "database_url_file: secrets/database_url\n" + sites(DAVANTIS))
    assert secret(config.database_url) == DB_SECRET  # relative to the config file
    assert DB_SECRET not in repr(config)
    absolute = load(
        tmp_path, f"database_url_file: {tmp_path / 'secrets' / 'database_url'}\n" + sites(DAVANTIS)
    )
    assert absolute.database_url == config.database_url


def test_database_url_file_empty(tmp_path: Path) -> None:
    (tmp_path / "database_url").write_text("\n")
    found = problems(tmp_path, "database_url_file: database_url\n" + sites(DAVANTIS))
    assert found == {"database_url_file": f"database_url file {tmp_path / 'database_url'} is empty"}


def test_database_url_file_missing(tmp_path: Path) -> None:
    found = problems(tmp_path, "database_url_file: /nonexistent/database_url\n" + sites(DAVANTIS))
    assert list(found) == ["database_url_file"]
    assert "cannot read database_url file /nonexistent/database_url" in found["database_url_file"]
    assert "No such file" in found["database_url_file"]


def test_database_url_and_database_url_file_together_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "database_url").write_text(DB_SECRET)
    text = f"database_url: '{DB_SECRET}'\ndatabase_url_file: database_url\n" + sites(DAVANTIS)
    found = problems(tmp_path, text)
    assert found == {"database_url_file": "set either database_url or database_url_file, not both"}
    assert "Db-Canary" not in error_text(tmp_path, text)


def test_empty_database_url_does_not_conflict_with_the_file(tmp_path: Path) -> None:
    # `database_url: ${DATABASE_URL:-}` (embedded unless the env says otherwise) next to a file.
    (tmp_path / "database_url").write_text(DB_SECRET)
    text = "database_url: ${DATABASE_URL:-}\ndatabase_url_file: database_url\n" + sites(DAVANTIS)
    assert secret(load(tmp_path, text).database_url) == DB_SECRET
    # And an empty database_url_file means "not given": the embedded database.
    assert load(tmp_path, "database_url_file: ''\n" + sites(DAVANTIS)).database_url is None


def test_database_url_file_holding_no_url_never_shows_its_content(tmp_path: Path) -> None:
    # The password alone put where the whole URL belongs: urlsplit sees "Pw-Canary" as a scheme.
    (tmp_path / "database_url").write_text("Pw-Canary:9f2e\n")
    text = "database_url_file: database_url\n" + sites(DAVANTIS)
    found = problems(tmp_path, text)
    assert list(found) == ["database_url_file"]  # where the file was named, not database_url
    assert found["database_url_file"].startswith("must be a PostgreSQL URL")
    assert "Canary" not in error_text(tmp_path, text)
    (tmp_path / "database_url").write_text("mysql://u:Pw-Canary@h/db\n")
    message = problems(tmp_path, text)["database_url_file"]
    assert "(got mysql://)" in message and "Canary" not in message


def test_database_url_file_typo_suggests_the_key(tmp_path: Path) -> None:
    found = problems(tmp_path, "database_url_fil: x\n" + sites(DAVANTIS))
    assert found == {
        "database_url_fil": "unknown key 'database_url_fil' (did you mean 'database_url_file'?)"
    }


def credentials_dir(tmp_path: Path, **files: str) -> Path:
    """A directory laid out like systemd's $CREDENTIALS_DIRECTORY: one file per credential."""
    directory = tmp_path / "credentials"
    directory.mkdir(exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(content)
    return directory


CREDENTIAL_CONFIG = """\
database_url_file: ${CREDENTIALS_DIRECTORY}/database_url
sites:
  - id: acme-north
    vendor: davantis
    url: http://192.0.2.10:21000
    username: cms
    password_file: ${CREDENTIALS_DIRECTORY}/acme-north
  - id: cloud
    vendor: camstreamer
    url: https://camstreamer.example
    token_file: ${CREDENTIALS_DIRECTORY}/cloud-token
"""


def test_systemd_credentials_in_file_paths(tmp_path: Path) -> None:
    creds = credentials_dir(
        tmp_path,
        database_url=DB_SECRET + "\n",
        **{"acme-north": "Site-Canary\n", "cloud-token": "Tok-Canary"},
    )
    config = load(tmp_path, CREDENTIAL_CONFIG, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert secret(config.database_url) == DB_SECRET
    assert secret(config.sites[0].password) == "Site-Canary"
    assert secret(config.sites[1].token) == "Tok-Canary"


def test_systemd_credentials_from_defaults(tmp_path: Path) -> None:
    creds = credentials_dir(tmp_path, davantis="Site-Canary")
    text = "defaults: {password_file: '${CREDENTIALS_DIRECTORY}/davantis'}\n" + sites(
        DAVANTIS.replace("    password: pw\n", "")
    )
    config = load(tmp_path, text, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert secret(config.sites[0].password) == "Site-Canary"


def test_systemd_credentials_not_available(tmp_path: Path) -> None:
    # Run outside systemd (or without LoadCredential=): one clear message per key, and
    # nothing else (no "cannot read", no "needs a password").
    message = (
        "systemd credentials are not available: start the daemon with LoadCredential= "
        "or use another secret source (CREDENTIALS_DIRECTORY is not set)"
    )
    assert problems(tmp_path, CREDENTIAL_CONFIG) == {
        "database_url_file": message,
        "sites[0].password_file": message,
        "sites[1].token_file": message,
    }


def test_systemd_credential_not_loaded_names_the_fix(tmp_path: Path) -> None:
    creds = credentials_dir(tmp_path, database_url=DB_SECRET, **{"cloud-token": "Tok-Canary"})
    text = CREDENTIAL_CONFIG
    found = problems(tmp_path, text, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert list(found) == ["sites[0].password_file"]
    assert found["sites[0].password_file"] == (
        f"cannot read password file {creds / 'acme-north'}: No such file or directory "
        "(the unit loads no credential named 'acme-north': add "
        "LoadCredential=acme-north:/path/to/file to it)"
    )


def test_empty_systemd_credential(tmp_path: Path) -> None:
    creds = credentials_dir(tmp_path, database_url="", **{"acme-north": "\n", "cloud-token": "t"})
    found = problems(tmp_path, CREDENTIAL_CONFIG, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert found == {
        "database_url_file": f"database_url file {creds / 'database_url'} is empty",
        "sites[0].password_file": f"password file {creds / 'acme-north'} is empty",
    }


def test_credentials_with_docker_secrets_fallback(tmp_path: Path) -> None:
    # One config for systemd and Docker: ${CREDENTIALS_DIRECTORY:-/run/secrets}/NAME reads the
    # systemd credential when there is one, else the Docker secret of the same name.
    creds = credentials_dir(tmp_path, database_url=DB_SECRET)
    docker = tmp_path / "run-secrets"
    docker.mkdir()
    (docker / "database_url").write_text(DB_SECRET.replace("Db-Canary", "Docker-Canary"))
    text = f"database_url_file: ${{CREDENTIALS_DIRECTORY:-{docker}}}/database_url\n" + sites(
        DAVANTIS
    )
    systemd = load(tmp_path, text, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert secret(systemd.database_url) == DB_SECRET
    assert "Docker-Canary" in secret(load(tmp_path, text).database_url)


def test_no_secret_file_content_in_any_error(tmp_path: Path) -> None:
    # Every error above, at once: contents never appear, only paths and keys.
    creds = credentials_dir(
        tmp_path, database_url="Db-Canary:nope", **{"acme-north": "\n", "cloud-token": "Tok-Canary"}
    )
    text = CREDENTIAL_CONFIG.replace(
        "    username: cms\n", "    username: cms\n    password: Inline-Canary\n"
    )
    found = error_text(tmp_path, text, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert "database_url_file" in found and "sites[0].password_file" in found
    assert "Canary" not in found


def test_sites_written_alike_share_their_fields_set_and_tls_settings(tmp_path: Path) -> None:
    """Thousands of sites: equal TLS settings are one object and equal fields sets one set
    (memory per site), and nothing of one site leaks into another through them."""
    config = load(
        tmp_path,
        sites(
            "  - {id: a, vendor: davantis, username: u, password: p, url: 'http://10.0.0.1', tls: {verify: false}}\n",
            "  - {id: b, vendor: davantis, username: u, password: p, url: 'http://10.0.0.2', tls: {verify: false}}\n",
            "  - {id: c, vendor: davantis, username: u, password: p, url: 'https://10.0.0.3'}\n",
            "  - {id: d, vendor: davantis, username: u, password: p, url: 'https://10.0.0.4', supervision_timeout: 30}\n",
        ),
    )
    a, b, c, d = config.sites
    assert a.tls is b.tls and a.tls.verify is False
    assert c.tls is not a.tls and c.tls.verify is True
    assert a.model_fields_set is b.model_fields_set
    assert "supervision_timeout" in d.model_fields_set
    assert "supervision_timeout" not in c.model_fields_set
    # A copy with changes gets a set of its own: the shared one is left as it was.
    changed = a.model_copy(update={"name": "Alpha"})
    assert changed.name == "Alpha" and a.name == "a" and b.name == "b"
    assert changed.model_fields_set is not a.model_fields_set
    assert a.model_fields_set == b.model_fields_set
    with pytest.raises(ValueError, match="frozen"):
        a.name = "x"  # type: ignore[misc]
    assert a.model_fields_set is b.model_fields_set and b.name == "b"
