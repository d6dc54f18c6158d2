"""keyagent.rules: one definition of a valid setting, and every front end agreeing with it.

A value is checked in five places: a request (keyagent.protocol), the configuration file and
environment (keyagent.config), the daemon's and keyagent-ctl's flags (keyagent._argparse),
and the Conduce client (keyagent.conduce). These tests feed the same values to each and
require the same verdict, so a front end that drifts from the rule fails here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from keyagent import daemon, protocol, rules
from keyagent.conduce import ConduceAccount, HttpSettings
from keyagent.config import ConfigError, load
from keyagent.errors import BadRequest, TLSError

NO_FILE = {"KEYAGENT_CONFIG": os.devnull, "HOME": "/nonexistent"}

# Numbers at and around every edge of the duration rule, JSON and TOML alike.
NUMBERS = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.sampled_from([0, -0.0, 5e-324, 315359999.5, 315360000, 315360000.0, 315360001])
)


def protocol_takes_lifetime(value: object) -> bool:
    try:
        protocol.OPS["add"]["lifetime"][0]("lifetime", value)
    except BadRequest:
        return False
    return True


def config_takes(name: str, value: object) -> bool:
    try:
        load(env=NO_FILE, flags={name: value})
    except ConfigError:
        return False
    return True


def http_settings_take(name: str, value: object) -> bool:
    try:
        HttpSettings(**{name: value})  # type: ignore[arg-type]
    except BadRequest:
        return False
    return True


def daemon_takes(flag: str, text: str) -> bool:
    try:
        daemon.build_parser().parse_args([flag, text])
    except SystemExit:
        return False
    return True


@pytest.fixture(autouse=True)
def quiet_usage(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """argparse prints its usage errors; keep them out of the test output."""
    yield
    capsys.readouterr()


@given(NUMBERS)
@example(float("nan"))
@example(float("inf"))
@example(315360001)
@example(10**400)
def test_a_number_of_seconds_gets_one_verdict_everywhere(seconds: float) -> None:
    """A number is a valid lifetime in a request exactly when it is a valid duration in the
    configuration and a valid timeout for the Conduce client: positive, at most ten years."""
    verdict = rules.duration_problem(seconds) is None
    assert verdict == (0 < seconds <= 315360000)
    assert protocol_takes_lifetime(seconds) == verdict
    assert config_takes("lifetime", seconds) == verdict
    assert config_takes("connect_timeout", seconds) == verdict
    assert http_settings_take("connect_timeout", seconds) == verdict
    assert http_settings_take("read_timeout", seconds) == verdict


@given(
    st.integers(min_value=0, max_value=4000).map(lambda days: f"{days}d")
    | st.integers(min_value=0, max_value=10**10).map(str)
    | st.sampled_from(["3650d", "3651d", "520w", "522w", "315360000s", "315360001s"])
)
def test_duration_text_gets_one_verdict_on_every_command_line(text: str) -> None:
    """keyagent's flags, keyagent-ctl's flags and the configuration take the same duration
    texts: whatever parses to a positive number of seconds of at most ten years."""
    from keyagent._argparse import duration_type

    verdict = config_takes("lifetime", text)
    assert daemon_takes("--lifetime", text) == verdict
    assert daemon_takes("--read-timeout", text) == verdict
    try:
        duration_type()(text)
    except Exception:  # noqa: BLE001  # argparse.ArgumentTypeError, by the contract of type=
        taken = False
    else:
        taken = True
    assert taken == verdict


@given(st.integers(min_value=-5, max_value=10**6) | st.booleans())
def test_a_count_gets_one_verdict_in_the_file_and_on_the_command_line(count: int) -> None:
    """max_connections and max_keys are whole numbers of at least 1 wherever they are set."""
    verdict = rules.count_problem(count) is None
    assert verdict == (not isinstance(count, bool) and count >= 1)
    assert config_takes("max_connections", count) == verdict
    if not isinstance(count, bool):
        assert daemon_takes("--max-keys", str(count)) == verdict


@given(st.integers(min_value=-3, max_value=40) | st.booleans() | st.sampled_from([2.0, "4", None]))
def test_a_worker_count_gets_one_verdict_in_the_file_and_on_the_command_line(
    count: object,
) -> None:
    """http_workers is a whole number from 1 to 32 (no bool, float or text) wherever it is
    set: the rule, the configuration file and keyagent --http-workers agree."""
    from keyagent._argparse import worker_count_type

    verdict = rules.worker_count_problem(count) is None
    exact = isinstance(count, int) and not isinstance(count, bool)
    assert verdict == (exact and 1 <= count <= rules.MAX_HTTP_WORKERS)  # type: ignore[operator]
    if count is not None:
        assert config_takes("http_workers", count) == verdict
    if exact:
        assert daemon_takes("--http-workers", str(count)) == verdict
        try:
            worker_count_type(str(count))
        except Exception:  # noqa: BLE001  # argparse.ArgumentTypeError, by the contract of type=
            taken = False
        else:
            taken = True
        assert taken == verdict


def test_the_default_worker_count_follows_the_cores() -> None:
    """Unset, http_workers is two per core, at least two and at most eight, within the
    range the rule allows (the pool's default too: tests/test_proxy_workers.py)."""
    cores = os.cpu_count() or 1
    assert max(2, min(8, 2 * cores)) == rules.DEFAULT_HTTP_WORKERS
    assert rules.worker_count_problem(rules.DEFAULT_HTTP_WORKERS) is None
    assert load(env=NO_FILE).http_workers == rules.DEFAULT_HTTP_WORKERS


USERS = st.text(max_size=330) | st.sampled_from(
    ["a" * 320, "a" * 321, "me@example.com", "me @example.com", "me\u200b@x", "", "\u00a0"]
)


@given(USERS)
@example("a" * 321)
def test_a_user_gets_one_verdict_in_requests_configuration_and_the_client(user: str) -> None:
    """An account name is valid for a request, the configuration and the Conduce client
    alike: 1 to 320 characters without spaces, separators or control characters."""
    verdict = rules.user_problem(user) is None
    try:
        protocol.OPS["login"]["user"][0]("user", user)
    except BadRequest:
        in_request = False
    else:
        in_request = True
    assert in_request == verdict
    assert config_takes("user", user) == verdict
    try:
        ConduceAccount("h.example", user, HttpSettings()).close()
    except BadRequest:
        in_client = False
    else:
        in_client = True
    assert in_client == verdict


@given(st.text(max_size=20) | st.sampled_from(["", "ca.pem", "~/ca.pem", "a\nb", "a\x00b"]))
@example("~0")
def test_a_path_gets_one_verdict_in_the_configuration_and_the_client(path: str) -> None:
    """A CA bundle path is refused alike by the configuration and the Conduce client when it
    is empty or holds a control character, and taken alike otherwise."""
    problem = rules.path_problem(path)
    if problem is None:
        # The configuration also expands ~user, which must name a user who exists.
        unknown_user = path.startswith("~") and os.path.expanduser(path) == path
        assert config_takes("ca_bundle", path) != unknown_user
        # Taken as a path: whether the file exists and is a bundle is checked elsewhere.
        with contextlib.suppress(TLSError):
            HttpSettings(verify=path)
        return
    assert not config_takes("ca_bundle", path)
    with pytest.raises(BadRequest, match="--ca-bundle"):
        HttpSettings(verify=path)


def test_problems_describe_the_rule_never_the_value() -> None:
    """A reason never quotes the value it refuses: a value may be a pasted secret."""
    secret = "hunter2-S3CR3T"
    for problem in (
        rules.user_problem(secret + " x"),
        rules.host_problem(secret + "/x"),
        rules.path_problem(secret + "\n"),
        rules.duration_problem(secret),
        rules.count_problem(secret),
    ):
        assert problem is not None
        assert secret not in problem


@pytest.mark.parametrize(
    ("mode", "shared"),
    [
        (0o1777, True),  # /tmp
        (0o0777, False),  # one's own, open to all: chmod 700 is the advice
        (0o1700, False),  # one's own and sticky (the XDG spec suggests the bit)
        (0o0700, False),
        (0o1770, False),  # sticky, for a group only: that advice still fits
    ],
)
def test_a_shared_directory_is_one_others_may_write_to(
    tmp_path: Path, mode: int, shared: bool
) -> None:
    """Only a directory others may write to (sticky, or someone else's) is shared."""
    directory = tmp_path / "d"
    directory.mkdir()
    directory.chmod(mode)
    assert rules.shared_directory(os.stat(directory)) is shared
