"""What a handler sees of a request and returns, and the checks every parameter goes through.

A handler is ``Callable[[Request], Response]``. Anything a client can get wrong raises
:class:`HTTPError` (usually 400) with a message that says what was expected; the server
turns it into a JSON error response and counts it. No request ends without a response.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping
from urllib.parse import unquote_to_bytes

# Longest value a parameter may have: a filter, a timestamp, a name. Bounded so that no
# parameter costs more than this to look at, whatever the handler does with it.
MAX_PARAM_CHARS = 1024
MAX_PARAMS = 64


class HTTPError(Exception):
    """A request the server will not serve: the status and a message for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # decoded, validated (no control characters)
    query: tuple[tuple[str, str], ...]  # decoded pairs in order, validated
    headers: Mapping[str, str]  # lower-case names
    # For a streaming handler: True once the client closed its end.
    client_gone: Callable[[], bool] = field(default=lambda: False)

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes | Iterable[bytes]  # an iterable streams (chunked) until it ends
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def _check_text(what: str, text: str) -> str:
    for ch in text:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise bad_request(f"{what} contains a control character ({ord(ch):#04x}); remove it")
    return text


def decode_component(what: str, raw: str) -> str:
    """A percent-decoded URL component as UTF-8 text; 400 on invalid UTF-8 or control characters."""
    try:
        text = unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{what} is not valid UTF-8 after percent-decoding") from None
    return _check_text(what, text)


def parse_path(raw_path_latin1: str) -> str:
    """WSGI's PATH_INFO (already percent-decoded, as latin-1) to validated text."""
    try:
        text = raw_path_latin1.encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise bad_request("the URL path is not valid UTF-8 after percent-decoding") from None
    return _check_text("the URL path", text)


def parse_query(raw: str) -> tuple[tuple[str, str], ...]:
    """``a=1&b&c=x`` to ordered, decoded pairs (a key without ``=`` has the value "")."""
    if not raw:
        return ()
    pairs = []
    for part in raw.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        name = decode_component("a parameter name", key)
        if len(value) > 3 * MAX_PARAM_CHARS:
            raise bad_request(f"{name}: value longer than {MAX_PARAM_CHARS} characters")
        text = decode_component(f"parameter {name!r}", value)
        if len(text) > MAX_PARAM_CHARS:
            raise bad_request(f"{name}: value longer than {MAX_PARAM_CHARS} characters")
        pairs.append((name, text))
        if len(pairs) > MAX_PARAMS:
            raise bad_request(f"more than {MAX_PARAMS} parameters")
    return tuple(pairs)


def ascii_int(name: str, value: str, *, minimum: int = 0, maximum: int) -> int:
    """A decimal written with ASCII digits only (``str.isdigit`` also takes ``²`` and ``٣``)."""
    if not value or len(value) > 19 or not all("0" <= c <= "9" for c in value):
        raise bad_request(f"{name}: expected a number from {minimum} to {maximum} (digits 0-9), got {value!r}")
    number = int(value)
    if not minimum <= number <= maximum:
        raise bad_request(f"{name}: expected a number from {minimum} to {maximum} (digits 0-9), got {value!r}")
    return number


def ascii_only(name: str, value: str) -> str:
    if not value.isascii():
        raise bad_request(f"{name}: expected ASCII text, got {value!r}")
    return value
