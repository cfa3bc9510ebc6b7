"""The admin console: the static files of apps/web, served at /admin on the API's own origin.

Same origin, so the console calls the public `/collection` endpoints with no CORS, and a newcomer's
`make run` serves it with no build step. The console's files hold all its scripts and styles (nothing
inline), so its pages can be held to a strict Content-Security-Policy, which the request middleware
(observability.py) adds to every /admin response with the other security headers.
"""

from __future__ import annotations

import logging
import os

from fastapi import APIRouter
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from app.config import packaged

logger = logging.getLogger(__name__)

WEB_DIR = packaged("web")


class ConsoleFiles(StaticFiles):
    """apps/web, revalidated on every load (cheap with the ETag), so a browser never mixes the modules
    of two versions of the console."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        return response


def console_router() -> APIRouter:
    """/admin: the console's files, when this installation has them."""
    router = APIRouter(include_in_schema=False)
    if (WEB_DIR / "index.html").is_file():
        # /admin redirects to /admin/, which serves index.html (html=True); the rest are its assets.
        router.mount("/admin", ConsoleFiles(directory=WEB_DIR, html=True), name="admin")
    else:
        logger.warning("admin console not served: %s has no index.html", WEB_DIR)
    return router
