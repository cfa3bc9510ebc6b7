"""The admin console: the static files of apps/web, served at /admin on the API's own origin.

Same origin, so the console calls the public `/collection` endpoints with no CORS, and a newcomer's
`make run` serves it with no build step. The console's files hold all its scripts and styles (nothing
inline), so its pages are sent with a strict Content-Security-Policy.
"""

from __future__ import annotations

import logging
import os

from fastapi import APIRouter
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from app.config import REPO_ROOT

logger = logging.getLogger(__name__)

WEB_DIR = REPO_ROOT / "apps" / "web"

CONSOLE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the code, not with time: always revalidate (ETag makes that cheap).
    "Cache-Control": "no-cache",
}


class ConsoleFiles(StaticFiles):
    """apps/web with the console's security headers on every file."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(CONSOLE_HEADERS)
        return response


router = APIRouter(include_in_schema=False)

if (WEB_DIR / "index.html").is_file():
    # /admin redirects to /admin/, which serves index.html (html=True); the rest are its assets.
    router.mount("/admin", ConsoleFiles(directory=WEB_DIR, html=True), name="admin")
else:  # an installed wheel carries only the API package
    logger.warning("admin console not served: %s has no index.html", WEB_DIR)
