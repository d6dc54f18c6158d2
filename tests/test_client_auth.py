"""AgentAuth: the key goes only to https:// requests for the key's own host and port."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import responses

from keyagent import errors
from keyagent.client import AgentAuth, AuthTargetRefused
from keyagent.testing.agent import AgentProcess

KEY = "KA-auth-0123456789"
OTHER_KEY = "KA-other-port-9876"
HOST = "app.conduce.com"


@pytest.fixture(scope="module")
def module_agent(module_agent: AgentProcess) -> AgentProcess:
    """The module's agent holds one key for HOST and one for HOST on port 8443."""
    with module_agent.client() as client:
        client.add(HOST, "u@example.com", KEY)
        client.add(f"{HOST}:8443", "u@example.com", OTHER_KEY)
    return module_agent


@pytest.fixture
def holding(shared_agent: AgentProcess) -> AgentProcess:
    """That agent, for a test that only reads it (AgentAuth only ever gets keys)."""
    return shared_agent


def authorization(mocked: responses.RequestsMock) -> str | None:
    return mocked.calls[-1].request.headers.get("Authorization")


@pytest.mark.parametrize(
    "url",
    [
        f"https://{HOST}/api",
        f"https://{HOST}:443/api",
        "https://APP.Conduce.COM/api",
        f"https://user@{HOST}/api",
    ],
)
def test_the_key_goes_to_https_on_its_host(holding: AgentProcess, url: str) -> None:
    """An https:// request to the key's host (default port, any case) carries the key."""
    auth = AgentAuth(host=HOST, socket_path=holding.socket_path)
    with responses.RequestsMock() as mocked:
        mocked.get(url, body="ok")
        assert requests.get(url, auth=auth, timeout=5).text == "ok"
        assert authorization(mocked) == f"Bearer {KEY}"


@pytest.mark.parametrize(
    "url",
    [
        f"http://{HOST}/api",  # plain text
        "http://127.0.0.1:8080/x",
        "https://evil.example/api",  # another host
        f"https://{HOST}.evil.example/api",
        f"https://{HOST}:8443/api",  # another port
        f"ftp://{HOST}/api",
    ],
)
def test_no_key_is_fetched_for_another_scheme_host_or_port(tmp_path: Path, url: str) -> None:
    """http://, another host or another port raises AuthTargetRefused before asking the agent."""
    # No agent at this path: asking it would raise AgentUnreachable, not AuthTargetRefused.
    auth = AgentAuth(host=HOST, socket_path=str(tmp_path / "no-agent.sock"))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.get(url, body="ok")
        with pytest.raises(AuthTargetRefused, match="no key was fetched"):
            requests.get(url, auth=auth, timeout=5)
        assert len(mocked.calls) == 0


def test_a_key_host_with_a_port_matches_only_that_port(holding: AgentProcess) -> None:
    """host='h:8443' authenticates https://h:8443/ with that key, and refuses https://h/."""
    auth = AgentAuth(host=f"{HOST}:8443", socket_path=holding.socket_path)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.get(f"https://{HOST}:8443/api", body="ok")
        requests.get(f"https://{HOST}:8443/api", auth=auth, timeout=5)
        assert authorization(mocked) == f"Bearer {OTHER_KEY}"
        with pytest.raises(AuthTargetRefused):
            requests.get(f"https://{HOST}/api", auth=auth, timeout=5)


def test_without_a_host_the_request_host_selects_the_key(holding: AgentProcess) -> None:
    """host=None asks the agent for a key held for the URL's own host, and only that."""
    auth = AgentAuth(socket_path=holding.socket_path)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.get(f"https://{HOST}/api", body="ok")
        mocked.get(f"https://{HOST}:8443/api", body="ok")
        requests.get(f"https://{HOST}/api", auth=auth, timeout=5)
        assert authorization(mocked) == f"Bearer {KEY}"
        requests.get(f"https://{HOST}:8443/api", auth=auth, timeout=5)
        assert authorization(mocked) == f"Bearer {OTHER_KEY}"
        with pytest.raises(AuthTargetRefused):
            requests.get(f"http://{HOST}/api", auth=auth, timeout=5)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.get("https://evil.example/api", body="ok")
        with pytest.raises(errors.NotFound) as caught:
            requests.get("https://evil.example/api", auth=auth, timeout=5)
        assert KEY not in str(caught.value)
        assert len(mocked.calls) == 0


def test_auth_target_refused_is_a_keyagent_error() -> None:
    """AuthTargetRefused is under the one exception root, with the stable code forbidden,
    and still a ValueError; the code still names Forbidden itself."""
    refusal = AuthTargetRefused("no")
    assert isinstance(refusal, errors.KeyagentError)
    assert isinstance(refusal, errors.Forbidden)
    assert isinstance(refusal, ValueError)
    assert refusal.code == "forbidden"
    assert type(errors.from_code("forbidden")) is errors.Forbidden
