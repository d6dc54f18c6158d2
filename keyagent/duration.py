"""Durations as people type them: ``90``, ``90s``, ``15m``, ``1h30m``, ``2d``, ``1w``.

A bare number is seconds, but only on its own: in ``1h30`` the ``30`` could be minutes or
seconds, so such text is refused with the likely meaning as a hint, never guessed.
"""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NEXT_SMALLER = {"w": "d", "d": "h", "h": "m", "m": "s"}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)", re.IGNORECASE)
_EXAMPLES = "use seconds or e.g. 90s, 15m, 1h30m, 2d"


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ``ValueError`` with a usable message if it is not a duration.

    The message says what is wrong: not a duration at all, ambiguous (a bare number after a
    unit, with a hint such as ``did you mean 1h30m?``), or not positive.
    """
    cleaned = text.strip()
    position, total = 0, 0.0
    previous_unit = ""
    while position < len(cleaned):
        match = _PART.match(cleaned, position)
        if match is None:
            break
        unit = match[2].lower()
        if not unit and position > 0:
            smaller = _NEXT_SMALLER.get(previous_unit)
            hint = f"; did you mean {cleaned}{smaller}?" if smaller else ""
            raise ValueError(
                f"{text!a} is ambiguous: give the number after '{previous_unit}' a unit of its"
                f" own{hint}"
            )
        total += float(match[1]) * _UNITS[unit]
        previous_unit = unit
        position = match.end()
    if not cleaned or position != len(cleaned) or not total < math.inf:
        raise ValueError(f"{text!a} is not a duration; {_EXAMPLES}")
    if total <= 0:
        raise ValueError(f"{text!a} must be positive; {_EXAMPLES}")
    return total
