"""systemd integration: ``keyagent.systemd``, the units in contrib/systemd, the daemon under them.

Three layers, fastest first:

* :func:`keyagent.systemd.listen_fds` in a child Python that inherits sockets the way a
  socket unit hands them over (descriptors from 3 on, ``LISTEN_PID`` set to the child's own
  pid just before ``exec``), and :class:`~keyagent.systemd.Notifier` against a datagram
  socket of our own.
* The unit files, checked by ``systemd-analyze verify`` and ``systemd-analyze security``.
* A real ``systemd --user`` manager, started by ``contrib/systemd/user-manager.sh`` in
  private namespaces (this machine's PID 1 is not systemd): the socket unit, the service's
  hardening as seen from inside it, and the whole socket-activated, ``Type=notify`` agent.

The daemon's side (serve the inherited socket, READY=1 once serving, STOPPING=1 on the way
out) lives in ``keyagent.daemon``; the tests here hold it to that contract.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyagent import service, systemd
from keyagent.client import Client
from keyagent.testing.agent import read_line, wait_for_exit

from .conftest import request_as_nobody

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
SOCKET_UNIT = UNITS / "keyagent.socket"
SERVICE_UNIT = UNITS / "keyagent.service"
USER_MANAGER = UNITS / "user-manager.sh"
TEMPLATE_EXEC = "%h/.local/bin/keyagent"
"""The console script's place in the shipped unit: ``pip install --user`` and pipx put it there."""
MAX_EXPOSURE = 1.6
"""``systemd-analyze security`` score of keyagent.service, run as root (lower is safer). 1.5
until the unit let the HTTP workers lower their own priority (``setpriority``, back from
@resources; without CAP_SYS_NICE, which the unit drops, a process can only lower it)."""

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (systemd)"
)
needs_socket_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (systemd)",
)
needs_user_manager = pytest.mark.skipif(
    not any(os.access(p, os.X_OK) for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"))
    or shutil.which("systemctl") is None
    or shutil.which("unshare") is None,
    reason="systemd (the user manager, systemctl) or unshare (util-linux) is not installed",
)
needs_session_bus = pytest.mark.skipif(
    not any(
        os.path.exists(p)
        for p in ("/usr/lib/systemd/user/dbus.socket", "/lib/systemd/user/dbus.socket")
    ),
    reason="dbus-user-session is not installed: no session bus to check keyring's path to",
)
needs_secret_service = pytest.mark.skipif(
    shutil.which("gnome-keyring-daemon") is None,
    reason="gnome-keyring is not installed: no Secret Service for keyring to reach",
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="user-manager.sh needs root for its mount, cgroup and PID namespaces"
)


def keyagent_script() -> Path:
    """The ``keyagent`` console script of the Python running the tests."""
    beside = Path(sys.executable).parent / "keyagent"
    if beside.exists():
        return beside
    found = shutil.which("keyagent")
    assert found, "the keyagent console script is not installed (pip install -e .)"
    return Path(found)


def daemon_env(runtime: Path, **extra: str) -> dict[str, str]:
    """The environment for a daemon under test: its own runtime dir, no inherited protocol."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), **extra}
    for name in ("KEYAGENT_SOCK", "NOTIFY_SOCKET", *systemd.LISTEN_ENV):
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (socket paths are limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="ka-sd-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is terminated (killed if need be) at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


# --- listen_fds ------------------------------------------------------------------------------

# Moves the inherited descriptors to 3, 4, ... and sets LISTEN_PID to its own pid (or to its
# parent's, to play a process the variables were not meant for), then execs the probe: the
# pid survives exec, exactly as when systemd forks, sets the variables and execs a service.
LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for target, fd in enumerate(high, 3):
    os.dup2(fd, target)
    os.close(fd)
pid = {"self": os.getpid(), "parent": os.getppid()}.get(sys.argv[2])
if pid is not None:
    os.environ["LISTEN_PID"] = str(pid)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[3], *sys.argv[4:]])
"""

PROBE = """
import fcntl, json, os, sys
from keyagent import systemd

def cloexec(fd):
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    except OSError:
        return None

try:
    found = systemd.listen_fds_with_names(unset_environment=sys.argv[1] == "unset")
except systemd.ListenFdsError as error:
    result = {"error": str(error), "fd3_cloexec": cloexec(3)}
else:
    result = {
        "sockets": [
            {"name": name, "fd": sock.fileno(), "address": sock.getsockname(),
             "cloexec": cloexec(sock.fileno())}
            for name, sock in found
        ],
        "fd3_cloexec": cloexec(3),
    }
result["env"] = {name: os.environ.get(name) for name in systemd.LISTEN_ENV}
result["pid"] = os.getpid()
print(json.dumps(result))
"""


def activate(
    fds: list[int],
    env: dict[str, str],
    *,
    pid: str = "self",
    unset: bool = True,
) -> dict[str, object]:
    """Run the probe with ``fds`` at 3, 4, ... and LISTEN_PID naming "self" or "parent"."""
    child_env = {**os.environ, **env}
    for name in systemd.LISTEN_ENV:
        if name not in env:
            child_env.pop(name, None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LAUNCHER,
            ",".join(map(str, fds)),
            pid,
            PROBE,
            "unset" if unset else "keep",
        ],
        pass_fds=fds,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_listen_fds_adopts_passed_sockets_in_order_with_names(short_dir: Path) -> None:
    """Two passed listeners come back in order, named, close-on-exec, variables unset."""
    first, second = listener(short_dir / "a.sock"), listener(short_dir / "b.sock")
    with first, second:
        answer = activate(
            [first.fileno(), second.fileno()],
            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "agent:spare"},
        )
    assert answer["sockets"] == [
        {"name": "agent", "fd": 3, "address": str(short_dir / "a.sock"), "cloexec": True},
        {"name": "spare", "fd": 4, "address": str(short_dir / "b.sock"), "cloexec": True},
    ]
    assert answer["env"] == dict.fromkeys(systemd.LISTEN_ENV)


def test_listen_fds_without_names_calls_them_unknown(short_dir: Path) -> None:
    """Without LISTEN_FDNAMES each socket is named "unknown", as sd_listen_fds_with_names does."""
    with listener(short_dir / "a.sock") as sock:
        answer = activate([sock.fileno()], {"LISTEN_FDS": "1"})
    assert answer["sockets"] == [
        {"name": "unknown", "fd": 3, "address": str(short_dir / "a.sock"), "cloexec": True}
    ]


def test_listen_fds_ignores_variables_meant_for_another_process(short_dir: Path) -> None:
    """LISTEN_PID naming another process yields nothing, leaves fd 3 alone, unsets the variables."""
    with listener(short_dir / "a.sock") as sock:
        answer = activate([sock.fileno()], {"LISTEN_FDS": "1"}, pid="parent")
    assert answer["sockets"] == []
    assert answer["fd3_cloexec"] is False  # not adopted: still inheritable as passed
    assert answer["env"] == dict.fromkeys(systemd.LISTEN_ENV)


def test_listen_fds_keeps_the_variables_when_asked(short_dir: Path) -> None:
    """unset_environment=False adopts the socket and leaves the variables in place."""
    with listener(short_dir / "a.sock") as sock:
        answer = activate([sock.fileno()], {"LISTEN_FDS": "1"}, unset=False)
    assert [entry["fd"] for entry in answer["sockets"]] == [3]  # type: ignore[attr-defined]
    env = answer["env"]
    assert isinstance(env, dict)
    assert env["LISTEN_FDS"] == "1"
    assert env["LISTEN_PID"] == str(answer["pid"])


def test_listen_fds_without_variables_returns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no LISTEN_PID at all (not socket-activated) there is nothing to adopt."""
    for name in systemd.LISTEN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"LISTEN_PID": "12x"}, "LISTEN_PID='12x' is not a whole number"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a whole number"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": " 1"}, "LISTEN_FDS=' 1' is not a whole number"),
        (
            {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"},
            "LISTEN_FDNAMES has 1 names for LISTEN_FDS=2",
        ),
    ],
)
def test_listen_fds_rejects_malformed_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    """Malformed variables raise ListenFdsError before any descriptor is touched, and are unset."""
    for name in systemd.LISTEN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value.format(pid=os.getpid()))
    with pytest.raises(systemd.ListenFdsError, match=re.escape(message)):
        systemd.listen_fds()
    assert not any(name in os.environ for name in systemd.LISTEN_ENV)


def test_listen_fds_rejects_a_pipe() -> None:
    """A descriptor that is not a socket is refused with a message naming it."""
    read_end, write_end = os.pipe()
    try:
        answer = activate([read_end], {"LISTEN_FDS": "1"})
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "descriptor 3 (unknown) passed by systemd is not a socket" in str(answer["error"])
    assert answer["env"] == dict.fromkeys(systemd.LISTEN_ENV)


def test_listen_fds_rejects_a_missing_descriptor(short_dir: Path) -> None:
    """LISTEN_FDS counting more descriptors than were passed is refused."""
    with listener(short_dir / "a.sock") as sock:
        answer = activate([sock.fileno()], {"LISTEN_FDS": "2"})
    assert "descriptor 4 (unknown) passed by systemd is not open" in str(answer["error"])


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "AF_INET SOCK_DGRAM"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), "AF_UNIX SOCK_DGRAM"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "not listening"),
        (lambda: socket.create_server(("127.0.0.1", 0)), "AF_INET SOCK_STREAM"),
    ],
    ids=["udp", "unix-datagram", "unix-not-listening", "tcp-listener"],
)
def test_listen_fds_rejects_sockets_it_cannot_serve(
    make: Callable[[], socket.socket], kind: str
) -> None:
    """Only a listening AF_UNIX SOCK_STREAM socket is adopted; others are named in the error."""
    with make() as sock:
        answer = activate([sock.fileno()], {"LISTEN_FDS": "1"})
    error = str(answer["error"])
    assert kind in error
    assert "listening AF_UNIX SOCK_STREAM" in error
    assert answer["fd3_cloexec"] is True  # marked before it was looked at, as sd_listen_fds does


# --- Notifier --------------------------------------------------------------------------------


@dataclass
class Datagram:
    fields: dict[str, str]
    pid: int | None
    raw: bytes


@dataclass
class NotifyReceiver:
    """A stand-in for the service manager's notification socket."""

    address: str
    """What NOTIFY_SOCKET would say: a path, or "@name" for the abstract namespace."""
    sock: socket.socket
    received: list[Datagram] = field(default_factory=list)

    def receive(self, timeout: float = 10.0) -> Datagram:
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _, _ = struct.unpack("3i", payload[:12])
        lines = data.decode().split("\n")
        datagram = Datagram(dict(line.split("=", 1) for line in lines if line), pid, data)
        self.received.append(datagram)
        return datagram

    def wait_for(self, name: str, value: str, timeout: float) -> Datagram:
        """Receive until a datagram sets ``name=value``; TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {name}={value} within {timeout}s: {self.received}")
            try:
                datagram = self.receive(remaining)
            except TimeoutError:
                continue
            if datagram.fields.get(name) == value:
                return datagram

    def values(self, name: str) -> list[str]:
        return [d.fields[name] for d in self.received if name in d.fields]


def bind_receiver(address: str, bind_to: str) -> NotifyReceiver:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(bind_to)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return NotifyReceiver(address, sock)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[NotifyReceiver]:
    """A notification socket at a path, as the system and user managers use."""
    path = str(short_dir / "notify")
    receiving = bind_receiver(path, path)
    yield receiving
    receiving.sock.close()


def test_notifier_sends_each_state_change(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY and STOPPING, with or without a STATUS, arrive as sd_notify datagrams from this
    process."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    notifier = systemd.Notifier()
    try:
        assert "NOTIFY_SOCKET" not in os.environ  # children must not notify in our name
        assert notifier.ready("serving")
        assert notifier.ready()
        assert notifier.stopping("stopping")
        assert notifier.stopping()
    finally:
        notifier.close()
    got = [receiver.receive() for _ in range(4)]
    assert [d.raw for d in got] == [
        b"READY=1\nSTATUS=serving",
        b"READY=1",
        b"STOPPING=1\nSTATUS=stopping",
        b"STOPPING=1",
    ]
    assert {d.pid for d in got} == {os.getpid()}  # what NotifyAccess=main checks


def test_notifier_keeps_a_status_on_one_line(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newline in a status cannot smuggle in another assignment such as READY=1 or MAINPID."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    notifier = systemd.Notifier()
    notifier.stopping("host down\nMAINPID=1\r\nREADY=1")
    notifier.close()
    datagram = receiver.receive()
    assert datagram.fields == {"STOPPING": "1", "STATUS": "host down MAINPID=1 READY=1"}


def test_notifier_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name means the abstract namespace, as systemd uses in containers."""
    name = f"keyagent-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = bind_receiver("@" + name, "\0" + name)
    with abstract.sock:
        monkeypatch.setenv("NOTIFY_SOCKET", abstract.address)
        notifier = systemd.Notifier()
        assert notifier.ready()
        notifier.close()
        assert abstract.receive().raw == b"READY=1"


def test_notifier_without_a_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET every call is a quiet no-op that reports False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = systemd.Notifier()
    assert notifier.ready("x") is False
    assert notifier.stopping() is False
    notifier.close()


@pytest.fixture
def systemd_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture keyagent.systemd's records at debug level, even if "keyagent" stops propagation.

    keyagent.daemon.configure_logging (run in-process by other tests) sets propagate=False on
    the "keyagent" logger, which would keep these records from caplog's root handler.
    """
    logger = logging.getLogger("keyagent.systemd")
    caplog.set_level(logging.DEBUG, logger=logger.name)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_notifier_never_raises_when_the_manager_is_gone(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, systemd_log: pytest.LogCaptureFixture
) -> None:
    """A send to a vanished socket returns False and logs at debug level only."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "gone"))
    notifier = systemd.Notifier()
    assert notifier.address == str(short_dir / "gone")
    assert notifier.ready() is False
    notifier.close()
    assert {r.levelno for r in systemd_log.records} == {logging.DEBUG}
    assert "could not notify" in systemd_log.text


def test_notifier_ignores_an_unsupported_address(
    monkeypatch: pytest.MonkeyPatch, systemd_log: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY_SOCKET that is neither a path nor @name (e.g. vsock:) disables notification."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    notifier = systemd.Notifier()
    assert notifier.ready() is False
    assert "unsupported" in systemd_log.text
    assert "could not notify" not in systemd_log.text  # nothing was even tried


def test_notifier_takes_an_address_and_can_leave_the_environment(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit address is used as given; unset_environment=False keeps NOTIFY_SOCKET."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    kept = systemd.Notifier(unset_environment=False)
    assert kept.address == "/nonexistent/notify"
    assert os.environ["NOTIFY_SOCKET"] == "/nonexistent/notify"
    notifier = systemd.Notifier(receiver.address)
    assert notifier.ready("explicit")
    notifier.close()
    assert receiver.receive().raw == b"READY=1\nSTATUS=explicit"


# --- unit files ------------------------------------------------------------------------------


def installed_service(keyagent: Path, *, exec_start: str | None = None, probe: bool = False) -> str:
    """keyagent.service as installed: ExecStart pointing at ``keyagent`` (the documented edit).

    The shipped unit runs ``%h/.local/bin/keyagent``; a venv, system or pipx-elsewhere install
    substitutes its own path. With ``probe`` the service becomes a oneshot running
    ``exec_start`` under the very same hardening.
    """
    text = SERVICE_UNIT.read_text()
    assert text.count(f"ExecStart={TEMPLATE_EXEC} -D\n") == 1
    text = text.replace(TEMPLATE_EXEC, str(keyagent))
    if probe:
        assert exec_start is not None
        text = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={exec_start}", text)
        text = re.sub(r"(?m)^Type=notify$", "Type=oneshot", text)
        text = re.sub(r"(?m)^(Requires|After)=keyagent\.socket\n", "", text)
        text = text.split("[Install]")[0]
    # PrivateTmp=yes hides /tmp and /var/tmp from the service: whatever of this checkout and
    # this Python lives there must be bound in, wherever CI put the clone and its venv.
    for path in hidden_by_private_tmp():
        text = add_to_service(text, f"BindReadOnlyPaths={path}")
    return text


def hidden_by_private_tmp() -> list[Path]:
    """The directories under /tmp or /var/tmp that the units' Python needs: the checkout,
    the venv and the interpreter it links to, the keyagent script, every import directory.

    Only the outermost of nested ones are listed; /tmp itself never is (binding it would
    undo PrivateTmp=yes, which the hardening tests check). The rule is the one
    ``keyagent-ctl service install`` applies (keyagent.service.hidden_by_private_tmp).
    """
    needed = {ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable)}
    needed |= {keyagent_script(), *(Path(entry) for entry in sys.path if os.path.isabs(entry))}
    return service.hidden_by_private_tmp(needed)


def add_to_service(text: str, line: str) -> str:
    """Add ``line`` at the top of the [Service] section (not in a comment that names it)."""
    text, count = re.subn(r"(?m)^\[Service\]\n", f"[Service]\n{line}\n", text, count=1)
    assert count == 1
    return text


def analyze(home: Path, runtime: Path, *args: str) -> subprocess.CompletedProcess[str]:
    home.mkdir(exist_ok=True)
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    return subprocess.run(
        ["systemd-analyze", "--user", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@needs_analyze
def test_units_verify_without_a_word(tmp_path: Path) -> None:
    """systemd-analyze --user verify prints nothing for the shipped units, as installed by pip."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "keyagent").symlink_to(keyagent_script())
    result = analyze(home, tmp_path / "run", "verify", str(SOCKET_UNIT), str(SERVICE_UNIT))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_installed_copy_verifies_without_a_word(tmp_path: Path) -> None:
    """The copy with ExecStart pointing at this venv's keyagent verifies cleanly too."""
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(SOCKET_UNIT, units / "keyagent.socket")
    (units / "keyagent.service").write_text(installed_service(keyagent_script()))
    result = analyze(
        tmp_path / "home",
        tmp_path / "run",
        "verify",
        str(units / "keyagent.socket"),
        str(units / "keyagent.service"),
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_service_exposure_stays_low(tmp_path: Path) -> None:
    """systemd-analyze security rates keyagent.service at most MAX_EXPOSURE (9.8 unhardened)."""
    result = analyze(
        tmp_path / "home", tmp_path / "run", "security", "--offline=true", str(SERVICE_UNIT)
    )
    found = re.search(r"Overall exposure level for keyagent\.service: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


# --- the daemon under socket activation and notification ------------------------------------


def start_socket_activated(
    processes: list[subprocess.Popen[bytes]], path: Path, runtime: Path
) -> subprocess.Popen[bytes]:
    """``systemd-socket-activate -l PATH -- python -m keyagent.daemon -D``, listening."""
    process = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(path),
            "--",
            sys.executable,
            "-m",
            "keyagent.daemon",
            "-D",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=daemon_env(runtime),
    )
    processes.append(process)
    assert process.stderr is not None
    line = read_line(process.stderr.fileno(), 20)
    assert line.startswith(f"Listening on {path} as 3.".encode()), line
    return process


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


@needs_socket_activate
def test_socket_activation_serves_the_inherited_socket(
    short_dir: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """The first connection execs the daemon in place on fd 3; it serves it and leaves the file."""
    path = short_dir / "agent.sock"
    process = start_socket_activated(processes, path, short_dir)
    # Nothing runs but the activator until a client connects ...
    assert comm(process.pid).startswith("systemd-socket")
    with Client(str(path), timeout=20) as client:
        status = client.status()
    # ... which execs keyagent in its place (no --accept): same pid, so LISTEN_PID matches.
    assert status["pid"] == process.pid
    assert comm(process.pid) == "keyagent"  # the serving process, named for pgrep
    process.terminate()
    assert process.wait(10) == 0
    assert stat.S_ISSOCK(path.lstat().st_mode)  # the socket file belongs to whoever made it


@needs_socket_activate
def test_socket_activated_daemon_refuses_other_users(
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """The peer-uid check guards an inherited socket too: nobody's first connection is refused."""
    base = Path(tempfile.mkdtemp(prefix="ka-sd-open-"))  # tmp_path is private to root
    try:
        os.chmod(base, 0o755)
        path = base / "agent.sock"
        process = start_socket_activated(processes, path, base)
        os.chmod(path, 0o666)
        answer = request_as_nobody(str(path), b'{"op": "status"}\n', timeout=20)
        assert json.loads(answer)["error"]["code"] == "forbidden"
        with Client(str(path), timeout=20) as client:  # its owner is still served
            assert client.status()["pid"] == process.pid
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_daemon_notifies_ready_then_stopping(
    short_dir: Path, receiver: NotifyReceiver, processes: list[subprocess.Popen[bytes]]
) -> None:
    """With NOTIFY_SOCKET, keyagent -D sends READY=1 once serving and STOPPING=1 on SIGTERM."""
    path = short_dir / "run" / "agent.sock"
    (short_dir / "run").mkdir(mode=0o700)
    process = subprocess.Popen(
        [sys.executable, "-m", "keyagent.daemon", "-D", "-a", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=daemon_env(short_dir, NOTIFY_SOCKET=receiver.address),
    )
    processes.append(process)
    ready = receiver.wait_for("READY", "1", 10)
    assert ready.pid == process.pid  # NotifyAccess=main: only the main process counts
    with Client(str(path), timeout=20) as client:  # READY=1 means it answers already
        assert client.status()["pid"] == process.pid
    process.send_signal(signal.SIGTERM)
    stopping = receiver.wait_for("STOPPING", "1", 10)
    assert stopping.pid == process.pid
    assert process.wait(10) == 0
    assert receiver.values("STATUS"), "no STATUS= line was sent"


# --- a real systemd --user manager -----------------------------------------------------------


@dataclass
class ManagerRun:
    """The outcome of a script run next to a user manager: its output and KEY=value results."""

    returncode: int
    output: str
    results: dict[str, str]
    out: Path
    home: Path

    def json(self, path: Path) -> dict[str, object]:
        data: dict[str, object] = json.loads(path.read_text())
        return data


UserManager = Callable[..., ManagerRun]


@pytest.fixture
def user_manager(tmp_path: Path) -> Iterator[UserManager]:
    """Run a bash script inside user-manager.sh, with a fresh HOME; stop it at the end.

    The script sees ``$PYTHON`` (this Python), ``$KEYAGENT`` (its console script) and
    ``$OUT`` (a directory for result files), and ``env`` besides; lines it prints as
    ``KEY=value`` are collected.
    Units in ``units`` are installed in ``$HOME/.config/systemd/user``; ``files`` are
    written to ``$OUT``. With ``user``, the manager and the script run as that user, in a
    home of theirs (``files`` go there too: ``$OUT`` is root's).
    """
    started: list[subprocess.Popen[str]] = []
    homes: list[Path] = []

    def run(
        script: str,
        units: dict[str, str],
        files: dict[str, str] | None = None,
        timeout: float = 45.0,
        *,
        user: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ManagerRun:
        home = tmp_path / f"home{len(started)}"
        if user is not None:  # a home of the user's own, outside root's private tmp_path
            home = Path(tempfile.mkdtemp(prefix="ka-sd-home-"))
            homes.append(home)
        unit_dir = home / ".config" / "systemd" / "user"
        unit_dir.mkdir(parents=True)
        for name, text in units.items():
            (unit_dir / name).write_text(text)
        if user is not None:
            for name, text in (files or {}).items():
                (home / name).write_text(text)
            account = pwd.getpwnam(user)
            for path in [home, *home.rglob("*")]:
                os.chown(path, account.pw_uid, account.pw_gid)
        out = tmp_path / f"out{len(started)}"
        out.mkdir()
        for name, text in (files or {}).items():
            (out / name).write_text(text)
        variables = {
            **os.environ,
            **(env or {}),
            "HOME": str(home),
            "PYTHON": sys.executable,
            "KEYAGENT": str(keyagent_script()),
            "OUT": str(out),
        }
        for name in ("KEYAGENT_SOCK", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS"):
            variables.pop(name, None)
        as_user = ["--user", user] if user is not None else []
        process = subprocess.Popen(
            [str(USER_MANAGER), *as_user, "bash", "-euo", "pipefail", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=variables,
            start_new_session=True,
        )
        started.append(process)
        output, _ = process.communicate(timeout=timeout)
        results = dict(
            line.split("=", 1) for line in output.splitlines() if re.match(r"^[A-Za-z_]+=", line)
        )
        return ManagerRun(process.returncode, output, results, out, home)

    yield run
    for process in started:
        if process.poll() is None:
            process.terminate()  # the script tears its namespaces and cgroup down
            if not wait_for_exit(process.pid, 15):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)


@needs_user_manager
@needs_root
def test_socket_unit_makes_a_private_socket(user_manager: UserManager) -> None:
    """keyagent.socket listens at %t/keyagent/agent.sock (0600 in 0700) and removes it on stop."""
    run = user_manager(
        """
        systemctl --user daemon-reload
        systemctl --user start keyagent.socket
        echo "socket=$(systemctl --user is-active keyagent.socket)"
        echo "service=$(systemctl --user is-active keyagent.service || true)"
        sock=$XDG_RUNTIME_DIR/keyagent/agent.sock
        echo "dir=$(stat -c %a "$XDG_RUNTIME_DIR/keyagent")"
        echo "sock=$(stat -c %a:%F "$sock")"
        echo "http=$(stat -c %a:%F "$XDG_RUNTIME_DIR/keyagent/http.sock")"
        echo "default=$("$PYTHON" -c 'import keyagent.paths as p; print(p.default_socket_path())')"
        systemctl --user stop keyagent.socket
        echo "after_stop=$(test -e "$sock" && echo here || echo gone)"
        """,
        {
            "keyagent.socket": SOCKET_UNIT.read_text(),
            "keyagent.service": installed_service(keyagent_script()),
        },
    )
    assert run.returncode == 0, run.output
    uid = os.getuid()
    assert run.results == {
        "socket": "active",
        "service": "inactive",  # nothing connected yet
        "dir": "700",
        "sock": "600:socket",
        "http": "600:socket",
        "default": f"/run/user/{uid}/keyagent/agent.sock",  # where keyagent-ctl looks
        "after_stop": "gone",
    }, run.output


def cgroup2_dir() -> Path:
    """This process's cgroup in the cgroup2 hierarchy (hybrid or unified layout)."""
    unified = Path("/sys/fs/cgroup/unified")
    base = unified if unified.is_dir() else Path("/sys/fs/cgroup")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return base / line[3:].lstrip("/")
    raise AssertionError("no cgroup2 line in /proc/self/cgroup")


@needs_user_manager
@needs_root
def test_user_manager_script_tears_everything_down_on_sigterm(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """SIGTERM to user-manager.sh ends every process it started and removes its cgroup."""
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("XDG_RUNTIME_DIR", None)
    process = subprocess.Popen(
        [str(USER_MANAGER), "sh", "-c", "systemctl --user is-system-running; exec sleep 600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    processes.append(process)
    assert process.stdout is not None
    assert read_line(process.stdout.fileno(), 30) == b"running\n"
    cgroup = cgroup2_dir() / f"keyagent-user-manager.{process.pid}"
    inside = {
        int(pid) for procs in cgroup.rglob("cgroup.procs") for pid in procs.read_text().split()
    }
    assert len(inside) >= 4  # the script, unshare, the namespace's init, the manager, sleep
    process.terminate()
    assert wait_for_exit(process.pid, 15)
    assert process.wait() != 0
    assert not cgroup.exists()
    assert all(wait_for_exit(pid, 5) for pid in inside)


HARDENING_PROBE = """
import ctypes, json, mmap, os, socket, sys
from keyagent import core

result = {}
core.harden(1024)  # setrlimit, and prctl(PR_SET_DUMPABLE, 0) through ctypes
libc = ctypes.CDLL(None, use_errno=True)
result["dumpable"] = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
numbers = (ctypes.c_int * 3)(3, 1, 2)
as_int = lambda p: ctypes.cast(p, ctypes.POINTER(ctypes.c_int))[0]
libc.qsort(numbers, 3, ctypes.sizeof(ctypes.c_int),
           compare(lambda a, b: as_int(a) - as_int(b)))  # a libffi closure
result["callback_sorted"] = list(numbers)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    result["wx_mapping"] = "allowed"
except OSError as error:
    result["wx_mapping"] = os.strerror(error.errno)
for name in ("AF_INET", "AF_INET6", "AF_NETLINK"):
    try:
        socket.socket(getattr(socket, name), socket.SOCK_DGRAM).close()
        result[name] = "allowed"
    except OSError as error:
        result[name] = os.strerror(error.errno)
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
bus = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
with open_dbus_connection("SESSION") as connection:  # how keyring reaches Secret Service
    reply = connection.send_and_get_reply(new_method_call(bus, "GetId"))
result["session_bus_id"] = len(reply.body[0])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
for name in ("NoNewPrivs", "Seccomp", "CapEff", "CapBnd"):
    result[name] = status[name].strip()
result["home_writable"] = os.access(os.environ["HOME"], os.W_OK)
print(json.dumps(result))
"""


@needs_user_manager
@needs_session_bus
@needs_root
def test_service_hardening_leaves_python_working(user_manager: UserManager) -> None:
    """Under keyagent.service's hardening: ctypes, setrlimit, D-Bus and INET work; W+X does not."""
    run = user_manager(
        """
        cp "$OUT/probe.py" "$XDG_RUNTIME_DIR/probe.py"
        systemctl --user daemon-reload
        systemctl --user start keyagent-probe.service
        echo "result=$(systemctl --user show -p Result --value keyagent-probe.service)"
        """,
        {
            "keyagent-probe.service": add_to_service(
                installed_service(
                    keyagent_script(), exec_start=f"{sys.executable} %t/probe.py", probe=True
                ),
                "StandardOutput=file:%h/probe.json",
            ),
        },
        files={"probe.py": HARDENING_PROBE},
    )
    assert run.returncode == 0, run.output
    assert run.results == {"result": "success"}, run.output
    probe = run.json(run.home / "probe.json")
    assert probe == {
        "dumpable": 0,
        "callback_sorted": [1, 2, 3],  # libffi's closures need no W+X page
        "wx_mapping": "Operation not permitted",  # MemoryDenyWriteExecute is in force
        "AF_INET": "allowed",
        "AF_INET6": "allowed",
        "AF_NETLINK": "Address family not supported by protocol",
        "session_bus_id": 32,
        "NoNewPrivs": "1",
        "Seccomp": "2",
        "CapEff": "0000000000000000",
        "CapBnd": "0000000000000000",
        "home_writable": False,
    }, run.output


KEYRING_PROBE = """
import json, keyring
backend = keyring.get_keyring()
result = {"backend": f"{type(backend).__module__}.{type(backend).__name__}"}
keyring.set_password("keyagent-test", "probe", "s3cret")
result["read_back"] = keyring.get_password("keyagent-test", "probe")
keyring.delete_password("keyagent-test", "probe")
print(json.dumps(result))
"""


@needs_user_manager
@needs_session_bus
@needs_secret_service
@needs_root
def test_keyring_reaches_the_secret_service_from_the_service(user_manager: UserManager) -> None:
    """Under keyagent.service's hardening, keyring stores and reads a secret via the session bus."""
    run = user_manager(
        """
        cp "$OUT/probe.py" "$XDG_RUNTIME_DIR/probe.py"
        # A login keyring unlocked as pam_gnome_keyring would at login (password "test").
        printf test | gnome-keyring-daemon --unlock --components=secrets >/dev/null
        systemctl --user daemon-reload
        systemctl --user start keyagent-probe.service
        echo "result=$(systemctl --user show -p Result --value keyagent-probe.service)"
        """,
        {
            "keyagent-probe.service": add_to_service(
                installed_service(
                    keyagent_script(), exec_start=f"{sys.executable} %t/probe.py", probe=True
                ),
                "StandardOutput=file:%h/probe.json",
            ),
        },
        files={"probe.py": KEYRING_PROBE},
    )
    assert run.returncode == 0, run.output
    assert run.results == {"result": "success"}, run.output
    assert run.json(run.home / "probe.json") == {
        "backend": "keyring.backends.SecretService.Keyring",
        "read_back": "s3cret",
    }


SANDBOX_PROBE = """
echo "uid=$(id -u)"
echo "uid_map=$(tr -s ' ' <"/proc/self/uid_map" | sed 's/^ //' | paste -sd,)"
grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status | tr -d ' \t' | tr : =
echo "etc=$(touch /etc/keyagent-probe 2>/dev/null && echo writable || echo read-only)"
echo "home=$(touch "$HOME/probe-write" 2>/dev/null && echo writable || echo read-only)"
echo "bus=$(test -S "$XDG_RUNTIME_DIR/bus" && echo visible || echo hidden)"
echo "devices=$(ls /dev | wc -l)"
"""


@needs_user_manager
@needs_session_bus
@needs_root
def test_unprivileged_user_manager_runs_the_sandbox(user_manager: UserManager) -> None:
    """As an ordinary user (nobody), the socket unit works and keyagent.service's sandbox holds."""
    probe_unit = add_to_service(
        installed_service(Path("/bin/true"), exec_start="/bin/sh %t/probe.sh", probe=True),
        "StandardOutput=file:%h/probe.txt",
    )
    run = user_manager(
        """
        cp "$HOME/probe.sh" "$XDG_RUNTIME_DIR/probe.sh"
        systemctl --user daemon-reload
        systemctl --user start keyagent.socket
        echo "sock=$(stat -c %U:%a:%F "$XDG_RUNTIME_DIR/keyagent/agent.sock")"
        systemctl --user start keyagent-probe.service
        echo "result=$(systemctl --user show -p Result --value keyagent-probe.service)"
        cat "$HOME/probe.txt"
        """,
        {
            "keyagent.socket": SOCKET_UNIT.read_text(),
            "keyagent.service": installed_service(keyagent_script()),
            "keyagent-probe.service": probe_unit,
        },
        files={"probe.sh": SANDBOX_PROBE},
        user="nobody",
    )
    assert run.returncode == 0, run.output
    assert run.results == {
        "sock": "nobody:600:socket",
        "result": "success",
        "uid": "65534",
        "uid_map": "65534 65534 1",  # PrivateUsers=yes: a user namespace holding only itself
        "NoNewPrivs": "1",
        "Seccomp": "2",
        "CapEff": "0000000000000000",
        "etc": "read-only",
        "home": "read-only",
        "bus": "visible",  # the session bus, and so the Secret Service, stays reachable
        "devices": run.results.get("devices", "?"),
    }, run.output
    assert int(run.results["devices"]) < 20  # PrivateDevices=yes: a minimal /dev


@needs_user_manager
@needs_root
def test_the_http_socket_activates_the_service_too(user_manager: UserManager) -> None:
    """A first connection to http.sock starts keyagent.service, which serves it as the HTTP
    socket (an agent error comes back, not a JSON line, from an HTTP worker at the lowest
    priority) and names it in status."""
    run = user_manager(
        """
        systemctl --user daemon-reload
        systemctl --user start keyagent.socket
        echo "before=$(systemctl --user is-active keyagent.service || true)"
        http=$XDG_RUNTIME_DIR/keyagent/http.sock
        timeout 10 curl -s -o "$OUT/answer.json" -w '%{http_code}' --unix-socket "$http" \
            http://app.conduce.com/conduce/api/v1/user/list-teams >"$OUT/code"
        echo "code=$(cat "$OUT/code")"
        timeout 10 systemctl --user start keyagent.service
        echo "active=$(systemctl --user is-active keyagent.service)"
        # The worker that answered lowered its priority inside the sandbox too.
        echo "worker_nice=$(ps -o ni= -p "$(pgrep -x keyagent-http)" | tr -d ' ')"
        timeout 10 "$PYTHON" -m keyagent status --json >"$OUT/status.json"
        systemctl --user stop keyagent.socket keyagent.service
        """,
        {
            "keyagent.socket": SOCKET_UNIT.read_text(),
            "keyagent.service": installed_service(keyagent_script()),
        },
    )
    assert run.returncode == 0, run.output
    uid = os.getuid()
    assert run.results == {
        "before": "inactive",
        "code": "401",
        "active": "active",
        "worker_nice": "19",
    }, run.output
    answer = run.json(run.out / "answer.json")
    error = answer["error"]
    assert isinstance(error, dict)
    assert error["code"] == "login_required"
    status = run.json(run.out / "status.json")
    assert status["http_socket"] == f"/run/user/{uid}/keyagent/http.sock"
    assert status["socket"] == f"/run/user/{uid}/keyagent/agent.sock"


@needs_user_manager
@needs_root
def test_allowed_programs_are_refused_clearly_inside_the_service_sandbox(
    user_manager: UserManager,
) -> None:
    """Under the unit's PrivateUsers= the agent cannot read a client's /proc/PID/exe (the
    kernel allows that only within one user namespace): add --allow-exe is refused with a
    message saying why and what to do, rather than holding a key no program could use;
    plain keys are served as ever."""
    run = user_manager(
        """
        systemctl --user daemon-reload
        systemctl --user start keyagent.socket
        curl=$(readlink -f "$(command -v curl)")
        printf 'sandbox-test-key-0001\\n' | timeout 10 "$PYTHON" -m keyagent add \\
            --host 127.0.0.1:9 --user u@example.com --allow-exe "$curl" 2>"$OUT/refused.txt" \\
            && echo "refused=0" || echo "refused=$?"
        printf 'sandbox-test-key-0002\\n' | timeout 10 "$PYTHON" -m keyagent add \\
            --host 127.0.0.1:9 --user u@example.com >/dev/null
        echo "plain=$?"
        systemctl --user stop keyagent.socket keyagent.service
        """,
        {
            "keyagent.socket": SOCKET_UNIT.read_text(),
            "keyagent.service": installed_service(keyagent_script()),
        },
    )
    assert run.returncode == 0, run.output
    assert run.results == {"refused": "1", "plain": "0"}, run.output
    message = (run.out / "refused.txt").read_text()
    assert "PrivateUsers=" in message
    assert "[bad_request]" in message


@needs_user_manager
@needs_root
def test_socket_activated_notify_service_end_to_end(user_manager: UserManager) -> None:
    """A client starts keyagent.service under a user manager; READY=1 makes it active; it stops."""
    run = user_manager(
        """
        systemctl --user daemon-reload
        systemctl --user start keyagent.socket
        echo "before=$(systemctl --user is-active keyagent.service || true)"
        # keyagent-ctl finds the socket through XDG_RUNTIME_DIR, as a user's shell would.
        timeout 10 "$PYTHON" -m keyagent status --json >"$OUT/first.json"
        # The activation job ends when the service sent READY=1 (Type=notify): wait for it.
        timeout 10 systemctl --user start keyagent.service
        echo "active=$(systemctl --user is-active keyagent.service)"
        echo "main_pid=$(systemctl --user show -p MainPID --value keyagent.service)"
        echo "status_text=$(systemctl --user show -p StatusText --value keyagent.service)"
        # eval "$(keyagent)" and keyagent -k find the agent the manager runs, and say so.
        env -u KEYAGENT_PID "$PYTHON" -m keyagent.daemon -s >"$OUT/eval.txt" 2>&1 || true
        env -u KEYAGENT_PID KEYAGENT_SOCK="$XDG_RUNTIME_DIR/keyagent/agent.sock" \
            "$PYTHON" -m keyagent.daemon -k >"$OUT/kill.txt" 2>&1 || true
        systemctl --user stop keyagent.service
        echo "result=$(systemctl --user show -p Result --value keyagent.service)"
        echo "exit=$(systemctl --user show -p ExecMainCode,ExecMainStatus --value keyagent.service \
            | paste -sd,)"
        echo "after_stop=$(systemctl --user is-active keyagent.service || true)"
        echo "socket_kept=$(test -S "$XDG_RUNTIME_DIR/keyagent/agent.sock" && echo yes || echo no)"
        # The socket stayed open: the next client starts the service again.
        timeout 10 "$PYTHON" -m keyagent --socket "$XDG_RUNTIME_DIR/keyagent/agent.sock" \
            status --json >"$OUT/second.json"
        systemctl --user stop keyagent.socket keyagent.service
        echo "final=$(systemctl --user is-active keyagent.service || true)"
        """,
        {
            "keyagent.socket": SOCKET_UNIT.read_text(),
            "keyagent.service": installed_service(keyagent_script()),
        },
    )
    assert run.returncode == 0, run.output
    first, second = run.json(run.out / "first.json"), run.json(run.out / "second.json")
    uid = os.getuid()
    assert first["socket"] == f"/run/user/{uid}/keyagent/agent.sock"
    results = dict(run.results)
    assert results.pop("main_pid") == str(first["pid"]), run.output
    assert results.pop("status_text"), "no STATUS= reached the manager"
    assert results == {
        "before": "inactive",
        "active": "active",
        "result": "success",
        "exit": "1,0",  # CLD_EXITED, status 0
        "after_stop": "inactive",
        "socket_kept": "yes",
        "final": "inactive",
    }, run.output
    assert second["pid"] != first["pid"]  # a new activation, on the socket systemd kept
    evaluated = (run.out / "eval.txt").read_text()
    assert "keyagent runs under systemd" in evaluated, evaluated
    assert "unset KEYAGENT_PID;" in evaluated
    killed = (run.out / "kill.txt").read_text()
    assert "runs under systemd; stop it with systemctl --user stop keyagent.service" in killed
