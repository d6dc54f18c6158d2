"""Where the socket, the configuration and the state live.

The socket's default is ``$XDG_RUNTIME_DIR/keyagent/agent.sock`` (or the same under
``/run/user/UID``, which logind makes for each user). Without either there is no default:
a shared directory such as ``/tmp/runtime-UID`` could be made first by another user, so the
agent then binds in a fresh private directory with a random name (as ssh-agent does) and
announces it through ``KEYAGENT_SOCK``, which clients then need.

``platformdirs`` is imported only for the configuration's and the state's locations (by the
daemon at start; the serving process is handed its paths).
"""

from __future__ import annotations

import os

SOCKET_ENV = "KEYAGENT_SOCK"
HTTP_SOCKET_ENV = "KEYAGENT_HTTP_SOCK"
PID_ENV = "KEYAGENT_PID"
HTTP_SOCKET_NAME = "http.sock"
APP = "keyagent"
SOCKET_NAME = "agent.sock"
SYSTEMD_SERVICE = "keyagent.service"
SYSTEMD_UNITS = (SYSTEMD_SERVICE, "keyagent.socket")


def runtime_dir() -> str | None:
    """The user's runtime directory: ``$XDG_RUNTIME_DIR``, else ``/run/user/UID`` if it
    exists; None if neither does (the agent checks the directory's owner and mode)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        return xdg
    standard = f"/run/user/{os.geteuid()}"
    return standard if os.path.isdir(standard) else None


def default_socket_path() -> str | None:
    """``<runtime dir>/keyagent/agent.sock``: where the agent listens unless told otherwise;
    None without a runtime directory.

    The systemd socket unit uses the same path (``%t/keyagent/agent.sock``).
    """
    base = runtime_dir()
    return os.path.join(base, APP, SOCKET_NAME) if base is not None else None


def http_socket_path(agent_socket: str) -> str:
    """Where the HTTP socket goes for the agent socket ``agent_socket``: ``http.sock`` in
    the same directory when that is ``agent.sock`` (the default), else the agent socket's
    path with ``.http`` added, so that agents given different ``-a`` paths in one
    directory never share one."""
    directory, name = os.path.split(agent_socket)
    if name == SOCKET_NAME:
        return os.path.join(directory, HTTP_SOCKET_NAME)
    return agent_socket + ".http"


def socket_path(explicit: str | None = None) -> str | None:
    """The socket a client should use: ``explicit``, else ``$KEYAGENT_SOCK``, else the
    default; None if there is none of them (see :data:`NO_SOCKET_HINT`)."""
    return explicit or os.environ.get(SOCKET_ENV) or default_socket_path()


NO_SOCKET_HINT = (
    f"XDG_RUNTIME_DIR is not set (to an absolute path), so there is no default socket: set"
    f" {SOCKET_ENV} to the"
    ' socket keyagent printed (eval "$(keyagent)" does)'
)


def private_socket_path() -> str:
    """A socket path in a fresh directory with a random name, mode 0700 (``mkdtemp``), for
    an agent without a runtime directory: nobody else can have made it first."""
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix=f"{APP}-"), SOCKET_NAME)


def systemd_unit_dirs() -> list[str]:
    """The systemd user manager's unit directories, most specific first."""
    home = os.path.expanduser("~")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    found = [os.path.join(config, "systemd", "user")]
    if runtime:
        found.append(os.path.join(runtime, "systemd", "user"))
    found += [
        "/etc/systemd/user",
        "/run/systemd/user",
        os.path.join(data, "systemd", "user"),
        "/usr/local/lib/systemd/user",
        "/usr/local/share/systemd/user",
        "/usr/lib/systemd/user",
        "/lib/systemd/user",
        "/usr/share/systemd/user",
    ]
    return found


def systemd_unit_installed() -> bool:
    """Whether ``keyagent.service`` or ``keyagent.socket`` is installed for the user manager.

    Asked only on the way to an error message, never on a client's success path.
    """
    return any(
        os.path.lexists(os.path.join(directory, unit))
        for directory in systemd_unit_dirs()
        for unit in SYSTEMD_UNITS
    )


def config_dir() -> str:
    import platformdirs

    return platformdirs.user_config_dir(APP)


def config_file() -> str:
    return os.path.join(config_dir(), "config.toml")


LEFTOVERS_PREFIX = "leftovers-"


def state_dir() -> str:
    """The user's state directory for keyagent (platformdirs: ``$XDG_STATE_HOME/keyagent``,
    ``~/.local/state/keyagent``); the agent makes it 0700 and checks that it is private."""
    import platformdirs

    return str(platformdirs.user_state_path(APP))


def leftovers_path(agent_socket: str) -> str:
    """The leftovers file (:mod:`keyagent.leftovers`) of the agent on ``agent_socket``: named
    after the socket's absolute path, so that agents on different sockets never share one and
    an agent restarted on the same socket reads what its predecessor left."""
    import hashlib

    tag = hashlib.sha256(os.path.abspath(agent_socket).encode("utf-8", "surrogateescape"))
    return os.path.join(state_dir(), f"{LEFTOVERS_PREFIX}{tag.hexdigest()[:16]}.json")
