"""The ui extension over HTTP (no browser): assets, the API under /api, isolation.

The page itself is exercised in a real headless Chromium by extensions/ui/test_ui_e2e.py.
"""
from __future__ import annotations

from tests.support.wire import any_uuid, any_uuid_envelope

import json
import re
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from extensions.ui.config import UiConfig
from extensions.ui.extension import STATIC_DIR, UiExtension
from extensions.ui.factory import FACTORY
from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.component import CreateSettings, Kind, Telemetry
from tests.flowsamples import sample_flows


@pytest.fixture
def ui() -> Iterator[UiExtension]:
    ext = FACTORY.create(CreateSettings("ui", "node-1", Telemetry()), UiConfig(endpoint="127.0.0.1:0"))
    assert isinstance(ext, UiExtension)
    ext.start()
    ext.consume(list(sample_flows().values()))
    yield ext
    ext.shutdown()


def get(ui: UiExtension, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://{ui.endpoint}{path}", timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.parametrize("path, ctype", [
    ("/", "text/html; charset=utf-8"),
    ("/index.html", "text/html; charset=utf-8"),
    ("/app.js", "text/javascript; charset=utf-8"),
    ("/style.css", "text/css; charset=utf-8"),
])
def test_assets_are_served_from_the_package(ui: UiExtension, path: str, ctype: str) -> None:
    status, headers, body = get(ui, path)
    assert status == 200
    assert headers["Content-Type"] == ctype
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    name = "index.html" if path == "/" else path.lstrip("/")
    assert body == (STATIC_DIR / name).read_bytes()


def test_api_is_the_flow_api_under_api(ui: UiExtension) -> None:
    status, _, body = get(ui, "/api/flows?last=2")
    flows = list(sample_flows().values())
    assert status == 200
    assert [json.loads(line) for line in body.decode().splitlines()] == [any_uuid_envelope(hubble.envelope(f)) for f in flows[-2:]]
    graph = json.loads(get(ui, "/api/map?namespace=shop")[2])
    assert "shop/frontend" in {n["id"] for n in graph["nodes"]}
    assert json.loads(get(ui, "/api/healthz")[2])["status"] == "ok"
    status, _, body = get(ui, "/api/flows?verdict=NOPE")
    assert status == 400 and "--verdict: invalid verdict" in json.loads(body)["error"]


@pytest.mark.parametrize("path", ["/../config.py", "/%2e%2e/config.py", "/static/../../flowtel/cli.py", "/nope.js"])
def test_nothing_outside_the_assets(ui: UiExtension, path: str) -> None:
    assert get(ui, path)[0] == 404


def test_assets_load_nothing_from_outside() -> None:
    files = {p.name: p.read_text() for p in STATIC_DIR.iterdir()}
    assert set(files) == {"index.html", "app.js", "style.css"}
    for name, text in files.items():
        urls = re.findall(r"""(?:https?:)?//[\w.-]+""", text)
        # The only absolute URL is the SVG namespace name, which is an identifier, not a fetch.
        assert set(urls) <= {"http://www.w3.org"}, (name, urls)
        assert "@import" not in text and "<iframe" not in text


def test_config_defaults() -> None:
    assert UiConfig().endpoint == "127.0.0.1:12000"
    assert UiConfig().buffer_size == 4095
    assert FACTORY.kind is Kind.EXTENSION and FACTORY.type == "ui"
