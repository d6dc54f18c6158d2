"""How keyagent talks TLS to Conduce hosts: :class:`HttpSettings` and its pinned CA bundle.

Used by the agent's own calls (:mod:`keyagent.conduce`, through ``requests``) and by the HTTP
workers (:mod:`keyagent.forward`, with h11 over :mod:`ssl`): kept apart from both so that a
worker never loads ``requests`` or ``urllib3``.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass, field
from typing import Final

from keyagent.errors import BadRequest, TLSError
from keyagent.rules import duration_problem, path_problem
from keyagent.trust import UntrustedFile, read_ca_bundle

__all__ = ["HttpSettings", "is_certificate_failure"]


# Bundles already loaded, by absolute path (or by their PEM text): a path is read once per
# process, so whoever can replace the file later (say, by recreating a deleted temporary
# directory) does not become a trusted CA for accounts made afterwards. A restart reads it
# again. (A PEM text holds newlines, which no path that reaches here does.)
_LOADED_BUNDLES: dict[str, ssl.SSLContext] = {}
_LOADED_BUNDLES_LOCK: Final = threading.Lock()


def _context_for(pem: str) -> ssl.SSLContext:
    """A client context that trusts exactly the certificates in ``pem``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _context_from_pem(pem: str) -> ssl.SSLContext | None:
    """One shared context per bundle text (accounts are made one by one, lazily), or None
    if OpenSSL refuses the text."""
    with _LOADED_BUNDLES_LOCK:
        context = _LOADED_BUNDLES.get(pem)
        if context is None:
            try:
                context = _context_for(pem)
            except (ssl.SSLError, ValueError):
                return None
            _LOADED_BUNDLES[pem] = context
        return context


def _load_bundle(path: str) -> ssl.SSLContext:
    absolute = os.path.abspath(path)
    with _LOADED_BUNDLES_LOCK:
        context = _LOADED_BUNDLES.get(absolute)
        if context is None:
            try:
                pem = read_ca_bundle(absolute)
            except UntrustedFile as error:
                problem = error.message
            else:
                context = _context_for(pem)
                _LOADED_BUNDLES[absolute] = context
                return context
        else:
            return context
    # Raised outside the except block, as everywhere in this module.
    # The problem names its own next step; say where the path came from.
    raise TLSError(f"the CA bundle (--ca-bundle, KEYAGENT_CA_BUNDLE or ca_bundle) {problem}")


@dataclass(frozen=True)
class HttpSettings:
    """How to talk to the service; one instance is shared by all accounts of an agent.

    The CA bundle is loaded into an :class:`ssl.SSLContext` when the settings are made (from
    :attr:`ca_certificates`, else by reading the file :attr:`verify` names, once per process
    and after :func:`keyagent.trust.check_trusted`), and every account's connections use that
    context: the file is never read again, so replacing it has no effect until a restart. An
    unusable bundle is a :class:`~keyagent.errors.TLSError` here, not on some later request.
    """

    verify: str | bool = True
    """A CA bundle path, or True for the system (or ``REQUESTS_CA_BUNDLE``) trust store."""
    ca_certificates: str | None = field(default=None, repr=False)
    """The PEM text of the CA bundle, already read (by the daemon, at start); beats
    :attr:`verify`."""
    insecure: bool = False
    """Explicit opt-out of TLS verification: overrides :attr:`verify`, warns on every request."""
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 2
    """Extra attempts for safe calls (validate, list) only."""
    backoff: float = 0.2
    """urllib3's ``backoff_factor``, and the most jitter added to a wait, in seconds: the first
    retry goes at once, the n-th after ``backoff * 2**(n-1)`` plus up to ``backoff``."""

    def __post_init__(self) -> None:
        # Fail at configuration time, not on the first request of some worker thread, and by
        # the rule the configuration file and the flags follow (keyagent.rules).
        for name in ("connect_timeout", "read_timeout"):
            problem = duration_problem(getattr(self, name))
            if problem is not None:
                raise BadRequest(f"{name} must be {problem}; fix the settings")
        if self.retries < 0 or self.backoff < 0:
            raise BadRequest("retries and backoff must not be negative; fix the settings")
        if self.verify is False and not self.insecure:
            # Turning verification off must be spelled out as insecure=True, which also
            # makes every request log a warning; verify=False alone would do it silently.
            raise BadRequest("to turn TLS verification off, pass --insecure explicitly")
        problem = path_problem(self.verify) if isinstance(self.verify, str) else None
        if problem is not None:
            raise BadRequest(
                f"the CA bundle path is unusable: {problem}; pass a file to --ca-bundle"
            )
        context: ssl.SSLContext | None = None
        if self.insecure:
            pass
        elif self.ca_certificates is not None:
            context = _context_from_pem(self.ca_certificates)
            if context is None:
                raise TLSError("the CA certificates given are not valid PEM; fix --ca-bundle")
        elif isinstance(self.verify, str):
            context = _load_bundle(self.verify)
        object.__setattr__(self, "_ssl_context", context)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The context holding the CA bundle, or None for the default trust (or --insecure)."""
        context: ssl.SSLContext | None = getattr(self, "_ssl_context", None)
        return context

    @property
    def effective_verify(self) -> bool:
        """What to pass as ``verify=`` to requests: False under --insecure; True when the
        bundle is in :attr:`ssl_context` (the adapter ignores it then) or for the default
        trust store (where ``REQUESTS_CA_BUNDLE`` applies, as with curl)."""
        return not self.insecure


def is_certificate_failure(error: BaseException) -> bool:
    """Whether an SSLError comes from certificate verification rather than, say, a dropped
    handshake; requests nests the ssl exception in urllib3 exceptions' args and reason."""
    seen: set[int] = set()
    pending: list[object] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen or len(seen) > 32:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        if isinstance(current, BaseException):
            pending.extend(current.args)
            pending.extend(
                (current.__cause__, current.__context__, getattr(current, "reason", None))
            )
    return False
