"""The chat page, ``GET /``: our own static HTML/CSS/JS from the package, under a strict Content-Security-Policy.

Why explicit routes and not a static directory: the page is four fixed files, so nothing a
client sends picks a file (no path to normalize), and every answer carries the same security
headers.  The page holds no secret and works offline (no CDN, no build step): it is public
even when the server has API keys; the API calls it makes send the key the user typed, kept
in the tab's session storage, exactly as any other client would.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .protocol import error_body

# name -> media type; nothing else is served from /static/
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
PAGE_PATHS = frozenset({"/", *(f"/static/{name}" for name in STATIC_FILES)})

# No inline script or style anywhere, no other origin: a reply the model writes (shown with
# textContent) could not run code even if it were put into the DOM as markup.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new server version is picked up on reload
}


@cache
def _read(name: str) -> bytes:
    return files(__package__).joinpath("static", name).read_bytes()


async def index(request: Request) -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC_FILES:
        return Response(_not_found(), status_code=404, media_type="application/json")
    return Response(_read(name), media_type=STATIC_FILES[name], headers=HEADERS)


def _not_found() -> bytes:
    return json.dumps(error_body("no such file", type="not_found_error", code="404")).encode()


ROUTES = [
    Route("/", index, methods=["GET"]),
    Route("/static/{name}", static_file, methods=["GET"]),
]
