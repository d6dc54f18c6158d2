"""Orphans at the agent's level: the mark keyagent puts on the keys it creates, and ``prune``,
which lists (and with ``delete`` deletes) the account's marked keys on the service that this
agent neither holds nor is deleting. Driven inline with fakes: no sockets, no sleeping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from keyring.backends import fail

from keyagent import errors
from keyagent.agent import KEPT_MARK, KEYAGENT_MARK, Agent, is_marked, is_prunable, marked
from keyagent.effects import Work
from keyagent.persist import KeyringStore
from keyagent.protocol import DESCRIPTION_MAX
from keyagent.store import digest_of, key_id_for
from keyagent.testing.memory_keyring import MemoryKeyring

from .fakes import PEER, FakeAccount, FakeTime, Listed, driver_for, fails, request, run, steps

if TYPE_CHECKING:
    from keyagent.sessions import ListedKey

HOST, USER = "app.conduce.com", "ada@example.com"
ACCOUNT = {"host": HOST, "user": USER}
UNMARKED = "by-hand-key-0000-abcdefgh"
ORPHANS = ("orphan-key-0001-abcdefgh", "orphan-key-0002-abcdefgh", "orphan-key-0003-abcdefgh")


# --- the mark ---------------------------------------------------------------------------------


def test_a_short_description_is_kept_whole_and_marked() -> None:
    """marked() appends the mark to a description that fits, unchanged."""
    assert marked("deploy bot") == "deploy bot [keyagent]"
    assert is_marked(marked("deploy bot"))


def test_an_empty_description_is_marked() -> None:
    """An empty description becomes the mark alone, which is_marked() recognises."""
    assert marked("") == KEYAGENT_MARK
    assert is_marked(marked(""))
    assert not is_marked("")


def test_a_long_description_is_cut_to_leave_room_for_the_mark() -> None:
    """A description of the protocol's maximum length is cut so that, marked, it is exactly
    at the limit and still ends with the mark."""
    long = "x" * DESCRIPTION_MAX
    on_service = marked(long)
    assert len(on_service) == DESCRIPTION_MAX
    assert on_service == "x" * (DESCRIPTION_MAX - len(KEYAGENT_MARK)) + KEYAGENT_MARK
    assert is_marked(on_service)


def test_descriptions_without_the_whole_mark_at_their_end_are_not_marked() -> None:
    """Only the exact suffix counts: the mark elsewhere, a variant or a cut mark is not it."""
    for description in (
        "[keyagent] deploy",
        "deploy [keyagent] bot",
        "deploy[keyagent]",
        "deploy [Keyagent]",
        "deploy [keyagent",
        "deploy [keyagent] ",
    ):
        assert not is_marked(description), description


@given(st.text(max_size=DESCRIPTION_MAX + 50))
@example("")
@example("y" * DESCRIPTION_MAX)
@example("z" * (DESCRIPTION_MAX - len(KEYAGENT_MARK)))
def test_marked_is_always_marked_and_within_the_limit(description: str) -> None:
    """For any description, marked() is recognised by is_marked(), fits the protocol's limit,
    keeps a description that fits whole, and marking twice changes nothing more than once."""
    on_service = marked(description)
    assert is_marked(on_service)
    assert len(on_service) <= DESCRIPTION_MAX
    room = DESCRIPTION_MAX - len(KEYAGENT_MARK)
    assert on_service.removesuffix(KEYAGENT_MARK) == description[:room]


# --- prune ------------------------------------------------------------------------------------


class OrphanAccount(FakeAccount):
    """A FakeAccount whose ``delete_key`` can refuse chosen keys, and whose list can show
    keys it no longer has (``ghosts``: deleted by someone else since it listed them)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refuse: dict[str, errors.KeyagentError] = {}
        self.ghosts: list[str] = []

    def list_keys(self, api_key: str | None = None) -> Sequence[ListedKey]:
        listed = list(super().list_keys(api_key))
        return listed + [Listed(ghost, marked("gone")) for ghost in self.ghosts]

    def delete_key(self, key: str, api_key: str | None = None) -> None:
        refusal = self.refuse.get(key)
        if refusal is not None:
            self.calls.append(("delete", api_key))
            raise refusal
        super().delete_key(key, api_key=api_key)


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def account() -> OrphanAccount:
    """Three keys a stopped agent created (marked), one made by hand (not marked)."""
    account = OrphanAccount(keys=[UNMARKED, *ORPHANS])
    account.descriptions[UNMARKED] = "made in the web console"
    for number, key in enumerate(ORPHANS):
        account.descriptions[key] = marked(f"old agent's key {number}")
    return account


@pytest.fixture
def agent(time: FakeTime, account: OrphanAccount) -> Agent:
    """An agent whose OS keyring keeps no key."""
    agent = Agent(
        clock=time.clock(), accounts=lambda host, user: account, jitter=lambda d: d,
        keyring=KeyringStore(MemoryKeyring()),
    )  # fmt: skip
    run(agent, "login", **ACCOUNT, password="pw")
    return agent


def test_an_agent_that_does_not_read_the_keyring_refuses_to_prune(
    time: FakeTime, account: OrphanAccount
) -> None:
    """--no-keyring: the agent cannot tell which keys the keyring keeps (a persisted key
    would look like an orphan), so prune is refused and nothing is deleted."""
    agent = Agent(clock=time.clock(), accounts=lambda host, user: account, keyring=None)
    run(agent, "login", **ACCOUNT, password="pw")
    calls = len(account.calls)
    for delete in (False, True):
        error = fails(agent, "prune", **ACCOUNT, delete=delete)
        assert type(error) is errors.KeyringUnavailable
        assert "--no-keyring" in error.message
    assert len(account.calls) == calls  # refused before the service was asked
    assert account.keys == [UNMARKED, *ORPHANS]


def work(effect: object) -> Work:
    """The effect a handler yielded, which must be work (a remote call)."""
    assert isinstance(effect, Work)
    return effect


def orphan_ids(result: dict[str, Any]) -> list[str]:
    return [orphan["key_id"] for orphan in result["orphans"]]


def test_prune_lists_the_marked_keys_the_agent_does_not_hold(
    agent: Agent, account: OrphanAccount
) -> None:
    """Without delete, prune shows each marked key on the service that the agent does not
    hold (id, fingerprint, masked key, description, created), deletes nothing, and records
    nothing in the audit log."""
    calls_before = len(account.calls)
    result = run(agent, "prune", **ACCOUNT)
    assert (result["host"], result["user"]) == (HOST, USER)
    assert orphan_ids(result) == [key_id_for(key) for key in ORPHANS]
    first = result["orphans"][0]
    assert first == {
        "key_id": key_id_for(ORPHANS[0]),
        "fingerprint": digest_of(ORPHANS[0]),
        "masked": "orph…efgh",
        "description": "old agent's key 0 [keyagent]",
        "created": None,
    }
    assert "deleted" not in result
    assert account.keys == [UNMARKED, *ORPHANS]
    assert [name for name, _ in account.calls[calls_before:]] == ["list"]  # one list call
    assert [entry.op for entry in agent.audit_log.last(None)] == ["login"]
    for key in ORPHANS:
        assert key not in str(result)


def test_held_and_pending_keys_are_not_orphans(
    agent: Agent, account: OrphanAccount, time: FakeTime
) -> None:
    """A marked key the agent holds (created, or added by hand) and one it is still deleting
    (pending deletion) are never listed nor deleted by prune."""
    held = run(agent, "create", **ACCOUNT, description="in use")
    created_secret = account.keys[-1]
    run(agent, "add", **ACCOUNT, key=ORPHANS[0])
    run(agent, "create", **ACCOUNT, lifetime=60)
    pending_secret = account.keys[-1]
    account.failures = [errors.RemoteError("the service answered 503")]
    driver_for(agent)
    time.advance(60)
    agent.reap()  # the expired key's deletion fails once: it is pending, retried in 1 s
    assert digest_of(pending_secret) in agent.pending_deletions
    assert account.descriptions[created_secret] == "in use [keyagent]"
    result = run(agent, "prune", **ACCOUNT, delete=True)
    assert orphan_ids(result) == [key_id_for(key) for key in ORPHANS[1:]]
    assert held["key_id"] not in orphan_ids(result)
    assert key_id_for(pending_secret) not in orphan_ids(result)
    assert account.keys == [UNMARKED, ORPHANS[0], created_secret, pending_secret]
    assert digest_of(pending_secret) in agent.pending_deletions  # still the agent's to end


def test_unmarked_keys_are_never_touched(agent: Agent, account: OrphanAccount) -> None:
    """A key whose description does not end with the mark (made by hand, or by another
    tool) is neither listed nor deleted, even with delete."""
    account.keys.append("console-key-0000-abcdefgh")
    account.descriptions["console-key-0000-abcdefgh"] = "[keyagent] in front is not the mark"
    result = run(agent, "prune", **ACCOUNT, delete=True)
    assert result["deleted"] == len(ORPHANS)
    assert account.keys == [UNMARKED, "console-key-0000-abcdefgh"]
    assert key_id_for(UNMARKED) not in orphan_ids(result)


def test_delete_goes_on_after_a_failure_and_reports_each_key(
    agent: Agent, account: OrphanAccount
) -> None:
    """With delete, each orphan is deleted with the account's session; one refused does not
    stop the others, the reply says per key deleted or the error, and a key already gone
    counts as deleted."""
    account.refuse[ORPHANS[1]] = errors.RemoteError("the service answered 503; retry later")
    account.ghosts.append("ghost-key-0000-abcdefgh")
    result = run(agent, "prune", **ACCOUNT, delete=True)
    by_id = {orphan["key_id"]: orphan for orphan in result["orphans"]}
    assert by_id[key_id_for(ORPHANS[0])]["deleted"] is True
    assert by_id[key_id_for(ORPHANS[2])]["deleted"] is True
    assert by_id[key_id_for("ghost-key-0000-abcdefgh")]["deleted"] is True
    failed = by_id[key_id_for(ORPHANS[1])]
    assert failed["deleted"] is False
    assert failed["error"] == {
        "code": "remote_error",
        "message": "the service answered 503; retry later",
    }
    assert (result["deleted"], result["failed"]) == (3, 1)
    assert account.keys == [UNMARKED, ORPHANS[1]]
    deletes = [credential for name, credential in account.calls if name == "delete"]
    assert deletes == [None] * 4  # the live session each time


def test_each_deletion_is_recorded_in_the_audit_log(agent: Agent, account: OrphanAccount) -> None:
    """Each key prune deletes, or fails to delete, is one audit entry: op prune, its key id,
    the account, the outcome, and who asked."""
    account.refuse[ORPHANS[2]] = errors.Timeout("the service did not answer within 30 s")
    run(agent, "prune", **ACCOUNT, delete=True)
    entries = [entry for entry in agent.audit_log.last(None) if entry.op == "prune"]
    assert [(e.key_id, e.host, e.user, e.outcome) for e in entries] == [
        (key_id_for(ORPHANS[0]), HOST, USER, "ok"),
        (key_id_for(ORPHANS[1]), HOST, USER, "ok"),
        (key_id_for(ORPHANS[2]), HOST, USER, "timeout"),
    ]
    assert {(entry.pid, entry.uid) for entry in entries} == {(PEER.pid, PEER.uid)}


def test_a_key_held_again_while_others_are_deleted_is_kept(
    agent: Agent, account: OrphanAccount
) -> None:
    """An orphan the agent comes to hold between the list and its turn to be deleted (added
    meanwhile) is kept on the service and says so."""
    pruning = steps(agent, "prune", **ACCOUNT, delete=True)
    listing = work(next(pruning))
    keyring = work(pruning.send(listing.fn()))
    first_delete = work(pruning.send(keyring.fn()))
    run(agent, "add", **ACCOUNT, key=ORPHANS[1])  # while the first deletion runs
    second_delete = work(pruning.send(first_delete.fn()))
    with pytest.raises(StopIteration) as stop:
        pruning.send(second_delete.fn())
    result = stop.value.value
    kept = result["orphans"][1]
    assert (kept["key_id"], kept["deleted"], kept["held"]) == (key_id_for(ORPHANS[1]), False, True)
    assert (result["deleted"], result["failed"]) == (2, 0)
    assert account.keys == [UNMARKED, ORPHANS[1]]


def test_a_prune_whose_list_comes_back_after_a_lock_prunes_nothing(
    agent: Agent, account: OrphanAccount
) -> None:
    """Locked while the service listed the keys: prune --yes neither lists nor deletes
    anything, and says to unlock and prune again."""
    pruning = steps(agent, "prune", **ACCOUNT, delete=True)
    listing = work(next(pruning))
    keyring = work(pruning.send(listing.fn()))
    run(agent, "lock", passphrase="a passphrase")
    with pytest.raises(errors.Locked) as caught:
        pruning.send(keyring.fn())
    assert "prune again" in caught.value.message
    assert account.keys == [UNMARKED, *ORPHANS]


def test_prune_uses_a_held_key_when_there_is_no_session(
    agent: Agent, account: OrphanAccount
) -> None:
    """Logged out, prune lists and deletes with a key the agent holds for the account."""
    run(agent, "add", **ACCOUNT, key=UNMARKED)
    run(agent, "logout", **ACCOUNT)
    result = run(agent, "prune", **ACCOUNT, delete=True)
    assert result["deleted"] == len(ORPHANS)
    assert account.keys == [UNMARKED]
    assert {credential for name, credential in account.calls[-4:]} == {UNMARKED}


def test_prune_without_credentials_asks_for_a_login(time: FakeTime, account: OrphanAccount) -> None:
    """With no session and no held key for the account, prune fails login_required and
    deletes nothing."""
    agent = Agent(
        clock=time.clock(), accounts=lambda host, user: account,
        keyring=KeyringStore(MemoryKeyring()),
    )  # fmt: skip
    error = fails(agent, "prune", **ACCOUNT, delete=True)
    assert isinstance(error, errors.LoginRequired)
    assert account.keys == [UNMARKED, *ORPHANS]


def test_prune_is_refused_while_locked(agent: Agent, account: OrphanAccount) -> None:
    """A locked agent refuses prune (locked, audited as a refusal) and touches nothing."""
    run(agent, "lock", passphrase="correct horse battery")
    error = fails(agent, "prune", **ACCOUNT, delete=True)
    assert isinstance(error, errors.Locked)
    assert account.keys == [UNMARKED, *ORPHANS]
    assert agent.audit_log.last(1)[0].op == "prune"
    assert agent.audit_log.last(1)[0].outcome == "locked"


def test_list_remote_says_which_keys_keyagent_created(agent: Agent) -> None:
    """list with remote shows for each key on the service whether keyagent created it."""
    result = run(agent, "list", **ACCOUNT, remote=True)
    created = {entry["key_id"]: entry["keyagent"] for entry in result["remote"]}
    assert created == {key_id_for(UNMARKED): False, **{key_id_for(k): True for k in ORPHANS}}


def test_prune_needs_an_account() -> None:
    """prune without host or user is a bad request, named by the protocol."""
    from keyagent.protocol import InvalidRequest

    with pytest.raises(InvalidRequest) as caught:
        request("prune", host=HOST)
    assert "'user'" in caught.value.error.message


# --- keys the OS keyring keeps ------------------------------------------------------------


def keyring_agent(time: FakeTime, account: OrphanAccount, backend: object) -> Agent:
    agent = Agent(
        clock=time.clock(), accounts=lambda host, user: account, jitter=lambda d: d,
        keyring=KeyringStore(backend),
    )  # fmt: skip
    run(agent, "login", **ACCOUNT, password="pw")
    return agent


def test_a_key_forgotten_from_memory_but_kept_in_the_keyring_is_no_orphan(
    time: FakeTime, account: OrphanAccount
) -> None:
    """A marked key the agent no longer holds but the OS keyring still keeps (forgotten
    without --persist: it comes back at the next start) is neither listed nor deleted."""
    agent = keyring_agent(time, account, MemoryKeyring())
    run(agent, "add", **ACCOUNT, key=ORPHANS[0], persist=True)
    run(agent, "forget", key_id=key_id_for(ORPHANS[0]))
    assert agent.held_keys.holding(digest_of(ORPHANS[0])) is None
    result = run(agent, "prune", **ACCOUNT, delete=True)
    assert orphan_ids(result) == [key_id_for(key) for key in ORPHANS[1:]]
    assert account.keys == [UNMARKED, ORPHANS[0]]


def test_prune_is_refused_when_the_keyring_cannot_be_read(
    time: FakeTime, account: OrphanAccount
) -> None:
    """If the OS keyring cannot say which keys it keeps, prune deletes nothing and says why
    (keyring_unavailable), rather than take a persisted key for an orphan."""
    backend = MemoryKeyring()
    agent = keyring_agent(time, account, backend)
    backend.fail_with = RuntimeError("the keyring is locked")
    with pytest.raises(errors.KeyringUnavailable, match="prune must know which keys"):
        run(agent, "prune", **ACCOUNT, delete=True)
    assert account.keys == [UNMARKED, *ORPHANS]


def test_an_agent_with_no_keyring_backend_keeps_no_key_there() -> None:
    """With keyring's fail backend (no OS keyring on this machine) nothing can have been
    persisted: the store keeps no key, and prune works as without a keyring."""
    no_backend = fail.Keyring()  # type: ignore[no-untyped-call]  # keyring is untyped here
    assert KeyringStore(no_backend).fingerprints() == frozenset()


# --- keys meant to outlive the agent ------------------------------------------------------


def test_the_kept_mark_is_keyagents_but_not_prunable() -> None:
    """A kept key's description is recognised as keyagent's (list --remote) but is never one
    prune may delete; the plain mark is both."""
    kept = marked("ci deploy", kept=True)
    assert kept == "ci deploy" + KEPT_MARK
    assert is_marked(kept)
    assert not is_prunable(kept)
    assert is_marked(marked("laptop"))
    assert is_prunable(marked("laptop"))
    assert len(marked("x" * DESCRIPTION_MAX, kept=True)) == DESCRIPTION_MAX


def test_keys_created_to_outlive_the_agent_are_never_pruned(
    agent: Agent, account: OrphanAccount
) -> None:
    """create --keep and create --print mark their key as kept on the service, so once the
    agent no longer holds them prune neither lists nor deletes them; a plain created key it
    forgot is an orphan."""
    run(agent, "create", **ACCOUNT, description="kept", lifetime=3600, keep=True)
    run(agent, "create", **ACCOUNT, description="printed", reveal=True)
    run(agent, "create", **ACCOUNT, description="plain")
    kept, printed, plain = account.keys[-3:]
    assert account.descriptions[kept] == "kept" + KEPT_MARK
    assert account.descriptions[printed] == "printed" + KEPT_MARK
    assert account.descriptions[plain] == "plain" + KEYAGENT_MARK
    run(agent, "forget", all=True)
    result = run(agent, "prune", **ACCOUNT, delete=True)
    assert orphan_ids(result) == [key_id_for(key) for key in (*ORPHANS, plain)]
    assert account.keys == [UNMARKED, kept, printed]
    remote = run(agent, "list", **ACCOUNT, remote=True)["remote"]
    assert [entry["keyagent"] for entry in remote] == [False, True, True]


def test_persisted_keys_are_marked_kept_so_a_prune_without_the_keyring_spares_them(
    time: FakeTime, account: OrphanAccount
) -> None:
    """create --persist, and the rotation of a persisted key, mark the key kept: an agent
    whose keyring is out of reach (keyring falls back to its fail backend when the Secret
    Service has no D-Bus, as in an SSH login) cannot see the key there, and its prune must
    still leave it alone. A persisted ephemeral key is deleted when it expires anyway, and
    keeps the plain mark."""
    agent = keyring_agent(time, account, MemoryKeyring())
    run(agent, "create", **ACCOUNT, description="persisted", persist=True)
    run(agent, "create", **ACCOUNT, description="rotated", persist=True)
    run(agent, "rotate", key_id=key_id_for(account.keys[-1]))
    run(agent, "create", **ACCOUNT, description="brief", lifetime=3600, persist=True)
    persisted, rotated, brief = account.keys[-3:]
    assert account.descriptions[persisted] == "persisted" + KEPT_MARK
    assert account.descriptions[rotated] == "rotated" + KEPT_MARK
    assert account.descriptions[brief] == "brief" + KEYAGENT_MARK
    elsewhere = keyring_agent(time, account, fail.Keyring())  # type: ignore[no-untyped-call]
    result = run(elsewhere, "prune", **ACCOUNT)
    assert orphan_ids(result) == [key_id_for(key) for key in (*ORPHANS, brief)]
