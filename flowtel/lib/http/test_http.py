"""flowtel.lib.http over real sockets on loopback: limits, timeouts, overload, checks, errors."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Iterator

import pytest
from pydantic import ValidationError

from flowtel.component import Telemetry
from flowtel.lib.http import (
    BoundedHTTPServer,
    BrowserFacingSettings,
    HTTPError,
    Limits,
    Request,
    Response,
    ascii_int,
    json_response,
)
from flowtel.lib.http.origin import HostPolicy, split_host_header
from flowtel.lib.http.request import parse_query


# --- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["²", "٣", "１", "-1", "+1", " 1", "1e3", "", "9" * 20, "1_000"])
def test_ascii_int_takes_ascii_digits_only(value: str) -> None:
    with pytest.raises(HTTPError) as info:
        ascii_int("last", value, maximum=10**18)
    assert info.value.status == 400 and "last: expected a number" in info.value.message


def test_ascii_int_bounds() -> None:
    assert ascii_int("n", "0042", maximum=100) == 42
    with pytest.raises(HTTPError, match="from 0 to 100"):
        ascii_int("n", "101", maximum=100)


def test_parse_query_decodes_in_order_and_refuses_what_cannot_be_text() -> None:
    assert parse_query("a=1&not&b=x%20y&c=%E2%9C%93&&d=+") == (
        ("a", "1"), ("not", ""), ("b", "x y"), ("c", "\u2713"), ("d", " "))
    for raw, message in (("a=%00", "control character"), ("a=%FF", "not valid UTF-8"), ("%0A=1", "control"),
                         ("a=" + "x" * 1025, "longer than 1024"), ("&".join(["a=1"] * 65), "more than 64")):
        with pytest.raises(HTTPError, match=message):
            parse_query(raw)


@pytest.mark.parametrize("header, expected", [
    ("localhost:12000", ("localhost", "12000")), ("LOCALHOST.", ("localhost", "")),
    ("[::1]:80", ("::1", "80")), ("[::1]", ("::1", "")), ("10.0.0.1", ("10.0.0.1", "")),
])
def test_split_host_header(header: str, expected: tuple[str, str]) -> None:
    assert split_host_header(header) == expected


def test_host_policy_refuses_rebinding_names_and_cross_site_requests() -> None:
    policy = HostPolicy("0.0.0.0", ["flowtel.example.com"])
    ok = [{"host": "localhost:12000"}, {"host": "127.0.0.1:12000"}, {"host": "[::1]:12000"},
          {"host": "10.1.2.3:12000"}, {"host": "flowtel.example.com"},
          {"host": "localhost:12000", "sec-fetch-site": "same-origin", "origin": "http://localhost:12000"},
          {"host": "localhost:12000", "sec-fetch-site": "none"}]
    for headers in ok:
        assert policy.refusal(headers) is None, headers
    refused = [({}, "DNS rebinding"), ({"host": "evil.example:12000"}, "DNS rebinding"),
               ({"host": "localhost.evil.example"}, "DNS rebinding"),
               ({"host": "localhost", "sec-fetch-site": "cross-site"}, "cross-site"),
               ({"host": "localhost", "sec-fetch-site": "same-site"}, "cross-site"),
               ({"host": "localhost:1", "origin": "http://evil.example"}, "cross-origin"),
               ({"host": "localhost:1", "origin": "http://localhost:2"}, "cross-origin"),
               ({"host": "localhost:1", "origin": "null"}, "cross-origin")]
    for headers, message in refused:
        reason = policy.refusal(headers)
        assert reason is not None and message in reason, headers
    # The endpoint's own name is allowed; "*" turns the Host check off (not the cross-site one).
    assert HostPolicy("agent.internal").refusal({"host": "agent.internal:1"}) is None
    assert HostPolicy("127.0.0.1", ["*"]).refusal({"host": "anything"}) is None
    assert HostPolicy("127.0.0.1", ["*"]).refusal({"host": "x", "sec-fetch-site": "cross-site"}) is not None


def test_settings_validate() -> None:
    assert BrowserFacingSettings(allowed_hosts=["Flowtel.Example.COM."]).allowed_hosts == ["flowtel.example.com"]
    for bad in ("http://x", "x:80", "", "a b"):
        with pytest.raises(ValidationError, match="host name without port"):
            BrowserFacingSettings(allowed_hosts=[bad])
    with pytest.raises(ValidationError):
        BrowserFacingSettings(max_connections=0)
    assert BrowserFacingSettings.model_validate({"read_timeout": "500ms"}).read_timeout == 0.5


# --- a real server ------------------------------------------------------------------------


class App:
    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("a bug")
        if request.path == "/stream":
            def chunks() -> Iterator[bytes]:
                yield b""  # headers at once
                while not request.client_gone() and not self.release.wait(0.05):
                    pass
                yield b"done\n"
            return Response(200, chunks(), "text/plain")
        if request.path == "/bad":
            raise HTTPError(400, "bad: a message for the client")
        return json_response(200, {"path": request.path, "query": request.query})


@pytest.fixture
def server() -> Iterator[tuple[BoundedHTTPServer, Telemetry, App]]:
    telemetry = Telemetry()
    app = App()
    srv = BoundedHTTPServer(component="t", telemetry=telemetry, host="127.0.0.1", port=0, handler=app,
                            limits=Limits(max_connections=4, read_timeout=1.0, idle_timeout=2.0, threads=3),
                            browser=BrowserFacingSettings())
    srv.start("test-http")
    yield srv, telemetry, app
    app.release.set()
    srv.stop()


def request(srv: BoundedHTTPServer, method: str, path: str,
            headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_serves_and_validates(server: tuple[BoundedHTTPServer, Telemetry, App]) -> None:
    srv, telemetry, _ = server
    status, body, headers = request(srv, "GET", "/a%20b?x=1&y")
    assert status == 200 and json.loads(body) == {"path": "/a b", "query": [["x", "1"], ["y", ""]]}
    assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff"
    assert request(srv, "HEAD", "/x")[:2] == (200, b"")
    for method, path, status_code, message in (
        ("GET", "/%00", 400, "control character"), ("GET", "/?a=%C0", 400, "UTF-8"),
        ("POST", "/", 405, "GET and HEAD"), ("DELETE", "/", 405, "GET and HEAD"),
        ("GET", "/bad", 400, "bad: a message"),
    ):
        status, body, _ = request(srv, method, path)
        assert status == status_code and message in json.loads(body)["error"], (method, path, body)
    assert telemetry.get("t", "http_client_errors") == 5
    status, body, _ = request(srv, "GET", "/boom")
    assert status == 500 and json.loads(body) == {"error": "internal error; see the agent's log"}
    assert telemetry.get("t", "http_server_errors") == 1


def test_cross_site_and_rebinding_requests_are_refused(server: tuple[BoundedHTTPServer, Telemetry, App]) -> None:
    srv, _, _ = server
    assert request(srv, "GET", "/", {"Host": "evil.example"})[0] == 403
    assert request(srv, "GET", "/", {"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert request(srv, "GET", "/", {"Host": "localhost", "Origin": "http://localhost"})[0] == 200


def test_over_the_cap_is_503_and_freed_slots_are_reused(server: tuple[BoundedHTTPServer, Telemetry, App]) -> None:
    srv, telemetry, _ = server
    held = [socket.create_connection(srv.address) for _ in range(4)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(srv.address, timeout=5)
        data = extra.recv(4096)
        assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"Retry-After: 1" in data
        assert extra.recv(1) == b""  # and closed
        extra.close()
        assert telemetry.get("t", "http_connections_rejected") == 1
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert request(srv, "GET", "/")[0] == 200


def test_read_and_idle_timeouts_close_connections(server: tuple[BoundedHTTPServer, Telemetry, App]) -> None:
    srv, telemetry, _ = server
    slow = socket.create_connection(srv.address, timeout=10)
    idle = socket.create_connection(srv.address, timeout=10)
    started = time.monotonic()
    slow.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")  # never finished
    assert slow.recv(1) == b""
    slow_after = time.monotonic() - started
    assert idle.recv(1) == b""
    idle_after = time.monotonic() - started
    assert 1.0 <= slow_after < 3.5, slow_after
    assert 2.0 <= idle_after < 5.0, idle_after
    assert telemetry.get("t", "http_connections_timed_out") == 2
    slow.close()
    idle.close()


def test_a_stream_sees_its_client_leave_and_stop_ends_it(server: tuple[BoundedHTTPServer, Telemetry, App]) -> None:
    srv, telemetry, app = server
    s = socket.create_connection(srv.address, timeout=5)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")  # the status line before any data
    s.close()
    deadline = time.monotonic() + 5
    # The worker is free again: three more streams and a plain request all get served.
    while time.monotonic() < deadline:
        if request(srv, "GET", "/")[0] == 200:
            break
    streams = []
    for _ in range(3):
        c = socket.create_connection(srv.address, timeout=5)
        c.sendall(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 200 OK")
        streams.append(c)
    started = time.monotonic()
    app.release.set()
    srv.stop()
    assert time.monotonic() - started < 5
    for c in streams:
        c.close()


def test_port_in_use_raises_oserror() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(OSError):
            BoundedHTTPServer(component="t", telemetry=Telemetry(), host="127.0.0.1", port=holder.getsockname()[1],
                              handler=lambda r: json_response(200, {}), limits=Limits())
    finally:
        holder.close()
