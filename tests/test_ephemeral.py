"""Ephemeral keys at the agent's level: a key that create makes with a lifetime is deleted on
the service when it expires or is forgotten, with retries on a fake clock (no sleeping)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from keyagent import errors
from keyagent.agent import FIRST_RETRY, MAX_RETRY, RETRY_DELETION_FOR, Agent, jittered
from keyagent.effects import InlineDriver
from keyagent.store import key_id_for

from .fakes import FakeAccount, FakeTime, driver_for, fails, run

HOST, USER = "app.conduce.com", "ada@example.com"
ACCOUNT = {"host": HOST, "user": USER}


class TimedAccount(FakeAccount):
    """A FakeAccount that notes the fake clock's time of each delete attempt."""

    def __init__(self, time: FakeTime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.time = time
        self.delete_times: list[float] = []

    def delete_key(self, key: str, api_key: str | None = None) -> None:
        self.delete_times.append(self.time.monotonic)
        super().delete_key(key, api_key=api_key)


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def account(time: FakeTime) -> TimedAccount:
    return TimedAccount(time, keys=["existing-key-0000-abcdefgh"])


def make_agent(time: FakeTime, account: FakeAccount, **kwargs: Any) -> Agent:
    # No jitter: the backoff schedule is asserted exactly.
    return Agent(
        clock=time.clock(), accounts=lambda host, user: account, jitter=lambda d: d, **kwargs
    )


@pytest.fixture
def agent(time: FakeTime, account: TimedAccount) -> Agent:
    return make_agent(time, account)


def logout(agent: Agent) -> None:
    run(agent, "logout", **ACCOUNT)


def create(agent: Agent, **args: Any) -> dict[str, Any]:
    """create, logged in (the session stays live unless the test logs out)."""
    if not agent.sessions or not next(iter(agent.sessions.values())).live:
        run(agent, "login", **ACCOUNT, password="pw")
    return run(agent, "create", **ACCOUNT, **args)


def expire(agent: Agent, time: FakeTime, seconds: float) -> InlineDriver:
    """Move the clock past a lifetime and reap, as the server's loop does before each wait."""
    driver = driver_for(agent)
    time.advance(seconds)
    agent.reap()
    return driver


def created_secret(account: FakeAccount) -> str:
    return account.keys[-1]


def test_a_created_key_with_a_lifetime_is_ephemeral_and_deleted_at_expiry(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """A key create makes with a lifetime is listed ephemeral and, at expiry, deleted on the
    service with itself as the credential when there is no session."""
    listing = create(agent, lifetime=60)
    secret = created_secret(account)
    logout(agent)
    assert listing["ephemeral"] is True
    assert run(agent, "list")["keys"][0]["ephemeral"] is True
    expire(agent, time, 60)
    assert secret not in account.keys
    assert ("delete", secret) in account.calls  # authenticated with the expiring key itself
    assert agent.pending_deletions == {}
    assert isinstance(fails(agent, "get", key_id=listing["key_id"]), errors.NotFound)


def test_the_default_lifetime_makes_a_created_key_ephemeral(
    time: FakeTime, account: TimedAccount
) -> None:
    """With the agent's default lifetime (-t), a created key is ephemeral too."""
    agent = make_agent(time, account, default_lifetime=30.0)
    assert create(agent)["ephemeral"] is True
    secret = created_secret(account)
    expire(agent, time, 30)
    assert secret not in account.keys


def test_the_live_session_deletes_the_expired_key(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """With a live session, the expired key is deleted with the session, not with itself."""
    create(agent, lifetime=60)
    secret = created_secret(account)
    expire(agent, time, 60)
    assert secret not in account.keys
    assert account.calls[-1] == ("delete", None)


def test_another_held_key_deletes_it_when_the_key_itself_is_refused(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """When the service refuses the expired key as a credential, another held key of the
    account authenticates its deletion."""
    create(agent, lifetime=60)
    secret = created_secret(account)
    run(agent, "add", **ACCOUNT, key="existing-key-0000-abcdefgh")
    logout(agent)
    account.fail_next = errors.BadCredentials("the service rejected the API key")
    expire(agent, time, 60)
    assert secret not in account.keys
    assert account.calls[-2:] == [("delete", secret), ("delete", "existing-key-0000-abcdefgh")]


def test_failures_are_retried_with_exponential_backoff_on_the_clock(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """A deletion that fails (503, timeout) is retried after 1 s, 2 s, 4 s...; the key is not
    served meanwhile and status shows it pending with its attempts."""
    create(agent, lifetime=60)
    secret = created_secret(account)
    account.failures = [
        errors.RemoteError("the service answered 503"),
        errors.Timeout("the service did not answer within 30 s"),
        errors.RemoteError("the service answered 502"),
    ]
    driver = expire(agent, time, 60)
    start = time.monotonic
    (pending,) = run(agent, "status")["pending_deletions"]
    assert pending == {
        "key_id": key_id_for(secret),
        "host": HOST,
        "user": USER,
        "since": pending["since"],
        "attempts": 1,
    }
    assert secret not in str(run(agent, "status"))
    assert isinstance(fails(agent, "get"), errors.NotFound)
    driver.pass_time(FIRST_RETRY - 0.01)
    assert len(account.delete_times) == 1
    driver.pass_time(10)
    assert [t - start for t in account.delete_times] == [0, 1, 3, 7]
    assert secret not in account.keys
    assert run(agent, "status")["pending_deletions"] == []
    assert agent.pending_deletions == {}


def test_a_service_that_never_answers_is_retried_for_a_day_at_most_every_ten_minutes(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """Deletion keeps trying for at least 24 h with waits capped at ten minutes, then gives
    up and drops the secret."""
    create(agent, lifetime=60)
    secret = created_secret(account)
    account.failures = [errors.RemoteError("the service answered 503")] * 100_000
    driver = expire(agent, time, 60)
    start = time.monotonic
    driver.pass_time(RETRY_DELETION_FOR - 60)
    assert secret in agent.pending_deletions[key_id_full(agent)].secret
    driver.pass_time(2 * MAX_RETRY)
    assert agent.pending_deletions == {}
    times = account.delete_times
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[:4] == [1, 2, 4, 8]
    assert max(gaps) == MAX_RETRY
    assert times[-1] - start >= RETRY_DELETION_FOR
    assert secret in account.keys  # never deleted: the log says how to


def key_id_full(agent: Agent) -> str:
    (digest,) = agent.pending_deletions
    return digest


def test_a_key_the_service_does_not_know_counts_as_deleted(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """A deletion answered not_found (someone deleted the key already) is done, not retried."""
    create(agent, lifetime=60)
    secret = created_secret(account)
    account.keys.remove(secret)
    driver = expire(agent, time, 60)
    driver.pass_time(3600)
    assert len(account.delete_times) == 1
    assert agent.pending_deletions == {}


def test_keep_leaves_the_key_on_the_service(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """create with keep makes a key that is not ephemeral: at expiry it stays on the service."""
    assert create(agent, lifetime=60, keep=True)["ephemeral"] is False
    secret = created_secret(account)
    expire(agent, time, 60)
    assert secret in account.keys
    assert account.delete_times == []


def test_a_created_key_without_a_lifetime_is_not_ephemeral(agent: Agent) -> None:
    """A key with no lifetime never expires, so the agent never deletes it on its own."""
    assert create(agent)["ephemeral"] is False


def test_keep_created_keys_makes_keeping_the_default_and_keep_false_asks_for_ephemeral(
    time: FakeTime, account: TimedAccount
) -> None:
    """With keep_created_keys, created keys are kept unless create says keep: false."""
    agent = make_agent(time, account, keep_created_keys=True)
    assert create(agent, lifetime=60)["ephemeral"] is False
    kept = created_secret(account)
    assert create(agent, lifetime=60, keep=False)["ephemeral"] is True
    ephemeral = created_secret(account)
    expire(agent, time, 60)
    assert kept in account.keys
    assert ephemeral not in account.keys


def test_an_added_key_is_never_ephemeral(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """A key given with add, even with a lifetime, is never deleted on the service."""
    assert (
        run(agent, "add", **ACCOUNT, key="existing-key-0000-abcdefgh", lifetime=5)["ephemeral"]
        is False
    )
    expire(agent, time, 5)
    run(agent, "forget", all=True)
    assert "existing-key-0000-abcdefgh" in account.keys
    assert account.delete_times == []


def test_a_key_whose_deletion_is_pending_is_not_held_again(
    agent: Agent, account: TimedAccount, time: FakeTime
) -> None:
    """Adding a key again while its deletion is retried is busy: held, it would be served
    until the deletion revoked it on the service. Once deleted, the add is refused no more."""
    create(agent, lifetime=60)
    secret = created_secret(account)
    account.failures = [errors.RemoteError("the service answered 503")]
    driver = expire(agent, time, 60)
    refused = fails(agent, "add", host=HOST, user=USER, key=secret)
    assert isinstance(refused, errors.Busy)
    assert refused.message.startswith(f"key {key_id_for(secret)} is being deleted on the service")
    assert isinstance(fails(agent, "get"), errors.NotFound)
    driver.pass_time(10)
    assert secret not in account.keys
    assert agent.pending_deletions == {}
    assert run(agent, "add", host=HOST, user=USER, key=secret)["key_id"] == key_id_for(secret)


def test_forget_deletes_an_ephemeral_key_on_the_service(
    agent: Agent, account: TimedAccount
) -> None:
    """forget of an ephemeral key deletes it on the service too, and says so."""
    listing = create(agent, lifetime=3600)
    secret = created_secret(account)
    driver_for(agent)
    forgot = run(agent, "forget", key_id=listing["key_id"])
    assert (forgot["forgotten"], forgot["deleting"]) == (1, 1)
    assert secret not in account.keys


def test_forget_local_keeps_an_ephemeral_key_on_the_service(
    agent: Agent, account: TimedAccount
) -> None:
    """forget with local drops the key from memory only: it stays valid on the service."""
    listing = create(agent, lifetime=3600)
    secret = created_secret(account)
    driver_for(agent)
    forgot = run(agent, "forget", key_id=listing["key_id"], local=True)
    assert (forgot["forgotten"], "deleting" in forgot) == (1, False)
    assert secret in account.keys
    assert agent.pending_deletions == {}


def test_forget_all_deletes_every_ephemeral_key(agent: Agent, account: TimedAccount) -> None:
    """forget --all deletes each ephemeral key held on the service, and no other."""
    create(agent, lifetime=3600)
    first = created_secret(account)
    create(agent, lifetime=3600)
    second = created_secret(account)
    create(agent, lifetime=3600, keep=True)
    kept = created_secret(account)
    driver_for(agent)
    staying = [{"key_id": key_id_for(kept), "host": HOST, "user": USER}]  # kept: not deleted
    assert run(agent, "forget", all=True) == {"forgotten": 3, "deleting": 2, "staying": staying}
    assert first not in account.keys
    assert second not in account.keys
    assert kept in account.keys


def test_jitter_stays_within_the_last_quarter_of_the_delay() -> None:
    """The default jitter spreads a retry over [0.75, 1] of its delay, never longer."""
    assert all(7.5 <= jittered(10.0) <= 10.0 for _ in range(200))
