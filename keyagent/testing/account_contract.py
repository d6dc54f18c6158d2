"""A contract test suite for remote accounts: what any stand-in for Conduce must do.

The agent talks to the service through one interface (``RemoteAccount`` in
:mod:`keyagent.sessions`): log in, check the session, list, create and delete API keys.
Unit tests use an in-memory fake of it, end-to-end tests the real
:class:`~keyagent.conduce.ConduceAccount` against the emulator. If the fake drifted from
the real adapter (another error, a session that survives what the service ends), unit tests
would keep passing on behaviour the agent never sees. So both run the same tests: subclass
:class:`RemoteAccountContract` and provide the ``subject`` fixture::

    class TestMyAccount(RemoteAccountContract):
        @pytest.fixture
        def subject(self) -> Iterator[AccountUnderTest]:
            account = MyAccount(password="pw")
            yield AccountUnderTest(
                account, password="pw",
                provision_key=account.service_side_add_key,
                expire_sessions=account.service_side_expire,
            )
            account.close()

A test that an implementation cannot pass is marked in its subclass (``xfail`` with
``strict=True``, and a reason naming the difference), so a fix shows up as a failure too.
:func:`emulated_account` builds the subject for the real adapter against a
:class:`~keyagent.testing.emulator.ConduceEmulator`.

This module needs pytest (the ``test`` extra); importing :mod:`keyagent.testing` does not
load it.
"""

# A test suite: asserts are what it is made of, and its passwords are test data.
# ruff: noqa: S101, S105, S107

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import pytest

from keyagent import errors

if TYPE_CHECKING:
    from keyagent.sessions import ListedKey, RemoteAccount
    from keyagent.testing.emulator import ConduceEmulator

__all__ = ["AccountUnderTest", "RemoteAccountContract", "emulated_account"]

# Not a key any implementation hands out: no service-made key looks like this.
UNKNOWN_KEY: Final = "contract-no-such-key-0123456789"


@dataclass(frozen=True)
class AccountUnderTest:
    """One account of a fresh user, with the service-side switches the contract needs."""

    account: RemoteAccount
    """The account under test, without a session."""
    password: str
    """The user's password on the service."""
    provision_key: Callable[[], str]
    """Give the user a new API key on the service's side (not through ``account``)."""
    expire_sessions: Callable[[], None]
    """End the user's sessions on the service's side, as the service does when they age."""


def _listed(account: RemoteAccount, api_key: str | None = None) -> dict[str, ListedKey]:
    return {listed.key: listed for listed in account.list_keys(api_key)}


class RemoteAccountContract:
    """Tests every remote account must pass; subclasses provide the ``subject`` fixture."""

    WRONG_PASSWORD: Final = "not the password 7f3e"

    @pytest.fixture
    def subject(self) -> Iterator[AccountUnderTest]:
        """Override: yield a fresh :class:`AccountUnderTest`, and close its account after."""
        raise NotImplementedError("subclasses of RemoteAccountContract provide 'subject'")

    # --- sessions ----------------------------------------------------------------------------

    def test_login_with_the_password_starts_a_session(self, subject: AccountUnderTest) -> None:
        """After a login with the right password, validate is True and the session works."""
        account = subject.account
        assert account.validate() is False
        account.login(subject.password)
        assert account.validate() is True
        assert _listed(account) == {}

    def test_login_with_a_wrong_password_raises_bad_credentials(
        self, subject: AccountUnderTest
    ) -> None:
        """A wrong password raises BadCredentials and starts no session."""
        account = subject.account
        with pytest.raises(errors.BadCredentials):
            account.login(self.WRONG_PASSWORD)
        assert account.validate() is False
        with pytest.raises(errors.LoginRequired):
            account.list_keys()

    def test_a_failed_login_keeps_the_session_there_was(self, subject: AccountUnderTest) -> None:
        """A wrong password on a logged-in account raises BadCredentials; the session lives on."""
        account = subject.account
        account.login(subject.password)
        with pytest.raises(errors.BadCredentials):
            account.login(self.WRONG_PASSWORD)
        assert account.validate() is True

    def test_login_with_an_empty_password_is_a_bad_request(self, subject: AccountUnderTest) -> None:
        """An empty password is refused as BadRequest, before it could count as a failed login."""
        with pytest.raises(errors.BadRequest):
            subject.account.login("")
        assert subject.account.validate() is False

    def test_without_session_or_key_every_call_raises_login_required(
        self, subject: AccountUnderTest
    ) -> None:
        """list, create and delete without a session or an API key raise LoginRequired."""
        account = subject.account
        key = subject.provision_key()
        with pytest.raises(errors.LoginRequired):
            account.list_keys()
        with pytest.raises(errors.LoginRequired):
            account.create_key("no session")
        with pytest.raises(errors.LoginRequired):
            account.delete_key(key)
        assert list(_listed(account, key)) == [key]

    def test_logout_forgets_the_session(self, subject: AccountUnderTest) -> None:
        """After logout, validate is False and calls without an API key raise LoginRequired."""
        account = subject.account
        account.login(subject.password)
        account.logout()
        assert account.validate() is False
        with pytest.raises(errors.LoginRequired):
            account.list_keys()

    def test_an_expired_session_raises_session_expired_once(
        self, subject: AccountUnderTest
    ) -> None:
        """A call on a session the service ended raises SessionExpired, then LoginRequired."""
        account = subject.account
        account.login(subject.password)
        subject.expire_sessions()
        with pytest.raises(errors.SessionExpired):
            account.list_keys()
        with pytest.raises(errors.LoginRequired):
            account.create_key("after expiry")
        assert account.validate() is False

    def test_validate_tells_an_expired_session_and_drops_it(
        self, subject: AccountUnderTest
    ) -> None:
        """validate on a session the service ended is False, and the account drops it."""
        account = subject.account
        account.login(subject.password)
        subject.expire_sessions()
        assert account.validate() is False
        with pytest.raises(errors.LoginRequired):
            account.list_keys()

    def test_login_after_expiry_starts_a_working_session(self, subject: AccountUnderTest) -> None:
        """A new login after the service ended the session makes calls work again."""
        account = subject.account
        account.login(subject.password)
        subject.expire_sessions()
        account.login(subject.password)
        assert account.validate() is True
        assert account.create_key("after a new login") in _listed(account)

    def test_an_api_key_works_without_a_session(self, subject: AccountUnderTest) -> None:
        """Calls made with an API key need no session, and do not start one."""
        account = subject.account
        key = subject.provision_key()
        assert list(_listed(account, key)) == [key]
        assert account.validate() is False

    def test_close_ends_the_session(self, subject: AccountUnderTest) -> None:
        """After close, validate is False."""
        account = subject.account
        account.login(subject.password)
        account.close()
        assert account.validate() is False

    # --- keys, with a session ----------------------------------------------------------------

    def test_create_list_delete_with_a_session(self, subject: AccountUnderTest) -> None:
        """A created key is listed and authenticates; once deleted it is neither."""
        account = subject.account
        provisioned = subject.provision_key()
        account.login(subject.password)
        assert list(_listed(account)) == [provisioned]
        created = account.create_key("contract")
        assert created != provisioned
        assert list(_listed(account)) == [provisioned, created]
        assert created in _listed(account, created)
        account.delete_key(created)
        assert list(_listed(account)) == [provisioned]
        with pytest.raises(errors.BadCredentials):
            account.list_keys(created)

    def test_listed_keys_carry_the_description(self, subject: AccountUnderTest) -> None:
        """list shows the description given to create, and a creation date or None."""
        account = subject.account
        account.login(subject.password)
        created = account.create_key("laptop 3")
        listed = _listed(account)[created]
        assert listed.description == "laptop 3"
        assert listed.created is None or isinstance(listed.created, str)

    def test_listed_keys_are_masked(self, subject: AccountUnderTest) -> None:
        """masked() shows at most the first and last four characters of a listed key."""
        account = subject.account
        account.login(subject.password)
        created = account.create_key("masked")
        masked = _listed(account)[created].masked()
        assert created not in masked
        assert masked in ("****", f"{created[:4]}…{created[-4:]}")

    def test_a_key_created_after_a_delete_is_a_new_key(self, subject: AccountUnderTest) -> None:
        """The service never hands out a deleted key again."""
        account = subject.account
        account.login(subject.password)
        first = account.create_key("first")
        account.delete_key(first)
        second = account.create_key("second")
        assert second != first
        assert list(_listed(account)) == [second]

    def test_deleting_an_unknown_key_with_a_session_raises_not_found(
        self, subject: AccountUnderTest
    ) -> None:
        """delete of a key the account does not have raises NotFound and changes nothing."""
        account = subject.account
        provisioned = subject.provision_key()
        account.login(subject.password)
        with pytest.raises(errors.NotFound):
            account.delete_key(UNKNOWN_KEY)
        assert list(_listed(account)) == [provisioned]

    def test_deleting_a_key_twice_raises_not_found(self, subject: AccountUnderTest) -> None:
        """The second delete of the same key raises NotFound."""
        account = subject.account
        account.login(subject.password)
        created = account.create_key("twice")
        account.delete_key(created)
        with pytest.raises(errors.NotFound):
            account.delete_key(created)

    # --- keys, with an API key ---------------------------------------------------------------

    def test_create_list_delete_with_an_api_key(self, subject: AccountUnderTest) -> None:
        """With an API key and no session: create, list and delete work as with a session."""
        account = subject.account
        key = subject.provision_key()
        created = account.create_key("made with a key", key)
        assert list(_listed(account, key)) == [key, created]
        account.delete_key(created, key)
        assert list(_listed(account, key)) == [key]
        assert account.validate() is False

    def test_deleting_an_unknown_key_with_an_api_key_raises_not_found(
        self, subject: AccountUnderTest
    ) -> None:
        """delete of an unknown key, authenticated by an API key, raises NotFound."""
        key = subject.provision_key()
        with pytest.raises(errors.NotFound):
            subject.account.delete_key(UNKNOWN_KEY, key)

    def test_an_unknown_api_key_raises_bad_credentials(self, subject: AccountUnderTest) -> None:
        """Every call with an API key the service does not know raises BadCredentials."""
        account = subject.account
        with pytest.raises(errors.BadCredentials):
            account.list_keys(UNKNOWN_KEY)
        with pytest.raises(errors.BadCredentials):
            account.create_key("with a bad key", UNKNOWN_KEY)
        with pytest.raises(errors.BadCredentials):
            account.delete_key(UNKNOWN_KEY, UNKNOWN_KEY)

    def test_a_deleted_api_key_raises_bad_credentials(self, subject: AccountUnderTest) -> None:
        """A key deleted with another key stops authenticating: BadCredentials, not expiry."""
        account = subject.account
        keeper, victim = subject.provision_key(), subject.provision_key()
        account.delete_key(victim, keeper)
        with pytest.raises(errors.BadCredentials):
            account.list_keys(victim)
        assert list(_listed(account, keeper)) == [keeper]

    def test_an_api_key_call_ignores_an_expired_session(self, subject: AccountUnderTest) -> None:
        """A call with an API key works even when the session it could have used has ended."""
        account = subject.account
        key = subject.provision_key()
        account.login(subject.password)
        subject.expire_sessions()
        assert list(_listed(account, key)) == [key]


_users = itertools.count()


@contextmanager
def emulated_account(
    emulator: ConduceEmulator, password: str = "contract password 4c1a"
) -> Iterator[AccountUnderTest]:
    """A :class:`~keyagent.conduce.ConduceAccount` of a new user of ``emulator``.

    Trusts the emulator's CA; closed on exit. Keep proxies out of the environment
    (``HTTPS_PROXY``): the emulator listens on loopback.
    """
    from keyagent.conduce import ConduceAccount, HttpSettings

    user = f"contract-{next(_users)}@example.com"
    emulator.add_user(user, password)
    settings = HttpSettings(verify=emulator.ca_path, retries=0)
    account = ConduceAccount(emulator.host, user, settings)

    def expire_sessions() -> None:
        emulator.expire_sessions(user)

    try:
        yield AccountUnderTest(
            account,
            password=password,
            provision_key=lambda: emulator.add_key(user, "provisioned"),
            expire_sessions=expire_sessions,
        )
    finally:
        account.close()
