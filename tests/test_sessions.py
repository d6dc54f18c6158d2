"""Credential choice for remote calls, and the agent's Conduce handlers, with a fake account."""

from __future__ import annotations

import pytest

from keyagent import errors
from keyagent.agent import Agent
from keyagent.effects import Work
from keyagent.sessions import Plan, RemoteResult, Session, run_remote
from keyagent.store import key_id_for

from .fakes import PEER, FakeAccount, FakeTime, HeldWorkDriver, fails, request, run, steps

HOST, USER = "conduce.example", "alice@example.com"


@pytest.fixture
def account() -> FakeAccount:
    return FakeAccount()


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def agent(account: FakeAccount, fake_time: FakeTime) -> Agent:
    return Agent(clock=fake_time.clock(), accounts=lambda host, user: account, validate_after=60.0)


def test_run_remote_prefers_the_live_session(account: FakeAccount) -> None:
    """With a live session, the call goes out with the cookie, not the held key."""
    account.session = True
    result = run_remote(
        account,
        Plan(use_session=True, validate_first=False, api_keys=("k",)),
        account.list_keys,
        host=HOST,
        user=USER,
    )
    assert result.session_alive
    assert account.calls == [("list", None)]


def test_run_remote_falls_back_to_a_key_when_the_session_died(account: FakeAccount) -> None:
    """A 401 on the session is retried once with the held API key, and reported as expired."""
    account.session, account.session_alive, account.keys = True, False, ["held"]
    result: RemoteResult = run_remote(
        account,
        Plan(use_session=True, validate_first=False, api_keys=("held",)),
        account.list_keys,
        host=HOST,
        user=USER,
    )
    assert result.session_expired
    assert not result.session_alive
    assert account.calls == [("list", None), ("list", "held")]


def test_run_remote_validates_an_idle_session_first(account: FakeAccount) -> None:
    """validate_first checks the session before the call; a dead one is not used at all."""
    account.session, account.session_alive = True, False
    with pytest.raises(errors.SessionExpired):
        run_remote(
            account,
            Plan(use_session=True, validate_first=True),
            account.list_keys,
            host=HOST,
            user=USER,
        )
    assert account.calls == [("validate", None)]


def test_run_remote_without_credentials_needs_login(account: FakeAccount) -> None:
    """No session and no key: login_required, and nothing is sent."""
    with pytest.raises(errors.LoginRequired):
        run_remote(
            account,
            Plan(use_session=False, validate_first=False),
            account.list_keys,
            host=HOST,
            user=USER,
        )
    assert account.calls == []


def test_login_records_the_session_and_status_shows_it(agent: Agent) -> None:
    """A successful login is shown in status with its time; the password is kept nowhere."""
    assert run(agent, "login", host=HOST, user=USER, password="pw")["session"] is True
    (state,) = agent.process_status({})["sessions"]
    assert state["logged_in"] is True
    assert state["since"] is not None
    assert "pw" not in repr(agent.sessions)


def test_failed_login_leaves_no_session(agent: Agent) -> None:
    """A wrong password is bad_credentials and the account stays logged out."""
    with pytest.raises(errors.BadCredentials):
        run(agent, "login", host=HOST, user=USER, password="nope")
    assert (HOST, USER) not in agent.sessions  # an account it did not know: no record


def test_create_holds_the_new_key_and_reveals_only_on_request(
    agent: Agent, account: FakeAccount
) -> None:
    """create stores the key as source 'created'; the secret is in the reply only with reveal."""
    run(agent, "login", host=HOST, user=USER, password="pw")
    quiet = run(agent, "create", host=HOST, user=USER, description="d")
    assert "key" not in quiet
    assert quiet["source"] == "created"
    assert quiet["created"] is not None
    loud = run(agent, "create", host=HOST, user=USER, reveal=True)
    assert loud["key"] == account.keys[-1]
    assert run(agent, "get", host=HOST)["key"] == account.keys[-1]


def test_expired_session_is_marked_and_reported(agent: Agent, account: FakeAccount) -> None:
    """A 401 on the session with no key to fall back on is session_expired, shown in status."""
    run(agent, "login", host=HOST, user=USER, password="pw")
    account.session_alive = False
    with pytest.raises(errors.SessionExpired):
        run(agent, "create", host=HOST, user=USER)
    assert agent.sessions[(HOST, USER)].expired is True


def test_a_remote_list_answered_after_a_lock_lists_nothing(
    agent: Agent, account: FakeAccount, fake_time: FakeTime
) -> None:
    """A list --remote whose answer comes once the agent is locked is refused as locked: a
    locked agent says nothing of the keys it holds, even to a request made before."""
    account.keys = ["on-service-only-000000"]
    run(agent, "login", host=HOST, user=USER, password="pw")
    run(agent, "add", host=HOST, user=USER, key="held-and-listed-00000")
    driver = HeldWorkDriver(fake_time)
    ended: list[tuple[object, errors.KeyagentError | None]] = []
    driver.start(
        steps(agent, "list", host=HOST, user=USER, remote=True),
        lambda result, error: ended.append((result, error)),
    )
    run(agent, "lock", passphrase="a passphrase")
    driver.end(driver.held[0])
    ((result, error),) = ended
    assert result is None
    assert isinstance(error, errors.Locked)
    assert "unlock" in error.message


def test_idle_session_is_validated_after_the_interval(
    agent: Agent, account: FakeAccount, fake_time: FakeTime
) -> None:
    """Within validate_after the session is trusted; past it, it is checked first."""
    run(agent, "login", host=HOST, user=USER, password="pw")
    run(agent, "list", host=HOST, user=USER, remote=True)
    fake_time.advance(61)
    run(agent, "list", host=HOST, user=USER, remote=True)
    assert [name for name, _ in account.calls] == ["login", "list", "validate", "list"]


def test_remote_list_merges_held_unheld_and_stale(agent: Agent, account: FakeAccount) -> None:
    """Remote keys say whether they are held; held keys the service lost are stale."""
    account.keys = ["on-service-only-000000", "held-and-listed-00000"]
    run(agent, "add", host=HOST, user=USER, key="held-and-listed-00000")
    run(agent, "add", host=HOST, user=USER, key="held-but-gone-0000000")
    result = run(agent, "list", host=HOST, user=USER, remote=True)
    held = {k["key_id"]: k["held"] for k in result["remote"]}
    assert held == {
        key_id_for("on-service-only-000000"): False,
        key_id_for("held-and-listed-00000"): True,
    }
    stale = {k["key_id"]: k["stale"] for k in result["keys"]}
    assert stale == {
        key_id_for("held-and-listed-00000"): False,
        key_id_for("held-but-gone-0000000"): True,
    }
    assert "on-service-only-000000" not in repr(result)


def test_remote_list_needs_host_and_user(agent: Agent) -> None:
    """list with remote: true names one account, so host and user are required."""
    with pytest.raises(errors.BadRequest):
        run(agent, "list", remote=True)


def test_remove_deletes_remotely_then_forgets(agent: Agent, account: FakeAccount) -> None:
    """remove deletes on the service, then drops the held key; auth prefers another held key."""
    account.keys = ["first-key-0000000000", "second-key-000000000"]
    run(agent, "add", host=HOST, user=USER, key="first-key-0000000000")
    run(agent, "add", host=HOST, user=USER, key="second-key-000000000")
    result = run(agent, "remove", key_id=key_id_for("first-key-0000000000"))
    assert result["forgotten"] == 1
    assert account.keys == ["second-key-000000000"]
    assert account.calls[-1] == ("delete", "second-key-000000000")
    with pytest.raises(errors.NotFound):
        run(agent, "get", key_id=key_id_for("first-key-0000000000"))


def test_remove_failure_keeps_the_key(agent: Agent, account: FakeAccount) -> None:
    """When the service fails the delete, the key stays held."""
    account.keys = ["only-key-00000000000"]
    run(agent, "add", host=HOST, user=USER, key="only-key-00000000000")
    account.fail_next = errors.RemoteError("the service answered 500")
    with pytest.raises(errors.RemoteError):
        run(agent, "remove", key="only-key-00000000000")
    assert run(agent, "get")["key"] == "only-key-00000000000"


def test_remove_unheld_key_needs_an_account(agent: Agent) -> None:
    """A key the agent does not hold can only be removed when host and user are given."""
    with pytest.raises(errors.NotFound):
        run(agent, "remove", key_id="abcd1234")
    with pytest.raises(errors.BadRequest):
        run(agent, "remove")


def test_remove_by_id_of_a_key_only_on_the_service(agent: Agent, account: FakeAccount) -> None:
    """remove KEY_ID for an unheld key finds it in the service's list and deletes it."""
    run(agent, "login", host=HOST, user=USER, password="pw")
    account.keys = ["stranger-key-00000000"]
    result = run(
        agent, "remove", key_id=key_id_for("stranger-key-00000000")[:6], host=HOST, user=USER
    )
    assert result["forgotten"] == 0
    assert account.keys == []


def test_logout_drops_the_session(agent: Agent, account: FakeAccount) -> None:
    """logout forgets the session; remote calls then need a login again."""
    run(agent, "login", host=HOST, user=USER, password="pw")
    assert run(agent, "logout", host=HOST, user=USER)["was_logged_in"] is True
    with pytest.raises(errors.LoginRequired):
        run(agent, "create", host=HOST, user=USER)


def test_remote_ops_are_serialised_per_account(agent: Agent) -> None:
    """Every remote operation of one account runs on the same queue; other accounts differ."""

    def queue_of(op: str, **args: object) -> str | None:
        work = next(steps(agent, op, **args))
        assert isinstance(work, Work)
        return work.queue

    first = queue_of("login", host=HOST, user=USER, password="x")
    second = queue_of("create", host=HOST, user=USER)
    other = queue_of("create", host="other.example", user=USER)
    assert first == second != other


def test_agent_without_accounts_does_not_offer_remote_ops() -> None:
    """An agent built without an account factory answers unknown_op for Conduce operations."""
    bare = Agent()
    assert "login" not in bare.ops
    with pytest.raises(errors.UnknownOp):
        bare.handle(request("login", host=HOST, user=USER, password="x"), PEER)


def test_session_repr_and_state_hold_no_cookie() -> None:
    """A session's repr and status entry carry no account internals."""
    session = Session(HOST, USER, FakeAccount(password="secret-pw"))
    assert "secret-pw" not in repr(session)
    assert set(session.state()) == {
        "host",
        "user",
        "logged_in",
        "expired",
        "since",
        "last_validated",
        "confirm",
        "allowed_exes",
    }


def test_logout_of_an_unknown_account_tracks_nothing(agent: Agent) -> None:
    """A logout for an account the agent never saw creates no session record."""
    assert run(agent, "logout", host="never.example", user=USER)["was_logged_in"] is False
    assert agent.sessions == {}


def test_a_failed_first_login_leaves_no_account_behind(agent: Agent) -> None:
    """A login that fails for an account the agent did not know leaves no record (status
    would list each for good); an account known before keeps its own."""
    for user in ("one@example.com", "two@example.com"):
        assert type(fails(agent, "login", host=HOST, user=user, password="wrong")) is (
            errors.BadCredentials
        )
    assert agent.sessions == {}
    assert run(agent, "status")["sessions"] == []
    run(agent, "login", host=HOST, user=USER, password="pw")
    run(agent, "logout", host=HOST, user=USER)
    assert type(fails(agent, "login", host=HOST, user=USER, password="wrong")) is (
        errors.BadCredentials
    )
    assert list(agent.sessions) == [(HOST, USER)]


def test_failed_first_logins_in_line_leave_no_account_behind(
    agent: Agent, fake_time: FakeTime
) -> None:
    """Two wrong passwords for an unknown account, in line one behind the other: when the
    last one fails, the account's record goes too."""
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    ended: list[errors.KeyagentError | None] = []
    for _ in range(2):
        driver.start(
            agent.handle(request("login", host=HOST, user=USER, password="wrong"), PEER),  # type: ignore[arg-type]
            lambda result, error: ended.append(error),
        )
    driver.end(driver.held[0])
    assert (HOST, USER) in agent.sessions  # the second is still in line
    driver.end(driver.held[0])
    assert [type(error) for error in ended] == [errors.BadCredentials] * 2
    assert agent.sessions == {}


def test_tracked_accounts_are_capped(agent: Agent) -> None:
    """A client naming ever new accounts cannot grow the agent's session table for ever."""
    from keyagent.agent import MAX_ACCOUNTS

    for n in range(MAX_ACCOUNTS + 10):
        with pytest.raises(errors.LoginRequired):
            run(agent, "create", host=f"h{n}.example", user=USER)
    assert len(agent.sessions) == MAX_ACCOUNTS


def test_remote_result_repr_hides_the_value() -> None:
    """A remote call's value (a created key, say) stays out of the result's repr."""
    text = repr(RemoteResult("sk-created-key-value", session_alive=True, session_expired=False))
    assert "sk-created-key-value" not in text
    assert text == "RemoteResult(session_alive=True, session_expired=False)"
