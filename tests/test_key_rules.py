"""The rules a key can carry: not exportable, confirm each use, allowed programs (the agent,
driven inline with fakes)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import GeneratorType
from typing import Any

import pytest

from keyagent import errors
from keyagent.agent import Agent, Peer
from keyagent.effects import Work
from keyagent.grant import Grant
from keyagent.persist import KeyringStore, PersistedKey
from keyagent.sockets import sees_peer_executables
from keyagent.store import digest_of, key_id_for
from keyagent.testing.memory_keyring import MemoryKeyring

from .fakes import (
    PEER,
    FakeAccount,
    FakeTime,
    HeldWorkDriver,
    driver_for,
    fails,
    request,
    run,
    settle,
)

SECRET = "rules-S3CR3T-0001"
HOST, USER = "app.conduce.example", "ada@example.com"
CURL = "/usr/bin/curl"
TOOL = "/opt/tools/report"
ASKPASS = "/usr/libexec/ask"


class FakeAskpass:
    """Stands in for the askpass program: records each question, answers as told."""

    def __init__(self, answer: errors.KeyagentError | None = None) -> None:
        self.answer = answer
        self.asked: list[tuple[str, str, float]] = []

    def __call__(self, program: str, question: str, timeout: float) -> None:
        self.asked.append((program, question, timeout))
        if self.answer is not None:
            raise self.answer


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def askpass() -> FakeAskpass:
    return FakeAskpass()


@pytest.fixture
def agent(fake_time: FakeTime, askpass: FakeAskpass) -> Agent:
    return Agent(
        clock=fake_time.clock(),
        askpass=ASKPASS,
        confirm_timeout=7.0,
        confirmer=askpass,
        accounts=lambda host, user: FakeAccount(),
    )


def peer(exe: str | None, pid: int = 4242) -> Peer:
    return Peer(pid=pid, uid=0, gid=0, exe=exe)


def get_as(agent: Agent, who: Peer, **args: Any) -> dict[str, Any]:
    outcome = settle(agent, agent.handle(request("get", **args), who))
    assert isinstance(outcome, dict)
    return outcome


def get_fails_as(agent: Agent, who: Peer, **args: Any) -> errors.KeyagentError:
    with pytest.raises(errors.KeyagentError) as caught:
        settle(agent, agent.handle(request("get", **args), who))
    return caught.value


def add(agent: Agent, secret: str = SECRET, **args: Any) -> dict[str, Any]:
    return run(agent, "add", host=HOST, user=USER, key=secret, **args)


# --- not exportable ------------------------------------------------------------------------------


def test_a_key_added_with_export_false_is_refused_by_get_as_forbidden(agent: Agent) -> None:
    """get of a non-exportable key is forbidden, and the message points to the HTTP socket."""
    add(agent, export=False)
    error = fails(agent, "get")
    assert type(error) is errors.Forbidden
    assert error.code == "forbidden"
    assert "KEYAGENT_HTTP_SOCK" in error.message
    assert key_id_for(SECRET) in error.message
    assert SECRET not in error.message


def test_a_non_exportable_key_is_still_listed_with_its_flag(agent: Agent) -> None:
    """list shows a non-exportable key, marked exportable: false, with the other rules."""
    add(agent, export=False, confirm=True, allow_exe=[CURL])
    (listed,) = run(agent, "list")["keys"]
    assert (listed["exportable"], listed["confirm"], listed["allowed_exes"]) == (
        False,
        True,
        [CURL],
    )
    assert SECRET not in json.dumps(listed)


def test_the_agent_default_can_make_new_keys_non_exportable(fake_time: FakeTime) -> None:
    """With default_export False (config export = false) a key is non-exportable unless its
    add says export: true."""
    agent = Agent(clock=fake_time.clock(), default_export=False)
    assert add(agent)["exportable"] is False
    assert type(fails(agent, "get")) is errors.Forbidden
    assert add(agent, "another-S3CR3T", export=True)["exportable"] is True
    assert run(agent, "get", key_id=key_id_for("another-S3CR3T"))["key"] == "another-S3CR3T"


def test_check_use_without_export_allows_a_non_exportable_key(agent: Agent) -> None:
    """A use that keeps the secret inside the agent (a proxied call) passes check_use."""
    add(agent, export=False)
    held = agent.held_keys.newest(agent.clock.monotonic())
    assert driver_for(agent).run(agent.check_use(held, PEER, op="proxy", export=False)) is None
    with pytest.raises(errors.Forbidden):
        driver_for(agent).run(agent.check_use(held, PEER, op="get", export=True))


def test_create_refuses_to_print_a_key_that_cannot_be_taken_out(agent: Agent) -> None:
    """create with reveal and export false is refused before the service is asked."""
    error = fails(agent, "create", host=HOST, user=USER, reveal=True, export=False)
    assert type(error) is errors.BadRequest
    assert "--print" in error.message
    assert len(agent.held_keys) == 0


def test_create_holds_the_key_with_its_rules(agent: Agent) -> None:
    """create takes export, confirm and allow_exe like add."""
    run(agent, "login", host=HOST, user=USER, password="pw")
    created = run(agent, "create", host=HOST, user=USER, export=False, allow_exe=[TOOL])
    assert (created["exportable"], created["confirm"], created["allowed_exes"]) == (
        False,
        False,
        [TOOL],
    )


# --- what a credential with rules may make ----------------------------------------------------


@pytest.fixture
def service() -> FakeAccount:
    return FakeAccount()


@pytest.fixture
def maker(fake_time: FakeTime, askpass: FakeAskpass, service: FakeAccount) -> Agent:
    """An agent whose one account is ``service``, where held keys are valid."""
    return Agent(
        clock=fake_time.clock(), askpass=ASKPASS, confirmer=askpass,
        accounts=lambda host, user: service,
    )  # fmt: skip


def create(agent: Agent, **args: Any) -> dict[str, Any]:
    return run(agent, "create", host=HOST, user=USER, **args)


def create_fails(agent: Agent, **args: Any) -> errors.KeyagentError:
    return fails(agent, "create", host=HOST, user=USER, **args)


@pytest.mark.parametrize(
    ("rules", "escaping", "at_least_as_strict", "why"),
    [
        ({"export": False}, [{}, {"reveal": True}], [{"export": False}], "--no-export"),
        (
            {"confirm": True},
            [{}, {"reveal": True}, {"reveal": True, "confirm": True}],  # printed: no rules
            [{"confirm": True}, {"confirm": True, "export": False}],
            "--confirm",
        ),
        (
            {"allow_exe": [CURL, TOOL]},
            [{}, {"allow_exe": [CURL, "/usr/bin/wget"]}, {"reveal": True, "allow_exe": [CURL]}],
            [{"allow_exe": [CURL]}, {"allow_exe": [TOOL, CURL]}],
            "may be used only by",
        ),
    ],
)
def test_a_key_with_rules_makes_only_keys_at_least_as_strict(
    maker: Agent,
    service: FakeAccount,
    askpass: FakeAskpass,
    *,
    rules: dict[str, Any],
    escaping: list[dict[str, Any]],
    at_least_as_strict: list[dict[str, Any]],
    why: str,
) -> None:
    """The account's only credential is a key with rules: a create whose key would escape
    them (looser, or printed) is forbidden before the service is asked, naming the key and
    the rule; one at least as strict is made with the key, without a question."""
    service.keys = [SECRET]
    add(maker, **rules)
    for args in escaping:
        error = create_fails(maker, **args)
        assert type(error) is errors.Forbidden, args
        assert key_id_for(SECRET) in error.message
        # What to change: --print when it is the cause, else the rule the key lacks.
        assert ("leave out --print" if args.get("reveal") else why) in error.message
        assert ("--print" in error.message) == bool(args.get("reveal"))
        assert SECRET not in error.message
    assert [name for name, _ in service.calls] == []
    for args in at_least_as_strict:
        create(maker, **args)
    # Each made with a held key (the newest: after the first, the key just made).
    assert [name for name, _ in service.calls] == ["create"] * len(at_least_as_strict)
    assert service.calls[0] == ("create", SECRET)
    assert all(api_key is not None for _, api_key in service.calls)
    assert askpass.asked == []


def test_a_session_with_rules_makes_only_keys_at_least_as_strict(
    maker: Agent, service: FakeAccount
) -> None:
    """login --allow-exe: a plain create passes the session over for a held key without
    rules; with no such key it is forbidden, naming the session; a key with the session's
    rules is made with the session."""
    log_in(maker, allow_exe=[CURL])
    for escaping in ({"reveal": True}, {"allow_exe": [CURL]}):  # printable, or exportable
        error = create_fails(maker, **escaping)
        assert type(error) is errors.Forbidden
        assert "the session of" in error.message
    create(maker, allow_exe=[CURL], export=False)
    assert service.calls[-1] == ("create", None)  # the session
    service.keys.append(SECRET)
    add(maker)
    create(maker, reveal=True)
    assert service.calls[-1:] == [("create", SECRET)]  # the plain key, not the session


def test_rotating_a_key_with_rules_may_use_the_key_itself(
    maker: Agent, service: FakeAccount
) -> None:
    """A rotation makes a key with the old key's rules: the old key may make it."""
    service.keys = [SECRET]
    add(maker, export=False, confirm=True)
    rotated = run(maker, "rotate", key_id=key_id_for(SECRET))
    assert service.calls[0] == ("create", SECRET)
    assert (rotated["exportable"], rotated["confirm"]) == (False, True)


# --- nothing loosens a key ---------------------------------------------------------------------


def test_re_adding_the_secret_keeps_the_stricter_rules(agent: Agent) -> None:
    """Re-adding a key with looser rules keeps it non-exportable and confirmed."""
    add(agent, export=False, confirm=True)
    again = add(agent, export=True, confirm=False)
    assert (again["exportable"], again["confirm"]) == (False, True)
    assert type(fails(agent, "get")) is errors.Forbidden


def test_re_adding_narrows_the_allowed_programs_to_those_both_name(agent: Agent) -> None:
    """Allowed programs merge as an intersection; an empty side keeps the other's list."""
    add(agent, allow_exe=[CURL, TOOL])
    assert add(agent)["allowed_exes"] == [CURL, TOOL]  # no list: any program is not looser
    assert add(agent, allow_exe=[TOOL, "/bin/other"])["allowed_exes"] == [TOOL]


def test_re_adding_with_disjoint_programs_is_refused_and_changes_nothing(agent: Agent) -> None:
    """Programs with none in common would leave no program (empty means any): refused."""
    add(agent, allow_exe=[CURL], description="first")
    error = fails(agent, "add", host=HOST, user=USER, key=SECRET, allow_exe=[TOOL], description="x")
    assert type(error) is errors.BadRequest
    assert "forget" in error.message
    (listed,) = run(agent, "list")["keys"]
    assert (listed["allowed_exes"], listed["description"]) == ([CURL], "first")


# --- allowed programs --------------------------------------------------------------------------


def test_only_an_allowed_program_gets_the_key(agent: Agent) -> None:
    """A peer whose executable is allowed gets the key; another is denied, naming both."""
    add(agent, allow_exe=[CURL])
    assert get_as(agent, peer(CURL))["key"] == SECRET
    error = get_fails_as(agent, peer("/usr/bin/python3.12", pid=77))
    assert type(error) is errors.Denied
    assert error.code == "denied"
    assert CURL in error.message
    assert "/usr/bin/python3.12" in error.message
    assert "77" in error.message
    # The way out it names works: a re-add never loosens a key, so it says forget first.
    assert "forget the key and add it again" in error.message


@pytest.mark.parametrize("exe", [None, f"{CURL} (deleted)", CURL + "/", "/usr/bin/curl2"])
def test_an_unknown_or_replaced_executable_is_denied(agent: Agent, exe: str | None) -> None:
    """An unreadable executable, a replaced one (' (deleted)') or a near miss is denied."""
    add(agent, allow_exe=[CURL])
    assert type(get_fails_as(agent, peer(exe))) is errors.Denied


def test_a_get_of_a_restricted_key_is_answered_by_a_generator(agent: Agent) -> None:
    """A get whose answer depends on the peer is a generator (which the server never
    remembers); a plain key's get stays a plain dict."""
    add(agent, "plain-S3CR3T")
    plain = agent.handle(request("get", key_id=key_id_for("plain-S3CR3T")), peer(CURL))
    assert isinstance(plain, dict)
    add(agent, allow_exe=[CURL])
    restricted = agent.handle(request("get", key_id=key_id_for(SECRET)), peer(CURL))
    assert isinstance(restricted, GeneratorType)
    restricted.close()


# A get or proxied request naming no key gets the newest one the peer may use.


def test_a_newer_key_for_other_programs_does_not_hide_an_older_one(agent: Agent) -> None:
    """get without a key id: the allowed program gets the newer guarded key, another
    program the older plain one (a generator: the answer depends on who asks). Named by
    its id, the guarded key still refuses the other program."""
    add(agent, "plain-S3CR3T")
    add(agent, allow_exe=[CURL])
    assert get_as(agent, peer(CURL))["key"] == SECRET
    assert get_as(agent, peer(TOOL))["key"] == "plain-S3CR3T"
    assert isinstance(agent.handle(request("get"), peer(TOOL)), GeneratorType)
    assert type(get_fails_as(agent, peer(TOOL), key_id=key_id_for(SECRET))) is errors.Denied


def test_a_program_the_key_is_not_for_is_denied_before_it_is_told_how_to_use_it(
    agent: Agent,
) -> None:
    """A non-exportable key kept for curl: curl's get is forbidden (use the HTTP socket),
    another program's is denied, since the HTTP socket would refuse it too."""
    add(agent, export=False, allow_exe=[CURL])
    forbidden = get_fails_as(agent, peer(CURL))
    assert type(forbidden) is errors.Forbidden
    assert "KEYAGENT_HTTP_SOCK" in forbidden.message
    denied = get_fails_as(agent, peer(TOOL), key_id=key_id_for(SECRET))
    assert type(denied) is errors.Denied
    assert "KEYAGENT_HTTP_SOCK" not in denied.message


def test_a_newer_non_exportable_key_does_not_hide_an_older_exportable_one(
    agent: Agent,
) -> None:
    """get and exec take out the newest exportable key; the non-exportable one is still
    refused by its id, and alone it refuses as before."""
    add(agent, "plain-S3CR3T")
    add(agent, export=False)
    assert get_as(agent, peer(TOOL))["key"] == "plain-S3CR3T"
    assert get_as(agent, peer(TOOL), purpose="exec")["key"] == "plain-S3CR3T"
    assert type(get_fails_as(agent, peer(TOOL), key_id=key_id_for(SECRET))) is errors.Forbidden
    run(agent, "forget", key_id=key_id_for("plain-S3CR3T"))
    assert type(get_fails_as(agent, peer(TOOL))) is errors.Forbidden


def test_with_no_key_it_may_use_a_peer_is_refused_by_the_newest_keys_rule(
    agent: Agent,
) -> None:
    """Two keys, each for another program: the refusal names the newest one."""
    add(agent, "older-S3CR3T", allow_exe=[TOOL])
    add(agent, allow_exe=[CURL])
    error = get_fails_as(agent, peer("/usr/bin/wget"))
    assert type(error) is errors.Denied
    assert key_id_for(SECRET) in error.message
    assert error.subject == (key_id_for(SECRET), HOST, USER)


def test_keys_are_passed_over_only_within_the_newest_keys_account(agent: Agent) -> None:
    """A get without a host is refused by the newest key's rule rather than given another
    account's key, which the tool would use for the wrong account."""
    run(agent, "add", host=HOST, user="bob@example.com", key="bobs-S3CR3T")
    add(agent, allow_exe=[CURL])
    assert type(get_fails_as(agent, peer(TOOL))) is errors.Denied
    assert get_as(agent, peer(TOOL), user="bob@example.com")["key"] == "bobs-S3CR3T"


def test_a_usable_key_the_service_refused_comes_before_one_the_peer_may_not_use(
    agent: Agent,
) -> None:
    """Keys the service refused are passed over for others the peer may use; with none, the
    newest usable key is still given, rather than a refusal by another key's rule."""
    add(agent, "oldest-S3CR3T")
    add(agent, "older-S3CR3T")
    add(agent, allow_exe=[CURL])
    refused = agent.held_keys.newest(agent.clock.monotonic(), key_id=key_id_for("older-S3CR3T"))
    agent.held_keys.mark_refused(refused, True)
    assert get_as(agent, peer(TOOL))["key"] == "oldest-S3CR3T"
    run(agent, "forget", key_id=key_id_for("oldest-S3CR3T"))
    assert get_as(agent, peer(TOOL))["key"] == "older-S3CR3T"


def test_default_allowed_programs_apply_to_new_keys(fake_time: FakeTime) -> None:
    """The agent's allow_exe default binds a key added without its own list."""
    agent = Agent(clock=fake_time.clock(), default_allowed_exes=(TOOL,))
    assert add(agent)["allowed_exes"] == [TOOL]
    assert type(get_fails_as(agent, peer(CURL))) is errors.Denied
    assert get_as(agent, peer(TOOL))["key"] == SECRET


# --- confirmation ------------------------------------------------------------------------------


def test_a_confirmed_key_asks_the_askpass_program_on_its_own_queue(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """get of a confirm key yields one Work on the confirm queue with the confirm timeout,
    and answers with the key when the program allows."""
    add(agent, confirm=True, description="laptop")
    outcome = agent.handle(request("get"), peer(CURL, pid=99))
    assert isinstance(outcome, GeneratorType)
    work = next(outcome)
    assert isinstance(work, Work)
    assert (work.queue, work.timeout) == ("confirm", 7.0)
    assert askpass.asked == []  # nothing runs on the loop
    with pytest.raises(StopIteration) as ended:
        outcome.send(work.fn())
    assert ended.value.value == {"key": SECRET, "key_id": key_id_for(SECRET)}
    ((program, question, timeout),) = askpass.asked
    assert (program, timeout) == (ASKPASS, 7.0)
    for part in (CURL, "99", key_id_for(SECRET), HOST, USER, "laptop", "get"):
        assert part in question
    assert SECRET not in question


def test_the_question_carries_no_control_characters(agent: Agent, askpass: FakeAskpass) -> None:
    """Control and format characters of the peer's executable never reach the question."""
    add(agent, confirm=True, description="desc")
    get_as(agent, peer("/tmp/x\x1b[31m\u202e\nprog"))
    ((_, question, _),) = askpass.asked
    assert question.isprintable()
    assert "\n" not in question
    assert question.startswith("Allow /tmp/x[31m prog (pid 4242) ")  # shown, made harmless


def test_a_refusal_at_the_prompt_is_denied(agent: Agent, askpass: FakeAskpass) -> None:
    """The askpass program's refusal reaches the client as denied."""
    add(agent, confirm=True)
    askpass.answer = errors.Denied("refused at the prompt")
    error = get_fails_as(agent, peer(CURL))
    # It says which key (and which use) the answer was about.
    assert (type(error), error.message) == (
        errors.Denied, f"get of key {key_id_for(SECRET)}: refused at the prompt"
    )  # fmt: skip
    error = get_fails_as(agent, peer(CURL), purpose="exec")
    assert error.message.startswith(f"exec of key {key_id_for(SECRET)}: ")
    assert askpass.asked[-1][1].endswith(" for exec?")


def test_a_refusal_by_a_keys_rules_is_audited_with_the_key(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """get and exec refused by a key's rules (not exportable, another program, no at the
    prompt) each leave an entry naming the key and its account, asked for by an id prefix
    alone."""
    other = "rules-S3CR3T-0002"
    add(agent, export=False)
    add(agent, other, allow_exe=[CURL], confirm=True)
    askpass.answer = errors.Denied("refused at the prompt")
    attempts = [
        (SECRET, {}, None, "forbidden"),
        (SECRET, {"purpose": "exec"}, None, "forbidden"),
        (other, {}, TOOL, "denied"),
        (other, {}, CURL, "denied"),
    ]
    for secret, args, exe, code in attempts:
        key_id = key_id_for(secret)
        assert get_fails_as(agent, peer(exe), key_id=key_id[:6], **args).code == code
        entry = agent.audit_log.newest
        assert entry is not None
        assert (entry.outcome, entry.key_id, entry.host, entry.user) == (code, key_id, HOST, USER)


def test_without_an_askpass_program_a_confirmed_key_is_denied(fake_time: FakeTime) -> None:
    """No askpass program configured: adding a --confirm key (or logging in with
    --confirm) is refused, since every use would be denied; one restored from the keyring
    (persisted by an agent that had one) is denied at each use. Both say how to set one."""
    backend = MemoryKeyring()
    keeper = Agent(clock=fake_time.clock(), askpass=ASKPASS, keyring=KeyringStore(backend))
    add(keeper, persist=True, confirm=True)
    agent = Agent(clock=fake_time.clock(), accounts=lambda host, user: FakeAccount())
    for op, args in (("add", {"key": "other-S3CR3T"}), ("login", {"password": "pw"})):
        refused = fails(agent, op, host=HOST, user=USER, confirm=True, **args)
        assert type(refused) is errors.BadRequest
        assert "KEYAGENT_ASKPASS" in refused.message
    assert len(agent.held_keys) == 0
    assert agent.sessions == {}
    # Printed or not, a create is refused before the service is asked to make a key.
    service = FakeAccount()
    maker = Agent(clock=fake_time.clock(), accounts=lambda host, user: service)
    run(maker, "login", host=HOST, user=USER, password="pw")
    for printed in (False, True):
        refused = fails(maker, "create", host=HOST, user=USER, confirm=True, reveal=printed)
        assert type(refused) is errors.BadRequest
    assert [name for name, _ in service.calls] == ["login"]
    keys, _ = KeyringStore(backend).load_all(fake_time.wall)
    assert agent.restore(keys) == 1
    error = get_fails_as(agent, peer(CURL))
    assert type(error) is errors.Denied
    assert "KEYAGENT_ASKPASS" in error.message


def test_no_answer_within_the_timeout_is_denied(fake_time: FakeTime) -> None:
    """When the confirmation outlasts confirm_timeout, the get is denied saying so."""
    agent = Agent(clock=fake_time.clock(), askpass=ASKPASS, confirm_timeout=7.0)
    add(agent, confirm=True)
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    outcomes: list[tuple[object, errors.KeyagentError | None]] = []
    driver.start(
        agent.handle(request("get"), peer(CURL)),  # type: ignore[arg-type]
        lambda result, error: outcomes.append((result, error)),
    )
    assert len(driver.held) == 1
    driver.pass_time(7.5)
    ((result, error),) = outcomes
    assert result is None
    assert error is not None
    assert error.to_wire()["code"] == "denied"
    assert "7 s" in error.message


def test_a_question_whose_turn_comes_too_late_is_never_asked(fake_time: FakeTime) -> None:
    """Questions take turns. One that waited in line past its deadline was refused already:
    it is not shown when its turn comes (a "yes" would do nothing, and a flood of them
    would keep the dialog busy for half an hour); the others ask for the time they have
    left."""
    askpass = FakeAskpass()
    agent = Agent(clock=fake_time.clock(), askpass=ASKPASS, confirm_timeout=7.0, confirmer=askpass)
    add(agent, confirm=True)
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    outcomes: list[errors.KeyagentError | None] = []
    for _ in range(2):
        driver.start(
            agent.handle(request("get"), peer(CURL)),  # type: ignore[arg-type]
            lambda result, error: outcomes.append(error),
        )
        driver.pass_time(1.0)
    (first,) = driver.held  # the second waits for the first to end
    driver.pass_time(3.0)  # t=5: the first is answered with 2 s of its 7 left
    driver.end(first)
    assert [timeout for _, _, timeout in askpass.asked] == [pytest.approx(2.0)]
    (second,) = driver.held
    driver.pass_time(4.0)  # t=9: past the second's deadline (t=8)
    assert [type(error) for error in outcomes] == [type(None), errors.Denied]
    driver.end(second)  # its turn, too late
    assert len(askpass.asked) == 1


def test_a_key_forgotten_while_its_use_waits_is_not_served(fake_time: FakeTime) -> None:
    """A key forgotten while the prompt shows is not handed out when the answer comes."""
    agent = Agent(clock=fake_time.clock(), askpass=ASKPASS, confirmer=FakeAskpass())
    add(agent, confirm=True)
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    outcomes: list[tuple[object, errors.KeyagentError | None]] = []
    driver.start(
        agent.handle(request("get"), peer(CURL)),  # type: ignore[arg-type]
        lambda result, error: outcomes.append((result, error)),
    )
    run(agent, "forget", all=True)
    driver.end(driver.held[0])
    ((result, error),) = outcomes
    assert result is None
    assert type(error) is errors.NotFound


def test_a_use_already_confirmed_is_not_asked_again(agent: Agent, askpass: FakeAskpass) -> None:
    """check_use with confirmed=True (a proxied connection allowed once) asks nothing."""
    add(agent, confirm=True)
    held = agent.held_keys.newest(agent.clock.monotonic())
    check = agent.check_use(held, peer(CURL), op="proxy", export=False, confirmed=True)
    assert driver_for(agent).run(check) is None
    assert askpass.asked == []


def test_allowed_programs_are_checked_before_anyone_is_asked(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """A program that may not use the key is denied without a prompt."""
    add(agent, confirm=True, allow_exe=[CURL])
    assert type(get_fails_as(agent, peer(TOOL))) is errors.Denied
    assert askpass.asked == []


# --- the rules of a session (login --confirm, --allow-exe) ------------------------------------


def log_in(agent: Agent, **args: Any) -> dict[str, Any]:
    return run(agent, "login", host=HOST, user=USER, password="pw", **args)


def proxy_as(agent: Agent, who: Peer, confirmed: frozenset[str] = frozenset()) -> Grant:
    """What the agent lends ``who`` for a proxied request to the account (waited for inline)."""
    grant = driver_for(agent).run(agent.authorize_proxy(who, HOST, None, None, confirmed))
    assert isinstance(grant, Grant)
    return grant


def proxy_fails_as(agent: Agent, who: Peer) -> errors.KeyagentError:
    with pytest.raises(errors.KeyagentError) as caught:
        proxy_as(agent, who)
    return caught.value


def test_a_session_with_allowed_programs_is_lent_only_to_them(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """login --allow-exe: the session goes to that program's proxied requests; another
    program is denied, without a prompt, by a refusal that names the account (no key)."""
    log_in(agent, allow_exe=[CURL])
    grant = proxy_as(agent, peer(CURL))
    assert (grant.session, grant.header) == (True, "Cookie")
    error = proxy_fails_as(agent, peer(TOOL))
    assert type(error) is errors.Denied
    assert "the session of" in error.message
    assert "log in again with --allow-exe" in error.message
    assert error.subject == (None, HOST, USER)
    assert askpass.asked == []


def test_a_session_for_other_programs_gives_way_to_a_key_this_one_may_use(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """login --allow-exe: the allowed program gets the session; another gets the
    account's newest key it may use, passing over a newer key for other programs too."""
    add(agent, "plain-S3CR3T")
    add(agent, allow_exe=[CURL])
    log_in(agent, allow_exe=[CURL])
    assert proxy_as(agent, peer(CURL)).session is True
    grant = proxy_as(agent, peer(TOOL))
    assert (grant.session, grant.value) == (False, "Bearer plain-S3CR3T")
    assert askpass.asked == []


def test_a_confirmed_key_is_not_passed_over_a_question_is_part_of_its_use(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """--confirm does not make a key unusable: the newest key is asked about, and a
    refusal denies the request rather than lend an older key unasked."""
    add(agent, "plain-S3CR3T")
    add(agent, confirm=True)
    assert proxy_as(agent, peer(TOOL)).value == f"Bearer {SECRET}"
    assert len(askpass.asked) == 1
    askpass.answer = errors.Denied("refused at the prompt")
    assert type(proxy_fails_as(agent, peer(TOOL))) is errors.Denied


def test_a_confirmed_session_asks_and_is_remembered_by_its_login(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """login --confirm: a proxied use asks first (a question naming the session, never the
    cookie); the grant carries the login's mark, which spares the connection a second
    question; a new login has a mark of its own, and asks again."""
    log_in(agent, confirm=True)
    grant = proxy_as(agent, peer(CURL, pid=77))
    ((program, question, _),) = askpass.asked
    assert program == ASKPASS
    for part in (CURL, "77", f"the session of {USER} on {HOST}", "proxy"):
        assert part in question
    assert "fake-session-cookie" not in question
    assert grant.confirmed
    assert grant.mark is not None
    proxy_as(agent, peer(CURL), confirmed=frozenset({grant.mark}))
    assert len(askpass.asked) == 1
    log_in(agent, confirm=True)
    again = proxy_as(agent, peer(CURL), confirmed=frozenset({grant.mark}))
    assert len(askpass.asked) == 2
    assert again.mark != grant.mark


def yes_to(*grants: Grant) -> frozenset[str]:
    """What a connection remembers after the user allowed ``grants``."""
    marks = frozenset(grant.mark for grant in grants if grant.mark is not None)
    assert len(marks) == len(grants)
    return marks


def test_a_yes_holds_for_one_holding_of_a_key_and_until_the_next_lock(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """A connection's "yes" to a --confirm key is not taken for the same key forgotten and
    added again (the user dropped it on purpose), nor, for a key or a login, for any use
    after the agent was locked: each asks again."""
    add(agent, confirm=True)
    first = proxy_as(agent, peer(CURL))
    proxy_as(agent, peer(CURL), confirmed=yes_to(first))  # remembered
    assert len(askpass.asked) == 1
    run(agent, "forget", all=True)
    add(agent, confirm=True)
    again = proxy_as(agent, peer(CURL), confirmed=yes_to(first))
    assert len(askpass.asked) == 2
    assert again.mark != first.mark
    run(agent, "lock", passphrase="pass phrase")
    run(agent, "unlock", passphrase="pass phrase")
    proxy_as(agent, peer(CURL), confirmed=yes_to(first, again))
    assert len(askpass.asked) == 3
    run(agent, "forget", all=True)
    log_in(agent, confirm=True)
    session = proxy_as(agent, peer(CURL))
    assert len(askpass.asked) == 4
    run(agent, "lock", passphrase="pass phrase")
    run(agent, "unlock", passphrase="pass phrase")
    proxy_as(agent, peer(CURL), confirmed=yes_to(session))
    assert len(askpass.asked) == 5


def test_a_key_expired_and_added_again_is_asked_about_again(
    agent: Agent, askpass: FakeAskpass, fake_time: FakeTime
) -> None:
    """A --confirm key that expired and is added again before the agent reaped it is a new
    holding: a connection's "yes" to the old one does not cover it."""
    add(agent, confirm=True, lifetime=10.0)
    first = proxy_as(agent, peer(CURL))
    fake_time.advance(11)
    add(agent, confirm=True)
    again = proxy_as(agent, peer(CURL), confirmed=yes_to(first))
    assert len(askpass.asked) == 2
    assert again.mark != first.mark


Outcomes = list[tuple[object, errors.KeyagentError | None]]


def asking(agent: Agent, fake_time: FakeTime) -> tuple[HeldWorkDriver, Outcomes]:
    """A proxied request of curl's for the account, held where the user is being asked:
    the driver (end its held work to answer) and the list its outcome will go to."""
    driver = HeldWorkDriver(fake_time)
    outcomes: Outcomes = []
    driver.start(
        agent.authorize_proxy(peer(CURL), HOST, None, None),
        lambda result, error: outcomes.append((result, error)),
    )
    return driver, outcomes


def test_a_key_added_again_while_its_use_waits_is_decided_again(
    agent: Agent, askpass: FakeAskpass, fake_time: FakeTime
) -> None:
    """A key forgotten and added again (with other rules) while the user is asked about it
    is lent only as its new rules allow: not to a program they leave out."""
    add(agent, confirm=True)
    driver, outcomes = asking(agent, fake_time)
    run(agent, "forget", all=True)
    add(agent, allow_exe=[TOOL])
    driver.end(driver.held[0])  # the user says yes to the key as it was
    ((result, error),) = outcomes
    assert (result, type(error)) == (None, errors.Denied)


@pytest.mark.parametrize("change", ["another account", "lock and unlock"])
def test_a_key_whose_holding_changed_while_asked_about_is_not_lent_on_that_answer(
    agent: Agent, askpass: FakeAskpass, fake_time: FakeTime, change: str
) -> None:
    """While the user is asked about a key: forgotten and added for another account, it is
    not lent to this request (meant for the first account); the agent locked and unlocked,
    the question is put again."""
    add(agent, confirm=True)
    driver, outcomes = asking(agent, fake_time)
    if change == "another account":
        run(agent, "forget", all=True)
        run(agent, "add", host=HOST, user="else@example.com", key=SECRET, confirm=True)
    else:
        run(agent, "lock", passphrase="pass phrase")
        run(agent, "unlock", passphrase="pass phrase")
    driver.end(driver.held[0])  # the user says yes to the key as it was
    if change == "another account":
        ((result, error),) = outcomes
        assert (result, type(error)) == (None, errors.NotFound)
    else:
        assert outcomes == []  # asked again: the second question is the one that counts
        driver.end(driver.held[0])
        ((result, error),) = outcomes
        assert isinstance(result, Grant)
        assert error is None
    assert len(askpass.asked) == (1 if change == "another account" else 2)


def test_a_refusal_at_the_prompt_denies_the_session(agent: Agent, askpass: FakeAskpass) -> None:
    log_in(agent, confirm=True)
    askpass.answer = errors.Denied("refused at the prompt")
    error = proxy_fails_as(agent, peer(CURL))
    assert (type(error), error.subject) == (errors.Denied, (None, HOST, USER))
    assert error.message.startswith(f"proxy of the session of {USER} on {HOST}: ")


def test_a_login_sets_its_own_rules_and_a_logout_drops_them(
    agent: Agent, askpass: FakeAskpass
) -> None:
    """The rules are the login's: logging in again without them lends the session freely,
    and status shows each state."""
    log_in(agent, confirm=True, allow_exe=[CURL])
    (state,) = run(agent, "status")["sessions"]
    assert (state["confirm"], state["allowed_exes"]) == (True, [CURL])
    log_in(agent)
    assert proxy_as(agent, peer(TOOL)).session
    assert askpass.asked == []
    (state,) = run(agent, "status")["sessions"]
    assert (state["confirm"], state["allowed_exes"]) == (False, [])
    log_in(agent, confirm=True)
    run(agent, "logout", host=HOST, user=USER)
    (state,) = run(agent, "status")["sessions"]
    assert (state["logged_in"], state["confirm"]) == (False, False)


def test_the_default_allowed_programs_apply_to_a_login(fake_time: FakeTime) -> None:
    """The agent's allow_exe default guards a session as it does a new key, unless the
    login names programs of its own."""
    agent = Agent(
        clock=fake_time.clock(), default_allowed_exes=(CURL,),
        accounts=lambda host, user: FakeAccount(),
    )  # fmt: skip
    log_in(agent)
    assert type(proxy_fails_as(agent, peer(TOOL))) is errors.Denied
    assert proxy_as(agent, peer(CURL)).session
    log_in(agent, allow_exe=[TOOL])
    assert proxy_as(agent, peer(TOOL)).session


def test_a_session_changed_while_its_use_waits_is_decided_again(fake_time: FakeTime) -> None:
    """A logout, another login or the session's expiry while the prompt shows: what is lent
    is decided again when the answer comes, by the new login's rules or a held key, never
    under the rules the user was asked about."""
    account = FakeAccount()
    askpass = FakeAskpass()
    agent = Agent(
        clock=fake_time.clock(), askpass=ASKPASS, confirmer=askpass,
        accounts=lambda host, user: account,
    )  # fmt: skip

    def expire_with_a_key() -> None:
        add(agent)
        agent.sessions[(HOST, USER)].mark_expired()

    changes: dict[str, Callable[[], object]] = {
        "logout": lambda: run(agent, "logout", host=HOST, user=USER),
        "login without rules": lambda: log_in(agent),
        "login for another program": lambda: log_in(agent, allow_exe=[TOOL]),
        "expiry, a key held": expire_with_a_key,
    }

    ended: dict[str, tuple[object, type[errors.KeyagentError] | None]] = {}
    for change, make in changes.items():
        run(agent, "forget", all=True)
        log_in(agent, confirm=True)
        driver = HeldWorkDriver(fake_time)
        outcomes: list[tuple[object, errors.KeyagentError | None]] = []

        def done(
            result: object,
            error: errors.KeyagentError | None,
            seen: list[tuple[object, errors.KeyagentError | None]] = outcomes,
        ) -> None:
            seen.append((result, error))

        driver.start(agent.authorize_proxy(peer(CURL), HOST, None, None), done)
        make()
        current = agent.use_mark(agent.sessions[(HOST, USER)].mark)
        driver.end(driver.held[0])
        ((result, error),) = outcomes
        if isinstance(result, Grant):
            assert result.digest is not None or result.mark == current  # the new login's
            result = "the key" if result.digest is not None else "the session"
        ended[change] = (result, None if error is None else type(error))
    assert ended == {
        "logout": (None, errors.LoginRequired),
        "login without rules": ("the session", None),  # the new login, lent as it allows
        "login for another program": (None, errors.Denied),
        "expiry, a key held": ("the key", None),
    }


def test_a_session_is_not_lent_while_a_login_replaces_it(fake_time: FakeTime) -> None:
    """While a login is under way the account's cookie may already be the new login's, whose
    rules are not set yet: a held key is lent instead, and without one the tool is told to
    retry (busy)."""
    account = FakeAccount()
    agent = Agent(clock=fake_time.clock(), accounts=lambda host, user: account)
    log_in(agent)
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    logins: list[tuple[object, errors.KeyagentError | None]] = []
    driver.start(
        agent.handle(request("login", host=HOST, user=USER, password="pw"), PEER),  # type: ignore[arg-type]
        lambda result, error: logins.append((result, error)),
    )
    assert type(proxy_fails_as(agent, peer(CURL))) is errors.Busy
    add(agent)
    assert proxy_as(agent, peer(CURL)).digest == digest_of(SECRET)
    driver.end(driver.held[0])
    assert logins[0][1] is None
    assert proxy_as(agent, peer(CURL)).session


def test_a_failed_login_in_line_before_another_does_not_end_the_wait(
    fake_time: FakeTime,
) -> None:
    """Two logins in line: the first one failing (a wrong password, from any process) does
    not make the session lendable while the second may be replacing its cookie; once the
    second ends, the session is lent by its rules. The agent's own calls, which wait in the
    same line, still plan to use the session."""
    account = FakeAccount()
    agent = Agent(clock=fake_time.clock(), accounts=lambda host, user: account)
    log_in(agent)
    driver = HeldWorkDriver(fake_time)
    agent.driven_by(driver.start_background)
    outcomes: list[tuple[str, object, errors.KeyagentError | None]] = []
    for name, args in (
        ("bogus login", {"password": "wrong"}),
        ("login", {"password": "pw", "allow_exe": [CURL]}),
        ("list", {"remote": True}),
    ):
        op = "list" if name == "list" else "login"

        def done(result: object, error: errors.KeyagentError | None, name: str = name) -> None:
            outcomes.append((name, result, error))

        driver.start(
            agent.handle(request(op, host=HOST, user=USER, **args), PEER),  # type: ignore[arg-type]
            done,
        )
    driver.end(driver.held[0])  # the bogus login fails
    assert type(proxy_fails_as(agent, peer(TOOL))) is errors.Busy  # not the session
    while driver.held:
        driver.end(driver.held[0])
    assert [(name, error) for name, _, error in outcomes][1:] == [("login", None), ("list", None)]
    assert ("list", None) in account.calls  # with the session
    assert type(proxy_fails_as(agent, peer(TOOL))) is errors.Denied  # the new login's rules


def test_an_agent_blind_to_executables_refuses_a_login_with_allowed_programs(
    fake_time: FakeTime,
) -> None:
    """Refused before the password is sent: no session comes of it."""
    account = FakeAccount()
    blind = Agent(
        clock=fake_time.clock(), sees_executables=False, accounts=lambda host, user: account
    )
    error = fails(blind, "login", host=HOST, user=USER, password="pw", allow_exe=[CURL])
    assert type(error) is errors.BadRequest
    assert "PrivateUsers=" in error.message
    assert account.calls == []


def test_a_blind_agent_names_its_allow_exe_setting_when_that_is_what_it_cannot_enforce(
    fake_time: FakeTime,
) -> None:
    """An allow_exe default in a blind agent: an add or a login that names no programs is
    refused by a message that names the setting (not a flag the user never gave)."""
    account = FakeAccount()
    blind = Agent(
        clock=fake_time.clock(), sees_executables=False, default_allowed_exes=(CURL,),
        accounts=lambda host, user: account,
    )  # fmt: skip
    for error in (
        fails(blind, "login", host=HOST, user=USER, password="pw"),
        fails(blind, "add", host=HOST, user=USER, key=SECRET),
    ):
        assert type(error) is errors.BadRequest
        assert "allow_exe setting of its config file" in error.message
    assert account.calls == []
    assert len(blind.held_keys) == 0


# --- persistence -------------------------------------------------------------------------------


def test_rules_survive_a_restart_through_the_keyring(fake_time: FakeTime) -> None:
    """A persisted key comes back after a restart with its rules, still refused by get."""
    backend = MemoryKeyring()
    first = Agent(clock=fake_time.clock(), askpass=ASKPASS, keyring=KeyringStore(backend))
    add(first, persist=True, export=False, confirm=True, allow_exe=[CURL, TOOL])
    second = Agent(clock=fake_time.clock(), askpass=ASKPASS, keyring=KeyringStore(backend))
    keys, _ = KeyringStore(backend).load_all(fake_time.wall)
    assert second.restore(keys) == 1
    (listed,) = run(second, "list")["keys"]
    assert (listed["exportable"], listed["confirm"], listed["allowed_exes"]) == (
        False,
        True,
        [CURL, TOOL],
    )
    assert type(get_fails_as(second, peer(CURL))) is errors.Forbidden
    assert type(get_fails_as(second, peer("/usr/bin/wget"))) is errors.Denied


def test_re_adding_a_persisted_key_saves_the_stricter_rules(fake_time: FakeTime) -> None:
    """A persisted re-add with looser rules writes the merged (stricter) ones."""
    backend = MemoryKeyring()
    store = KeyringStore(backend)
    agent = Agent(clock=fake_time.clock(), askpass=ASKPASS, keyring=store)
    add(agent, export=False)
    add(agent, persist=True, export=True)
    (saved,) = store.load_all(fake_time.wall)[0]
    assert saved.digest == digest_of(SECRET)
    assert saved.exportable is False


def test_a_stricter_re_add_of_a_persisted_key_is_saved_too(fake_time: FakeTime) -> None:
    """Re-adding a persisted key without --persist still rewrites its keyring record with
    the stricter rules: a restart must not bring back the looser ones. What the add does
    not change stays as it was (here a key the agent created: ephemeral, rotating)."""
    backend = MemoryKeyring()
    store = KeyringStore(backend)
    made = PersistedKey(
        digest=digest_of(SECRET), host=HOST, user=USER, secret=SECRET, description="deploy",
        created="2026-11-01T00:00:00.000Z", expires=fake_time.wall + 86400, ephemeral=True,
        rotate_every=3600.0,
    )  # fmt: skip
    store.save(made)
    agent = Agent(clock=fake_time.clock(), askpass=ASKPASS, keyring=store)
    assert agent.restore(store.load_all(fake_time.wall)[0]) == 1
    add(agent, export=False, confirm=True, lifetime=86400.0)
    (saved,) = store.load_all(fake_time.wall)[0]
    assert (saved.exportable, saved.confirm) == (False, True)
    assert saved._replace(exportable=True, confirm=False) == made
    restarted = Agent(clock=fake_time.clock(), keyring=KeyringStore(backend))
    assert restarted.restore(store.load_all(fake_time.wall)[0]) == 1
    assert type(fails(restarted, "get")) is errors.Forbidden


# --- the rule for program paths, the protocol, the keyring records -----------------------------


@pytest.mark.parametrize(
    ("path", "fine"),
    [
        ("/usr/bin/curl", True),
        ("/opt/my tool/run", True),
        ("usr/bin/curl", False),
        ("./curl", False),
        ("/usr/bin/../bin/curl", False),
        ("/usr/./bin/curl", False),
        ("/usr//bin/curl", False),
        ("/usr/bin/", False),
        ("/", False),
        ("", False),
        ("/usr/bin/cu\x00rl", False),
        ("/usr/bin/cu\nrl", False),
        ("/" + "a" * 4095, False),
        # How /proc/PID/exe names a deleted program: never an allowed path, or a deleted
        # (replaced) program would pass for a real file of that name.
        ("/usr/bin/curl (deleted)", False),
        ("/opt/(deleted)/run", True),
    ],
)
def test_program_paths_must_be_absolute_and_normalised(path: str, fine: bool) -> None:
    """An allowed program is an absolute, normalised path without control characters."""
    from keyagent.rules import exe_path_problem

    assert (exe_path_problem(path) is None) is fine


def test_the_protocol_bounds_and_dedupes_allowed_programs() -> None:
    """allow_exe takes at most 32 paths, each checked, and drops repeats in order."""
    from keyagent.protocol import InvalidRequest, parse_request
    from keyagent.rules import MAX_ALLOWED_EXES

    line = json.dumps(
        {"op": "add", "host": HOST, "user": USER, "key": SECRET, "allow_exe": [CURL, TOOL, CURL]}
    ).encode()
    assert parse_request(line).args["allow_exe"] == (CURL, TOOL)
    for bad in (["relative/curl"], [f"/p{n}" for n in range(MAX_ALLOWED_EXES + 1)]):
        message = {"op": "add", "host": HOST, "user": USER, "key": SECRET, "allow_exe": bad}
        with pytest.raises(InvalidRequest) as caught:
            parse_request(json.dumps(message).encode())
        assert type(caught.value.error) is errors.BadRequest
        assert "'allow_exe'" in caught.value.error.message


def test_an_old_keyring_record_loads_with_the_default_rules(fake_time: FakeTime) -> None:
    """A format-1 entry (written before rules) loads exportable, unconfirmed, any program."""
    backend = MemoryKeyring()
    store = KeyringStore(backend)
    plain = Agent(clock=fake_time.clock(), keyring=store)
    add(plain, persist=True)
    entry = backend.get_password("keyagent", f"key:{digest_of(SECRET)}")
    assert entry is not None
    assert json.loads(entry)["v"] == 1
    (loaded,) = store.load_all(fake_time.wall)[0]
    assert (loaded.exportable, loaded.confirm, loaded.allowed_exes) == (True, False, ())


@pytest.mark.parametrize(
    "change",
    [
        {"exportable": "no"},
        {"confirm": 1},
        {"allowed_exes": "/usr/bin/curl"},
        {"allowed_exes": ["relative"]},
        {"v": 1, "exportable": False, "extra": 0},
    ],
    ids=["exportable", "confirm", "not-a-list", "relative", "rules-in-format-1"],
)
def test_a_record_with_unreadable_rules_never_loads_looser(
    fake_time: FakeTime, change: dict[str, object]
) -> None:
    """A record whose rules are malformed is not loaded; rules found in a format-1 record
    still bind the key (never loaded looser than its entry says)."""
    backend = MemoryKeyring()
    store = KeyringStore(backend)
    agent = Agent(clock=fake_time.clock(), askpass=ASKPASS, keyring=store)
    add(agent, persist=True, export=False)
    name = f"key:{digest_of(SECRET)}"
    document = json.loads(backend.get_password("keyagent", name) or "")
    assert document["v"] == 2
    document.update(change)
    backend.set_password("keyagent", name, json.dumps(document))
    loaded = store.load_all(fake_time.wall)[0]
    if change.get("v") == 1:
        assert [key.exportable for key in loaded] == [False]
    else:
        assert loaded == []


def test_a_restricted_record_is_written_in_a_format_older_agents_leave_alone(
    fake_time: FakeTime,
) -> None:
    """Keys with rules are format 2, so a keyagent that predates rules skips them instead
    of loading them without their rules."""
    from keyagent.persist import RULES_FORMAT

    backend = MemoryKeyring()
    agent = Agent(clock=fake_time.clock(), askpass=ASKPASS, keyring=KeyringStore(backend))
    add(agent, persist=True, confirm=True)
    document = json.loads(backend.get_password("keyagent", f"key:{digest_of(SECRET)}") or "")
    assert document["v"] == RULES_FORMAT == 2
    assert (document["exportable"], document["confirm"], document["allowed_exes"]) == (
        True,
        True,
        [],
    )


# --- the agent's defaults: config file and hand-off ----------------------------------------------


def test_config_reads_the_rule_defaults_and_resolves_program_paths(tmp_path: Path) -> None:
    """export, allow_exe (resolved with realpath, relative to the file), askpass and
    confirm_timeout come from the file; KEYAGENT_ASKPASS beats the file's askpass."""
    from keyagent.config import load

    real = tmp_path / "tools" / "real-tool"
    real.parent.mkdir()
    real.write_text("")
    (tmp_path / "tools" / "link").symlink_to(real)
    path = tmp_path / "config.toml"
    path.write_text(
        'export = false\nallow_exe = ["tools/link", "/usr/bin/env"]\n'
        'askpass = "~/ask"\nconfirm_timeout = "1m"\n'
    )
    config = load(str(path), env={"HOME": "/home/ada"})
    assert config.export is False
    assert config.allow_exe == (str(real), os.path.realpath("/usr/bin/env"))
    assert (config.askpass, config.confirm_timeout) == ("/home/ada/ask", 60.0)
    from_env = load(str(path), env={"HOME": "/home/ada", "KEYAGENT_ASKPASS": "/opt/ask"})
    assert from_env.askpass == "/opt/ask"


@pytest.mark.parametrize(
    "text",
    ['allow_exe = "/usr/bin/curl"', "allow_exe = [1]", "confirm_timeout = 0", "export = 1"],
)
def test_config_refuses_bad_rule_defaults(tmp_path: Path, text: str) -> None:
    """A rule default of the wrong shape is a ConfigError naming the setting."""
    from keyagent.config import ConfigError, load

    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path), env={})
    assert text.split(" ", maxsplit=1)[0] in caught.value.message


def test_the_hand_off_carries_the_rule_defaults() -> None:
    """The settings hand-off round-trips export, allow_exe, askpass and confirm_timeout, and
    refuses a relative program path."""
    from keyagent.handoff import HandoffError, Settings

    values: dict[str, Any] = {
        "lifetime": None, "ca_bundle": None, "connect_timeout": 5.0, "read_timeout": 30.0,
        "validate_after": 300.0, "idle_timeout": 300.0, "line_timeout": 10.0,
        "max_connections": 8, "max_keys": 8, "insecure": False, "persist": False,
        "no_keyring": True, "ca_certificates": None, "export": False,
        "allow_exe": (CURL,), "askpass": ASKPASS, "confirm_timeout": 5.0,
    }  # fmt: skip
    settings = Settings(**values)
    again = Settings.from_dict(json.loads(json.dumps(settings.as_dict())))
    assert again == settings
    assert (again.export, again.allow_exe, again.askpass, again.confirm_timeout) == (
        False,
        (CURL,),
        ASKPASS,
        5.0,
    )
    with pytest.raises(HandoffError):
        Settings.from_dict({**settings.as_dict(), "allow_exe": ["relative"]})


def test_an_agent_blind_to_executables_refuses_allowed_programs(fake_time: FakeTime) -> None:
    """In a user namespace of its own the agent cannot know a peer's program: adding a key
    with allowed programs is a bad request naming why, and a restored one serves no one;
    keys without allowed programs work as ever."""
    blind = Agent(clock=fake_time.clock(), sees_executables=False)
    with pytest.raises(errors.BadRequest) as caught:
        add(blind, allow_exe=[CURL])
    assert "PrivateUsers=" in caught.value.message
    assert len(blind.held_keys) == 0
    blind.held_keys.put(
        host=HOST, user=USER, secret=SECRET, now=fake_time.monotonic, wall=0.0, lifetime=None,
        allowed_exes=(CURL,),
    )  # fmt: skip
    assert isinstance(get_fails_as(blind, peer(CURL)), errors.Denied)
    add(blind, "plain-S3CR3T")
    assert get_as(blind, peer(CURL), key_id=key_id_for("plain-S3CR3T"))["key"] == "plain-S3CR3T"


def test_sees_peer_executables_reads_the_user_namespace() -> None:
    """The initial user namespace maps every uid: there, peers' executables are readable."""
    with open("/proc/self/uid_map", encoding="ascii") as uid_map:
        initial = uid_map.read().split() == ["0", "0", "4294967295"]
    assert sees_peer_executables() is initial
