"""One exception root, one leaf per stable wire code.

The agent raises a leaf; the server sends its ``code`` and ``message``; the client turns the
pair back into the same leaf with :func:`from_code`. Codes are part of protocol v1: add new
ones, never rename.

A message is one sentence that names the next step. It must never contain a secret: callers
build messages from key ids, hosts, user names and operation names only.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar

__all__ = [
    "WIRE_CODES",
    "AgentUnreachable",
    "Ambiguous",
    "BadConfig",
    "BadCredentials",
    "BadPassphrase",
    "BadRequest",
    "Busy",
    "Denied",
    "Forbidden",
    "Internal",
    "KeyagentError",
    "KeyringUnavailable",
    "Locked",
    "LoginRequired",
    "NotFound",
    "NotLocked",
    "ProtocolError",
    "RemoteError",
    "RemoteUnreachable",
    "SessionExpired",
    "TLSError",
    "Timeout",
    "TooLarge",
    "TooMany",
    "UnknownOp",
    "from_code",
]


class KeyagentError(Exception):
    """Root of every error keyagent raises, on either side of the socket."""

    code: ClassVar[str] = "internal"
    default_message: ClassVar[str] = "the agent failed unexpectedly; see its log (keyagent -d)"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        self.subject: tuple[str | None, str, str] | None = None
        """The held key (or session: no key id) a refusal is about, as (key id, host,
        user), for the audit log; not part of the reply (whose message names the key id
        where that helps)."""
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def to_wire(self) -> dict[str, str]:
        """The ``error`` member of a failed reply."""
        return {"code": self.code, "message": self.message}


# --- request errors -------------------------------------------------------------------------


class BadRequest(KeyagentError):
    code = "bad_request"
    default_message = "the request is malformed; see docs/protocol.md for its shape"


class UnknownOp(KeyagentError):
    code = "unknown_op"
    default_message = 'unknown operation; send {"op": "hello"} to list the supported ones'


class TooLarge(KeyagentError):
    code = "too_large"
    default_message = "the request line exceeds 64 KiB; send a smaller request"


class NotFound(KeyagentError):
    code = "not_found"
    default_message = "no matching key is held; add one with keyagent-ctl add"


class Ambiguous(KeyagentError):
    code = "ambiguous"
    default_message = "the key id prefix matches several keys; give more characters"


class TooMany(KeyagentError):
    code = "too_many"
    default_message = "the agent holds as many keys as it may; forget some first"


class Locked(KeyagentError):
    code = "locked"
    default_message = "the agent is locked; run keyagent-ctl unlock"


class NotLocked(KeyagentError):
    code = "not_locked"
    default_message = "the agent is not locked; nothing to unlock"


class BadPassphrase(KeyagentError):
    code = "bad_passphrase"
    default_message = "wrong passphrase; try keyagent-ctl unlock again"


class Forbidden(KeyagentError):
    code = "forbidden"
    default_message = "permission denied; only the user who started the agent may use it"


class Denied(KeyagentError):
    """A rule of the key refused this use: its allowed programs, or its confirmation."""

    code = "denied"
    default_message = (
        "the use of this key was refused by its rules; see keyagent-ctl list for its "
        "allowed programs and confirmation"
    )


class Busy(KeyagentError):
    code = "busy"
    default_message = "the agent has too many open connections; close idle clients and retry"


class Timeout(KeyagentError):
    code = "timeout"
    default_message = "the request line was not completed in time; send whole lines"


class Internal(KeyagentError):
    code = "internal"


# --- remote (Conduce) errors ----------------------------------------------------------------


class LoginRequired(KeyagentError):
    code = "login_required"
    default_message = "no session for this account; run keyagent-ctl login"


class BadCredentials(KeyagentError):
    code = "bad_credentials"
    default_message = "the service rejected the user name or password; check them and log in again"


class SessionExpired(KeyagentError):
    code = "session_expired"
    default_message = "the session has expired; run keyagent-ctl login again"


class RemoteError(KeyagentError):
    code = "remote_error"
    default_message = "the Conduce service answered with an error; retry later"


class RemoteUnreachable(KeyagentError):
    code = "remote_unreachable"
    default_message = "the Conduce service could not be reached; check the host and network"


class TLSError(KeyagentError):
    code = "tls_error"
    default_message = (
        "the service's TLS certificate could not be verified; check the host or pass --ca-bundle"
    )


# --- persistence errors ---------------------------------------------------------------------


class KeyringUnavailable(KeyagentError):
    code = "keyring_unavailable"
    default_message = (
        "no usable OS keyring; install and unlock a Secret Service (e.g. gnome-keyring)"
    )


# --- client-side only (never on the wire) ---------------------------------------------------


class AgentUnreachable(KeyagentError):
    code = "no_agent"
    default_message = 'no agent is reachable; start one with eval "$(keyagent)"'


class BadConfig(KeyagentError):
    code = "bad_config"
    default_message = "the configuration is invalid; run keyagent-ctl config to see where"


class ProtocolError(KeyagentError):
    code = "bad_reply"
    default_message = "the agent sent a reply this client does not understand; upgrade keyagent"


def _leaves() -> dict[str, type[KeyagentError]]:
    found: dict[str, type[KeyagentError]] = {}
    pending: list[type[KeyagentError]] = [KeyagentError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    found["internal"] = Internal
    return found


_BY_CODE = _leaves()


def from_code(code: str, message: str | None = None) -> KeyagentError:
    """Rebuild the error a reply names; an unknown code keeps its code on the root class."""
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    error = KeyagentError(message)
    error.code = code  # type: ignore[misc]  # preserve a newer agent's code verbatim
    return error


WIRE_CODES: tuple[str, ...] = tuple(
    code
    for code in _BY_CODE
    if code not in {AgentUnreachable.code, ProtocolError.code, BadConfig.code}
)
