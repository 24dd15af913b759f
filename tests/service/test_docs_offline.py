"""``/docs`` (Swagger UI) and ``/redoc`` work offline: their pages name no other host, and every
script, style sheet, icon and schema they load is served by the service itself (from the
``fastapi-offline`` package), with the right content type."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import httpx
import pytest

from service.engine import Engine, EngineConfig
from service.rest import create_app
from service.settings import Settings
from service.uploads import decode_image
from tests.service.rest_support import LiveServer, SlowPipeline

CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
    ".json": ("application/json",),
}


class _References(HTMLParser):
    """Every URL a page loads: ``src``, ``href`` and ReDoc's ``spec-url`` attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "spec-url") and v is not None]


def references(page: str) -> list[str]:
    parser = _References()
    parser.feed(page)
    # Swagger UI's schema URL is in its inline script: SwaggerUIBundle({url: '/openapi.json', ...
    return parser.urls + re.findall(r"""\burl:\s*['"]([^'"]+)['"]""", page)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    engine = Engine(lambda device: SlowPipeline(), ["cpu"], EngineConfig(), decoder=decode_image)
    # The second app has API keys: the docs, like health and metrics, need none.
    apps = [create_app(engine, Settings()), create_app(engine, Settings(api_keys=["k1"]))]
    with LiveServer(engine, lambda: apps, start_engine=False) as server:
        yield server


@pytest.mark.parametrize("keyed", [False, True], ids=["open", "api-keys"])
@pytest.mark.parametrize(("page", "loads"), [("/docs", 4), ("/redoc", 3)])
def test_docs_load_only_from_this_server(
    live: LiveServer, keyed: bool, page: str, loads: int
) -> None:
    with httpx.Client(base_url=live.urls()[keyed], timeout=30) as http:
        answer = http.get(page)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/html")
        html = answer.text
        # No CDN, no fonts, no validator badge: nothing outside this server.
        assert not re.search(r"https?:|//[a-z]", html, re.IGNORECASE), html
        urls = references(html)
        assert len(urls) == loads, urls  # script, style sheet (Swagger UI), icon, schema
        for url in urls:
            assert url.startswith("/"), url
            asset = http.get(url)
            assert asset.status_code == 200, url
            suffix = url[url.rindex(".") :]
            assert asset.headers["content-type"].startswith(CONTENT_TYPES[suffix]), url
            assert len(asset.content) > 1000, url


def test_the_bundled_scripts_are_the_real_ones(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        swagger = http.get("/docs/assets/swagger-ui-bundle.js").text
        redoc = http.get("/docs/assets/redoc.standalone.js").text
        schema = http.get("/openapi.json").json()
    assert "SwaggerUIBundle" in swagger and "Redoc" in redoc
    assert "/v1/pose" in schema["paths"]
    assert not any(path.startswith("/docs") for path in schema["paths"])  # not in the API
