"""GET / and GET /static/{name}: the gateway's own page (plain HTML, CSS and JS shipped in gateway/static/).

Open, like /docs: the page holds no secret. It calls /v1/tasks and /v1/compare from the browser, with the API key
the user pastes into it when the gateway has keys. Only the files listed in STATIC are served, each with its
Content-Type; any other name (a typo, `../settings.py`, an encoded traversal) is the 404 envelope, and the file
system is never asked about a name the client chose. Outside the OpenAPI schema: the page is not part of the API.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from telepathy.gateway.errors import GatewayError

# Only the page's own script, style and API calls: no inline script or style, no other origin, no framing.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
STATIC: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

router = APIRouter(tags=["page"], include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return resources.files("telepathy.gateway").joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=STATIC[name], headers=PAGE_HEADERS)


@router.get("/")
async def page() -> Response:
    """The page: pick a task, type a text, see both paths side by side."""
    return _file("index.html")


@router.get("/static/{name:path}")
async def static(name: str) -> Response:
    if name not in STATIC:
        raise GatewayError(404, f"no static file {name[:100]!r}; the page's files are {', '.join(sorted(STATIC))}")
    return _file(name)
