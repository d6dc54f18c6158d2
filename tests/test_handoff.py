"""keyagent.handoff: the one typed value the daemon writes and the serving process reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keyagent.daemon import CONFIGURED, FILE_ONLY
from keyagent.handoff import Handoff, HandoffError, Settings

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "keyagent" / "_serve.py"


def settings(**changes: object) -> Settings:
    values: dict[str, object] = {
        "lifetime": 3600.0,
        "ca_bundle": "/etc/keyagent/ca.pem",
        "connect_timeout": 5.0,
        "read_timeout": 30.0,
        "validate_after": 300.0,
        "idle_timeout": 300.0,
        "line_timeout": 10.0,
        "max_connections": 1024,
        "max_keys": 100_000,
        "audit_entries": 10_000,
        "insecure": False,
        "persist": True,
        "no_keyring": False,
        "ca_certificates": "-----BEGIN CERTIFICATE-----\n...",
        **changes,
    }
    return Settings(**values)  # type: ignore[arg-type]


def handoff(**changes: object) -> Handoff:
    values: dict[str, object] = {
        "sys_path": ["/usr/lib/python3.11", str(ROOT)],
        "socket_path": "/run/user/1000/keyagent/agent.sock",
        "bound": (2049, 1234567, 1_700_000_000_123_456_789),
        "listener_fd": 3,
        "foreground": False,
        "debug": False,
        "notify": "@/org/freedesktop/systemd1/notify",
        "private_dir": None,
        "settings": settings(),
        "announce_fd": 1,
        "announce": "KEYAGENT_SOCK=/r\u00e9p; export KEYAGENT_SOCK;\n".encode() + b"\xff",
        "ready_fd": 7,
        **changes,
    }
    return Handoff(**values)  # type: ignore[arg-type]


def document(value: Handoff) -> dict[str, object]:
    loaded = json.loads(value.to_json())
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize(
    "value",
    [
        handoff(),
        handoff(bound=None, notify=None, announce_fd=None, announce=b"", ready_fd=None),
        handoff(settings=settings(lifetime=None, ca_bundle=None, ca_certificates=None)),
        handoff(private_dir="/tmp/keyagent-x1y2", socket_path="(inherited socket)"),
        handoff(settings=settings(http_workers=1)),
    ],
    ids=["background", "foreground-under-systemd", "defaults", "private-dir", "one-worker"],
)
def test_what_the_daemon_writes_the_serving_process_reads_back(value: Handoff) -> None:
    """to_json then from_json gives back an equal hand-off, field for field and typed
    (bound a tuple, announce bytes that need not be UTF-8)."""
    read = Handoff.from_json(value.to_json())
    assert read == value
    assert isinstance(read.bound, tuple) or read.bound is None
    assert read.announce == value.announce
    assert read.settings.as_dict() == value.settings.as_dict()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"listener_fd": -1}, "'listener_fd' must be a descriptor number"),
        ({"listener_fd": True}, "'listener_fd' must be a descriptor number"),
        ({"bound": [1, 2]}, "'bound' must be a [device, inode, change time] triple"),
        ({"announce": "not hex"}, "'announce' must be hex digits"),
        ({"foreground": "yes"}, "'foreground' must be true or false"),
        ({"sys_path": "/usr/lib"}, "'sys_path' must be a list of directories"),
        ({"settings": []}, "the settings is not a JSON object"),
    ],
)
def test_a_field_of_the_wrong_kind_is_refused_by_name(
    change: dict[str, object], fragment: str
) -> None:
    """Each hand-off field is checked; the error names the field and what it must be."""
    data = {**document(handoff()), **change}
    with pytest.raises(HandoffError) as caught:
        Handoff.from_json(json.dumps(data).encode())
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("max_connections", 0, "'max_connections' must be a whole number of at least 1"),
        ("idle_timeout", 0, "'idle_timeout' must be a positive duration"),
        ("lifetime", 315360001, "'lifetime' must be at most ten years"),
        ("read_timeout", "30", "'read_timeout' must be a number of seconds"),
        ("ca_bundle", "", "'ca_bundle' must be a path (the path is empty)"),
        ("no_keyring", None, "'no_keyring' must be true or false"),
        ("http_workers", 0, "'http_workers' must be a whole number from 1 to 32"),
        ("http_workers", 33, "'http_workers' must be a whole number from 1 to 32"),
        ("http_workers", True, "'http_workers' must be a whole number from 1 to 32"),
        ("http_workers", 2.5, "'http_workers' must be a whole number from 1 to 32"),
    ],
)
def test_settings_follow_the_rules_of_the_configuration(
    name: str, value: object, fragment: str
) -> None:
    """A setting in the hand-off is held to keyagent.rules, as the file and flags are."""
    data = document(handoff())
    data["settings"] = {**settings().as_dict(), name: value}
    with pytest.raises(HandoffError, match="the settings") as caught:
        Handoff.from_json(json.dumps(data).encode())
    assert fragment in str(caught.value)


@pytest.mark.parametrize("where", ["hand-off", "settings"])
def test_a_missing_or_unknown_field_names_a_version_mismatch(where: str) -> None:
    """A field too many or too few means daemon and serving process differ: say restart."""
    data = document(handoff())
    target = data if where == "hand-off" else data["settings"]
    assert isinstance(target, dict)
    del target["debug" if where == "hand-off" else "max_keys"]
    target["from_the_future"] = 1
    with pytest.raises(HandoffError, match="restart the agent") as caught:
        Handoff.from_json(json.dumps(data).encode())
    assert "from_the_future" in str(caught.value)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff", b'"x"'])
def test_text_that_is_no_json_object_is_refused(data: bytes) -> None:
    """Bytes that are not a JSON object are a HandoffError, never another exception."""
    with pytest.raises(HandoffError):
        Handoff.from_json(data)


def test_settings_repr_leaves_out_the_ca_text() -> None:
    """The repr shows each setting but only whether a CA text is present, not the text."""
    text = repr(settings(ca_certificates="PEM-TEXT-" + "A" * 100))
    assert "max_connections=1024" in text
    assert "PEM-TEXT" not in text
    assert "ca_certificates='...'" in text


def serve(data: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """The serving process run on the hand-off ``data``, as the daemon runs it."""
    read_end, write_end = os.pipe()
    os.write(write_end, json.dumps(data).encode())
    os.close(write_end)
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-S", str(SERVE), str(read_end)],
            pass_fds=[read_end], capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        os.close(read_end)
    return result


def test_serving_process_reports_an_unusable_hand_off_in_one_line() -> None:
    """The serving process given a hand-off without a listener exits 1 with one line
    naming the problem, not a traceback."""
    data = document(handoff())
    del data["listener_fd"]
    result = serve(data)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("keyagent: the hand-off from the daemon is unusable:")
    assert "listener_fd" in result.stderr


def test_serving_process_refuses_a_worker_count_out_of_range() -> None:
    """A hand-off asking for 0 HTTP workers stops the serving process before it serves,
    naming the setting and its range (the daemon is not trusted to have checked)."""
    data = document(handoff())
    data["settings"] = {**settings().as_dict(), "http_workers": 0}
    result = serve(data)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("keyagent: the hand-off from the daemon is unusable:")
    assert "'http_workers' must be a whole number from 1 to 32" in result.stderr


def test_every_setting_the_daemon_resolves_crosses_the_handoff() -> None:
    """Each setting the daemon fills from flags, environment or file is a field of the
    hand-off's Settings, so none is silently dropped on the way to the serving process."""
    assert set(CONFIGURED) | set(FILE_ONLY) <= set(Settings.__slots__)
