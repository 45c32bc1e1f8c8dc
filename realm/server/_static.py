"""The playground's files, served from the package directory ``realm/server/static/``.

``GET /`` is its ``index.html``; ``GET /NAME`` (or ``/static/NAME``) a file in it. Only regular
files inside that directory are served: a path with ``..``, a backslash, a NUL or a hidden part
is not looked up, and a path that resolves outside the directory (a link) is refused.
"""

from __future__ import annotations

import mimetypes
import urllib.parse
from pathlib import Path
from typing import Final

from ._http import HttpResponse

STATIC_DIR: Final = Path(__file__).parent / "static"
MAX_FILE_BYTES: Final = 8 << 20
TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
    ".wasm": "application/wasm",
}


def static_file(path: str, root: Path = STATIC_DIR) -> Path | None:
    """The file ``path`` names in ``root``, or None."""
    path = urllib.parse.unquote(path)
    if path in ("", "/"):
        path = "/index.html"
    if path.startswith("/static/"):
        path = path[len("/static") :]
    parts = path.lstrip("/").split("/")
    if any(not p or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None
    try:
        base = root.resolve(strict=True)
        file = (base / Path(*parts)).resolve(strict=True)
    except (OSError, ValueError, RuntimeError):
        return None
    if not file.is_relative_to(base) or not file.is_file():
        return None
    return file


def static_response(path: str, root: Path = STATIC_DIR) -> HttpResponse | None:
    """The response for ``GET path`` if it names a playground file, else None."""
    file = static_file(path, root)
    if file is None:
        return None
    try:
        if file.stat().st_size > MAX_FILE_BYTES:
            return None
        body = file.read_bytes()
    except OSError:
        return None
    ctype = TYPES.get(file.suffix.lower()) or mimetypes.guess_type(file.name)[0]
    return HttpResponse(
        200, body, ctype or "application/octet-stream", (("Cache-Control", "no-cache"),)
    )
