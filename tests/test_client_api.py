"""The Python client library against a real agent (and small fakes of one)."""

from __future__ import annotations

import os

from keyagent.testing.agent import AgentProcess


def test_allow_exe_given_one_path_as_a_string(agent: AgentProcess) -> None:
    """allow_exe="/usr/bin/env" is one program, not one per character."""
    with agent.client() as client:
        added = client.add(
            "one.example", "u@example.com", "KA-one-0123456789", allow_exe="/usr/bin/env"
        )
    assert added["allowed_exes"] == [os.path.realpath("/usr/bin/env")]
