"""Host and cross-site checks for servers a browser can reach (pure: no I/O).

DNS rebinding: a page on ``evil.example`` re-resolves its own name to 127.0.0.1 (or the
node's address) and then reads the agent's API as "same-origin". The browser still sends
``Host: evil.example``, so only names the operator expects are served: localhost, IP
literals (a browser sends those only when it was pointed at that address, which no
rebinding can fake), the endpoint's own host, and ``allowed_hosts``.

Cross-site requests: a page elsewhere cannot read a response without CORS, but it can make
the agent do the work (``<img src=".../flows?…">``). Browsers label every request with
``Sec-Fetch-Site``; only ``same-origin`` (the UI's own fetches) and ``none`` (the user
typed or bookmarked the URL) are served. Older browsers send ``Origin`` on cross-origin
fetches, which must then name this very host. Clients that are not browsers (curl,
``flowtel observe``) send neither header and are served.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_SERVED_SITES = frozenset({"same-origin", "none"})


def split_host_header(value: str) -> tuple[str, str]:
    """``(host, port)`` from a Host header (``name``, ``name:port``, ``[v6]:port``), host lower-cased."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value.lower(), ""
        host, rest = value[1:end], value[end + 1:]
        return host.lower(), rest[1:] if rest.startswith(":") else ""
    host, sep, port = value.rpartition(":")
    if not sep or ":" in host:
        return value.lower().rstrip("."), ""
    return host.lower().rstrip("."), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which Host headers and cross-site signals a browser-facing server accepts."""

    def __init__(self, endpoint_host: str, allowed_hosts: Iterable[str] = ()) -> None:
        names = set(LOOPBACK_NAMES) | {h.lower().rstrip(".") for h in allowed_hosts}
        host = endpoint_host.strip("[]").lower()
        if host and not _is_ip(host):
            names.add(host.rstrip("."))
        self.names = frozenset(names)
        self.any_host = "*" in self.names

    def host_allowed(self, host_header: str | None) -> bool:
        if not host_header:
            return False  # HTTP/1.1 requires Host; a browser always sends it
        host, _ = split_host_header(host_header)
        return self.any_host or host in self.names or _is_ip(host)

    def refusal(self, headers: Mapping[str, str]) -> str | None:
        """Why this request is refused (403), or None to serve it. ``headers`` lower-case keyed."""
        host_header = headers.get("host")
        if not self.host_allowed(host_header):
            return (f"Host {host_header!r} is not served (DNS rebinding protection); reach the agent by "
                    "localhost, an IP address or a name listed in allowed_hosts")
        site = headers.get("sec-fetch-site")
        if site is not None and site.strip().lower() not in _SERVED_SITES:
            return f"cross-site request refused (Sec-Fetch-Site: {site}); open the UI itself instead"
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin.strip())
            if origin.strip() == "null" or parts.scheme not in ("http", "https") \
                    or parts.netloc.lower() != (host_header or "").strip().lower():
                return f"cross-origin request refused (Origin: {origin}); open the UI itself instead"
        return None
