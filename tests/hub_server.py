"""A small Hugging Face hub file server on 127.0.0.1 for the download tests (not a test module).

It speaks what ``huggingface_hub.hf_hub_download`` (2.x) asks of the hub, so the tests run the real download code:

- ``HEAD`` / ``GET {endpoint}/{owner}/{name}/resolve/{revision}/{path}``; ``revision`` is ``main`` or the repo's
  commit. A small file answers 200 with ``ETag`` (its git blob id), ``X-Repo-Commit`` and ``Content-Length``, as the
  hub does for regular files. A large file (``.ckpt``, ``.safetensors``, ``.onnx``) answers 302 to
  ``/cdn/<sha256>`` on another host (a second listener on 127.0.0.2; the client follows same-host redirects itself,
  as it must not for a CDN) with ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, as the hub
  does for LFS files (no Xet headers, so the client downloads over plain HTTP).
- ``GET /cdn/<sha256>`` serves the bytes, with ``Range`` (the client resumes a dropped transfer with it).
- Errors carry the hub's ``X-Error-Code``: ``RepoNotFound`` (401), ``RevisionNotFound`` and ``EntryNotFound`` (404).
- ``drop_always`` / ``drop_once``: file paths whose content transfer stops half-way (the connection is closed after
  half the bytes): always until removed from the set, or once per path.
- ``not_a_hub``: answer every request 200 without the hub's headers (a proxy or captive page in the way).
- ``after_get[path]``: a callable run after that file's bytes were served (e.g. push a new commit to ``main`` in the
  middle of a download); earlier commits stay downloadable by their id.

Every request is recorded in ``requests`` as ``(method, repo_id, path, range)``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".ckpt", ".safetensors", ".onnx", ".bin", ".pth")


class _Repo:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.commit = hashlib.sha1(b"".join(hashlib.sha1(k.encode() + v).digest()
                                            for k, v in sorted(self.files.items()))).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}  # the head of main
        self.history: dict[str, dict[str, _Repo]] = {}  # repo_id -> commit -> repo state
        self.after_get: dict[str, object] = {}
        self.blobs: dict[str, list[tuple[str, str]]] = {}  # sha256 -> every (repo_id, path) with those bytes
        self.requests: list[tuple[str, str | None, str | None, str | None]] = []
        self.drop_always: set[str] = set()
        self.drop_once: set[str] = set()
        self.not_a_hub = False
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # ------------------------------------------------------------------ content
    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Add a repo, or a new commit on its ``main``; returns the commit id."""
        repo = self.repos[repo_id] = _Repo(files)
        self.history.setdefault(repo_id, {})[repo.commit] = repo
        for path, data in repo.files.items():
            self.blobs.setdefault(hashlib.sha256(data).hexdigest(), []).append((repo_id, path))
        return repo.commit

    @staticmethod
    def folder_files(folder: str | os.PathLike, prefix: str = "") -> dict[str, bytes]:
        root = Path(folder)
        return {prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.drop_always.clear()
        self.drop_once.clear()
        self.after_get.clear()
        self.not_a_hub = False

    def content_gets(self) -> list[tuple[str, str]]:
        """``(repo_id, path)`` of every GET that transferred (or began to transfer) a file's bytes."""
        return [(r, p) for m, r, p, _ in list(self.requests) if m == "GET" and p is not None]

    def _log(self, *entry) -> None:
        with self._lock:
            self.requests.append(entry)

    # ------------------------------------------------------------------ server
    @property
    def url(self) -> str:
        host, port = self._servers[0].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        if len(self._servers) > 1:
            host, port = self._servers[1].server_address[:2]
            return f"http://{host}:{port}"
        return f"http://localhost:{self._servers[0].server_address[1]}"  # no 127.0.0.2 here: another name

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, body=False)

            def do_GET(self):
                hub._handle(self, body=True)

        for host in ("127.0.0.1", "127.0.0.2"):
            try:
                server = ThreadingHTTPServer((host, 0), Handler)
            except OSError:
                if host == "127.0.0.1":
                    raise
                continue
            server.daemon_threads = True
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, name=f"fake-hub-{host}", daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _reply(h, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
        h.send_response(status)
        for k, v in headers.items():
            if k != "Content-Length":
                h.send_header(k, v)
        h.send_header("Content-Length", headers.get("Content-Length", str(len(data))))
        h.end_headers()
        if body and data:
            h.wfile.write(data)

    def _error(self, h, status: int, code: str, body: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": code}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._reply(h, status, headers, code.encode(), body)

    def _send_bytes(self, h, data: bytes, paths: list[str], body: bool, extra: dict[str, str]) -> None:
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start = min(int(rng[6:].split("-")[0]), len(data))
        chunk = data[start:]
        headers = dict(extra)
        headers["Accept-Ranges"] = "bytes"
        headers["Content-Length"] = str(len(chunk))
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        drop = body and any(p in self.drop_always or p in self.drop_once for p in paths)
        if not drop:
            self._reply(h, status, headers, chunk, body)
            return
        self.drop_once.difference_update(paths)
        cut = len(data) // 2
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data[start:max(start, cut)])
        h.wfile.flush()
        h.close_connection = True
        try:  # a transfer that stops half-way: the declared length is never reached
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self, h, body: bool) -> None:
        method = "GET" if body else "HEAD"
        parts = h.path.split("?")[0].lstrip("/").split("/")
        if self.not_a_hub:
            self._log(method, None, None, None)
            self._reply(h, 200, {"Content-Type": "text/html"}, b"<html>sign in to continue</html>", body)
            return
        if parts[0] == "cdn" and len(parts) == 2 and parts[1] in self.blobs:
            owners = self.blobs[parts[1]]
            repo_id, path = owners[-1]
            self._log(method, repo_id, path, h.headers.get("Range"))
            data = next(r.files[path] for r in self.history[repo_id].values() if path in r.files
                        and hashlib.sha256(r.files[path]).hexdigest() == parts[1])
            self._send_bytes(h, data, [p for _, p in owners], body, {})
            self._after(body, [p for _, p in owners])
            return
        if len(parts) < 5 or parts[2] != "resolve":
            self._log(method, None, None, h.path)
            self._error(h, 404, "EntryNotFound", body)
            return
        repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            self._log(method, repo_id, None, None)
            self._error(h, 401, "RepoNotFound", body)
            return
        if revision != "main":
            repo = self.history[repo_id].get(revision)
        if repo is None:
            self._log(method, repo_id, None, None)
            self._error(h, 404, "RevisionNotFound", body)
            return
        data = repo.files.get(path)
        if data is None:
            self._log(method, repo_id, None, None)
            self._error(h, 404, "EntryNotFound", body, repo.commit)
            return
        if path.endswith(LFS_SUFFIXES):
            self._log(method, repo_id, None, None)  # metadata or redirect only: the bytes come from /cdn
            sha = hashlib.sha256(data).hexdigest()
            self._reply(h, 302, {"Location": f"{self.cdn_url}/cdn/{sha}", "X-Repo-Commit": repo.commit,
                                 "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                 "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, b"", body)
            return
        self._log(method, repo_id, path if body else None, h.headers.get("Range"))
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        self._send_bytes(h, data, [path], body, {"ETag": f'"{blob}"', "X-Repo-Commit": repo.commit})
        self._after(body, [path])

    def _after(self, body: bool, paths: list[str]) -> None:
        for p in paths:
            hook = self.after_get.pop(p, None) if body else None
            if hook is not None:
                hook()
