"""keyagent: a credential agent for the Conduce REST API.

Tools fetch an API key from a running agent without ever seeing the password::

    import keyagent
    key = keyagent.get_key(host="app.conduce.com")

or let the agent make the call, so the tool never holds the key at all::

    session = keyagent.http_session("app.conduce.com")
    session.get("https://app.conduce.com/conduce/api/v1/user/list-teams")

or let the agent's key authenticate a ``requests`` call without handling it::

    requests.get(url, auth=keyagent.AgentAuth(host="app.conduce.com"))

This module imports nothing heavy: a tool that only fetches a key pays for ``socket`` and
``json``, not for ``requests``, ``keyring`` or ``platformdirs``.
"""

from __future__ import annotations

from keyagent.errors import *  # noqa: F403  # the exception leaves are public API
from keyagent.errors import KeyagentError

__version__ = "0.1.0"

__all__ = [
    "AgentAuth",
    "AuthTargetRefused",
    "Client",
    "KeyagentError",
    "__version__",
    "get_key",
    "http_session",
]

# Every module of the package writes `TYPE_CHECKING = False` instead of importing it from
# typing, and this is why: annotations are never evaluated (`from __future__ import
# annotations`), so what they name is imported under `if TYPE_CHECKING:` for the type
# checker alone, which takes any variable of that name for typing.TYPE_CHECKING. Importing
# typing itself would add about 0.7 MiB to the resident agent and 2 ms to every
# `keyagent-ctl get` (Python 3.11), for nothing used at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from keyagent.client import AgentAuth, AuthTargetRefused, Client, get_key
    from keyagent.http_client import http_session


def __getattr__(name: str) -> Any:
    # The client module is only loaded by tools that use it (PEP 562).
    if name in {"Client", "get_key", "AgentAuth", "AuthTargetRefused"}:
        from keyagent import client

        return getattr(client, name)
    if name == "http_session":
        from keyagent.http_client import http_session

        return http_session
    raise AttributeError(f"module 'keyagent' has no attribute {name!r}")
