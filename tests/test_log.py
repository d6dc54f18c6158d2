"""keyagent.log: the standard logging module in a library, a lean sink in the agent."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from keyagent import log


@pytest.fixture
def restore_sink() -> Iterator[None]:
    """Put the process-wide sink back to 'standard logging' after the test."""
    yield
    log._sink = None


def test_records_go_to_standard_logging_by_default(caplog: pytest.LogCaptureFixture) -> None:
    """Without a sink, a record reaches the standard logger of the same name."""
    caplog.set_level(logging.INFO, logger="keyagent.test")
    logger = log.get_logger("keyagent.test")
    logger.info("held %d key(s) for %s", 2, "ops@example.com")
    logger.debug("not shown at INFO")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("keyagent.test", logging.INFO, "held 2 key(s) for ops@example.com")
    ]


def test_stderr_sink_formats_and_filters(
    restore_sink: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stderr sink writes `keyagent[PID]: LEVEL: message` from its level up."""
    log.to_stderr(log.INFO)
    logger = log.get_logger("keyagent.test")
    logger.debug("hidden %s", "detail")
    logger.warning("refused connection from uid %d", 1001)
    assert not logger.isEnabledFor(log.DEBUG)
    assert logger.isEnabledFor(log.ERROR)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("keyagent[")
    assert lines[0].endswith("]: WARNING: refused connection from uid 1001")


def test_a_record_is_one_line_whatever_its_values_hold(
    restore_sink: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value with a newline (a program path any local user can choose), an escape or a
    bidi override is written escaped: it cannot start a forged line of the agent's in the
    journal, nor rewrite a terminal. Records written together (audit lines) are too."""
    log.to_stderr(log.INFO)
    logger = log.get_logger("keyagent.test")
    forged = "/tmp/x\nkeyagent[1]: INFO: audit op=get outcome=ok\x1b[2J\u202e"
    logger.warning("denied get to pid 7 (%s)", forged)
    logger.log_many(log.INFO, [f"audit exe={forged}", "audit plain"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(
        "WARNING: denied get to pid 7 (/tmp/x\\x0akeyagent[1]: INFO: audit op=get "
        "outcome=ok\\x1b[2J\\u202e)"
    )
    assert lines[1].endswith("INFO: audit exe=/tmp/x\\x0akeyagent[1]: INFO: audit op=get "
                             "outcome=ok\\x1b[2J\\u202e")  # fmt: skip
    assert lines[2].endswith("INFO: audit plain")
    assert log.one_line("caf\u00e9 \u00e0 l'heure") == "caf\u00e9 \u00e0 l'heure"


def test_sink_survives_bad_format_arguments(
    restore_sink: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A format string that does not fit its arguments is logged as is, never raised."""
    log.to_stderr(log.DEBUG)
    log.get_logger("keyagent.test").error("expected a number: %d", "text")
    assert (
        capsys.readouterr()
        .err.rstrip()
        .endswith("ERROR: expected a number: %d (unformattable arguments)")
    )


def test_syslog_sink_filters_by_level(restore_sink: None) -> None:
    """The background agent's syslog sink passes warnings and errors only."""
    log.to_syslog(log.WARNING)
    logger = log.get_logger("keyagent.test")
    assert not logger.isEnabledFor(log.INFO)
    assert logger.isEnabledFor(log.WARNING)
    logger.warning("a warning goes to syslog (or nowhere without a syslog daemon)")


def test_a_logger_with_a_floor_reaches_a_sink_set_higher(
    restore_sink: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit trail's logger (floor INFO) is written at info by a sink that passes warnings
    only, as a background agent's syslog does; other loggers' info records are not."""
    log.to_stderr(log.WARNING)
    audit = log.get_logger("keyagent.test.audit", floor=log.INFO)
    other = log.get_logger("keyagent.test")
    assert audit.isEnabledFor(log.INFO)
    assert not audit.isEnabledFor(log.DEBUG)
    audit.info("audit op=%s", "get")
    audit.debug("not this")
    other.info("nor this")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("]: INFO: audit op=get")


def test_the_lending_log_is_at_info_whatever_the_agents_level(restore_sink: None) -> None:
    """A background agent logs warnings only; what it lends for the HTTP socket is still
    logged (at info), as the audit log is: it names a use an agent's SIGKILL leaves."""
    from keyagent.agent import lending_log
    from keyagent.agent import log as agent_log

    log.to_stderr(log.WARNING)
    assert not agent_log.isEnabledFor(log.INFO)
    assert lending_log.isEnabledFor(log.INFO)
