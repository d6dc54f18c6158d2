"""Unit tests for keyagent.duration.parse_duration."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyagent.duration import parse_duration

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("8h", 28800.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("1h30m", 5400.0),
        ("1w2d3h4m5s", 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5.0),
        ("1.5h", 5400.0),
        ("0.5", 0.5),
        ("0.25m", 15.0),
        ("1H", 3600.0),
        ("15M", 900.0),
        ("2D1H", 176400.0),
        ("  10m  ", 600.0),
        ("\t10m\n", 600.0),
        ("0s1m", 60.0),
        ("1m0s", 60.0),
        ("1h1h", 7200.0),
        ("007", 7.0),
    ],
)
def test_valid_durations(text: str, seconds: float) -> None:
    """Seconds, unit suffixes (any case), decimals and concatenated parts add up to seconds."""
    result = parse_duration(text)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "-5",
        "+5",
        "-5m",
        ".5",
        "5.",
        "1.5.5",
        "1e3",
        "1 h",
        "1h 30m",
        "h",
        "m5",
        "1y",
        "1ms",
        "10ss",
        "1,5h",
        "1_000",
        "abc",
        "inf",
        "nan",
        "infinity",
        "5x",
        "0x10",
    ],
)
def test_invalid_durations_raise_value_error(text: str) -> None:
    """Empty, zero, negative, malformed or unknown-unit durations raise ValueError."""
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "0h0m", "0.0", "00", "0w0d0h0m0s"])
def test_zero_must_be_positive(text: str) -> None:
    """Zero, in any spelling, is a duration but not a positive one, and the message says so."""
    with pytest.raises(ValueError, match="must be positive") as caught:
        parse_duration(text)
    assert f"'{text}'" in str(caught.value)
    assert "not a duration" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("1h30", "did you mean 1h30m?"),
        ("1d2", "did you mean 1d2h?"),
        ("2w1", "did you mean 2w1d?"),
        ("1m30", "did you mean 1m30s?"),
        ("1H30", "did you mean 1H30m?"),
        ("1h30m15", "did you mean 1h30m15s?"),
    ],
)
def test_a_bare_number_after_a_unit_is_ambiguous_and_refused_with_a_hint(
    text: str, hint: str
) -> None:
    """1h30 is neither 1 h 30 s nor 1 h 30 m: it is refused, with the likely meaning as hint."""
    with pytest.raises(ValueError, match="ambiguous") as caught:
        parse_duration(text)
    assert hint in str(caught.value)


def test_a_bare_number_after_seconds_is_refused_without_a_guess() -> None:
    """After seconds there is no smaller unit to suggest; the text is refused all the same."""
    with pytest.raises(ValueError, match="ambiguous") as caught:
        parse_duration("10s5")
    assert "did you mean" not in str(caught.value)


def test_error_message_quotes_the_input_and_gives_examples() -> None:
    """The error message repeats what was typed and shows valid forms."""
    with pytest.raises(ValueError, match="is not a duration") as caught:
        parse_duration("forever")
    message = str(caught.value)
    assert "'forever'" in message
    assert "90s" in message
    assert "1h30m" in message


def test_huge_number_is_not_a_duration() -> None:
    """A number too large for a finite float is rejected instead of returned as infinity."""
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration("9" * 400)


@settings(max_examples=200)
@given(
    parts=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), st.sampled_from(sorted(UNITS))),
        min_size=1,
        max_size=6,
    ),
    upper=st.booleans(),
)
def test_concatenated_parts_sum(parts: list[tuple[int, str]], upper: bool) -> None:
    """Any concatenation of number+unit parts is the sum of the parts, whatever the case; a
    bare number is accepted alone and refused as ambiguous after a unit."""
    bare = [part for part in parts if part[1] == ""]
    parts = [part for part in parts if part[1] != ""] + bare[:1]
    text = "".join(f"{number}{unit}" for number, unit in parts)
    if upper:
        text = text.upper()
    expected = float(sum(number * UNITS[unit] for number, unit in parts))
    if bare and len(parts) > 1:
        with pytest.raises(ValueError, match="ambiguous"):
            parse_duration(text)
    elif expected > 0:
        assert parse_duration(text) == expected
    else:
        with pytest.raises(ValueError, match="must be positive"):
            parse_duration(text)


@settings(max_examples=300)
@given(text=st.text(max_size=30))
def test_any_text_is_a_positive_number_or_value_error(text: str) -> None:
    """For any text, parse_duration returns a positive float or raises ValueError, nothing else."""
    outcome: float | ValueError
    try:
        outcome = parse_duration(text)
    except ValueError as error:
        outcome = error
    if isinstance(outcome, ValueError):
        message = str(outcome)
        assert any(w in message for w in ("is not a duration", "must be positive", "ambiguous"))
    else:
        assert isinstance(outcome, float)
        assert outcome > 0
        assert not math.isnan(outcome)


@settings(max_examples=100)
@given(text=st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{1,3})?[smhdw]?\Z"))
def test_single_part_matches_float_times_unit(text: str) -> None:
    """A single part is its number times its unit's seconds (or a ValueError when zero)."""
    unit = text[-1] if text[-1] in UNITS else ""
    number = float(text[: len(text) - len(unit)])
    if number > 0:
        assert parse_duration(text) == number * UNITS[unit]
    else:
        with pytest.raises(ValueError, match="must be positive"):
            parse_duration(text)
