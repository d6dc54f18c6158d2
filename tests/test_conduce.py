"""Unit tests of keyagent.conduce against the `responses` fake of requests' transport."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests
import responses
from urllib3.exceptions import (
    InvalidChunkLength,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
)

from keyagent.conduce import (
    API_PREFIX,
    CREATE_UNSURE,
    MAX_ANSWER,
    MAX_COOKIES,
    ConduceAccount,
    HttpSettings,
    RemoteKey,
)
from keyagent.errors import (
    BadCredentials,
    BadRequest,
    Forbidden,
    KeyagentError,
    LoginRequired,
    NotFound,
    RemoteError,
    RemoteUnreachable,
    SessionExpired,
    TLSError,
)
from keyagent.testing.emulator import ConduceEmulator, Fault

HOST = "app.conduce.test"
USER = "alice@example.com"
PASSWORD = "correct horse battery staple"
COOKIE = "s3ss10n-t0ken-value"
KEY = "0123456789abcdef0123456789abcdef"
BASE = f"https://{HOST}{API_PREFIX}"
LOGIN = BASE + "user/login"
VALIDATE = BASE + "user/validate-session"
LIST = BASE + "apikeys/list"
CREATE = BASE + "apikeys/create"
DELETE = BASE + "apikeys/delete"
SECRET_IN_BODY = "LEAKED-SECRET-7f3a9"


class Recorder:
    """Stands in for time.sleep: no real waiting, waits are recorded."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the caller's CA bundle, proxy and netrc settings out of these tests."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def account(recorder: Recorder) -> Iterator[ConduceAccount]:
    with ConduceAccount(HOST, USER, HttpSettings(), sleep=recorder.sleep) as conduce:
        yield conduce


def add_login(rsps: responses.RequestsMock) -> None:
    rsps.add(
        responses.POST,
        LOGIN,
        json={"email": USER},
        headers={"Set-Cookie": f"conduce_session={COOKIE}; Path=/; Secure; HttpOnly"},
    )


def logged_in(account: ConduceAccount, rsps: responses.RequestsMock) -> ConduceAccount:
    add_login(rsps)
    account.login(PASSWORD)
    return account


def request_kwargs(call: Any) -> dict[str, Any]:
    """The keyword arguments requests passed to its adapter for one recorded call."""
    kwargs: dict[str, Any] = call.request.req_kwargs
    return kwargs


def body_of(call: Any) -> Any:
    return json.loads(call.request.body)


# --- login and session ------------------------------------------------------------------------


def test_login_posts_the_documented_body_and_keeps_the_cookie(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A login sends email, password and keep=false, and its cookie carries later calls."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, json=[])
    assert account.has_session
    assert account.list_keys() == []
    assert body_of(rsps.calls[0]) == {"email": USER, "password": PASSWORD, "keep": False}
    assert rsps.calls[1].request.headers["Cookie"] == f"conduce_session={COOKIE}"
    assert "Authorization" not in rsps.calls[1].request.headers


def test_login_with_bad_credentials_raises_bad_credentials(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A 401 on login is BadCredentials and leaves the account without a session."""
    rsps.add(responses.POST, LOGIN, status=401, json={"error": "Unauthorized"})
    with pytest.raises(BadCredentials, match="log in again"):
        account.login(PASSWORD)
    assert not account.has_session


def test_login_without_a_cookie_is_an_unexpected_answer(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A 2xx login answer that sets no cookie is a RemoteError, not a fake session."""
    rsps.add(responses.POST, LOGIN, json={})
    with pytest.raises(RemoteError, match="no session cookie"):
        account.login(PASSWORD)
    assert not account.has_session


def test_login_forbidden_raises_forbidden(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A 403 on login is Forbidden with a message about the remote account."""
    rsps.add(responses.POST, LOGIN, status=403)
    with pytest.raises(Forbidden, match=HOST):
        account.login(PASSWORD)


def test_login_is_never_retried(
    account: ConduceAccount, rsps: responses.RequestsMock, recorder: Recorder
) -> None:
    """A 503 on login fails at once: a login is not retried behind the user's back."""
    rsps.add(responses.POST, LOGIN, status=503)
    with pytest.raises(RemoteError, match="503"):
        account.login(PASSWORD)
    assert len(rsps.calls) == 1
    assert recorder.sleeps == []


def test_empty_password_is_refused_locally(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """An empty password is a BadRequest raised before any network call."""
    with pytest.raises(BadRequest):
        account.login("")
    assert len(rsps.calls) == 0


def test_logout_forgets_the_session_without_a_call(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """logout() drops the cookie locally, after which a session call needs a login."""
    logged_in(account, rsps)
    account.logout()
    assert not account.has_session
    with pytest.raises(LoginRequired):
        account.list_keys()
    assert len(rsps.calls) == 1


def test_a_rotated_session_cookie_is_kept(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A session cookie the service refreshes on a later call replaces the old one."""
    logged_in(account, rsps)
    rsps.add(
        responses.GET,
        LIST,
        json=[],
        headers={"Set-Cookie": "conduce_session=rotated; Path=/; Secure; HttpOnly"},
    )
    rsps.add(responses.GET, LIST, json=[])
    account.list_keys()
    account.list_keys()
    assert rsps.calls[2].request.headers["Cookie"] == "conduce_session=rotated"


def test_every_session_cookie_is_sent_whatever_its_path_or_domain(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """Cookies the login set for another path, or the parent domain, still carry the
    session's calls (cookie matching would leave them off, and the login would seem to work
    while its session was never sent); a cookie without a value goes as its name."""
    rsps.add(
        responses.POST,
        LOGIN,
        json={"email": USER},
        headers=[
            ("Set-Cookie", "sid=s1; Path=/elsewhere; Secure"),
            ("Set-Cookie", f"wide=w2; Domain=.{HOST.split('.', 1)[1]}; Path=/; Secure"),
            ("Set-Cookie", "flag; Path=/"),
        ],
    )
    account.login(PASSWORD)
    rsps.add(responses.GET, LIST, json=[])
    account.list_keys()
    sent = rsps.calls[1].request.headers["Cookie"]
    assert sorted(sent.split("; ")) == ["flag", "sid=s1", "wide=w2"]
    assert sent == account.session_cookie()


@pytest.mark.parametrize("value", ["a\x01b", "a\x7fb", "caf\u00e9"])
def test_cookies_a_cookie_header_cannot_carry_are_not_kept(
    account: ConduceAccount,
    rsps: responses.RequestsMock,
    value: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cookie value with a control or non-ASCII character is dropped: sent back, it
    would break the Cookie header (the HTTP socket's framing refuses it). A login that sets
    only such a cookie has no session; a later one is not kept, and the value is not logged."""
    bad = ("Set-Cookie", f"sid={value}; Path=/")
    rsps.add(responses.POST, LOGIN, json={"email": USER}, headers=[bad])
    with pytest.raises(RemoteError, match="no session cookie"):
        account.login(PASSWORD)
    assert not account.has_session
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, json=[], headers=[("Set-Cookie", f"other={value}; Path=/")])
    rsps.add(responses.GET, LIST, json=[])
    account.list_keys()
    account.list_keys()
    assert rsps.calls[-1].request.headers["Cookie"] == f"conduce_session={COOKIE}"
    assert "cannot be sent back" in caplog.text
    assert value not in caplog.text


def many_cookies(count: int, size: int, name: str = "c") -> list[tuple[str, str]]:
    return [("Set-Cookie", f"{name}{n}={'v' * size}; Path=/; Secure") for n in range(count)]


@pytest.mark.parametrize(("count", "size"), [(MAX_COOKIES + 1, 10), (20, 1024)])
def test_a_login_with_more_cookies_than_a_session_carries_is_refused(
    account: ConduceAccount, rsps: responses.RequestsMock, count: int, size: int
) -> None:
    """Cookies past MAX_COOKIES, or MAX_COOKIE_BYTES in all, are no session: a hostile
    service would grow the agent, and every Cookie header sent, without bound."""
    rsps.add(responses.POST, LOGIN, json={"email": USER}, headers=many_cookies(count, size))
    with pytest.raises(RemoteError, match="more cookies than a session can carry"):
        account.login(PASSWORD)
    assert not account.has_session


def test_cookies_that_would_grow_a_session_past_its_bounds_are_not_kept(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A call that sets cookies past the bounds leaves the session as it was."""
    logged_in(account, rsps)
    for name in ("c", "d"):  # 10 KiB kept, then 10 KiB more, which would pass the bound
        rsps.add(responses.GET, LIST, json=[], headers=many_cookies(10, 1024, name))
    rsps.add(responses.GET, LIST, json=[])
    for _ in range(3):
        account.list_keys()
    sent = rsps.calls[3].request.headers["Cookie"]
    assert f"conduce_session={COOKIE}" in sent
    assert "c9=" in sent
    assert "d0=" not in sent
    assert sent == account.session_cookie()


def test_cookies_set_on_api_key_calls_are_ignored(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A cookie set in answer to an API-key call never becomes the account's session."""
    rsps.add(
        responses.GET,
        LIST,
        json=[],
        headers={"Set-Cookie": "conduce_session=planted; Path=/; Secure; HttpOnly"},
    )
    account.list_keys(api_key=KEY)
    assert not account.has_session


def test_validate_without_session_makes_no_call(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """validate() is False without a session, and asks nothing of the network."""
    assert account.validate() is False
    assert len(rsps.calls) == 0


def test_validate_true_on_200(account: ConduceAccount, rsps: responses.RequestsMock) -> None:
    """validate() is True while the service answers 200, sending the session cookie."""
    logged_in(account, rsps)
    rsps.add(responses.GET, VALIDATE, json={})
    assert account.validate() is True
    assert rsps.calls[1].request.headers["Cookie"] == f"conduce_session={COOKIE}"


def test_validate_false_on_401_drops_the_session(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """validate() turns a 401 into False and forgets the dead cookie."""
    logged_in(account, rsps)
    rsps.add(responses.GET, VALIDATE, status=401)
    assert account.validate() is False
    assert not account.has_session


def test_validate_raises_on_other_errors(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """validate() raises RemoteError on a 500 rather than guessing a session state."""
    logged_in(account, rsps)
    rsps.add(responses.GET, VALIDATE, status=500)
    with pytest.raises(RemoteError, match="500"):
        account.validate()
    assert account.has_session


def test_validate_is_retried_on_502(account: ConduceAccount, rsps: responses.RequestsMock) -> None:
    """validate() is a safe call: after a 502 the request is sent again."""
    logged_in(account, rsps)
    rsps.add(responses.GET, VALIDATE, status=502)
    rsps.add(responses.GET, VALIDATE, json={})
    assert account.validate() is True
    assert [call.request.url for call in rsps.calls[1:]] == [VALIDATE, VALIDATE]


# --- keys ---------------------------------------------------------------------------------------


def test_list_keys_parses_defensively(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """Listed keys accept several field spellings, keep unknown fields, skip keyless entries."""
    logged_in(account, rsps)
    rsps.add(
        responses.GET,
        LIST,
        json=[
            {"apikey": KEY, "description": "ci", "created": "2024-01-02T03:04:05Z", "x": 1},
            {"key": "k2" * 8, "created_at": "2024-02-02"},
            {"api_key": "k3" * 8, "date": "2024-03-03", "description": 42},
            {"description": "no key at all"},
            {"apikey": 12345},
            {"apikey": None},
            "not an object",
            None,
        ],
    )
    keys = account.list_keys()
    assert [k.key for k in keys] == [KEY, "k2" * 8, "k3" * 8]
    assert keys[0] == RemoteKey(KEY, "ci", "2024-01-02T03:04:05Z", {"x": 1})
    assert keys[1].created == "2024-02-02"
    assert keys[1].description == ""
    assert keys[2].created == "2024-03-03"
    assert keys[2].description == ""  # a non-string description is not trusted
    assert dict(keys[0].extra) == {"x": 1}


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"apikey": KEY, "description": "\x1b[2J"}, "description"),
        ({"apikey": KEY, "description": "\x1b]0;owned\x07"}, "description"),
        ({"apikey": KEY, "description": "right\u202etxt.exe"}, "description"),
        ({"apikey": KEY, "description": "d" * 1025}, "description"),
        ({"apikey": "k\x1b[2Jk" * 3}, "apikey"),
        ({"key": "kkkk kkkk"}, "key"),
        ({"api_key": "kkkk\u00a0kkkk"}, "api_key"),
        ({"apikey": "kkkk\nkkkk"}, "apikey"),
        ({"apikey": ""}, "apikey"),
        ({"apikey": KEY, "created": "\x1b[31m2024"}, "created"),
        ({"apikey": KEY, "created_at": "2" * 65}, "created_at"),
    ],
)
def test_a_hostile_value_in_a_listed_entry_is_remote_error(
    account: ConduceAccount, rsps: responses.RequestsMock, entry: dict[str, str], field: str
) -> None:
    """A listed value that fails the client-input checks fails the list, naming field and
    entry, never the value."""
    logged_in(account, rsps)
    good = {"apikey": "g" * 20, "description": "fine", "created": "2024-01-02"}
    rsps.add(responses.GET, LIST, json=[good, good, entry])
    with pytest.raises(RemoteError) as caught:
        account.list_keys()
    message = caught.value.message
    assert f"invalid '{field}' in entry 3" in message
    assert "apikeys/list" in message
    assert all(value not in message for value in entry.values() if value)
    assert caught.value.__context__ is None


@pytest.mark.parametrize(
    ("entries", "shape"),
    [
        ([{"id": "k1" * 10, "name": "ci"}], "1 entry: objects with the fields id, name"),
        (["k1" * 10, "k2" * 10], "2 entries: strings"),
        (
            [{"id": "k1" * 10}, "k2" * 10, 7],
            "3 entries: objects and strings and numbers with the fields id",
        ),
        ([{"\x1b[2J": "k1" * 10}], "1 entry: objects with the fields ?"),
    ],
)
def test_a_list_without_any_understood_entry_is_remote_error(
    account: ConduceAccount, rsps: responses.RequestsMock, entries: list[object], shape: str
) -> None:
    """A non-empty list of which no entry has a key field is remote_error naming its shape,
    not an empty list (which would mark every held key stale)."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, json=entries)
    with pytest.raises(RemoteError) as caught:
        account.list_keys()
    message = caught.value.message
    assert f"does not understand ({shape}, none with a key field: apikey, key, api_key)" in message
    assert "k1" not in message
    assert "k2" not in message
    assert "\x1b" not in message


def test_an_empty_list_is_still_no_keys(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """An empty list means the account has no keys: no error."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, json=[])
    assert account.list_keys() == []


def test_list_keys_accepts_a_wrapped_list(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A list wrapped in an object under "apikeys" is accepted too."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, json={"apikeys": [{"apikey": KEY}]})
    assert [k.key for k in account.list_keys()] == [KEY]


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops</html>",
        b'{"apikeys": 3}',
        b'"a string"',
        b"[" * 100_000,
        b"\xff\xfe\x00",
        # Python's json takes these; JSON has no such values.
        b'[{"apikey": "k-0123456789", "created": NaN}]',
        b'[{"apikey": "k", "x": -Infinity}]',
    ],
)
def test_list_keys_unexpected_answer(
    account: ConduceAccount, rsps: responses.RequestsMock, body: bytes
) -> None:
    """A 2xx that is not JSON, or not a list of keys, is a RemoteError naming the problem."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, body=body, content_type="application/json")
    with pytest.raises(RemoteError, match="unexpected answer") as caught:
        account.list_keys()
    assert caught.value.__context__ is None


def test_an_answer_of_exactly_the_cap_is_read(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """An answer of MAX_ANSWER bytes is still read and parsed."""
    logged_in(account, rsps)
    padded = b"[" + b" " * (MAX_ANSWER - 2) + b"]"
    rsps.add(responses.GET, LIST, body=padded, content_type="application/json")
    assert account.list_keys() == []


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_an_oversized_answer_is_refused_unread(
    account: ConduceAccount,
    rsps: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    encoding: str,
) -> None:
    """An answer over MAX_ANSWER bytes (decoded) is a RemoteError, not retried, body unshown."""
    caplog.set_level(logging.DEBUG, logger="keyagent.conduce")
    logged_in(account, rsps)
    document = json.dumps([{"apikey": SECRET_IN_BODY, "description": "x" * MAX_ANSWER}]).encode()
    headers = {}
    if encoding == "gzip":
        # Small on the wire, over the cap once decoded: the cap must count decoded bytes.
        document = gzip.compress(document)
        assert len(document) < MAX_ANSWER // 100
        headers["Content-Encoding"] = "gzip"
    rsps.add(responses.GET, LIST, body=document, content_type="application/json", headers=headers)
    with pytest.raises(RemoteError, match="oversized answer") as caught:
        account.list_keys()
    assert caught.value.__context__ is None
    assert SECRET_IN_BODY not in str(caught.value)
    assert SECRET_IN_BODY not in caplog.text
    assert len(rsps.calls) == 2  # the login and one list: a refused answer is not retried


def test_an_oversized_login_answer_starts_no_session(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A login answer over the cap is refused as a whole, its session cookie included."""
    rsps.add(
        responses.POST,
        LOGIN,
        body=b" " * (MAX_ANSWER + 1),
        headers={"Set-Cookie": f"conduce_session={COOKIE}; Path=/; Secure; HttpOnly"},
    )
    with pytest.raises(RemoteError, match="oversized answer"):
        account.login(PASSWORD)
    assert not account.has_session


def test_create_key_posts_the_description_and_returns_the_key(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """create_key sends {"description"} and returns the "apikey" of the answer."""
    logged_in(account, rsps)
    rsps.add(responses.POST, CREATE, json={"apikey": KEY})
    assert account.create_key("laptop") == KEY
    assert body_of(rsps.calls[1]) == {"description": "laptop"}


@pytest.mark.parametrize(
    "key",
    [
        "",
        "k" * 8 + "\x1b[2J",
        "kkkk kkkk",
        "kkkk\r\nX-Evil: 1",
        "k\u2028k",
        "k" * 8193,
        "ключ-ключ",
    ],
)
def test_create_key_refuses_a_key_add_would_refuse(
    account: ConduceAccount, rsps: responses.RequestsMock, key: str
) -> None:
    """A created key is checked like a key a client adds; a bad one is remote_error naming
    the field, never the value."""
    logged_in(account, rsps)
    rsps.add(responses.POST, CREATE, json={"apikey": key})
    with pytest.raises(RemoteError) as caught:
        account.create_key("x")
    assert "apikeys/create answer with an invalid 'apikey'" in caught.value.message
    assert not key or key not in caught.value.message


@pytest.mark.parametrize("document", [{}, {"apikey": None}, {"apikey": 7}, [KEY], "k"])
def test_create_key_unexpected_answer(
    account: ConduceAccount, rsps: responses.RequestsMock, document: object
) -> None:
    """A create answer without a key string is a RemoteError."""
    logged_in(account, rsps)
    rsps.add(responses.POST, CREATE, json=document)
    with pytest.raises(RemoteError, match="unexpected answer"):
        account.create_key("x")


def test_an_answer_with_a_duplicate_member_is_refused(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """Two "apikey" members in a create answer mean what a parser picks: refused (the first
    or the last would be a guess), and neither value is shown."""
    logged_in(account, rsps)
    body = '{"apikey": "aaaaaaaa-first-key-0001", "apikey": "bbbbbbbb-second-key-0002"}'
    rsps.add(responses.POST, CREATE, body=body, content_type="application/json")
    with pytest.raises(RemoteError, match="unexpected answer") as caught:
        account.create_key("x")
    assert "first-key" not in caught.value.message
    assert "second-key" not in caught.value.message


def test_delete_key_posts_the_key(account: ConduceAccount, rsps: responses.RequestsMock) -> None:
    """delete_key sends {"apikey": key} and accepts any 2xx, even an empty body."""
    logged_in(account, rsps)
    rsps.add(responses.POST, DELETE, status=204)
    account.delete_key(KEY)
    assert body_of(rsps.calls[1]) == {"apikey": KEY}


def test_delete_unknown_key_is_not_found(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A 404 on delete is NotFound: the service has no such key for this account."""
    logged_in(account, rsps)
    rsps.add(responses.POST, DELETE, status=404)
    with pytest.raises(NotFound, match="no such API key"):
        account.delete_key(KEY)


# --- authentication choices ---------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["list", "create", "delete"])
def test_no_session_and_no_key_is_login_required_without_a_call(
    account: ConduceAccount, rsps: responses.RequestsMock, operation: str
) -> None:
    """Without a session or an API key, key calls raise LoginRequired before any traffic."""
    with pytest.raises(LoginRequired, match="keyagent-ctl login"):
        call(account, operation)
    assert len(rsps.calls) == 0


def test_api_key_uses_bearer_and_never_the_cookie(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """With api_key, calls carry Authorization: Bearer and no Cookie, even when logged in."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, json=[])
    rsps.add(responses.POST, CREATE, json={"apikey": "new" * 6})
    rsps.add(responses.POST, DELETE, json={})
    account.list_keys(api_key=KEY)
    account.create_key("d", api_key=KEY)
    account.delete_key("old" * 6, api_key=KEY)
    for call in rsps.calls[1:]:
        assert call.request.headers["Authorization"] == f"Bearer {KEY}"
        assert "Cookie" not in call.request.headers


def test_api_key_works_without_a_session(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """An API key is enough on its own: no login is needed."""
    rsps.add(responses.GET, LIST, json=[{"apikey": KEY}])
    assert [k.key for k in account.list_keys(api_key=KEY)] == [KEY]


def test_netrc_credentials_never_replace_the_bearer_header(
    account: ConduceAccount,
    rsps: responses.RequestsMock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ~/.netrc entry for the host adds no Basic auth, neither over Bearer nor alone."""
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {HOST} login someone password netrc-pass\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, json=[])
    rsps.add(responses.GET, LIST, json=[])
    account.list_keys(api_key=KEY)
    account.list_keys()
    assert rsps.calls[1].request.headers["Authorization"] == f"Bearer {KEY}"
    assert "Authorization" not in rsps.calls[2].request.headers
    assert "Authorization" not in rsps.calls[0].request.headers


def test_api_key_with_a_newline_is_refused_locally(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """An API key that could split the header is a BadRequest, sent nowhere."""
    with pytest.raises(BadRequest):
        account.list_keys(api_key="abc\r\nX-Evil: 1")
    assert len(rsps.calls) == 0


# --- failure mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["list", "create", "delete"])
def test_session_401_is_session_expired_and_drops_the_cookie(
    account: ConduceAccount, rsps: responses.RequestsMock, operation: str
) -> None:
    """A 401 on a cookie call is SessionExpired, and the dead cookie is forgotten."""
    logged_in(account, rsps)
    for method, url in [(responses.GET, LIST), (responses.POST, CREATE), (responses.POST, DELETE)]:
        rsps.add(method, url, status=401)
    with pytest.raises(SessionExpired, match="login again"):
        call(account, operation)
    assert not account.has_session


def test_api_key_401_is_bad_credentials_and_keeps_the_session(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A 401 on an API-key call says the key was rejected, and leaves the session alone."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, status=401)
    with pytest.raises(BadCredentials, match="rejected the API key"):
        account.list_keys(api_key=KEY)
    assert account.has_session


@pytest.mark.parametrize("operation", ["list", "create", "delete"])
def test_403_is_forbidden(
    account: ConduceAccount, rsps: responses.RequestsMock, operation: str
) -> None:
    """A 403 is Forbidden, naming the operation, the user and the host."""
    logged_in(account, rsps)
    for method, url in [(responses.GET, LIST), (responses.POST, CREATE), (responses.POST, DELETE)]:
        rsps.add(method, url, status=403)
    with pytest.raises(Forbidden) as caught:
        call(account, operation)
    assert USER in caught.value.message
    assert HOST in caught.value.message
    assert account.has_session


def call(account: ConduceAccount, operation: str, api_key: str | None = None) -> object:
    if operation == "list":
        return account.list_keys(api_key=api_key)
    if operation == "create":
        return account.create_key("x", api_key=api_key)
    account.delete_key(KEY, api_key=api_key)
    return None


def test_500_reports_status_and_standard_phrase_never_the_body(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A 500 is a RemoteError with status and standard phrase; body and reason stay out."""
    logged_in(account, rsps)
    rsps.add(
        responses.POST,
        CREATE,
        status=500,
        body=f'{{"error": "boom", "echo": "{SECRET_IN_BODY}", "password": "{PASSWORD}"}}',
    )
    with pytest.raises(RemoteError) as caught:
        account.create_key("x")
    error = caught.value
    assert "500 Internal Server Error" in error.message
    assert SECRET_IN_BODY not in str(error)
    assert SECRET_IN_BODY not in repr(error)
    assert PASSWORD not in str(error)
    assert error.__cause__ is None
    assert error.__context__ is None


def test_unknown_status_has_no_phrase(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """A non-standard status is reported by number alone."""
    logged_in(account, rsps)
    rsps.add(responses.POST, DELETE, status=599)
    with pytest.raises(RemoteError, match=r"answered 599 when"):
        account.delete_key(KEY)


@pytest.mark.parametrize(
    "exception",
    [
        requests.ReadTimeout("slow"),
        requests.ConnectionError("reset"),
        requests.exceptions.ChunkedEncodingError("cut"),
    ],
)
def test_a_create_left_unanswered_says_the_key_may_exist_not_retry(
    account: ConduceAccount, rsps: responses.RequestsMock, exception: Exception
) -> None:
    """A create the service may have carried out (no answer, or a cut one) must not be
    retried blindly, which would make a second key: the message says where to look; a
    failure before anything was sent (connect timeout) keeps its own advice."""
    logged_in(account, rsps)
    rsps.add(responses.POST, CREATE, body=exception)
    with pytest.raises(RemoteUnreachable) as caught:
        account.create_key("x")
    assert caught.value.message.endswith(CREATE_UNSURE)
    assert "retry" not in caught.value.message.replace("never sent twice", "")
    rsps.add(responses.POST, CREATE, body=requests.ConnectTimeout("slow"))
    with pytest.raises(RemoteUnreachable) as caught:
        account.create_key("x")
    assert "did not accept a connection" in caught.value.message
    assert CREATE_UNSURE not in caught.value.message


@pytest.mark.parametrize(
    "cause",
    [
        NewConnectionError(None, "refused"),  # type: ignore[arg-type]
        NameResolutionError("app.conduce.example", None, OSError("no such name")),  # type: ignore[arg-type]
    ],
)
def test_a_create_that_never_left_keeps_the_network_advice(
    account: ConduceAccount, rsps: responses.RequestsMock, cause: Exception
) -> None:
    """A connection refused, or a host name that does not resolve: nothing reached the
    service, so a create failing so says to check the host, not that a key may exist."""
    logged_in(account, rsps)
    refused = requests.ConnectionError(MaxRetryError(None, CREATE, cause))  # type: ignore[arg-type]
    rsps.add(responses.POST, CREATE, body=refused)
    with pytest.raises(RemoteUnreachable) as caught:
        account.create_key("x")
    assert caught.value.message.endswith("check the host and network")


def test_redirects_are_not_followed(account: ConduceAccount, rsps: responses.RequestsMock) -> None:
    """A 3xx is an error, not a hop that could carry the API key elsewhere."""
    rsps.add(responses.GET, LIST, status=302, headers={"Location": "https://evil.test/steal"})
    with pytest.raises(RemoteError, match="302"):
        account.list_keys(api_key=KEY)
    assert len(rsps.calls) == 1


def aborted(cause: Exception) -> requests.exceptions.ConnectionError:
    """The ConnectionError requests raises when http.client fails to read an answer."""
    return requests.exceptions.ConnectionError(ProtocolError("Connection aborted.", cause))


class Cut:
    """As much of urllib3's HTTPResponse as InvalidChunkLength reads."""

    length_remaining = None

    def tell(self) -> int:
        return 0


@pytest.mark.parametrize(
    ("exception", "expected", "match"),
    [
        (requests.ConnectionError("refused"), RemoteUnreachable, "could not be reached"),
        (requests.ConnectTimeout("slow"), RemoteUnreachable, "did not accept a connection"),
        (requests.ReadTimeout("slow"), RemoteUnreachable, "did not answer within 30s"),
        (requests.exceptions.SSLError("handshake"), TLSError, "TLS connection"),
        (
            requests.exceptions.SSLError(
                ssl.SSLCertVerificationError(1, "certificate verify failed")
            ),
            TLSError,
            "certificate",
        ),
        (requests.exceptions.ChunkedEncodingError("cut"), RemoteUnreachable, "mid-answer"),
        (requests.exceptions.InvalidHeader("bad"), RemoteError, "InvalidHeader"),
        # What requests raises when something answers, but not in HTTP: not a lost connection.
        (aborted(http.client.HTTPException("got more than 100 headers")), RemoteError, "rules"),
        (aborted(http.client.LineTooLong("header line")), RemoteError, "rules"),
        (aborted(http.client.BadStatusLine("FOO BAR")), RemoteError, "rules"),
        (
            requests.exceptions.ChunkedEncodingError(
                ProtocolError("Connection broken", InvalidChunkLength(cast(Any, Cut()), b"zz"))
            ),
            RemoteError,
            "breaks HTTP's rules; the key may have been made",
        ),
        # ... and what it raises when the connection is lost, which stays that (urllib3 1.26
        # says an empty chunk size when the connection ends between chunks).
        (
            requests.exceptions.ChunkedEncodingError(
                ProtocolError("Connection broken", InvalidChunkLength(cast(Any, Cut()), b""))
            ),
            RemoteUnreachable,
            "mid-answer",
        ),
        (aborted(http.client.RemoteDisconnected("closed")), RemoteUnreachable, "dropped"),
        (
            requests.exceptions.ChunkedEncodingError(
                ProtocolError("Connection broken", http.client.IncompleteRead(b"", 5))
            ),
            RemoteUnreachable,
            "mid-answer",
        ),
    ],
)
def test_transport_failures_map_to_keyagent_errors(
    account: ConduceAccount,
    rsps: responses.RequestsMock,
    exception: Exception,
    expected: type[KeyagentError],
    match: str,
) -> None:
    """Each transport failure becomes its keyagent error, with no chained exception."""
    logged_in(account, rsps)
    rsps.add(responses.POST, CREATE, body=exception)
    with pytest.raises(expected, match=match) as caught:
        account.create_key("x")
    assert type(caught.value) is expected
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None
    assert caught.value.__suppress_context__


# --- retries ------------------------------------------------------------------------------------


def test_list_is_retried_on_503(account: ConduceAccount, rsps: responses.RequestsMock) -> None:
    """list_keys sends the request again after each of two 503s, and returns the keys."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, status=503)
    rsps.add(responses.GET, LIST, status=503)
    rsps.add(responses.GET, LIST, json=[{"apikey": KEY}])
    assert [k.key for k in account.list_keys()] == [KEY]
    assert len(rsps.calls) == 4


def test_waits_between_retries_grow_exponentially_with_jitter(recorder: Recorder) -> None:
    """Against a real server answering 503: the first retry goes at once, the n-th waits
    backoff * 2**(n-1) plus up to backoff of jitter, capped at ten seconds."""
    with ConduceEmulator() as emulator:
        emulator.inject(Fault.status(503), path="apikeys/list")
        settings = HttpSettings(verify=emulator.ca_path, retries=9, backoff=0.1)
        with (
            ConduceAccount(emulator.host, USER, settings, sleep=recorder.sleep) as conduce,
            pytest.raises(RemoteError, match="503"),
        ):
            conduce.list_keys(api_key=KEY)
        assert [r.path for r in emulator.requests].count("apikeys/list") == 10
    assert len(recorder.sleeps) == 9
    assert recorder.sleeps[0] == 0
    for n, wait in enumerate(recorder.sleeps[1:], start=2):
        base = 0.1 * 2 ** (n - 1)
        assert min(base, 10.0) <= wait <= min(base + 0.1, 10.0)


def test_list_gives_up_after_the_configured_retries(
    account: ConduceAccount, rsps: responses.RequestsMock, recorder: Recorder
) -> None:
    """After retries + 1 attempts a persistent 504 is reported as a RemoteError."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, status=504)
    with pytest.raises(RemoteError, match="504 Gateway Timeout"):
        account.list_keys()
    assert len(rsps.calls) == 1 + 3


def test_a_refused_connection_is_retried_for_list_only(recorder: Recorder) -> None:
    """A port nobody listens on: list_keys tries three times, then reports RemoteUnreachable;
    login, create and delete try once (urllib3 alone would retry any method here)."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    with ConduceAccount(f"127.0.0.1:{port}", USER, HttpSettings(), sleep=recorder.sleep) as conduce:
        with pytest.raises(RemoteUnreachable, match="could not be reached"):
            conduce.list_keys(api_key=KEY)
        assert len(recorder.sleeps) == 2
        with pytest.raises(RemoteUnreachable, match="could not be reached"):
            conduce.login(PASSWORD)
        for operation in ("create", "delete"):
            with pytest.raises(RemoteUnreachable, match="could not be reached"):
                call(conduce, operation, api_key=KEY)
        assert len(recorder.sleeps) == 2


def test_list_is_not_retried_on_500_or_read_timeout(
    account: ConduceAccount, rsps: responses.RequestsMock, recorder: Recorder
) -> None:
    """Only 502/503/504 and connection failures are retried: not 500, not a read timeout."""
    rsps.add(responses.GET, LIST, status=500)
    rsps.add(responses.GET, LIST, body=requests.ReadTimeout("slow"))
    with pytest.raises(RemoteError, match="500"):
        account.list_keys(api_key=KEY)
    with pytest.raises(RemoteUnreachable):
        account.list_keys(api_key=KEY)
    assert len(rsps.calls) == 2
    assert recorder.sleeps == []


def test_retries_zero_means_one_attempt(rsps: responses.RequestsMock, recorder: Recorder) -> None:
    """retries=0 makes a safe call try exactly once."""
    rsps.add(responses.GET, LIST, status=503)
    conduce = ConduceAccount(HOST, USER, HttpSettings(retries=0), sleep=recorder.sleep)
    with conduce, pytest.raises(RemoteError, match="503"):
        conduce.list_keys(api_key=KEY)
    assert len(rsps.calls) == 1
    assert recorder.sleeps == []


@pytest.mark.parametrize("operation", ["create", "delete"])
@pytest.mark.parametrize("failure", [503, requests.ConnectionError("reset")])
def test_create_and_delete_are_never_retried(
    account: ConduceAccount,
    rsps: responses.RequestsMock,
    recorder: Recorder,
    operation: str,
    failure: int | Exception,
) -> None:
    """create and delete fail on the first 503 or connection error: a retry could repeat them."""
    logged_in(account, rsps)
    url = CREATE if operation == "create" else DELETE
    if isinstance(failure, int):
        rsps.add(responses.POST, url, status=failure)
    else:
        rsps.add(responses.POST, url, body=failure)
    with pytest.raises((RemoteError, RemoteUnreachable)):
        call(account, operation)
    assert len(rsps.calls) == 2  # the login and one attempt
    assert recorder.sleeps == []


# --- TLS settings -------------------------------------------------------------------------------


def test_every_request_has_explicit_timeouts_and_verification(
    account: ConduceAccount, rsps: responses.RequestsMock
) -> None:
    """Each request passes timeout=(connect, read) and verify=True, redirects off."""
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, json=[])
    account.list_keys()
    for recorded in rsps.calls:
        kwargs = request_kwargs(recorded)
        assert kwargs["timeout"] == (5.0, 30.0)
        assert kwargs["verify"] is True


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [
        (None, 0o644, "cannot be read (No such file or directory)"),
        (b"not a certificate\n", 0o644, "holds no PEM certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            0o644,
            "not a valid PEM CA bundle",
        ),
        (b"", 0o664, "is writable by its group"),
        (b"", 0o666, "is writable by its group and every user"),
    ],
)
def test_an_unusable_ca_bundle_is_refused_when_the_settings_are_made(
    tmp_path: Path, content: bytes | None, mode: int, problem: str, rsps: responses.RequestsMock
) -> None:
    """A missing, non-PEM or group/other-writable bundle is a TLSError at construction."""
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_bytes(content)
        bundle.chmod(mode)
    with pytest.raises(TLSError, match="--ca-bundle") as caught:
        HttpSettings(verify=str(bundle))
    assert problem in caught.value.message
    assert str(bundle) in caught.value.message
    assert caught.value.message.count("; ") == 1  # one next step, the problem's own
    assert caught.value.__context__ is None
    assert len(rsps.calls) == 0


def test_default_verification_honours_requests_ca_bundle(
    account: ConduceAccount, rsps: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With verify=True, an inherited REQUESTS_CA_BUNDLE is honoured, as curl would."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/env/requests-bundle.pem")
    rsps.add(responses.GET, LIST, json=[])
    account.list_keys(api_key=KEY)
    assert request_kwargs(rsps.calls[0])["verify"] == "/env/requests-bundle.pem"


def test_insecure_disables_verification_and_warns_on_every_request(
    rsps: responses.RequestsMock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """insecure=True sends verify=False (beating REQUESTS_CA_BUNDLE) and warns per request."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/env/requests-bundle.pem")
    caplog.set_level(logging.WARNING, logger="keyagent.conduce")
    rsps.add(responses.GET, LIST, json=[])
    rsps.add(responses.GET, LIST, json=[])
    settings = HttpSettings(verify="/explicit/ca.pem", insecure=True)
    with ConduceAccount(HOST, USER, settings) as conduce:
        conduce.list_keys(api_key=KEY)
        conduce.list_keys(api_key=KEY)
    assert [request_kwargs(c)["verify"] for c in rsps.calls] == [False, False]
    warnings = [r for r in caplog.records if "TLS verification is off" in r.getMessage()]
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)


def test_verify_false_without_insecure_is_refused() -> None:
    """Verification can only be turned off through the explicit insecure switch."""
    with pytest.raises(BadRequest, match="--insecure"):
        HttpSettings(verify=False)


@pytest.mark.parametrize(
    "settings",
    [
        {"connect_timeout": 0},
        {"read_timeout": -1},
        {"retries": -1},
        {"backoff": -0.1},
        {"verify": ""},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any]) -> None:
    """Nonsensical timeouts, retries, backoff or CA path fail when the settings are made."""
    with pytest.raises(BadRequest):
        HttpSettings(**settings)


@pytest.mark.parametrize(
    "host",
    ["https://app.conduce.com", "app.conduce.com/x", "user@app.conduce.com", "", "a b", "h:x"],
)
def test_hosts_with_scheme_path_or_userinfo_are_refused(host: str) -> None:
    """A host is a name with an optional port: anything that could redirect the URL is refused."""
    with pytest.raises(BadRequest, match="--host"):
        ConduceAccount(host, USER, HttpSettings())


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("app..conduce.com", "no empty labels"),
        ("a" * 255 + ".com", "at most 253 characters"),
        ("a" * 64 + ".conduce.com", "at most 63 characters"),
        ("app.conduce.com:99999", "from 1 to 65535"),
        ("app.conduce.com:0", "from 1 to 65535"),
        ("-app.conduce.com", "hyphen"),
        ("app\u2028.conduce.com", "only letters, digits, hyphens and dots"),
        ("[::1", "closing bracket"),
        ("[zz::1]", "IPv6"),
    ],
)
def test_hosts_outside_the_one_grammar_are_refused_before_any_request(
    host: str, reason: str, rsps: responses.RequestsMock
) -> None:
    """A host outside protocol's grammar is BadRequest naming why, before any traffic."""
    with pytest.raises(BadRequest, match=reason) as caught:
        ConduceAccount(host, USER, HttpSettings())
    assert host not in caught.value.message
    assert len(rsps.calls) == 0


@pytest.mark.parametrize("host", ["app.conduce.com", "127.0.0.1:8443", "[::1]:8443", "localhost"])
def test_valid_hosts_are_accepted(host: str) -> None:
    """Names, addresses and bracketed IPv6 addresses with ports are valid hosts."""
    ConduceAccount(host, USER, HttpSettings()).close()


# --- secrecy ------------------------------------------------------------------------------------


def test_secrets_never_reach_logs_or_reprs(
    account: ConduceAccount, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    """Password, cookie and keys appear in no log record (DEBUG) and in no repr."""
    caplog.set_level(logging.DEBUG)
    rsps.add(responses.POST, LOGIN, status=401)
    with pytest.raises(BadCredentials) as bad_login:
        account.login(PASSWORD)
    rsps.add(responses.POST, LOGIN, body=requests.ConnectionError(f"echo {PASSWORD}"))
    with pytest.raises(RemoteUnreachable) as unreachable:
        account.login(PASSWORD)
    logged_in(account, rsps)
    rsps.add(responses.GET, LIST, status=503)
    rsps.add(responses.GET, LIST, json=[{"apikey": KEY, "description": "d", "secret": "zz"}])
    rsps.add(responses.POST, CREATE, json={"apikey": KEY})
    keys = account.list_keys(api_key=KEY)
    account.create_key("d")
    assert caplog.records, "the calls above should have been logged"
    texts = [record.getMessage() for record in caplog.records]
    texts += [repr(account), repr(keys), repr(bad_login.value), repr(unreachable.value)]
    texts += [repr(account.settings)]
    for text in texts:
        for secret in (PASSWORD, COOKIE, KEY, "zz"):
            assert secret not in text, (secret, text)
    # The account holds the cookie, by design, but nothing of the password.
    assert PASSWORD not in str(vars(account))


def test_remote_key_repr_and_masking() -> None:
    """RemoteKey's repr never shows the key or extras; masked() keeps 4+4 chars of long keys."""
    remote = RemoteKey(KEY, "ci", None, {"token": "hidden-value"})
    assert KEY not in repr(remote)
    assert "hidden-value" not in repr(remote)
    assert remote.masked() == "0123…cdef"
    assert RemoteKey("short-key", "", None).masked() == "****"
    assert RemoteKey("x" * 15, "", None).masked() == "****"
    assert RemoteKey("abcdefghijklmnop", "", None).masked() == "abcd…mnop"
    assert hash(remote) == hash(RemoteKey(KEY, "ci", None, {"token": "hidden-value"}))
