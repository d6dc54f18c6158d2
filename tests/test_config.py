"""keyagent.config: the file, the environment and the flags, merged, checked and rendered."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyagent import config
from keyagent.config import Config, ConfigError, Setting, load, render
from keyagent.duration import parse_duration
from keyagent.protocol import MAX_LIFETIME
from keyagent.rules import DEFAULT_HTTP_WORKERS

TEN_YEARS = 315360000
DURATION_KEYS = frozenset(
    {
        "lifetime",
        "connect_timeout",
        "read_timeout",
        "validate_after",
        "idle_timeout",
        "line_timeout",
    }
)

Writer = Callable[[str], Path]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    """Write TOML text to tmp_path/keyagent/config.toml and return its path."""

    def writer(text: str) -> Path:
        path = tmp_path / "keyagent" / "config.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return writer


def load_text(
    write: Writer,
    text: str,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> Config:
    """Write ``text`` as the config file and load it with an explicit (default empty) env."""
    return load(str(write(text)), env=env or {}, flags=flags)


def error_of(write: Writer, text: str, env: Mapping[str, str] | None = None) -> ConfigError:
    """Write ``text`` as the config file and return the ConfigError loading it raises."""
    path = write(text)
    with pytest.raises(ConfigError) as caught:
        load(str(path), env=env or {})
    return caught.value


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_when_the_default_file_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no file at the default location every setting has its default, from "default"."""
    # platformdirs reads the process environment, so this is the one way to aim it elsewhere.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = load(env={})
    assert result.path == str(tmp_path / "keyagent" / "config.toml")
    assert result.path_source == "default"
    assert not result.file_found
    assert result == Config(path=result.path, path_source="default", file_found=False)
    assert {name: s.value for name, s in result.sources().items()} == config.DEFAULTS
    assert {s.source for s in result.sources().values()} == {"default"}


def test_defaults_match_the_daemon_and_the_modules_that_use_them() -> None:
    """The built-in defaults are the daemon's flag defaults, the server's limits and HTTP's."""
    from keyagent import daemon
    from keyagent.conduce import HttpSettings
    from keyagent.server import Limits

    args = daemon.build_parser().parse_args(["--config", "/dev/null"])
    daemon.apply_config(args)  # flags left unset take the built-in defaults
    limits, http = Limits(), HttpSettings()
    defaults = Config()
    assert defaults.idle_timeout == limits.idle_timeout == args.idle_timeout
    assert defaults.line_timeout == limits.line_timeout == args.line_timeout
    assert defaults.max_connections == limits.max_connections == args.max_connections
    assert defaults.stop_timeout == limits.stop_timeout == args.stop_timeout
    assert defaults.connect_timeout == http.connect_timeout == args.connect_timeout
    assert defaults.read_timeout == http.read_timeout == args.read_timeout
    assert defaults.validate_after == args.validate_after
    assert defaults.lifetime is args.lifetime is None
    assert defaults.ca_bundle is args.ca_bundle is None
    assert defaults.insecure is args.insecure is False


def test_an_empty_file_gives_the_defaults(write: Writer) -> None:
    """A file that exists but sets nothing changes nothing."""
    result = load_text(write, "# nothing yet\n\n")
    assert result.file_found
    assert {name: s.value for name, s in result.sources().items()} == config.DEFAULTS


def test_a_default_constructed_config_reports_default_sources() -> None:
    """Config() built by hand still answers sources() for every setting."""
    sources = Config(host="h.example").sources()
    assert list(sources) == list(config.SETTINGS)
    assert sources["host"] == Setting("host", "h.example", "default")


# --- each setting from the file ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "name", "expected"),
    [
        ('host = "conduce.example.com"', "host", "conduce.example.com"),
        ('host = "10.0.0.7:8443"', "host", "10.0.0.7:8443"),
        ('host = "[::1]:443"', "host", "[::1]:443"),
        ('user = "me@example.com"', "user", "me@example.com"),
        ('lifetime = "8h"', "lifetime", 28800.0),
        ("persist = true", "persist", True),
        ('ca_bundle = "/etc/ssl/ca.pem"', "ca_bundle", "/etc/ssl/ca.pem"),
        ("connect_timeout = 2", "connect_timeout", 2.0),
        ('read_timeout = "1m"', "read_timeout", 60.0),
        ('validate_after = "10m"', "validate_after", 600.0),
        ("idle_timeout = 30.5", "idle_timeout", 30.5),
        ("line_timeout = 3", "line_timeout", 3.0),
        ("max_connections = 16", "max_connections", 16),
        ("max_keys = 500", "max_keys", 500),
        ("audit_entries = 0", "audit_entries", 0),
        ("audit_entries = 1000000", "audit_entries", 1_000_000),
        ("http_workers = 1", "http_workers", 1),
        ("http_workers = 32", "http_workers", 32),
    ],
)
def test_each_setting_from_the_file(write: Writer, line: str, name: str, expected: object) -> None:
    """Each file key lands in its typed field, sourced to the file and the key's line."""
    path = write(f"# keyagent\n\n{line}\n")
    result = load(str(path), env={})
    assert getattr(result, name) == expected
    assert type(getattr(result, name)) is type(expected)
    assert result.sources()[name] == Setting(name, expected, f"file {path}:3")


def test_a_full_file_sets_everything_with_each_line(write: Writer) -> None:
    """A file with every key reports each one's own line."""
    path = write(
        'host = "c.example.com"\n'
        'user = "me@example.com"\n'
        "# default key lifetime\n"
        'lifetime = "1h30m"\n'
        "persist = false\n"
        'ca_bundle = "ca.pem"\n'
        "connect_timeout = 1\n"
        "read_timeout = 2\n"
        "validate_after = 3\n"
        "idle_timeout = 4\n"
        "line_timeout = 5\n"
        "max_connections = 6\n"
        "max_keys = 7\n"
        "export = false\n"
        'allow_exe = ["/usr/bin/env"]\n'
        'askpass = "ask"\n'
        "confirm_timeout = 8\n"
        "audit_entries = 8\n"
        "keep_created_keys = true\n"
        'stop_timeout = "4s"\n'
        "http_workers = 3\n"
    )
    result = load(str(path), env={})
    sources = result.sources()
    assert sources.pop("insecure").source == "default"
    lines = {name: int(s.source.rsplit(":", 1)[1]) for name, s in sources.items()}
    assert lines == {
        "host": 1,
        "user": 2,
        "lifetime": 4,
        "persist": 5,
        "ca_bundle": 6,
        "connect_timeout": 7,
        "read_timeout": 8,
        "validate_after": 9,
        "idle_timeout": 10,
        "line_timeout": 11,
        "max_connections": 12,
        "max_keys": 13,
        "export": 14,
        "allow_exe": 15,
        "askpass": 16,
        "confirm_timeout": 17,
        "audit_entries": 18,
        "keep_created_keys": 19,
        "stop_timeout": 20,
        "http_workers": 21,
    }
    assert result.keep_created_keys is True
    assert result.stop_timeout == 4.0
    assert result.http_workers == 3
    assert result.lifetime == 5400.0
    assert result.ca_bundle == str(path.parent / "ca.pem")
    assert (result.connect_timeout, result.max_connections) == (1.0, 6)


# --- precedence --------------------------------------------------------------------------------


LAYERED = [
    # name, its variable, file TOML, env text, flag value, and the values from each layer
    ("host", "KEYAGENT_HOST", '"f.example"', "e.example", "c.example", None),
    ("user", "KEYAGENT_USER", '"file@x.org"', "env@x.org", "flag@x.org", None),
    ("lifetime", "KEYAGENT_LIFETIME", '"1h"', "2h", 10800.0, (3600.0, 7200.0, 10800.0)),
    ("ca_bundle", "KEYAGENT_CA_BUNDLE", '"/f/ca.pem"', "/e/ca.pem", "/c/ca.pem", None),
]


@pytest.mark.parametrize("case", LAYERED, ids=[case[0] for case in LAYERED])
def test_flag_beats_env_beats_file_beats_default(
    write: Writer, case: tuple[str, str, str, str, object, tuple[object, ...] | None]
) -> None:
    """Each layer overrides the ones below it, and the source names the winning layer."""
    name, variable, file_value, env_value, flag_value, expected = case
    from_file, from_env, from_flag = expected or (json.loads(file_value), env_value, flag_value)
    default = load(str(write("")), env={})
    assert default.sources()[name] == Setting(name, config.DEFAULTS[name], "default")

    path = write(f"\n{name} = {file_value}\n")
    only_file = load(str(path), env={})
    assert only_file.sources()[name] == Setting(name, from_file, f"file {path}:2")

    with_env = load(str(path), env={variable: env_value})
    assert with_env.sources()[name] == Setting(name, from_env, f"env {variable}")

    with_flag = load(str(path), env={variable: env_value}, flags={name: flag_value})
    assert with_flag.sources()[name] == Setting(name, from_flag, "flag")
    assert getattr(with_flag, name) == from_flag


def test_file_only_settings_are_overridden_by_flags(write: Writer) -> None:
    """Settings with no environment variable go straight from file to flag."""
    path = write("max_connections = 8\nidle_timeout = 60\npersist = true\n")
    result = load(
        str(path),
        env={"KEYAGENT_MAX_CONNECTIONS": "99"},
        flags={"max_connections": 4, "idle_timeout": None},
    )
    sources = result.sources()
    assert sources["max_connections"] == Setting("max_connections", 4, "flag")
    assert sources["idle_timeout"] == Setting("idle_timeout", 60.0, f"file {path}:2")
    assert sources["persist"] == Setting("persist", True, f"file {path}:3")


def test_an_empty_environment_variable_counts_as_unset(write: Writer) -> None:
    """KEYAGENT_HOST= (empty) leaves the file's host in place, as keyagent-ctl always did."""
    path = write('host = "f.example"\n')
    result = load(str(path), env={"KEYAGENT_HOST": ""})
    assert result.sources()["host"] == Setting("host", "f.example", f"file {path}:1")


def test_insecure_comes_only_from_the_flag(write: Writer) -> None:
    """--insecure is honoured from the command line, and no environment variable sets it."""
    path = write("")
    assert load(str(path), env={"KEYAGENT_INSECURE": "1"}).insecure is False
    result = load(str(path), env={}, flags={"insecure": True})
    assert result.sources()["insecure"] == Setting("insecure", True, "flag")


def test_an_invalid_value_is_reported_even_when_a_flag_overrides_it(write: Writer) -> None:
    """A broken file stays broken whatever the flags, so its error does not come and go."""
    path = write('lifetime = "forever"\n')
    with pytest.raises(ConfigError, match=r":1: 'lifetime' must be"):
        load(str(path), env={}, flags={"lifetime": 60.0})


def test_an_unknown_flag_name_is_a_programming_error(write: Writer) -> None:
    """Flags must be setting names; anything else is the caller's bug, not a ConfigError."""
    with pytest.raises(ValueError, match="not settings: lifetyme"):
        load(str(write("")), env={}, flags={"lifetyme": 3.0})


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "seconds"),
    [
        ("90", 90.0),
        ("0.25", 0.25),
        ("1e3", 1000.0),
        ('"90"', 90.0),
        ('"90s"', 90.0),
        ('"15m"', 900.0),
        ('"8h"', 28800.0),
        ('"1h30m"', 5400.0),
        ('"2d"', 172800.0),
        ('"1w"', 604800.0),
        (str(TEN_YEARS), float(TEN_YEARS)),
        ('"3650d"', float(TEN_YEARS)),
    ],
)
def test_durations_as_numbers_and_strings(write: Writer, toml: str, seconds: float) -> None:
    """A duration is a number of seconds or a duration string, always stored as float seconds."""
    result = load_text(write, f"lifetime = {toml}\nread_timeout = {toml}\n")
    assert result.lifetime == seconds
    assert result.read_timeout == seconds
    assert isinstance(result.read_timeout, float)


def test_durations_from_the_environment_and_flags(write: Writer) -> None:
    """KEYAGENT_LIFETIME takes a duration string; a flag takes seconds or a string."""
    path = str(write(""))
    assert load(path, env={"KEYAGENT_LIFETIME": "15m"}).lifetime == 900.0
    assert load(path, env={}, flags={"lifetime": 42}).lifetime == 42.0
    assert load(path, env={}, flags={"idle_timeout": "2m"}).idle_timeout == 120.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (28800.0, "8h"),
        (90.0, "1m30s"),
        (300.0, "5m"),
        (5.0, "5s"),
        (90061.0, "1d1h1m1s"),
        (0.5, "0.5s"),
        (1e-05, "0.00001s"),
        (float(TEN_YEARS), "3650d"),
    ],
)
def test_format_duration_is_readable(seconds: float, text: str) -> None:
    """Durations print in the shortest unit form that parse_duration reads back."""
    assert config.format_duration(seconds) == text
    assert parse_duration(text) == seconds


@settings(max_examples=200)
@given(st.floats(min_value=1e-6, max_value=MAX_LIFETIME) | st.integers(1, TEN_YEARS).map(float))
def test_format_duration_round_trips(seconds: float) -> None:
    """Whatever a setting holds, its rendered form parses back to the same seconds."""
    assert math.isclose(parse_duration(config.format_duration(seconds)), seconds, rel_tol=1e-12)


# --- paths -------------------------------------------------------------------------------------


def test_relative_ca_bundle_is_relative_to_the_file(write: Writer, tmp_path: Path) -> None:
    """A relative path in the file starts at the file's directory, not the current one."""
    result = load_text(write, 'ca_bundle = "certs/../certs/ca.pem"\n')
    assert result.ca_bundle == str(tmp_path / "keyagent" / "certs" / "ca.pem")


def test_tilde_ca_bundle_uses_home(write: Writer, tmp_path: Path) -> None:
    """A leading ~ expands to $HOME from the given environment."""
    result = load_text(write, 'ca_bundle = "~/certs/ca.pem"\n', env={"HOME": str(tmp_path)})
    assert result.ca_bundle == str(tmp_path / "certs" / "ca.pem")
    assert load_text(write, 'ca_bundle = "~"\n', env={"HOME": "/h"}).ca_bundle == "/h"


def test_tilde_user_ca_bundle(write: Writer) -> None:
    """~root expands through the password database; an unknown ~user is an error."""
    root_home = os.path.expanduser("~root")
    result = load_text(write, 'ca_bundle = "~root/ca.pem"\n')
    assert result.ca_bundle == os.path.join(root_home, "ca.pem")
    error = error_of(write, '\nca_bundle = "~no-such-user-here/ca.pem"\n')
    assert error.line == 2
    assert "'ca_bundle' must be a file path whose ~user names an existing user" in str(error)


def test_env_and_flag_paths_are_relative_to_the_current_directory(write: Writer) -> None:
    """Paths from the environment and the command line start where the command runs."""
    path = str(write(""))
    from_env = load(path, env={"KEYAGENT_CA_BUNDLE": "ca.pem"}).ca_bundle
    from_flag = load(path, env={"HOME": "/h"}, flags={"ca_bundle": "~/x.pem"}).ca_bundle
    assert from_env == os.path.join(os.getcwd(), "ca.pem")
    assert from_flag == "/h/x.pem"


# --- which file --------------------------------------------------------------------------------


def test_keyagent_config_names_the_file(tmp_path: Path) -> None:
    """$KEYAGENT_CONFIG replaces the default location, and an argument replaces both."""
    via_env = tmp_path / "env.toml"
    via_env.write_text('host = "env-file.example"\n')
    via_arg = tmp_path / "arg.toml"
    via_arg.write_text('host = "arg-file.example"\n')
    result = load(env={"KEYAGENT_CONFIG": str(via_env)})
    assert (result.host, result.path, result.path_source) == (
        "env-file.example",
        str(via_env),
        "env KEYAGENT_CONFIG",
    )
    result = load(str(via_arg), env={"KEYAGENT_CONFIG": str(via_env)})
    assert (result.host, result.path_source) == ("arg-file.example", "argument")


def test_keyagent_config_expands_tilde(tmp_path: Path) -> None:
    """KEYAGENT_CONFIG=~/x.toml is looked up in $HOME."""
    (tmp_path / "x.toml").write_text("max_connections = 3\n")
    result = load(env={"KEYAGENT_CONFIG": "~/x.toml", "HOME": str(tmp_path)})
    assert result.max_connections == 3
    assert result.path == str(tmp_path / "x.toml")


def test_dev_null_means_no_file() -> None:
    """KEYAGENT_CONFIG=/dev/null gives the defaults without looking anywhere else."""
    result = load(env={"KEYAGENT_CONFIG": os.devnull})
    assert result.file_found
    assert result.path == os.devnull
    assert {name: s.value for name, s in result.sources().items()} == config.DEFAULTS


def test_an_explicitly_named_file_must_exist(tmp_path: Path) -> None:
    """A missing file named on purpose is an error, since a typo would silently drop it all."""
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as caught:
        load(missing, env={})
    assert str(caught.value) == (
        f"{missing}: no such configuration file; create it or name another one"
    )
    assert caught.value.path == missing
    with pytest.raises(ConfigError) as caught:
        load(env={"KEYAGENT_CONFIG": missing})
    assert str(caught.value) == (
        f"{missing}: no such configuration file; create it, or fix or unset KEYAGENT_CONFIG"
    )


# --- errors ------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest(write: Writer) -> None:
    """A misspelt key names the file, its line and the setting it most likely meant."""
    path = write('host = "h.example"\n\nlifetme = "8h"\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    error = caught.value
    assert str(error) == f"{path}:3: unknown setting 'lifetme'; did you mean 'lifetime'?"
    assert (error.path, error.key, error.line) == (str(path), "lifetme", 3)
    assert error.message == str(error)


def test_unknown_key_spelt_with_dashes(write: Writer) -> None:
    """connect-timeout (the flag's spelling) points at connect_timeout."""
    error = error_of(write, "connect-timeout = 3\n")
    assert str(error).endswith(
        ":1: unknown setting 'connect-timeout'; did you mean 'connect_timeout'?"
    )


def test_unknown_key_with_nothing_close_lists_the_settings(write: Writer) -> None:
    """With no plausible match the message lists every setting instead."""
    error = error_of(write, "colour = 3\n")
    assert ":1: unknown setting 'colour'; the settings are host, user, lifetime," in str(error)
    assert "insecure" not in str(error)


def test_settings_below_a_table_header_get_a_hint(write: Writer) -> None:
    """Keys under a [header] belong to it in TOML; the message says to move them up."""
    path = write('host = "h.example"\n[keyagent]\nlifetime = "8h"\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == (
        f"{path}:2: 'keyagent' is not a setting, and settings are top-level keys,"
        " so move 'lifetime' above the first [table] header"
    )


@pytest.mark.parametrize(
    ("toml", "got"),
    [
        ("true", "a boolean"),
        ("[1, 2]", "an array"),
        ("{ hours = 8 }", "a table"),
        ("1979-05-27T07:32:00Z", "a date-time"),
        ("1979-05-27", "a date"),
        ("07:32:00", "a time"),
    ],
)
def test_wrong_type_for_a_duration(write: Writer, toml: str, got: str) -> None:
    """A non-duration value names the key, the line, the expected form and the type it got."""
    path = write(f'host = "h.example"\n\nlifetime = {toml}\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == (
        f"{path}:3: 'lifetime' must be a duration such as 3600 or \"8h\"; got {got}"
    )
    assert (caught.value.key, caught.value.line) == ("lifetime", 3)


HOST_MUST = "'host' must be a host name or address with an optional :port, such as"
HOST_MUST += ' "conduce.example.com"'
USER_MUST = "'user' must be an account name such as \"me@example.com\", 1 to 320 characters,"
USER_MUST += " no spaces or control characters"
PATH_MUST = "'ca_bundle' must be a file path such as \"~/certs/ca.pem\""
COUNT_MUST = "'max_connections' must be a whole number of at least 1"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("host = 7", f"{HOST_MUST}; got an integer"),
        (
            'host = "https://h.example/"',
            f'{HOST_MUST}; got "https://h.example/" (write the host alone (app.conduce.com),'
            " without https://, a path or user@)",
        ),
        (
            'host = "a b"',
            f'{HOST_MUST}; got "a b" (a host name has only letters, digits, hyphens and dots)',
        ),
        (
            'host = "h.example:"',
            f'{HOST_MUST}; got "h.example:" (a port is written :N with N from 1 to 65535)',
        ),
        ("user = 1.5", f"{USER_MUST}; got a float"),
        ('user = ""', f'{USER_MUST}; got ""'),
        ('user = "me\\u202eevil"', f'{USER_MUST}; got "me\\u202eevil"'),
        ('user = "me\\nyou"', f'{USER_MUST}; got "me\\u000ayou"'),
        ('persist = "yes"', "'persist' must be true or false (unquoted); got \"yes\""),
        ("persist = 1", "'persist' must be true or false (unquoted); got 1"),
        ("ca_bundle = 3", f"{PATH_MUST}; got an integer"),
        ('ca_bundle = ""', f'{PATH_MUST}; got ""'),
        ("ca_bundle = ['a']", f"{PATH_MUST}; got an array"),
        ("max_connections = 2.0", f"{COUNT_MUST}; got a float"),
        ("max_connections = true", f"{COUNT_MUST}; got a boolean"),
        ('max_connections = "8"', f"{COUNT_MUST}; got a string"),
    ],
)
def test_wrong_type_or_shape(write: Writer, line: str, message: str) -> None:
    """Each kind of setting says, at the key's line, what it expects and what it got."""
    path = write(f"\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == f"{path}:2: {message}"
    assert caught.value.line == 2


@pytest.mark.parametrize(
    ("value", "got"),
    [('"8 hours"', '"8 hours"'), ('"1h 30m"', '"1h 30m"'), ('"-5m"', '"-5m"'), ("nan", "nan")],
)
def test_bad_duration(write: Writer, value: str, got: str) -> None:
    """A string that is not a duration is quoted back in the message."""
    path = write(f"read_timeout = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == (
        f"{path}:1: 'read_timeout' must be a duration such as 3600 or \"8h\"; got {got}"
    )


@pytest.mark.parametrize(
    ("value", "must"),
    [
        ('"1h30"', 'a duration such as 3600 or "8h" (did you mean 1h30m?)'),
        ('"0"', "a positive duration"),
        ('"0s"', "a positive duration"),
    ],
)
def test_an_ambiguous_or_zero_duration_says_what_was_meant(
    write: Writer, value: str, must: str
) -> None:
    """'1h30' in the file gets the same hint as on the command line; '0' must be positive."""
    path = write(f"lifetime = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == f"{path}:1: 'lifetime' must be {must}; got {value}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lifetime = 315360001", "'lifetime' must be at most ten years (315360000 seconds); got 3"),
        ('lifetime = "3651d"', "'lifetime' must be at most ten years"),
        ("lifetime = inf", "'lifetime' must be at most ten years (315360000 seconds); got inf"),
        ("lifetime = 1e400", "'lifetime' must be at most ten years (315360000 seconds); got inf"),
        ("lifetime = 99999999999999999999", "'lifetime' must be at most ten years"),
        ("idle_timeout = 0", "'idle_timeout' must be a positive duration; got 0"),
        ("connect_timeout = -1.5", "'connect_timeout' must be a positive duration; got -1.5"),
        ("line_timeout = -0.0", "'line_timeout' must be a positive duration; got -0.0"),
        ("max_connections = 0", "'max_connections' must be a whole number of at least 1; got 0"),
        ("max_connections = -3", "'max_connections' must be a whole number of at least 1; got -3"),
        ("audit_entries = -1", "'audit_entries' must be a whole number from 0 to 1000000; got -1"),
        (
            "audit_entries = 1000001",
            "'audit_entries' must be a whole number from 0 to 1000000; got 1000001",
        ),
        ("audit_entries = 1.5", "'audit_entries' must be a whole number from 0 to 1000000; got a"),
        ("http_workers = 0", "'http_workers' must be a whole number from 1 to 32; got 0"),
        ("http_workers = -2", "'http_workers' must be a whole number from 1 to 32; got -2"),
        ("http_workers = 33", "'http_workers' must be a whole number from 1 to 32; got 33"),
        ("http_workers = 2.0", "'http_workers' must be a whole number from 1 to 32; got a float"),
        (
            "http_workers = true",
            "'http_workers' must be a whole number from 1 to 32; got a boolean",
        ),
        ('http_workers = "4"', "'http_workers' must be a whole number from 1 to 32; got a string"),
    ],
)
def test_out_of_range(write: Writer, line: str, message: str) -> None:
    """Lifetimes over ten years, non-positive timeouts and no connections are refused."""
    path = write(f'user = "me@example.com"\n{line}\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value).startswith(f"{path}:2: {message}")


@pytest.mark.parametrize(
    ("text", "line", "column", "detail"),
    [
        ('host = "h.example"\nlifetime = \n', 2, 12, "invalid value"),
        ('host = "h.example"\n\nhost = "again"\n', 3, 15, "cannot overwrite a value"),
        ("[table\n", 1, 7, "expected ']' at the end of a table declaration"),
        ('user = "x"\nthis is not toml\n', 2, 6, "expected '=' after a key in a key/value pair"),
    ],
)
def test_invalid_toml_reports_line_and_column(
    write: Writer, text: str, line: int, column: int, detail: str
) -> None:
    """tomllib's position becomes file:line and 'column N' in one sentence."""
    path = write(text)
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == f"{path}:{line}: not valid TOML at column {column}: {detail}"
    assert (caught.value.line, caught.value.column) == (line, column)


def test_invalid_toml_at_the_end_of_the_file(write: Writer) -> None:
    """An error tomllib places at the end of the document gets the last line."""
    path = write('host = "h.example"\nuser = "unterminated')
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value).startswith(f"{path}:2: not valid TOML")


@pytest.mark.parametrize(
    "nested", ["x = " + "[" * 5000 + "]" * 5000, "x = " + "{a = " * 5000 + "1" + "}" * 5000]
)
def test_values_nested_too_deeply_are_a_config_error(write: Writer, nested: str) -> None:
    """tomllib recurses into nested arrays and inline tables: a file nesting them thousands
    deep is refused like any invalid file (exit 78 from the commands), never a traceback."""
    path = write(nested + "\n")
    with pytest.raises(ConfigError, match="nested too deeply to read; remove the nesting"):
        load(str(path), env={})
    ctl = subprocess.run(
        [sys.executable, "-m", "keyagent", "config"],
        env={**os.environ, "KEYAGENT_CONFIG": str(path)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (ctl.returncode, "Traceback" in ctl.stderr) == (78, False)
    assert "nested too deeply" in ctl.stderr


def test_text_that_is_not_utf8(write: Writer) -> None:
    """Bytes that are not UTF-8 are reported at their line."""
    path = write("")
    path.write_bytes(b'host = "h.example"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == (
        f"{path}:2: is not UTF-8 text, which TOML requires; re-save it as UTF-8"
    )


SECRET_TAIL = (
    "looks like a secret, and secrets do not belong in files; give API keys to the agent"
    " with keyagent-ctl add and passwords with keyagent-ctl login"
)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ('password = "hunter2"\n', 1, "password"),
        ('host = "h.example"\nkey = "abc"\n', 2, "key"),
        ('api_key = "abc"\n', 1, "api_key"),
        ('apiKey = "abc"\n', 1, "apiKey"),
        ('token = "abc"\n', 1, "token"),
        ('CONDUCE_API_KEY = "abc"\n', 1, "CONDUCE_API_KEY"),
        ('session-cookie = "abc"\n', 1, "session-cookie"),
        ('host = "h"\n[conduce]\nuser = "u"\npassphrase = "p"\n', 4, "conduce.passphrase"),
        ('\naccount = { user = "u", password = "p" }\n', 2, "account.password"),
        ('[[accounts]]\nuser = "u"\n\n[[accounts]]\nsecret = "s"\n', 5, "accounts.secret"),
        ('lifetme = 3\npassword = "x"\n', 2, "password"),
    ],
)
def test_secret_looking_keys_are_refused(write: Writer, text: str, line: int, key: str) -> None:
    """A key that names a secret, at any depth, is refused first, with where to put it instead."""
    path = write(text)
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == f"{path}:{line}: '{key}' {SECRET_TAIL}"
    assert caught.value.key == key


def test_a_secret_value_is_never_echoed(write: Writer) -> None:
    """The refusal names the key but never repeats the secret's value."""
    error = error_of(write, 'password = "correct horse battery staple"\n')
    assert "horse" not in str(error)


def test_key_id_is_not_mistaken_for_a_secret(write: Writer) -> None:
    """key_id names a key without holding one, so it is just an unknown setting."""
    error = error_of(write, 'key_id = "abcd"\n')
    assert "unknown setting 'key_id'" in str(error)


def test_insecure_is_refused_in_the_file(write: Writer) -> None:
    """insecure = true in a file is refused with the flag and ca_bundle as the ways forward."""
    path = write('host = "h.example"\ninsecure = true\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={}, flags={"insecure": True})
    assert str(caught.value) == (
        f"{path}:2: 'insecure' is refused in a file, because turning off TLS verification must"
        " be asked for at each start: pass --insecure, or set ca_bundle for a private CA"
    )


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    """Naming a directory is reported, not a traceback."""
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path), env={})
    assert str(caught.value) == f"{tmp_path}: is a directory, not a configuration file"


def test_a_path_through_a_file_cannot_be_read(tmp_path: Path) -> None:
    """An OS error while opening becomes a ConfigError naming the file and the reason."""
    (tmp_path / "plain").write_text("")
    bad = tmp_path / "plain" / "config.toml"
    with pytest.raises(ConfigError) as caught:
        load(str(bad), env={})
    assert str(caught.value) == f"{bad}: the configuration file cannot be read (Not a directory)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file(write: Writer) -> None:
    """A file without read permission is reported with the reason."""
    path = write('host = "h.example"\n')
    path.chmod(0o200)
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == f"{path}: the configuration file cannot be read (Permission denied)"


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    """A named pipe is not a configuration file, and opening it must not block."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file; name a TOML file"):
        load(str(fifo), env={})


def test_a_world_writable_file_is_refused(write: Writer) -> None:
    """A file anyone can edit could redirect TLS trust, so it is refused."""
    path = write('host = "h.example"\n')
    path.chmod(0o666)
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert str(caught.value) == (
        f"{path}: is writable by its group and every user, who could point ca_bundle at"
        f" their own CA; run chmod go-w {path}"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_a_file_of_another_user_is_refused(write: Writer) -> None:
    """A file owned by someone else (not root) is refused."""
    path = write('host = "h.example"\n')
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to another user"):
        load(str(path), env={})


def test_an_invalid_environment_value(write: Writer) -> None:
    """A bad environment variable is named in the message, with no file position."""
    with pytest.raises(ConfigError) as caught:
        load(str(write("")), env={"KEYAGENT_LIFETIME": "soon"})
    assert str(caught.value) == (
        "environment variable KEYAGENT_LIFETIME: 'lifetime' must be a duration such as 3600"
        ' or "8h"; got "soon"'
    )
    assert (caught.value.path, caught.value.key, caught.value.line) == (None, "lifetime", None)


def test_an_invalid_flag_value(write: Writer) -> None:
    """A bad flag value (say, from a caller that skipped argparse) is a ConfigError too."""
    with pytest.raises(ConfigError) as caught:
        load(str(write("")), env={}, flags={"max_connections": 0})
    assert str(caught.value) == (
        "command line: 'max_connections' must be a whole number of at least 1; got 0"
    )


def test_messages_escape_control_characters(write: Writer) -> None:
    """A value quoted back cannot rewrite the terminal: control and bidi chars are escaped."""
    error = error_of(write, 'lifetime = "\\u001b[2J\\u202e8h"\n')
    assert "\x1b" not in str(error)
    assert "\u202e" not in str(error)
    assert '\\u001b[2J\\u202e8h"' in str(error)


# --- line scanning -----------------------------------------------------------------------------


def test_quoted_keys_comments_and_crlf_keep_their_lines(write: Writer) -> None:
    """Quoted keys, indentation, comments and CRLF line ends do not disturb line numbers."""
    path = write('# header\r\n\r\n\'host\' = "a.example"\r\n  "lifetime"   =  60 # why\r\n')
    result = load(str(path), env={})
    assert result.sources()["host"].source == f"file {path}:3"
    assert result.sources()["lifetime"].source == f"file {path}:4"


def test_lookalike_lines_inside_multiline_strings_are_skipped(write: Writer) -> None:
    """A 'key = value' line inside a multi-line string is not taken for that key."""
    for quote in ('"""', "'''"):
        path = write(f'[notes]\ntext = {quote}\npassword = 1\n{quote}\npassword = "x"\n')
        with pytest.raises(ConfigError) as caught:
            load(str(path), env={})
        assert str(caught.value) == f"{path}:5: 'notes.password' {SECRET_TAIL}"


def test_line_numbers_ignore_unicode_line_separators(write: Writer) -> None:
    """U+2028 (in a comment here) is not a line break, so later lines keep their numbers."""
    path = write('user = "me@example.com" # me\u2028you\nlifetime = "8h"\n')
    result = load(str(path), env={})
    assert result.user == "me@example.com"
    assert result.sources()["lifetime"].source == f"file {path}:2"


def test_an_unfound_line_falls_back_to_the_file(write: Writer) -> None:
    """A key the scan cannot place is still reported, with the file and no line."""
    # A key whose quoted name uses a TOML-only escape (\U) defeats the scan's unescaping.
    path = write('"\\U0000006Cifetime" = 5\n')
    result = load(str(path), env={})
    assert result.lifetime == 5.0
    assert result.sources()["lifetime"].source == f"file {path}"


# --- render ------------------------------------------------------------------------------------


def test_render_lists_every_setting_aligned_with_its_source() -> None:
    """render() prints the file, then each setting, its value and its origin, in columns."""
    result = load(
        env={
            "KEYAGENT_CONFIG": os.devnull,
            "KEYAGENT_HOST": "conduce.example.com",
            "KEYAGENT_LIFETIME": "8h",
        },
        flags={"insecure": True, "max_connections": 8, "idle_timeout": 90.5},
    )
    assert render(result) == (
        "config             /dev/null            env KEYAGENT_CONFIG\n"
        "host               conduce.example.com  env KEYAGENT_HOST\n"
        "user               (not set)            default\n"
        "lifetime           8h                   env KEYAGENT_LIFETIME\n"
        "persist            false                default\n"
        "ca_bundle          (not set)            default\n"
        "insecure           true                 flag\n"
        "connect_timeout    5s                   default\n"
        "read_timeout       30s                  default\n"
        "validate_after     5m                   default\n"
        "idle_timeout       1m30.5s              flag\n"
        "line_timeout       10s                  default\n"
        "max_connections    8                    flag\n"
        "max_keys           100000               default\n"
        "export             true                 default\n"
        "allow_exe          (any program)        default\n"
        "askpass            (not set)            default\n"
        "confirm_timeout    30s                  default\n"
        "audit_entries      10000                default\n"
        f"http_workers       {DEFAULT_HTTP_WORKERS:<21}default\n"
        "keep_created_keys  false                default\n"
        "stop_timeout       10s                  default\n"
    )


def test_render_names_file_lines_and_a_missing_file(write: Writer, tmp_path: Path) -> None:
    """File sources carry their line; a default file that is absent is marked (not found)."""
    path = write('\nuser = "me@example.com"\n')
    lines = render(load(str(path), env={})).splitlines()
    assert re.fullmatch(rf"user +me@example\.com +file {re.escape(str(path))}:2", lines[2])
    missing = render(Config(path=str(tmp_path / "none.toml")))
    assert missing.splitlines()[0].split("  ")[0] == "config"
    assert f"{tmp_path / 'none.toml'} (not found)  default" in missing
    # Columns line up: every value starts at the same offset.
    starts = {len(line) - len(line[len(line.split()[0]) :].lstrip()) for line in lines}
    assert len(starts) == 1


# --- properties --------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    """A TOML literal for a generated value (json's escapes are all valid in TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


durations = st.one_of(
    st.integers(1, TEN_YEARS),
    st.floats(min_value=0.001, max_value=MAX_LIFETIME),
    st.builds(
        # Every number with a unit of its own: a bare number after a unit ("1h30") is refused.
        lambda parts: "".join(f"{n}{u}" for n, u in parts),
        st.lists(
            st.tuples(st.integers(1, 500), st.sampled_from(["s", "m", "h", "d", "w", "H"])),
            min_size=1,
            max_size=3,
        ),
    ).filter(lambda text: parse_duration(text) <= MAX_LIFETIME),
)
valid_settings = st.fixed_dictionaries(
    {},
    optional={
        "host": st.tuples(
            st.lists(
                st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True),
                min_size=1,
                max_size=4,
            ).map(".".join),
            st.one_of(st.just(""), st.integers(1, 65535).map(lambda port: f":{port}")),
        ).map("".join),
        "user": st.text(
            st.characters(blacklist_categories=("C", "Z")),
            min_size=1,
            max_size=40,
        ),
        "lifetime": durations,
        "persist": st.booleans(),
        "ca_bundle": st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True), min_size=1)
        .map("/".join)
        .map(lambda p: p + ".pem"),
        "connect_timeout": durations,
        "read_timeout": durations,
        "validate_after": durations,
        "idle_timeout": durations,
        "line_timeout": durations,
        "max_connections": st.integers(1, 2**31),
    },
)


@settings(max_examples=150, deadline=None)
@given(values=valid_settings, data=st.data())
def test_valid_settings_written_as_toml_load_back(
    tmp_path_factory: pytest.TempPathFactory, values: dict[str, object], data: st.DataObject
) -> None:
    """Any valid settings written as TOML load back as the same values, each from its line."""
    directory = tmp_path_factory.mktemp("prop")
    order = data.draw(st.permutations(sorted(values)))
    path = directory / "config.toml"
    path.write_text("".join(f"{key} = {toml_value(values[key])}\n" for key in order))
    result = load(str(path), env={})
    sources = result.sources()
    for number, key in enumerate(order, start=1):
        raw = values[key]
        expected: object = raw
        if key in DURATION_KEYS:
            expected = parse_duration(raw) if isinstance(raw, str) else float(cast(float, raw))
        elif key == "ca_bundle":
            expected = str(directory / cast(str, raw))
        assert getattr(result, key) == expected, key
        assert sources[key] == Setting(key, expected, f"file {path}:{number}")
    for key in set(config.SETTINGS) - set(values):
        assert sources[key].source == "default"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "host = ",
                    "lifetime = ",
                    "[table]",
                    "[[arr]]",
                    '"""',
                    "'''",
                    "password = 1",
                    "max_connections = ",
                    "ca_bundle = ",
                    "= ",
                    "\r",
                    "\x00",
                    "\u2028",
                ]
            ),
            st.text(max_size=12),
        ),
        max_size=8,
    ).map("\n".join)
)
def test_no_input_causes_a_traceback(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    """Whatever the file holds, load() returns a Config or raises ConfigError, nothing else."""
    path = tmp_path_factory.mktemp("fuzz") / "config.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load(str(path), env={})
    except ConfigError as error:
        message = str(error)
    else:
        return
    assert message.startswith(str(path))
    assert "\n" not in message
