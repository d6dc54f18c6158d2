"""Unit tests for the audit log: keyagent.audit's ring and entries, and what Agent.handle records
for each operation, with the fakes of tests/fakes.py (inline driver, fake clock, fake account)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from keyagent.agent import SIGNAL_PEER, Agent, Follow, Stop
from keyagent.audit import AuditEntry, AuditLog, timestamp
from keyagent.errors import BadCredentials, BadPassphrase, Locked, NotFound
from keyagent.rules import MAX_AUDIT_ENTRIES
from keyagent.store import key_id_for

from .fakes import PEER, WALL, FakeAccount, FakeTime, request, settle

SECRET = "zebra-quokka-7781-S3CR3T"
PASSWORD = "hunter2-PASSWORD-S3CR3T"
PASSPHRASE = "correct horse PASSPHRASE"
QUERY_SECRET = "QUERY-VALUE-S3CR3T"
HOST = "app.conduce.com"
USER = "ada@example.com"


def entry(**fields: Any) -> AuditEntry:
    values: dict[str, Any] = dict.fromkeys(AuditEntry._fields)
    values.update(time=WALL, op="get", outcome="ok", **fields)
    return AuditEntry(**values)


@pytest.fixture
def account() -> FakeAccount:
    return FakeAccount(password=PASSWORD)


@pytest.fixture
def agent(account: FakeAccount) -> Agent:
    return Agent(clock=FakeTime().clock(), accounts=lambda host, user: account)


def outcome_of(agent: Agent, op: str, **args: Any) -> dict[str, Any] | Exception:
    """What a request (waited for inline) comes to: its result, or its error."""
    try:
        result = settle(agent, agent.handle(request(op, **args), PEER))
    except Exception as error:  # noqa: BLE001  # the test looks at the entry, not the error
        return error
    return result.result if isinstance(result, Stop) else result


def recorded(agent: Agent) -> list[dict[str, Any]]:
    return [entry.to_json() for entry in agent.audit_log.last()]


def newest(agent: Agent) -> dict[str, Any]:
    last = agent.audit_log.newest
    assert last is not None
    return last.to_json()


# --- entries ---------------------------------------------------------------------------------


def test_an_entry_has_a_field_per_fact_and_none_for_a_secret() -> None:
    """The entry's fields are exactly the audited facts: nothing named for a key or a body."""
    assert AuditEntry._fields == (
        "time", "op", "outcome", "key_id", "host", "user", "pid", "uid", "exe", "method",
        "path", "status",
    )  # fmt: skip


def test_time_is_iso_8601_utc_with_milliseconds() -> None:
    """to_json gives the wall time as ISO 8601 in UTC to the millisecond, every field present."""
    assert timestamp(WALL + 0.042) == "2023-11-14T22:13:20.042Z"
    assert timestamp(WALL + 0.9999) == "2023-11-14T22:13:20.999Z"
    assert entry(key_id="abcdef012345").to_json() == {
        "time": "2023-11-14T22:13:20.000Z", "op": "get", "outcome": "ok",
        "key_id": "abcdef012345", "host": None, "user": None, "pid": None, "uid": None,
        "exe": None, "method": None, "path": None, "status": None,
    }  # fmt: skip


def test_the_log_line_is_one_line_whatever_the_values_hold() -> None:
    """Values with spaces, quotes, newlines or escape sequences are JSON-quoted in the log line,
    so an entry is one line a reader can split into fields; empty fields are left out."""
    hostile = '/tmp/a b"\n\x1b[31mop=unlock outcome=ok'
    line = entry(exe=hostile, pid=42, uid=1000, host=HOST).log_line()
    assert "\n" not in line
    assert "\x1b" not in line
    assert line == (
        "audit time=2023-11-14T22:13:20.000Z op=get outcome=ok host=app.conduce.com pid=42 "
        'uid=1000 exe="/tmp/a b\\"\\n\\u001b[31mop=unlock outcome=ok"'
    )
    assert "user=" not in line


# --- the ring ----------------------------------------------------------------------------------


def test_the_ring_keeps_the_newest_entries_oldest_first() -> None:
    """A ring of 3 fed 5 entries keeps the last 3; last(n) gives the newest n, oldest first."""
    ring = AuditLog(3)
    for pid in range(5):
        ring.record(entry(pid=pid))
    assert [kept.pid for kept in ring.last()] == [2, 3, 4]
    assert [kept.pid for kept in ring.last(2)] == [3, 4]
    assert [kept.pid for kept in ring.last(10)] == [2, 3, 4]
    assert ring.last(0) == []
    assert ring.recorded == 5
    assert len(ring) == 3


def test_a_ring_of_zero_keeps_nothing_but_still_logs_and_follows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """audit_entries 0: nothing is kept for log, but each entry is logged and followed."""
    ring = AuditLog(0)
    followed: list[AuditEntry] = []
    ring.follow(followed.append)
    with caplog.at_level(logging.INFO, logger="keyagent.audit"):
        ring.record(entry(pid=7))
    assert ring.last() == []
    assert [kept.pid for kept in followed] == [7]
    assert [record.getMessage() for record in caplog.records] == [entry(pid=7).log_line()]


def test_a_follower_that_stops_following_while_entries_are_handed_out_is_safe() -> None:
    """A follower may unfollow itself (its client gone) while an entry is being handed out;
    the others still get it, and it gets no more."""
    ring = AuditLog(10)
    seen: list[str] = []

    def leaving(kept: AuditEntry) -> None:
        seen.append("leaving")
        ring.unfollow(leaving)

    ring.follow(leaving)
    ring.follow(lambda kept: seen.append("staying"))
    ring.record(entry())
    ring.record(entry())
    assert seen == ["leaving", "staying", "staying"]
    assert ring.followers == 1


@pytest.mark.parametrize("size", [-1, MAX_AUDIT_ENTRIES + 1])
def test_a_ring_size_out_of_range_is_refused(size: int) -> None:
    """The ring holds 0 to MAX_AUDIT_ENTRIES entries; other sizes raise ValueError."""
    with pytest.raises(ValueError, match="0 to 1000000"):
        AuditLog(size)


# --- no secret, ever -----------------------------------------------------------------------------


def test_requests_carrying_a_key_a_password_and_a_query_string_leave_none_in_the_audit(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    """add (a key), login (a password), lock and a failed unlock (passphrases), remove by key,
    and a proxied request with a query string: no secret or query value reaches an entry's
    JSON or its log line."""
    with caplog.at_level(logging.INFO, logger="keyagent.audit"):
        outcome_of(agent, "add", host=HOST, user=USER, key=SECRET)
        outcome_of(agent, "login", host=HOST, user=USER, password=PASSWORD)
        outcome_of(agent, "login", host=HOST, user=USER, password=PASSWORD + "-wrong")
        outcome_of(agent, "lock", passphrase=PASSPHRASE)
        outcome_of(agent, "unlock", passphrase=PASSPHRASE + "-wrong")
        outcome_of(agent, "unlock", passphrase=PASSPHRASE)
        outcome_of(agent, "remove", key=SECRET + "-not-held", host=HOST, user=USER)
        agent.audit(
            "proxy", PEER, method="GET", path=f"/conduce/api/v1/x?apikey={QUERY_SECRET}#frag",
            status=200, host=HOST, user=USER,
        )  # fmt: skip
    lines = [record.getMessage() for record in caplog.records if record.name == "keyagent.audit"]
    assert len(lines) == len(recorded(agent)) == 8
    texts = [json.dumps(kept) for kept in recorded(agent)]
    texts += [record.getMessage() for record in caplog.records]  # the agent's others too
    for text in texts:
        for secret in (SECRET, PASSWORD, PASSPHRASE, QUERY_SECRET, "apikey", "frag"):
            assert secret not in text, text
    assert newest(agent)["path"] == "/conduce/api/v1/x"
    # The key is named by its id, which is not the key.
    assert recorded(agent)[0]["key_id"] == key_id_for(SECRET)


# --- what each operation records ---------------------------------------------------------------


def test_each_operation_records_its_entry_and_outcome(agent: Agent, account: FakeAccount) -> None:
    """add, get, exec, forget, login, create, remove, logout and stop each record one entry
    with the key id, account and peer; hello, status, list and log record nothing."""
    added = outcome_of(agent, "add", host=HOST, user=USER, key=SECRET)
    assert isinstance(added, dict)
    outcome_of(agent, "get")
    outcome_of(agent, "get", key_id=added["key_id"], purpose="exec")
    for quiet in ("hello", "status", "list", "log"):
        outcome_of(agent, quiet)
    outcome_of(agent, "login", host=HOST, user=USER, password=PASSWORD)
    account.keys.append(SECRET)
    created = outcome_of(agent, "create", host=HOST, user=USER)
    assert isinstance(created, dict)
    outcome_of(agent, "remove", key_id=created["key_id"])
    outcome_of(agent, "forget", key_id=added["key_id"][:5])  # named in full all the same
    outcome_of(agent, "logout", host=HOST, user=USER)
    outcome_of(agent, "stop")
    key_id = added["key_id"]
    assert [
        (kept["op"], kept["outcome"], kept["key_id"], kept["host"], kept["user"])
        for kept in recorded(agent)
    ] == [
        ("add", "ok", key_id, HOST, USER),
        ("get", "ok", key_id, HOST, USER),  # the served key's account, though none was asked
        ("exec", "ok", key_id, HOST, USER),
        ("login", "ok", None, HOST, USER),
        ("create", "ok", created["key_id"], HOST, USER),
        ("remove", "ok", created["key_id"], HOST, USER),
        ("forget", "ok", key_id, HOST, USER),
        ("logout", "ok", None, HOST, USER),
        ("stop", "ok", None, None, None),
    ]
    assert {(kept["pid"], kept["uid"], kept["time"]) for kept in recorded(agent)} == {
        (PEER.pid, PEER.uid, "2023-11-14T22:13:20.000Z")
    }


def test_failures_are_recorded_with_their_code(agent: Agent) -> None:
    """A get that finds nothing, a login the service refuses (a generator that fails) and a
    wrong unlock passphrase (after its delay) are recorded with their error codes."""
    assert isinstance(outcome_of(agent, "get", key_id="abcd"), NotFound)
    assert isinstance(
        outcome_of(agent, "login", host=HOST, user=USER, password="no"), BadCredentials
    )
    outcome_of(agent, "lock", passphrase=PASSPHRASE)
    assert isinstance(outcome_of(agent, "unlock", passphrase="wrong"), BadPassphrase)
    assert [(kept["op"], kept["outcome"], kept["key_id"]) for kept in recorded(agent)] == [
        ("get", "not_found", "abcd"),
        ("login", "bad_credentials", None),
        ("lock", "ok", None),
        ("unlock", "bad_passphrase", None),
    ]


def test_requests_refused_while_locked_are_recorded_even_reads(agent: Agent) -> None:
    """While locked, list, log and get are refused locked and each recorded as such; hello
    and status, which are served, record nothing."""
    outcome_of(agent, "add", host=HOST, user=USER, key=SECRET)
    outcome_of(agent, "lock", passphrase=PASSPHRASE)
    for op in ("list", "log", "get", "hello", "status"):
        outcome_of(agent, op)
    assert [(kept["op"], kept["outcome"]) for kept in recorded(agent)][2:] == [
        ("list", "locked"),
        ("log", "locked"),
        ("get", "locked"),
    ]


def test_a_forget_on_sigusr1_is_recorded_without_a_process(agent: Agent) -> None:
    """The forget the agent makes on SIGUSR1 is recorded with no pid, uid or executable."""
    outcome_of(agent, "add", host=HOST, user=USER, key=SECRET)
    settle(agent, agent.handle(request("forget", all=True), SIGNAL_PEER))
    assert {name: newest(agent)[name] for name in ("op", "outcome", "pid", "uid", "exe")} == {
        "op": "forget", "outcome": "ok", "pid": None, "uid": None, "exe": None,
    }  # fmt: skip


def test_a_proxied_request_is_recorded_with_method_path_and_status(agent: Agent) -> None:
    """Agent.audit, for the HTTP socket: method, path without its query and upstream status."""
    agent.audit(
        "proxy", PEER, key_id="abcdef012345", host=HOST, user=USER, method="POST",
        path="//api/v2/data/x?token=t", status=502, outcome="remote_unreachable",
    )  # fmt: skip
    assert newest(agent) | {"time": None} == {
        "time": None, "op": "proxy", "outcome": "remote_unreachable", "key_id": "abcdef012345",
        "host": HOST, "user": USER, "pid": PEER.pid, "uid": PEER.uid, "exe": None,
        "method": "POST", "path": "//api/v2/data/x", "status": 502,
    }  # fmt: skip


# --- the log operation ---------------------------------------------------------------------------


def test_log_returns_the_last_n_entries_and_follow_asks_the_server_to_follow(
    agent: Agent,
) -> None:
    """log gives every entry kept, or the last n; with follow it is a Follow of the same."""
    for number in range(3):
        outcome_of(agent, "add", host=HOST, user=USER, key=f"{SECRET}-{number}")
    everything = agent.handle(request("log"), PEER)
    assert isinstance(everything, dict)
    assert [kept["key_id"] for kept in everything["entries"]] == [
        key_id_for(f"{SECRET}-{number}") for number in range(3)
    ]
    last = agent.handle(request("log", n=1), PEER)
    assert isinstance(last, dict)
    assert last["entries"] == everything["entries"][-1:]
    followed = agent.handle(request("log", n=2, follow=True), PEER)
    assert isinstance(followed, Follow)
    assert followed.result["entries"] == everything["entries"][-2:]


def test_log_is_refused_while_locked(agent: Agent) -> None:
    """log reveals how the agent is used: a locked agent refuses it, follow or not."""
    outcome_of(agent, "lock", passphrase=PASSPHRASE)
    for args in ({}, {"follow": True}):
        with pytest.raises(Locked):
            agent.handle(request("log", **args), PEER)


def test_the_audit_ring_size_comes_from_the_agent(account: FakeAccount) -> None:
    """Agent(audit_entries=N) keeps the last N entries."""
    small = Agent(clock=FakeTime().clock(), audit_entries=2)
    for number in range(3):
        outcome_of(small, "add", host=HOST, user=USER, key=f"{SECRET}-{number}")
    assert [kept["key_id"] for kept in recorded(small)] == [
        key_id_for(f"{SECRET}-{number}") for number in (1, 2)
    ]


def test_deferred_entries_are_written_together_and_repeats_formatted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In the server's deferred mode an entry waits for flush (the first one arms it), then
    every waiting entry is logged, each with its own time."""
    armed: list[int] = []
    ring = AuditLog(10)
    ring.deferred = True
    ring.on_pending = lambda: armed.append(len(armed))
    first = AuditEntry(1_000.0, "get", "ok", "0123456789ab", "h", "u", 7, 0, None, None, None, None)
    with caplog.at_level(logging.INFO, logger="keyagent.audit"):
        ring.record(first)
        ring.record(first._replace(time=1_000.5))
        assert armed == [0]  # one timer for both
        assert not [r for r in caplog.records if "audit time=" in r.getMessage()]
        ring.flush()
    lines = [r.getMessage() for r in caplog.records if "audit time=" in r.getMessage()]
    assert lines == [
        "audit time=1970-01-01T00:16:40.000Z op=get outcome=ok key_id=0123456789ab host=h "
        "user=u pid=7 uid=0",
        "audit time=1970-01-01T00:16:40.500Z op=get outcome=ok key_id=0123456789ab host=h "
        "user=u pid=7 uid=0",
    ]
    assert len(ring) == 2
    ring.record(first)
    assert armed == [0, 1]  # armed again after a flush
