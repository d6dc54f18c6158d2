"""Run the Conduce emulator as its own process and steer it like an in-process one.

End-to-end tests start the real daemon and the emulator as processes; this class starts
``python -m keyagent.testing serve`` and drives it over its control API (a Unix socket
with a bearer token, see :mod:`keyagent.testing.emulator`), with the same methods and
properties as :class:`~keyagent.testing.emulator.ConduceEmulator`::

    with EmulatorProcess("alice@example.com", "s3cret") as emu:
        emu.inject(Fault.status(503), path="apikeys/list", count=1)
        run_agent_against(emu.host, ca_bundle=emu.ca_path)
        assert [r.status for r in emu.requests] == [503, 200]

Only the standard library is used here: the controlling side needs neither requests nor
trustme (the emulator process imports trustme).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Protocol

from keyagent.testing.agent import read_line, wait_for_exit
from keyagent.testing.emulator import CONTROL_PREFIX, Fault, RequestRecord

__all__ = ["Emulator", "EmulatorControlError", "EmulatorProcess", "EmulatorStartError"]

# What `serve` prints, in order; the token file comes last, so having it means having all.
_SETTINGS: Final = (
    "CONDUCE_HOST",
    "CONDUCE_CA_BUNDLE",
    "CONDUCE_USER",
    "CONDUCE_EMULATOR_CONTROL",
    "CONDUCE_EMULATOR_TOKEN_FILE",
)
# How long one control call may take beyond any wait it asks the emulator for.
_CALL_TIMEOUT: Final = 30.0
# The errors a control call re-raises as themselves: what the in-process method raises.
_REMOTE_ERRORS: Final[dict[str, type[Exception]]] = {
    "ValueError": ValueError,
    "KeyError": KeyError,
    "TypeError": TypeError,
}


class EmulatorStartError(RuntimeError):
    """The emulator process did not come up; the message carries its stderr."""


class EmulatorControlError(RuntimeError):
    """A control call failed for a reason other than the arguments (e.g. the process died)."""


class Emulator(Protocol):
    """What :class:`ConduceEmulator` and :class:`EmulatorProcess` both offer.

    Tests typed against it run with either; see the methods of ConduceEmulator for what
    each one does.
    """

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def url(self) -> str: ...
    @property
    def ca_path(self) -> str: ...
    def add_user(self, email: str, password: str) -> None: ...
    def add_key(self, email: str, description: str = "") -> str: ...
    def add_dataset(self, email: str, name: str = "") -> str: ...
    def api_keys(self, email: str) -> list[str]: ...
    def expire_sessions(self, email: str | None = None) -> int: ...
    def session_count(self, email: str | None = None) -> int: ...
    def session_tokens(self, email: str | None = None) -> list[str]: ...
    def forbid(self, email: str | None = None, *, api_key: str | None = None) -> None: ...
    def unforbid(self, email: str | None = None, *, api_key: str | None = None) -> None: ...
    def inject(
        self, fault: Fault, *, path: str | None = None, count: int | None = None
    ) -> None: ...
    def clear_faults(self) -> None: ...
    def release(self) -> int: ...
    @property
    def requests(self) -> list[RequestRecord]: ...
    def clear_requests(self) -> None: ...
    def wait_for_hung(self, count: int = 1, timeout: float = 5.0) -> bool: ...
    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool: ...


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a Unix socket; the host name only fills in the Host header."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class EmulatorProcess:
    """``python -m keyagent.testing serve`` in a child process, with one account.

    Use it as a context manager, or call :meth:`start` and :meth:`close`. The control
    methods open one connection per call, so they are thread-safe, and one thread may
    release() what another waits on.
    """

    def __init__(
        self,
        user: str,
        password: str,
        *,
        port: int = 0,
        session_lifetime: float | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        """
        :param user: the account the emulator starts with (``--user``).
        :param password: its password, handed over on stdin, never in argv.
        :param port: TCP port of the HTTPS service; 0 picks a free one.
        :param session_lifetime: ``--session-lifetime``: seconds a session lives.
        :param env: the child's environment (default: this process's).
        :param start_timeout: how long the child may take to print its settings.
        """
        self.user: Final = user
        self._password = password
        self._port_argument = port
        self._session_lifetime = session_lifetime
        self._env = env
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._stderr_text = ""
        self._settings: dict[str, str] = {}
        self._token = ""

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> EmulatorProcess:
        """Start the process and wait (up to ``start_timeout``) for its settings."""
        if self._process is not None:
            raise RuntimeError("an EmulatorProcess can only be started once")
        command = [
            sys.executable, "-m", "keyagent.testing", "serve",
            "--user", self.user, "--password-stdin", "--port", str(self._port_argument),
        ]  # fmt: skip
        if self._session_lifetime is not None:
            command += ["--session-lifetime", repr(float(self._session_lifetime))]
        # stderr goes to a file, not a pipe: nobody reads a pipe while the emulator runs, and
        # a full one would block it; the file still lets a start failure show the cause.
        # It lives as long as the process, so close() closes it, not a with block.
        self._stderr = tempfile.TemporaryFile(prefix="conduce-emulator-stderr-")  # noqa: SIM115
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=None if self._env is None else dict(self._env),
        )
        try:
            self._handshake(self._process)
        except BaseException:
            self.close()
            raise
        return self

    def _handshake(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._start_timeout
        if process.stdin is None or process.stdout is None:  # pragma: no cover - PIPE above
            raise EmulatorStartError("the emulator process has no pipes")
        try:
            process.stdin.write(self._password.encode() + b"\n")
            process.stdin.close()
        except BrokenPipeError:
            pass  # it exited already; reported below, with its stderr
        while not set(_SETTINGS) <= self._settings.keys():
            try:
                line = read_line(process.stdout.fileno(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise EmulatorStartError(
                    f"the emulator printed no settings within {self._start_timeout:g}s; "
                    f"stderr:\n{self.log()}"
                ) from None
            if not line.endswith(b"\n"):  # end of file: it has exited, or is about to
                wait_for_exit(process.pid, 5.0)
                code = process.poll()
                raise EmulatorStartError(
                    f"the emulator exited (status {code}) before it was ready; "
                    f"stderr:\n{self.log()}"
                )
            name, _, value = line.decode().rstrip("\n").partition("=")
            self._settings[name] = value
        if self._settings["CONDUCE_USER"] != self.user:
            raise EmulatorStartError(f"the emulator serves {self._settings['CONDUCE_USER']!r}")
        token_path = Path(self._settings["CONDUCE_EMULATOR_TOKEN_FILE"])
        self._token = token_path.read_text().strip()

    def close(self, timeout: float = 10.0) -> int | None:
        """Terminate the process (if running), wait for it and return its exit status.

        SIGTERM lets the emulator release hung requests and remove its directory; a process
        that does not exit within ``timeout`` is killed, and its directory removed here.
        Idempotent.
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            # pidfd + select instead of Popen.wait(timeout), which polls with sleeps.
            if not wait_for_exit(process.pid, timeout):
                process.kill()
        process.wait()
        control = self._settings.get("CONDUCE_EMULATOR_CONTROL")
        if control is not None:
            # A killed emulator (by us, or by a test) could not remove its directory; it
            # holds the CA and the control token, so it does not outlive the process.
            shutil.rmtree(Path(control).parent, ignore_errors=True)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        if self._stderr is not None:
            self._stderr_text = self.log()
            self._stderr.close()
            self._stderr = None
        return process.returncode

    stop = close

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log(self) -> str:
        """What the emulator process wrote to stderr so far (kept after close())."""
        if self._stderr is None:
            return self._stderr_text
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the emulator process is not started")
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended, else None."""
        return None if self._process is None else self._process.poll()

    # --- settings --------------------------------------------------------------------------

    def _setting(self, name: str) -> str:
        value = self._settings.get(name)
        if value is None:
            raise RuntimeError("the emulator process is not started")
        return value

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as ``--host`` takes it."""
        return self._setting("CONDUCE_HOST")

    @property
    def port(self) -> int:
        return int(self.host.rpartition(":")[2])

    @property
    def url(self) -> str:
        """``https://127.0.0.1:PORT`` (no trailing slash; API paths start with /conduce)."""
        return f"https://{self.host}"

    @property
    def ca_path(self) -> str:
        """A PEM file with the CA that signed the emulator's (good) certificate."""
        return self._setting("CONDUCE_CA_BUNDLE")

    @property
    def control_path(self) -> str:
        """The Unix socket of the emulator's control API."""
        return self._setting("CONDUCE_EMULATOR_CONTROL")

    @property
    def control_token_path(self) -> str:
        """The 0600 file with the control API's bearer token."""
        return self._setting("CONDUCE_EMULATOR_TOKEN_FILE")

    # --- accounts and sessions --------------------------------------------------------------

    def add_user(self, email: str, password: str) -> None:
        """Create (or reset the password of) an account."""
        self._call("add_user", {"email": email, "password": password})

    def add_key(self, email: str, description: str = "") -> str:
        """Give an existing account an API key without going through the API; returns it."""
        return _string(self._call("add_key", {"email": email, "description": description}))

    def add_dataset(self, email: str, name: str = "") -> str:
        """Give an existing account a dataset; returns its id (KeyError: no such account)."""
        return _string(self._call("add_dataset", {"email": email, "name": name}))

    def api_keys(self, email: str) -> list[str]:
        """The live API keys of an account, oldest first."""
        return _strings(self._call("api_keys", {"email": email}))

    def expire_sessions(self, email: str | None = None) -> int:
        """End the sessions of one account, or of all; returns how many ended."""
        return _integer(self._call("expire_sessions", {"email": email}))

    def session_count(self, email: str | None = None) -> int:
        """Live (not yet expired) sessions of one account, or of all."""
        return _integer(self._call("session_count", {"email": email}))

    def session_tokens(self, email: str | None = None) -> list[str]:
        """The cookie values of the live sessions of one account, or of all, oldest first."""
        return _strings(self._call("session_tokens", {"email": email}))

    def forbid(self, email: str | None = None, *, api_key: str | None = None) -> None:
        """Make a user's (or one API key's) ``apikeys/*`` calls answer 403."""
        self._call("forbid", {"email": email, "api_key": api_key})

    def unforbid(self, email: str | None = None, *, api_key: str | None = None) -> None:
        """Undo :meth:`forbid`."""
        self._call("unforbid", {"email": email, "api_key": api_key})

    # --- faults and observation -------------------------------------------------------------

    def inject(self, fault: Fault, *, path: str | None = None, count: int | None = None) -> None:
        """Apply ``fault`` to the next ``count`` requests (None: until cleared) to ``path``
        (relative to /conduce/api/v1/, or the full path; None: every path)."""
        self._call("inject", {"fault": fault.to_json(), "path": path, "count": count})

    def clear_faults(self) -> None:
        """Remove all fault rules. Requests already hanging stay hung until release()."""
        self._call("clear_faults")

    def release(self) -> int:
        """Let every hanging request go on; returns how many there were."""
        return _integer(self._call("release"))

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the request log, oldest first."""
        records = self._call("requests")
        if not isinstance(records, list):
            raise EmulatorControlError("the emulator sent a request log that is not a list")
        try:
            return [RequestRecord.from_json(_mapping(record)) for record in records]
        except ValueError as error:
            raise EmulatorControlError(f"the emulator sent a bad request record: {error}") from None

    def clear_requests(self) -> None:
        """Empty the request log; requests in progress are not logged further."""
        self._call("clear_requests")

    def wait_for_hung(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` requests are hanging; False on timeout or close()."""
        arguments = {"count": count, "timeout": timeout}
        return _boolean(self._call("wait_for_hung", arguments, wait=timeout))

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until the log holds at least ``count`` requests; False on timeout or close()."""
        arguments = {"count": count, "timeout": timeout}
        return _boolean(self._call("wait_for_requests", arguments, wait=timeout))

    # --- the control channel ----------------------------------------------------------------

    def _call(
        self, name: str, arguments: Mapping[str, object] | None = None, *, wait: float = 0.0
    ) -> object:
        """One control call: POST the arguments, return the result or raise what the
        emulator's method raised."""
        connection = _UnixConnection(self.control_path, timeout=_CALL_TIMEOUT + max(0.0, wait))
        failure: str | None = None
        status, body = 0, b""
        try:
            connection.request(
                "POST",
                CONTROL_PREFIX + name,
                body=json.dumps(dict(arguments or {})).encode(),
                headers={
                    "Authorization": f"Bearer {self._token}",
                    "Content-Type": "application/json",
                },
            )
            response = connection.getresponse()
            status, body = response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            failure = type(error).__name__
        finally:
            connection.close()
        if failure is not None:
            # Raised outside the except block: no traceback chain back into http.client, and
            # the message names neither the token nor the arguments (a password, say).
            raise EmulatorControlError(f"control call {name} failed: {failure}{self._exit_note()}")
        try:
            document = _mapping(json.loads(body))
        except ValueError:
            document = {}
        if status == 200 and "result" in document:
            return document["result"]
        kind, message = document.get("error"), str(document.get("message", ""))
        if status == 400 and isinstance(kind, str) and kind in _REMOTE_ERRORS:
            raise _REMOTE_ERRORS[kind](message)
        raise EmulatorControlError(f"control call {name} answered {status}: {message}")

    def _exit_note(self) -> str:
        code = self.returncode
        return "" if code is None else f" (the emulator process has exited with status {code})"


def _mapping(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise EmulatorControlError(_unexpected(value, "a string"))
    return value


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise EmulatorControlError(_unexpected(value, "a list of strings"))
    return list(value)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EmulatorControlError(_unexpected(value, "an integer"))
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise EmulatorControlError(_unexpected(value, "a boolean"))
    return value


def _unexpected(value: object, expected: str) -> str:
    # The type only, not the value: a result may be a key or a session token.
    return f"the emulator answered a {type(value).__name__} where {expected} was due"
