"""Timestamps as Hubble prints them: protojson's RFC 3339 and Go's ``time.StampMilli``."""
from __future__ import annotations

import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# One entry: flows of a batch mostly share the second, so the calendar work is done once.
_second_cache: tuple[int, str, str] = (-1, "", "")


def _second_strings(sec: int) -> tuple[str, str]:
    global _second_cache
    cached = _second_cache
    if cached[0] == sec:
        return cached[1], cached[2]
    t = time.gmtime(sec)
    rfc = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    # Go's time.StampMilli without the millis: "Jan _2 15:04:05" (day padded with a space).
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    _second_cache = (sec, rfc, stamp)
    return rfc, stamp


def format_time(time_ns: int) -> str:
    """A protojson Timestamp: RFC 3339, UTC, ``Z``, 0/3/6/9 fractional digits."""
    sec, nanos = divmod(time_ns, 1_000_000_000)
    rfc = _second_strings(sec)[0]
    if nanos == 0:
        return rfc + "Z"
    if nanos % 1_000_000 == 0:
        return f"{rfc}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{rfc}.{nanos // 1_000:06d}Z"
    return f"{rfc}.{nanos:09d}Z"


def format_stamp(time_ns: int) -> str:
    """Hubble's compact timestamp (Go ``time.StampMilli`` in UTC): ``Nov 26 11:45:45.123``."""
    sec, nanos = divmod(time_ns, 1_000_000_000)
    return f"{_second_strings(sec)[1]}.{nanos // 1_000_000:03d}"
