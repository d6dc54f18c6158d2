"""Upstream calls for the HTTP socket: one urllib3 pool of warm TLS connections per host.

This module owns urllib3 for the proxy, as :mod:`keyagent.conduce` owns requests for the
agent's own calls; both verify servers with the same :class:`~keyagent.conduce.HttpSettings`
(the CA bundle read once at start, ``--insecure`` only when asked). Bodies stream both ways:
a request body is an iterator of chunks read from the tool as urllib3 sends them, and an
answer is read a chunk at a time as the tool takes it, so a 100 MiB transfer holds one
chunk in memory, not 100 MiB. Nothing is retried and no redirect is followed: the tool sees
exactly what the service answered.

Imported on the first request of the HTTP socket only: an agent that never proxies never
loads urllib3 or OpenSSL for it.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Iterator
from typing import Final

import urllib3
from urllib3 import HTTPHeaderDict
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import parse_url

from keyagent.errors import KeyagentError, RemoteUnreachable, Timeout, TLSError
from keyagent.log import get_logger
from keyagent.tls import HttpSettings, is_certificate_failure

__all__ = ["CHUNK", "Answer", "Upstream"]

log = get_logger("keyagent.forward")

CHUNK: Final = 64 * 1024
"""Bytes moved at a time, each way."""
POOL_SIZE: Final = 64
"""Warm connections kept per host; more may be open at once, the surplus is not kept."""


def path_sent(host: str, target: str) -> str | None:
    """The path :meth:`Upstream.send` puts on the wire for ``target`` (urllib3 normalises
    percent-escapes, for one), so that the proxy checks what goes out; None if urllib3
    would refuse the URL."""
    try:
        return parse_url(f"https://{host}{target}").path or "/"
    except ValueError:
        return None


class Answer:
    """The service's answer: status and headers at once, the body as it is read."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response
        self.status: int = response.status
        self.headers: list[tuple[str, str]] = list(response.headers.items())

    def body(self, host: str) -> Iterator[bytes]:
        """The body, a chunk at a time, undecoded (Content-Encoding passes through)."""
        try:
            yield from self._response.stream(CHUNK, decode_content=False)
        except ReadTimeoutError:
            raise Timeout(f"{host} stopped sending its answer; retry later") from None
        except (HTTPError, OSError) as error:
            log.warning("reading the answer of %s failed: %s", host, type(error).__name__)
            raise RemoteUnreachable(
                f"{host} dropped the connection mid-answer; retry later"
            ) from None

    def finish(self, complete: bool) -> None:
        """Give the connection back to the pool if the body was read to its end; else close
        it (an unread rest must never reach the next request on that connection)."""
        if not complete:
            self._response.close()
        self._response.release_conn()


class Upstream:
    """Pools of TLS connections to Conduce hosts, shared by every HTTP-socket connection
    (urllib3's pools are thread-safe)."""

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        context = settings.ssl_context
        ca_certs: str | None = None
        if settings.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif context is None:
            # The same trust as the agent's own calls without --ca-bundle: requests' bundle.
            import certifi

            ca_certs = certifi.where()
        self._pools = urllib3.PoolManager(
            num_pools=16,
            maxsize=POOL_SIZE,
            block=False,
            retries=False,
            ssl_context=context,
            ca_certs=ca_certs,
            cert_reqs=ssl.CERT_NONE if settings.insecure else ssl.CERT_REQUIRED,
        )
        self._timeout = urllib3.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout
        )

    def send(
        self,
        method: str,
        host: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | Iterable[bytes] | None,
        *,
        chunked: bool,
    ) -> Answer:
        """Send one request to ``https://host`` + ``target`` and return the answer's head."""
        if self.settings.insecure:
            log.warning(
                "TLS verification is off (--insecure): a proxied %s to %s can be intercepted",
                method, host,
            )  # fmt: skip
        try:
            response = self._pools.urlopen(
                method,
                f"https://{host}{target}",
                body=body,
                headers=_header_dict(headers),
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                timeout=self._timeout,
                chunked=chunked,
                assert_same_host=False,
            )
        except KeyagentError:
            raise  # from the request body: the tool's side failed
        except SSLError as error:
            log.warning("proxied %s to %s: TLS failed: %s", method, host, type(error).__name__)
            if is_certificate_failure(error):
                raise TLSError(
                    f"the TLS certificate of {host} could not be verified; "
                    "check the host or start the agent with --ca-bundle"
                ) from None
            raise TLSError(f"the TLS connection to {host} failed; check the host") from None
        except (ConnectTimeoutError, NewConnectionError) as error:
            log.warning("proxied %s to %s: %s", method, host, type(error).__name__)
            if isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError):
                raise Timeout(
                    f"{host} did not accept a connection within "
                    f"{self.settings.connect_timeout:g}s; check the host and network"
                ) from None
            raise RemoteUnreachable(
                f"{host} could not be reached; check the host and network"
            ) from None
        except ReadTimeoutError:
            raise Timeout(
                f"{host} did not answer within {self.settings.read_timeout:g}s; retry later"
            ) from None
        except (ProtocolError, HTTPError, OSError) as error:
            log.warning("proxied %s to %s failed: %s", method, host, type(error).__name__)
            raise RemoteUnreachable(
                f"{host} could not be reached or dropped the connection; retry later"
            ) from None
        return Answer(response)

    def close(self) -> None:
        self._pools.clear()


def _header_dict(headers: list[tuple[str, str]]) -> HTTPHeaderDict:
    """The headers, a repeated name kept repeated (a plain dict would keep the last)."""
    kept = HTTPHeaderDict()
    for name, value in headers:
        kept.add(name, value)
    return kept
