"""Timestamps as Hubble prints them: protojson's RFC 3339 and Go's ``time.StampMilli``."""
from __future__ import annotations

import calendar
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


_parsed_second: tuple[str, int] = ("", 0)


def parse_time(text: str) -> tuple[int, int]:
    """(seconds, nanos) of a timestamp :func:`format_time` wrote (``...SSZ`` or
    ``...SS.fffZ``): what the message builder needs, without ``strptime`` (≈ 15 µs).
    Raises ValueError for any other form."""
    global _parsed_second
    if len(text) < 20 or text[-1] != "Z" or text[10] != "T" or (len(text) > 20 and text[19] != "."):
        raise ValueError(f"not a timestamp of format_time: {text!r}")
    head = text[:19]
    cached = _parsed_second
    if cached[0] == head:
        sec = cached[1]
    else:
        if head[4] != "-" or head[7] != "-" or head[13] != ":" or head[16] != ":":
            raise ValueError(f"not a timestamp of format_time: {text!r}")
        sec = calendar.timegm((int(head[0:4]), int(head[5:7]), int(head[8:10]),
                               int(head[11:13]), int(head[14:16]), int(head[17:19]), 0, 0, 0))
        _parsed_second = (head, sec)
    frac = text[20:-1]
    if not frac:
        return sec, 0
    if len(frac) not in (3, 6, 9) or not frac.isdigit():
        raise ValueError(f"not a timestamp of format_time: {text!r}")
    return sec, int(frac) * 10 ** (9 - len(frac))
