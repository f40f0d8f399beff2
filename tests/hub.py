"""A stand-in for the Hugging Face Hub on 127.0.0.1, for download tests through ``HF_ENDPOINT``.

It answers what ``huggingface_hub`` asks for, the way the Hub answers it:

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: a redirect to ``/lfs/{sha256}`` carrying
  ``X-Repo-Commit``, ``X-Linked-Etag`` and ``X-Linked-Size`` (as for an LFS file), or 404 with
  ``X-Error-Code: EntryNotFound`` / ``RepoNotFound``;
- ``GET /lfs/{sha256}`` on a second origin (the CDN): the bytes, honouring ``Range: bytes=START-[END]`` (206);
- ``GET /api/models/{repo}/tree/{revision}[/{folder}]``: the file listing (``list_repo_tree``,
  ``list_repo_files``);
- ``GET /api/models/{repo}[/revision/{revision}]``: the repo info with its ``siblings``
  (``model_info``, ``snapshot_download``).

A test can cut a transfer after N bytes (the connection closes mid-body, as a dropped network
does), hold one there until it calls ``release()``, advertise a different size, and read the
requests that came in (method, path, Range and Authorization headers).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "4f1d0c6e2b8a7d9e3c5f1a0b2d4e6f8091a3c5e7"
HOLD_LIMIT_S = 60.0  # a held transfer never outlives a test that forgot to release it


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None = None


class Hub:
    """``with Hub() as hub: hub.add(repo, path, data); env HF_ENDPOINT=hub.endpoint``."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> path -> content
        self._blobs: dict[str, bytes] = {}  # sha256 -> content
        self.advertised_size: dict[str, int] = {}  # path -> size claimed (X-Linked-Size, listings)
        self.requests: list[Request] = []
        self.cuts: list[int] = []  # each GET of file bytes takes the next: stop after that many bytes
        self.hold_after: int | None = None  # the next GET of file bytes pauses after this many bytes
        self.holding = threading.Event()  # set once a held transfer has sent its bytes
        self._released = threading.Event()
        self._lock = threading.Lock()
        # The Hub, and a second origin for the file bytes (the Hub's CDN: a redirect there is not
        # followed by HEAD, so the metadata comes from the redirect itself, as in real use).
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(self)) for _ in range(2)]
        self._threads = []
        for server in self._servers:
            server.daemon_threads = True
            self._threads.append(threading.Thread(target=server.serve_forever, daemon=True))

    @property
    def endpoint(self) -> str:
        return _origin(self._servers[0])

    @property
    def cdn(self) -> str:
        return _origin(self._servers[1])

    def add(self, repo: str, path: str, data: bytes) -> None:
        self.files.setdefault(repo, {})[path] = data
        self._blobs[hashlib.sha256(data).hexdigest()] = data

    def release(self) -> None:
        self._released.set()

    def file_requests(self) -> list[Request]:
        """The GETs of file bytes, in order."""
        return [r for r in self.requests if r.method == "GET" and r.path.startswith("/lfs/")]

    def __enter__(self) -> Hub:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _take_cut(self) -> tuple[int | None, bool]:
        """Where the next transfer stops, and whether it then waits for ``release()``."""
        with self._lock:
            if self.hold_after is not None:
                at, self.hold_after = self.hold_after, None
                return at, True
            return (self.cuts.pop(0) if self.cuts else None), False


def _origin(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            headers = self.headers
            hub.requests.append(
                Request(self.command, path, headers.get("Range"), headers.get("Authorization"))
            )
            if match := re.fullmatch(r"/lfs/([0-9a-f]{64})", path):
                return self._send_blob(match[1], body)
            if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                return self._send_tree(match[1], match[3] or "")
            if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
                return self._send_info(match[1])
            if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._send_resolve(match[1], match[3])
            self._send_error(404, "RepoNotFound", "no such endpoint")

        def _send_resolve(self, repo: str, name: str) -> None:
            if repo not in hub.files:
                return self._send_error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            data = hub.files[repo].get(name)
            if data is None:
                return self._send_error(404, "EntryNotFound", f"Entry Not Found for url: {self.path}.")
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"{hub.cdn}/lfs/{sha}")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(hub.advertised_size.get(name, len(data))))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send_blob(self, sha: str, body: bool) -> None:
            data = hub._blobs.get(sha)
            if data is None:
                return self._send_error(404, "EntryNotFound", "no such blob")
            start, end = 0, len(data)
            requested = self.headers.get("Range")
            if requested and (match := re.fullmatch(r"bytes=(\d+)-(\d*)", requested)):
                start, end = int(match[1]), int(match[2]) + 1 if match[2] else len(data)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{sha}"')
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not body:
                return
            cut, hold = hub._take_cut()
            if cut is None:
                self.wfile.write(data[start:end])
                return
            self.wfile.write(data[start : min(end, start + cut)])
            self.wfile.flush()
            if hold:
                hub.holding.set()
                hub._released.wait(HOLD_LIMIT_S)
            self.close_connection = True  # the client sees the body end early

        def _send_tree(self, repo: str, folder: str) -> None:
            if repo not in hub.files:
                return self._send_error(404, "RepoNotFound", "Repository not found")
            prefix = folder.rstrip("/") + "/" if folder else ""
            entries = []
            for name, data in sorted(hub.files[repo].items()):
                if name.startswith(prefix):
                    sha = hashlib.sha256(data).hexdigest()
                    size = hub.advertised_size.get(name, len(data))
                    entries.append(
                        {
                            "type": "file",
                            "oid": hashlib.sha1(data).hexdigest(),
                            "size": size,
                            "path": name,
                            "lfs": {"oid": sha, "size": size, "pointerSize": 134},
                        }
                    )
            self._send_json(entries)

        def _send_info(self, repo: str) -> None:
            if repo not in hub.files:
                return self._send_error(404, "RepoNotFound", "Repository not found")
            siblings = [
                {"rfilename": name, "size": len(data)} for name, data in sorted(hub.files[repo].items())
            ]
            self._send_json(
                {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}
            )

        def _send_json(self, value: object) -> None:
            payload = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

        def _send_error(self, status: int, code: str, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

    return Handler
