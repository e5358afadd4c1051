"""Result files of ``d3s2 serve`` bound to the visitor's browser session (issue 22, case 11).

Gradio serves every file a page shows from ``/gradio_api/file=<server path>``; its cache folders are named by a
content hash (64 hex digits), unguessable, but anyone who obtains the URL (a shared link, a proxy log, the browser
history of a shared machine) could fetch another visitor's mesh. Here each browser gets a random session cookie
(``d3s2_session``: 256 bits, ``HttpOnly`` so page scripts cannot read it, ``SameSite=Lax`` so other sites cannot make
the browser send it with their requests; not ``Secure``, because the page is served over plain HTTP on loopback by
default). A finished mesh is copied into Gradio's cache by :func:`publish_result`, which records the cookie of the
request that generated it; :class:`SessionBinding`, an ASGI middleware in front of the Gradio app, answers 404 to a
request for a recorded file that does not carry one of its owners' cookies. Files that were never recorded (the bundled
examples, Gradio's own assets) are left to Gradio's checks.

Not bound: the upload and its crop preview, which hold the visitor's own image and are named by its content hash (to
build the URL one needs the image itself).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from pathlib import Path
from urllib.parse import unquote

__all__ = ["COOKIE", "ResultOwners", "SessionBinding", "session_token", "publish_result", "cookie_header"]

log = logging.getLogger("d3s2.serve")

COOKIE = "d3s2_session"
_TOKEN = re.compile(r"^[0-9a-f]{64}$")
_FILE_ROUTE = "/file="


def _valid(token: str | None) -> bool:
    return bool(token) and _TOKEN.match(token) is not None


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


class ResultOwners:
    """Thread-safe map: real path of a published file -> session tokens allowed to fetch it."""

    def __init__(self, max_entries: int = 100_000):
        self._owners: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def bind(self, path: str | os.PathLike, token: str | None) -> None:
        """Record ``token`` as an owner of ``path``; without a valid token nobody can fetch it (bound to no one)."""
        key = _key(path)
        with self._lock:
            if len(self._owners) >= self.max_entries:
                self._owners = {k: v for k, v in self._owners.items() if os.path.exists(k)}
            owners = self._owners.setdefault(key, set())
            if _valid(token):
                owners.add(token)

    def is_bound(self, path: str | os.PathLike) -> bool:
        with self._lock:
            return _key(path) in self._owners

    def may_fetch(self, path: str | os.PathLike, token: str | None) -> bool:
        """False only for a bound file that ``token`` does not own."""
        with self._lock:
            owners = self._owners.get(_key(path))
        return owners is None or (_valid(token) and token in owners)


def _cookies(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k:
                    out.setdefault(k, v)
    return out


def session_token(cookies) -> str | None:
    """The valid session token in a cookie mapping (a request's ``cookies``), or None."""
    token = (cookies or {}).get(COOKIE)
    return token if _valid(token) else None


def cookie_header(token: str) -> bytes:
    return f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax".encode("latin-1")


class SessionBinding:
    """ASGI middleware: gives each browser a session cookie and refuses bound files to other sessions (404)."""

    def __init__(self, app, owners: ResultOwners):
        self.app, self.owners = app, owners

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        token = session_token(_cookies(scope))
        path = scope.get("path", "")
        at = path.find(_FILE_ROUTE)
        if at >= 0:
            target = unquote(path[at + len(_FILE_ROUTE):])
            if not self.owners.may_fetch(target, token):
                log.info("d3s2 serve: refused a result file to another session")
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"cache-control", b"no-store")]})
                await send({"type": "http.response.body", "body": b"Not found"})
                return None
        if token is not None:
            return await self.app(scope, receive, send)
        new = secrets.token_hex(32)

        async def send_with_cookie(message):
            if message.get("type") == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"set-cookie", cookie_header(new))]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


def publish_result(paths: list[str | os.PathLike], token: str | None, owners: ResultOwners,
                   cache_dir: str | os.PathLike) -> list[str]:
    """Copy each result file into Gradio's cache (where the page fetches it; content-hash folders) and bind the copy
    to ``token``; returns the cached paths, in order. Without a session cookie the copies are bound to no one."""
    from gradio.processing_utils import save_file_to_cache

    if token is None:
        log.warning("d3s2 serve: a generation request without a session cookie; its result cannot be fetched")
    out = []
    for p in paths:
        cached = save_file_to_cache(os.fspath(p), os.fspath(cache_dir))
        owners.bind(cached, token)
        out.append(str(Path(cached)))
    return out
