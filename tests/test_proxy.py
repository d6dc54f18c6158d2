"""The HTTP socket's request logic without sockets: which paths go out, which headers pass,
what errors look like, and which credentials the agent lends (keyagent.proxy, Agent)."""

from __future__ import annotations

import json
from types import GeneratorType
from typing import Any

import h11
import pytest

from keyagent.agent import Agent
from keyagent.errors import (
    Ambiguous,
    BadRequest,
    Forbidden,
    KeyagentError,
    Locked,
    LoginRequired,
    NotFound,
    RemoteUnreachable,
    Timeout,
)
from keyagent.grant import Grant
from keyagent.httpwire import Head
from keyagent.proxy import REROUTING, answer_headers, error_answer, request_headers, route
from keyagent.store import digest_of, key_id_for

from .fakes import PEER, FakeAccount, FakeTime, driver_for, request, run, settle

HOST = "app.conduce.com"
USER = "ada@example.com"
OTHER = "bob@example.com"
SECRET = "proxy-secret-key-0001-abcdefgh"
SECOND = "proxy-secret-key-0002-abcdefgh"


def head(target: str, method: str = "GET", **headers: str | bytes) -> Head:
    """A parsed request head, as h11 hands it over."""
    fields = [(b"Host", as_bytes(headers.pop("host", HOST)))]
    fields += [(name.replace("_", "-").encode(), as_bytes(v)) for name, v in headers.items()]
    return Head(h11.Request(method=method, target=target, headers=fields))


def as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("ascii")


# --- which paths are forwarded ------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/conduce/api/v1/user/list-teams",
        "/conduce/api/v1/datasets/metadata/abc?x=1&y=2",
        "/conduce/api/v2/resources/search",
        "/api/v2/data/transactions",
        "//api/v2/data/backends",
        "/conduce/api/v1/user/validate-session",
    ],
)
def test_api_paths_are_forwarded_unchanged(target: str) -> None:
    """Every API path, the client's doubled leading slash included, goes out as written."""
    where = route(head(target))
    assert where.host == HOST
    assert where.target == target
    assert where.path == target.split("?", 1)[0]


@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("/conduce/api/v1/user/login", "keyagent-ctl login"),
        ("/conduce/api/v1/user/logout", "keyagent-ctl logout"),
        ("/conduce/api/v1/apikeys/create", "keyagent-ctl create"),
        ("/conduce/api/v1/apikeys/list", "keyagent-ctl list --remote"),
        ("/conduce/api/v1/apikeys/delete", "keyagent-ctl remove"),
        ("/conduce/api/v1//apikeys/list", "keyagent-ctl list --remote"),
        ("/conduce/api/v1/apikeys/list/", "keyagent-ctl list --remote"),
        ("/conduce/api/v1/APIKEYS/List", "keyagent-ctl list --remote"),
        ("/conduce/api/v1/%61pikeys/list", "keyagent-ctl list --remote"),
        ("/conduce/api/v1/apikeys;x=1/list", "keyagent-ctl list --remote"),
        ("/conduce/api/v1/apikeys/list?all=1", "keyagent-ctl list --remote"),
        ("/conduce/api/apikeys/list", "keyagent-ctl list --remote"),
        ("/api/v1/apikeys/list", "keyagent-ctl list --remote"),
        ("/conduce/api/v1/apikeys/rotate", "keyagent-ctl"),
        ("//conduce/api/v1/user/login", "keyagent-ctl login"),
        # What some servers route to the same endpoint: a format suffix, trailing dots or
        # spaces, a segment skipped (a second version).
        ("/conduce/api/v1/user/login.json", "keyagent-ctl login"),
        ("/conduce/api/v1/user/login.", "keyagent-ctl login"),
        ("/conduce/api/v1/user/login%20", "keyagent-ctl login"),
        ("/conduce/api/v1/user./logout", "keyagent-ctl logout"),
        ("/conduce/api/v1/apikeys./create", "keyagent-ctl"),
        ("/conduce/api/v1/apikeys.json/create", "keyagent-ctl"),
        ("/conduce/api/v2/v1/apikeys/create", "keyagent-ctl create"),
        ("/api/v2/data/v1/user/login", "keyagent-ctl login"),
        ("/conduce/api/v1/x/y/apikeys", "keyagent-ctl"),
    ],
)
def test_credential_endpoints_are_refused_however_spelled(target: str, command: str) -> None:
    """Login, logout and the API-key endpoints never go out, in any spelling a server would
    take for them, and the refusal names the command to use instead."""
    with pytest.raises(Forbidden) as caught:
        route(head(target, "POST"))
    assert command in caught.value.message


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/etc/passwd",
        "/conduce/web/index.html",
        "/conduce/api",
        "/conduce/api/v1/../../admin",
        "/conduce/api/v1/%2e%2e/%2e%2e/admin",
        "/conduce/api/v1/./user/list-teams",
        "*",
    ],
)
def test_paths_outside_the_api_are_not_found(target: str) -> None:
    """Only the API is forwarded; dot segments are refused rather than resolved."""
    with pytest.raises(NotFound):
        route(head(target))


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/conduce/api/v1/x", {"host": "evil host"}),
        ("/conduce/api/v1/x", {"host": "0177.0.0.1"}),
        ("/conduce/api/v1/x", {"x_keyagent_user": "has space@example.com"}),
        ("/conduce/api/v1/x", {"x_keyagent_key_id": "xyz"}),
        ("/conduce/api/v1/x%0d%0aInjected:1", {}),
        ("http://other.example.com/conduce/api/v1/x", {}),
        ("/conduce/api/v1/user/login#", {}),
        ("/conduce/api/v1/apikeys#/list", {}),
        ("/conduce/api/v1/user/logout#x", {}),
        ("http://[/conduce/api/v1/x", {}),
        (f"http://a:pw@{HOST}/conduce/api/v1/x", {}),
        # Escapes servers differ on: none is guessed at.
        ("/conduce/api/v1/user/login%", {}),
        ("/conduce/api/v1/user/login%zz", {}),
        ("/conduce/api/v1/user/%252e%252e/apikeys/create", {}),
        ("/conduce/api/v1/a%252fb", {}),
        ("/conduce/api/v1/a%25255c", {}),
        ("/conduce/api/v1/user/%C0%AE%C0%AE/apikeys/create", {}),  # overlong "..": not UTF-8
    ],
)
def test_bad_hosts_users_key_ids_and_paths_are_bad_requests(
    target: str, headers: dict[str, str]
) -> None:
    """What names the account or the path is checked by the agent's own rules."""
    with pytest.raises(BadRequest):
        route(head(target, **headers))


@pytest.mark.parametrize(
    "target",
    ["/api/v2/data/caf%C3%A9", "/api/v2/data/a%2fb", "/api/v2/data/100%25", "/api/v2/login.json"],
)
def test_escapes_made_once_pass(target: str) -> None:
    """UTF-8 escapes, an escaped slash, an escaped % followed by nothing it could make an
    escape of, and a format suffix outside the credential endpoints are forwarded."""
    assert route(head(target)).target == target


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    "framing", [{"content_length": "5"}, {"transfer_encoding": "chunked"}], ids=["cl", "chunked"]
)
def test_a_get_or_head_with_a_body_is_refused(method: str, framing: dict[str, str]) -> None:
    """A body on a GET or HEAD means nothing to the service, which may leave it unread and
    take it for the next request on the connection: the agent's next request, with its
    credential, would become part of one the tool wrote. So none is forwarded."""
    with pytest.raises(BadRequest, match=f"a {method} request may not have a body"):
        route(head("/api/v2/data/x", method, **framing))


def test_bodies_go_where_they_mean_something() -> None:
    """An empty GET body said outright is no body; other methods keep theirs."""
    route(head("/api/v2/data/x", "GET", content_length="0"))
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        route(head("/api/v2/data/x", method, content_length="5"))


def test_headers_that_reroute_a_request_never_go_out() -> None:
    """Front ends that route by X-Original-URL (and the like) or override the method by a
    header would let a tool reach an endpoint the path check refused: those are dropped."""
    grant = Grant(HOST, USER, header="Authorization", value=f"Bearer {SECRET}")
    rerouting = {name.replace("-", "_"): "/conduce/api/v1/apikeys/create" for name in REROUTING}
    sent = request_headers(head("/api/v2/data/x", "GET", **rerouting, x_kept="1"), grant)
    names = {name.lower() for name, _ in sent}
    assert not names & REROUTING
    assert {"x-original-url", "x-http-method-override", "forwarded"} <= REROUTING
    assert "x-kept" in names


def test_the_path_checked_is_the_target_sent() -> None:
    """route() checks the target as the tool wrote it, and keyagent.forward sends exactly
    that (tests/test_forward.py): no library normalises it in between."""
    for target in ("/conduce/api/v1/user/list-teams", "//api/v2/data/x", "/api/v2/data/a%2fb?q"):
        where = route(head(target))
        assert where.target == target
        assert where.path == target.split("?")[0]


def test_methods_outside_the_list_are_refused() -> None:
    """Only GET, POST, PUT, PATCH, DELETE and HEAD are forwarded."""
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):
        route(head("/api/v2/data/x", method))
    for method in ("CONNECT", "TRACE", "OPTIONS", "PROPFIND"):
        with pytest.raises(BadRequest, match=f"method {method} is not forwarded"):
            route(head("/api/v2/data/x", method))
    with pytest.raises(BadRequest) as long:  # named, but never echoed at length
        route(head("/api/v2/data/x", "X" * 5000))
    assert "XXXXXXXXXXXXXXXXX" not in long.value.message


def test_absolute_form_targets_use_their_path() -> None:
    """A proxy-style absolute target is forwarded by its path, to the host it names."""
    where = route(head(f"http://{HOST}/conduce/api/v1/user/list-teams?a=b"))
    assert (where.host, where.target) == (HOST, "/conduce/api/v1/user/list-teams?a=b")


def test_account_and_key_headers_are_read() -> None:
    """X-Keyagent-User and X-Keyagent-Key-Id choose the account and the key."""
    where = route(head("/api/v2/data/x", x_keyagent_user=USER, x_keyagent_key_id="ABCDEF12"))
    assert (where.user, where.key_id) == (USER, "abcdef12")


def test_the_account_header_is_read_as_utf_8() -> None:
    """An account name beyond ASCII arrives as UTF-8 bytes (h11 hands them over as Latin-1)
    and names that account; bytes that are not UTF-8 are a bad request, not another name."""
    utf_8 = "dé@example.com".encode()
    assert route(head("/api/v2/data/x", x_keyagent_user=utf_8)).user == "dé@example.com"
    with pytest.raises(BadRequest, match="not valid UTF-8"):
        route(head("/api/v2/data/x", x_keyagent_user="dé@example.com".encode("latin-1")))


# --- headers ------------------------------------------------------------------------------


def test_the_tools_credentials_never_go_out() -> None:
    """Authorization, Cookie and the agent's own headers are replaced by the grant's."""
    grant = Grant(HOST, USER, header="Authorization", value=f"Bearer {SECRET}")
    sent = request_headers(
        head(
            "/api/v2/data/x", "POST",
            authorization="Bearer tool-key", cookie="session=tool", proxy_authorization="x",
            x_keyagent_user=USER, content_length="3", connection="keep-alive",
            content_type="application/json", x_custom="kept",
        ),
        grant,
    )  # fmt: skip
    names = [name.lower() for name, _ in sent]
    assert ("Authorization", f"Bearer {SECRET}") in sent
    assert "x-custom" in names  # not named by Connection: kept
    assert names.count("authorization") == 1
    assert "cookie" not in names
    assert "proxy-authorization" not in names
    assert "connection" not in names
    assert not any(name.startswith("x-keyagent-") for name in names)
    assert ("content-type", "application/json") in sent
    assert ("x-custom", "kept") in sent
    assert ("Content-Length", "3") in sent
    assert ("Host", HOST) in sent


def test_a_request_without_a_body_is_framed_by_its_method() -> None:
    """A POST, PUT or PATCH without a body goes out with Content-Length: 0 (some front ends
    answer 411 without one); a GET, HEAD or DELETE goes out without framing, as sent."""
    grant = Grant(HOST, USER, header="Authorization", value=f"Bearer {SECRET}")
    for method in ("POST", "PUT", "PATCH"):
        assert ("Content-Length", "0") in request_headers(head("/api/v2/x", method), grant)
    for method in ("GET", "HEAD", "DELETE"):
        sent = request_headers(head("/api/v2/x", method), grant)
        assert "content-length" not in [name.lower() for name, _ in sent]
    chunked = request_headers(head("/api/v2/x", "POST", transfer_encoding="chunked"), grant)
    assert "content-length" not in [name.lower() for name, _ in chunked]


def test_headers_named_by_connection_and_repeated_headers() -> None:
    """Headers the tool's Connection header names stay on its connection; a repeated header
    goes out repeated."""
    grant = Grant(HOST, USER, header="Authorization", value=f"Bearer {SECRET}")
    fields = [
        ("Host", HOST), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "drop me"),
        ("Accept", "a/b"), ("Accept", "c/d"),
    ]  # fmt: skip
    sent = request_headers(
        Head(h11.Request(method="GET", target="/api/v2/x", headers=fields)), grant
    )
    assert ("x-hop", "drop me") not in sent
    assert [value for name, value in sent if name == "accept"] == ["a/b", "c/d"]


def test_answers_lose_cookies_credentials_and_connection_headers() -> None:
    """Set-Cookie, anything carrying the credential (in its value or its name), and
    hop-by-hop headers are removed;
    a cookie too short to be a credential (``seen=1``, ``flash=``) takes no header with it."""
    grant = Grant(
        HOST,
        USER,
        header="Cookie",
        value="session=s3ss10n-t0k3n; other=0th3r-t0k3n; seen=1; flash=",
    )
    kept = answer_headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", "10"),
            ("Set-Cookie", "session=new"),
            ("set-cookie2", "x=y"),
            ("WWW-Authenticate", "Bearer"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            ("X-Echo", "session is s3ss10n-t0k3n"),
            ("X-Other", "0th3r-t0k3n!"),
            ("X-s3ss10n-t0k3n", "1"),  # in a name too, whatever its case
            ("x-0TH3R-T0K3N-seen", "1"),
            ("X-Request-Id", "42 "),
            ("Bad Name", "x"),
            ("X-Ctl", "a\x07b"),
            ("X-Upper", "S3SS10N-T0K3N"),  # an echo in another case is an echo
            ("Proxy-Authenticate", "Basic"),
            ("Authentication-Info", "x"),
            ("X-Keyagent-Error", "locked"),  # only the agent's own errors say so
            ("Connection", "X-Hop"),
            ("X-Hop", "about the service's connection only"),
        ],
        grant,
    )
    assert kept == [
        ("Content-Type", "application/json"),
        ("Content-Length", "10"),
        ("X-Request-Id", "42"),
    ]


def test_agent_errors_are_json_with_a_status_and_a_header() -> None:
    """A tool tells the agent's answers from the service's by X-Keyagent-Error."""
    cases: list[tuple[KeyagentError, int]] = [
        (LoginRequired("log in"), 401),
        (Ambiguous("which"), 409),
        (Forbidden("no"), 403),
        (NotFound("no"), 404),
        (Locked(), 423),
        (RemoteUnreachable("down"), 502),
        (Timeout("slow"), 504),
        (BadRequest("bad"), 400),
    ]
    for error, status in cases:
        got, headers, body = error_answer(error)
        assert got == status
        assert ("X-Keyagent-Error", error.code) in headers
        assert ("Content-Type", "application/json") in headers
        assert json.loads(body) == {"error": {"code": error.code, "message": error.message}}


def test_a_grant_never_shows_its_secret() -> None:
    """repr names the account and key id, never the credential; secrets() lists it."""
    grant = Grant(HOST, USER, header="Authorization", value=f"Bearer {SECRET}")
    assert SECRET not in repr(grant)
    assert grant.secrets() == [SECRET]
    cookie = Grant(HOST, USER, header="Cookie", value="a=1; b=; c=0123456789abcdef")
    assert cookie.secrets() == ["0123456789abcdef"]


# --- which credentials the agent lends ----------------------------------------------------


@pytest.fixture
def accounts() -> dict[tuple[str, str], FakeAccount]:
    return {}


@pytest.fixture
def agent(accounts: dict[tuple[str, str], FakeAccount]) -> Agent:
    def account(host: str, user: str) -> FakeAccount:
        return accounts.setdefault((host, user), FakeAccount())

    return Agent(clock=FakeTime().clock(), accounts=account)


def hold(agent: Agent, secret: str, user: str = USER, host: str = HOST) -> None:
    settle(agent, agent.handle(request("add", host=host, user=user, key=secret), PEER))


def log_in(agent: Agent, user: str = USER) -> None:
    settle(agent, agent.handle(request("login", host=HOST, user=user, password="pw"), PEER))


def granted(agent: Agent, outcome: Any) -> Grant:
    """The grant a request comes to, waited for (inline) if the agent must wait first."""
    if isinstance(outcome, GeneratorType):
        outcome = driver_for(agent).run(outcome)
    assert isinstance(outcome, Grant)
    return outcome


def lend(agent: Agent, **kwargs: Any) -> Grant:
    arguments = {"host": HOST, "user": None, "key_id": None, **kwargs}
    return granted(agent, agent.authorize_proxy(PEER, **arguments))


def test_without_credentials_the_tool_is_told_to_log_in(agent: Agent) -> None:
    """No session and no key for the host: login_required, naming the commands."""
    with pytest.raises(LoginRequired) as caught:
        lend(agent)
    assert "keyagent-ctl login" in caught.value.message


def test_a_held_key_is_lent_as_a_bearer_token(agent: Agent) -> None:
    """With one key of one account, that key is used."""
    hold(agent, SECRET)
    grant = lend(agent)
    assert (grant.header, grant.value, grant.session) == (
        "Authorization",
        f"Bearer {SECRET}",
        False,
    )
    assert grant.key_id == key_id_for(SECRET)


def test_the_live_session_comes_before_keys(agent: Agent) -> None:
    """As for the agent's own calls: the session first, then held keys."""
    hold(agent, SECRET)
    log_in(agent)
    grant = lend(agent)
    assert (grant.header, grant.session) == ("Cookie", True)
    assert grant.value == "session=fake-session-cookie"


def answer_to(agent: Agent, steps: Any) -> Grant | None:
    """What the agent answers a worker's question (waited for inline): a grant, or None."""
    outcome = driver_for(agent).run(steps)
    assert outcome is None or isinstance(outcome, Grant)
    return outcome


def refused(agent: Agent) -> Grant | None:
    """What the agent answers when the service refused (401) a request made with the session."""
    return answer_to(agent, agent.proxy_session_refused(PEER, HOST, USER, None))


def test_an_expired_session_falls_back_to_a_key(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """After the service refused the session, and validating it shows it expired, the next
    grant is a held key."""
    hold(agent, SECRET)
    log_in(agent)
    accounts[(HOST, USER)].session_alive = False
    outcome = refused(agent)
    assert outcome is not None
    assert outcome.value == f"Bearer {SECRET}"
    assert not agent.sessions[(HOST, USER)].live


def key_refused(agent: Agent, *secrets: str) -> Grant | None:
    """What the agent answers when the service refused (401) requests made with these keys."""
    digests = tuple(digest_of(secret) for secret in secrets)
    return answer_to(agent, agent.proxy_key_refused(PEER, HOST, USER, digests))


def test_a_revoked_key_falls_back_to_the_next_held_key(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """After the service refused a request made with the newest key, the agent asks the
    service about the key itself: if it still works, the 401 passes on; if it is refused,
    the next held key is lent; with none left, or three tried, nothing more."""
    older, newer, third = (f"proxy-secret-key-{n:04d}-abcdefgh" for n in (2, 3, 4))
    account = accounts[(HOST, USER)] = FakeAccount()
    account.keys = [older, newer]
    hold(agent, older)
    hold(agent, newer)
    assert lend(agent).value == f"Bearer {newer}"
    assert key_refused(agent, newer) is None  # the key works: that request alone was refused
    assert account.calls == [("list", newer)]
    account.keys = [older]
    renewed = key_refused(agent, newer)
    assert renewed is not None
    assert renewed.value == f"Bearer {older}"
    account.keys = []
    assert key_refused(agent, newer, older) is None  # none left
    hold(agent, third)
    account.calls.clear()
    assert key_refused(agent, third, newer, older) is None  # three tried: no more asked
    assert account.calls == []


def test_a_revoked_key_falls_back_past_keys_kept_for_other_programs(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """The next key lent after a refused one is the next the tool may use: a key allowed
    only to another program is passed over, not lent to be denied."""
    older, guarded, newer = (f"proxy-secret-key-{n:04d}-abcdefgh" for n in (5, 6, 7))
    accounts[(HOST, USER)] = FakeAccount()
    hold(agent, older)
    settle(
        agent,
        agent.handle(
            request("add", host=HOST, user=USER, key=guarded, allow_exe=["/usr/bin/curl"]), PEER
        ),
    )
    hold(agent, newer)
    renewed = key_refused(agent, newer)
    assert renewed is not None
    assert renewed.value == f"Bearer {older}"


def test_a_401_with_a_live_session_is_passed_on_and_the_session_kept(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """A 401 from some endpoint is not proof the session expired: the agent validates it,
    finds it alive, keeps it, and the tool gets the service's answer (None: no retry)."""
    hold(agent, SECRET)
    log_in(agent)
    assert refused(agent) is None
    assert agent.sessions[(HOST, USER)].live
    assert ("validate", None) in accounts[(HOST, USER)].calls


def test_a_session_whose_state_cannot_be_learnt_is_kept(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """The service unreachable while validating: the session stays, the 401 is passed on."""
    log_in(agent)
    accounts[(HOST, USER)].fail_next = RemoteUnreachable("down")
    assert refused(agent) is None
    assert agent.sessions[(HOST, USER)].live


def test_an_expired_session_without_keys_means_logging_in_again(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """No key to fall back on: login_required."""
    log_in(agent)
    accounts[(HOST, USER)].session_alive = False
    with pytest.raises(LoginRequired):
        refused(agent)


def test_a_key_found_refused_is_passed_over_until_it_works_again(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """Once a check finds the newest key refused, it is noted: later requests (a streamed
    upload that cannot be tried again included), get and the agent's own calls use an older
    key the service has not refused; list shows the mark; a check that finds the key works
    again, or adding it again, clears it. With only refused keys, the newest is still lent
    (the service may have changed its mind)."""
    older, newer = (f"proxy-secret-key-{n:04d}-abcdefgh" for n in (6, 7))
    account = accounts[(HOST, USER)] = FakeAccount()
    account.keys = [older]
    hold(agent, older)
    hold(agent, newer)
    assert lend(agent).value == f"Bearer {newer}"
    check_only = agent.proxy_key_refused(PEER, HOST, USER, (digest_of(newer),), retry=False)
    assert answer_to(agent, check_only) is None  # checked and noted, nothing lent
    assert lend(agent).value == f"Bearer {older}"
    assert settle(agent, agent.handle(request("get"), PEER)) == {
        "key": older, "key_id": key_id_for(older)
    }  # fmt: skip
    listed = {key["key_id"]: key["refused"] for key in run(agent, "list")["keys"]}
    assert listed == {key_id_for(older): False, key_id_for(newer): True}
    account.calls.clear()
    run(agent, "list", host=HOST, user=USER, remote=True)
    assert account.calls == [("list", older)]  # the refused key after the others
    # Only refused keys left: the newest of them is lent all the same.
    agent.held_keys.mark_refused(agent.held_keys.newest(0.0, key_id=key_id_for(older)), True)
    assert lend(agent).value == f"Bearer {newer}"
    agent.held_keys.mark_refused(agent.held_keys.newest(0.0, key_id=key_id_for(older)), False)
    account.keys = [older, newer]  # the service takes it again: a check clears the mark
    assert key_refused(agent, newer) is None
    assert lend(agent).value == f"Bearer {newer}"
    agent.held_keys.mark_refused(agent.held_keys.newest(0.0, key_id=key_id_for(newer)), True)
    hold(agent, newer)  # handed over again: asked afresh
    assert not agent.held_keys.newest(0.0, key_id=key_id_for(newer)).refused


def test_a_refused_key_is_never_passed_over_for_another_account(agent: Agent) -> None:
    """Passing over a refused key stays within its account: a get without a host (meant,
    say, for the refused key's host) gets that key, never another host's or user's."""
    hold(agent, SECOND, host="other.conduce.com")
    hold(agent, SECRET, user=OTHER)
    hold(agent, "proxy-secret-key-0008-abcdefgh")
    newest = agent.held_keys.newest(0.0)
    agent.held_keys.mark_refused(newest, True)
    assert agent.held_keys.newest(0.0) is newest
    assert agent.held_keys.newest(0.0, host=HOST) is newest


def test_a_session_checked_without_a_retry_lends_nothing(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """A streamed request's 401 with the session: the session is checked and marked
    expired, and nothing is lent for it (the next request gets the key)."""
    hold(agent, SECRET)
    log_in(agent)
    accounts[(HOST, USER)].session_alive = False
    check_only = agent.proxy_session_refused(PEER, HOST, USER, None, retry=False)
    assert answer_to(agent, check_only) is None
    assert not agent.sessions[(HOST, USER)].live
    assert lend(agent).value == f"Bearer {SECRET}"


def checks(agent: Agent) -> list[tuple[str, str | None, str | None, int | None]]:
    """The audit log's "check" entries: outcome, key id, user, pid."""
    return [
        (entry.outcome, entry.key_id, entry.user, entry.pid)
        for entry in agent.audit_log.last()
        if entry.op == "check"
    ]


def test_each_check_after_a_401_is_audited_for_the_tool(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """The agent's own calls that check a credential after a 401 use it for the tool's
    request: each is an entry of op "check", with the tool's pid and what the check
    found (the key, or the session: no key id)."""
    log_in(agent)
    account = accounts[(HOST, USER)]
    assert refused(agent) is None  # alive
    account.fail_next = RemoteUnreachable("down")
    assert refused(agent) is None  # not learnt
    account.session_alive = False
    with pytest.raises(LoginRequired):
        refused(agent)  # expired
    assert checks(agent) == [
        ("ok", None, USER, PEER.pid),
        ("remote_unreachable", None, USER, PEER.pid),
        ("session_expired", None, USER, PEER.pid),
    ]
    newer = "proxy-secret-key-0005-abcdefgh"
    hold(agent, SECRET)
    hold(agent, newer)
    account.keys = [SECRET, newer]
    assert key_refused(agent, newer) is None  # it works
    account.keys = [SECRET]
    assert key_refused(agent, newer) is not None  # refused: the next key is lent
    account.fail_next = RemoteUnreachable("down")
    assert key_refused(agent, newer) is None
    assert checks(agent)[3:] == [
        ("ok", key_id_for(newer), USER, PEER.pid),
        ("bad_credentials", key_id_for(newer), USER, PEER.pid),
        ("remote_unreachable", key_id_for(newer), USER, PEER.pid),
    ]


def test_two_accounts_on_a_host_need_the_user_header(agent: Agent) -> None:
    """Credentials of two accounts: ambiguous, unless X-Keyagent-User names one."""
    hold(agent, SECRET, USER)
    hold(agent, SECOND, OTHER)
    with pytest.raises(Ambiguous):
        lend(agent)
    assert lend(agent, user=OTHER).value == f"Bearer {SECOND}"
    assert lend(agent, user=USER).value == f"Bearer {SECRET}"


def test_a_key_id_picks_the_key(agent: Agent) -> None:
    """X-Keyagent-Key-Id chooses among held keys, by any prefix of the id."""
    hold(agent, SECRET)
    hold(agent, SECOND)
    assert lend(agent).value == f"Bearer {SECOND}"  # the newest, as for get
    assert lend(agent, key_id=key_id_for(SECRET)[:6]).value == f"Bearer {SECRET}"
    with pytest.raises(NotFound):
        lend(agent, key_id="ffffffff")


def test_other_hosts_credentials_are_never_lent(agent: Agent) -> None:
    """A key of one host is not lent for another."""
    hold(agent, SECRET, host="other.conduce.com")
    with pytest.raises(LoginRequired):
        lend(agent)


def test_a_locked_agent_lends_nothing(
    agent: Agent, accounts: dict[tuple[str, str], FakeAccount]
) -> None:
    """While locked, every proxied request is refused, and so is a retry after a 401: no
    key is used, not even to check it, nor the session."""
    account = accounts[(HOST, USER)] = FakeAccount()
    hold(agent, SECRET)
    log_in(agent)
    settle(agent, agent.handle(request("lock", passphrase="correct horse"), PEER))
    account.calls.clear()
    with pytest.raises(Locked):
        lend(agent)
    with pytest.raises(Locked):
        key_refused(agent, SECRET)
    with pytest.raises(Locked):
        refused(agent)
    assert account.calls == []
