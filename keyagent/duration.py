"""Durations as people type them: ``90``, ``90s``, ``15m``, ``1h30m``, ``2d``, ``1w``."""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ``ValueError`` with a usable message if it is not a duration."""
    cleaned = text.strip()
    position, total = 0, 0.0
    while position < len(cleaned):
        match = _PART.match(cleaned, position)
        if match is None:
            break
        total += float(match[1]) * _UNITS[match[2].lower()]
        position = match.end()
    if not cleaned or position != len(cleaned) or not 0 < total < math.inf:
        raise ValueError(f"'{text}' is not a duration; use seconds or e.g. 90s, 15m, 1h30m, 2d")
    return total
