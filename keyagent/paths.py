"""Where the socket, the configuration and the state live.

``platformdirs`` is imported only when a default location is needed, so a client with
``KEYAGENT_SOCK`` set never pays for it.
"""

from __future__ import annotations

import os

SOCKET_ENV = "KEYAGENT_SOCK"
PID_ENV = "KEYAGENT_PID"
APP = "keyagent"
SOCKET_NAME = "agent.sock"


def runtime_dir() -> str:
    """The user's runtime directory: ``$XDG_RUNTIME_DIR`` on Linux, else a private fallback."""
    import tempfile
    import warnings

    import platformdirs

    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR, platformdirs warns and falls back to a temp directory;
        # keyagent checks that directory's owner and mode itself before using it.
        warnings.simplefilter("ignore")
        try:
            base = platformdirs.user_runtime_dir()
        except OSError:
            base = ""
    if not base or not os.path.isdir(os.path.dirname(base) or "/"):
        base = os.path.join(tempfile.gettempdir(), f"runtime-{os.geteuid()}")
    return base


def default_socket_path() -> str:
    """``<runtime dir>/keyagent/agent.sock``: where the agent listens unless told otherwise.

    The systemd socket unit uses the same path (``%t/keyagent/agent.sock``).
    """
    return os.path.join(runtime_dir(), APP, SOCKET_NAME)


def socket_path(explicit: str | None = None) -> str:
    """The socket a client should use: ``explicit``, else ``$KEYAGENT_SOCK``, else the default."""
    return explicit or os.environ.get(SOCKET_ENV) or default_socket_path()


def config_dir() -> str:
    import platformdirs

    return platformdirs.user_config_dir(APP)


def config_file() -> str:
    return os.path.join(config_dir(), "config.toml")
