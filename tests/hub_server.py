"""A local, stdlib-only HTTP server that speaks enough of the Hugging Face Hub API for the real
``huggingface_hub`` client (2.4.x) -- and therefore ``diffusers`` / ``transformers`` ``from_pretrained`` --
to push to it and pull from it in tests, without any network access.

What is implemented (model, dataset and space repos):

* ``GET  /api/whoami-v2``                                   -> the test user
* ``POST /api/repos/create`` / ``DELETE /api/repos/delete`` / ``PUT /api/{type}s/{repo}/settings``
* ``GET  /api/{type}s/{repo}[/revision/{rev}]``              -> repo info (``sha``, ``siblings``, ``private`` ...)
* ``GET  /api/{type}s``                                      -> list repos (``list_models`` / ``list_datasets``)
* ``POST /api/{type}s/{repo}/preupload/{rev}``               -> upload mode (``regular`` or ``lfs``)
* ``POST /{prefix}{repo}.git/info/lfs/objects/batch``        -> LFS batch (basic transfer), then
  ``PUT /lfs-upload/{signature}`` and ``POST /api/lfs-verify``
* ``POST /api/{type}s/{repo}/commit/{rev}``                  -> ndjson commit (file / lfsFile / deletedFile /
  deletedFolder), every commit gets a new 40-hex sha; all commits stay downloadable; ``create_pr=1`` creates
  ``refs/pr/N``
* ``POST|DELETE /api/{type}s/{repo}/branch/{branch}``, ``POST /api/{type}s/{repo}/tag/{rev}``,
  ``DELETE /api/{type}s/{repo}/tag/{tag}``, ``GET /api/{type}s/{repo}/refs``, ``GET .../commits/{rev}``
* ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}``
* ``HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit``, ``Content-Length``,
  ``Range`` support, and ``X-Error-Code`` (``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``) on 404.
* ``POST /api/validate-yaml`` (always valid) and ``GET /api/agent-harnesses`` (empty registry).

Xet is NOT implemented: the client must run with ``HF_HUB_DISABLE_XET=1`` (``setup_test_environment`` sets it,
``hub_online`` enforces it).

Faults: ``HubServer.inject(...)`` makes matching requests fail, a given number of times or until
``clear_faults()``: an HTTP status (e.g. 429 with ``Retry-After``, 500, 503) or a dropped connection (the socket
is closed without an answer). ``WRITE_ENDPOINTS`` names the requests that change a repo.

Authentication: when the server has a ``token``, a request carrying any other bearer token gets
``401 Invalid credentials in Authorization header``; write endpoints without a token get 401; private repos are
invisible (``401`` + ``X-Error-Code: RepoNotFound``) to requests without the token.  Every bearer token the server
sees is appended to ``HubServer.seen_tokens``.

This module must not import ``huggingface_hub`` at import time (``setup_test_environment`` has to run first).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import socketserver
import sys
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

__all__ = [
    "Fault",
    "HubServer",
    "TEST_TOKEN",
    "TEST_USER",
    "WRITE_ENDPOINTS",
    "hub_online",
    "hub_server",
    "setup_test_environment",
]

TEST_TOKEN = "hf_test_token"
TEST_USER = "test-user"

DEFAULT_BRANCH = "main"
LFS_THRESHOLD = 10 * 1024 * 1024  # files of this size or more are uploaded through LFS (like the Hub)
# Patterns tracked by LFS in the `.gitattributes` the Hub puts in every new repo (abridged).
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz",
    "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_SUBPATHS = {
    "revision", "tree", "refs", "commit", "commits", "preupload", "paths-info", "branch", "tag", "settings",
    "resolve", "lfs-files", "discussions", "auth-check", "super-squash", "likers", "like", "treesize",
    "xet-read-token", "xet-write-token", "scan", "parquet", "safetensors-metadata",
}  # fmt: skip
# Requests that change a repo (create, preupload, LFS, commit, tags, branches, settings, delete): what
# `inject(..., path=WRITE_ENDPOINTS)` fails while reads (whoami, downloads) keep working.
WRITE_ENDPOINTS = (
    r"^/api/repos/(create|delete)|/preupload/|/commit/|/(tag|branch)/|/settings$|/info/lfs/objects/batch$"
    r"|^/lfs-upload/|^/api/lfs-verify$"
)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{7,39}$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on"}


class _HubError(Exception):
    """Raised inside request handling; turned into an HTTP error response."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}


class _Repo:
    """In-memory state of one repo (persisted as JSON under the server root)."""

    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type = repo_type
        self.repo_id = repo_id
        self.private = private
        self.created_at = _now()
        self.uid = secrets.token_hex(12)
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.prs: dict[int, str] = {}
        # sha -> {"parents": [...], "tree": {path: entry}, "title", "message", "date"}
        # entry = {"sha256": hex, "size": int, "lfs": bool, "git_sha1": hex (of the content)}
        self.commits: dict[str, dict] = {}

    def to_json(self) -> dict:
        return {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "created_at": self.created_at,
            "uid": self.uid,
            "branches": self.branches,
            "tags": self.tags,
            "prs": {str(k): v for k, v in self.prs.items()},
            "commits": self.commits,
        }

    @classmethod
    def from_json(cls, data: dict) -> "_Repo":
        repo = cls(data["repo_type"], data["repo_id"], data["private"])
        repo.created_at = data["created_at"]
        repo.uid = data["uid"]
        repo.branches = data["branches"]
        repo.tags = data["tags"]
        repo.prs = {int(k): v for k, v in data["prs"].items()}
        repo.commits = data["commits"]
        return repo

    def resolve(self, revision: str | None) -> str | None:
        """Branch, tag, PR ref, full or abbreviated commit sha -> commit sha (None if unknown)."""
        rev = revision or DEFAULT_BRANCH
        if rev.startswith("refs/heads/"):
            return self.branches.get(rev[len("refs/heads/") :])
        if rev.startswith("refs/tags/"):
            return self.tags.get(rev[len("refs/tags/") :])
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m:
            return self.prs.get(int(m.group(1)))
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        low = rev.lower()
        if _HEX40.match(low):
            return low if low in self.commits else None
        if _HEX_PREFIX.match(low):
            matches = [sha for sha in self.commits if sha.startswith(low)]
            if len(matches) == 1:
                return matches[0]
        return None

    def tree(self, sha: str) -> dict[str, dict]:
        return self.commits[sha]["tree"]

    def new_commit(self, parent: str | None, tree: dict[str, dict], title: str, message: str = "") -> str:
        seed = json.dumps(
            [self.repo_type, self.repo_id, parent, sorted(tree.items()), title, message, _now(), secrets.token_hex(8)],
            sort_keys=True,
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        self.commits[sha] = {
            "parents": [parent] if parent else [],
            "tree": tree,
            "title": title,
            "message": message,
            "date": _now(),
        }
        return sha


class Fault:
    """One injected failure: requests whose method matches ``method`` (None: any) and whose raw path matches the
    regex ``path`` get ``status`` (with ``Retry-After: retry_after`` when given) or, with ``drop``, a closed
    connection, for the next ``times`` matching requests (None: until cleared). ``hits`` counts them."""

    def __init__(self, method, path, status, times, retry_after, drop):
        self.method, self.path, self.status = method, re.compile(path), status
        self.remaining, self.retry_after, self.drop = times, retry_after, drop
        self.hits: list[tuple[str, str]] = []

    def matches(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        return (self.method is None or self.method == method) and self.path.search(path) is not None


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive connections of the client must not block stop()
    allow_reuse_address = True
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which may do slow DNS lookups: skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port


class HubServer:
    """Hugging Face Hub-compatible test server. See the module docstring for the supported API.

    Args:
        root: folder where repos and blobs are stored (created if needed; existing repos are loaded).
        token: if set, the only accepted bearer token (see module docstring); if None, no auth at all.
        port: port to listen on (127.0.0.1). 0 picks a free port. If ``setup_test_environment`` reserved this
            port, the reserved socket is reused (no race with other processes).
        lfs_threshold: files at least this big (and files matching ``LFS_PATTERNS``) are uploaded through LFS.
            ``None`` makes every upload "regular" (base64 inside the commit payload).
        init_gitattributes: like the real Hub, create repos with an initial commit holding ``.gitattributes``.
        enforce_private: hide private repos from requests that do not carry the server token.
    """

    def __init__(
        self,
        root: str | Path,
        token: str | None = None,
        port: int = 0,
        *,
        lfs_threshold: int | None = LFS_THRESHOLD,
        init_gitattributes: bool = True,
        enforce_private: bool = True,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "objects").mkdir(exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.init_gitattributes = init_gitattributes
        self.enforce_private = enforce_private
        self.username = TEST_USER

        self.seen_tokens: list[str] = []  # every bearer token received, in order (duplicates kept)
        self.request_log: list[tuple[str, str, int]] = []  # (method, raw path, status)
        self.uploaded_paths: list[str] = []  # every path_in_repo received in a preupload or commit payload

        self.faults: list[Fault] = []

        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blob_info: dict[str, dict] = {}  # sha256 -> {"size", "git_sha1"}
        self._pending_lfs: dict[str, tuple[str, int]] = {}  # signature -> (sha256, size)
        self._thread: threading.Thread | None = None
        self._load()

        self._httpd = self._make_httpd(port)
        self.port: int = self._httpd.server_address[1]
        self.url: str = f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def _make_httpd(self, port: int) -> _ThreadingServer:
        reserved = _RESERVED_SOCKETS.pop(port, None) if port else None
        if reserved is None:
            httpd = _ThreadingServer(("127.0.0.1", port), _Handler)
        else:
            httpd = _ThreadingServer(("127.0.0.1", port), _Handler, bind_and_activate=False)
            httpd.socket.close()
            httpd.socket = reserved
            httpd.server_address = reserved.getsockname()
            httpd.server_name, httpd.server_port = httpd.server_address[:2]
            httpd.server_activate()
        httpd.hub = self  # type: ignore[attr-defined]
        return httpd

    def start(self) -> "HubServer":
        if self._thread is not None:
            return self
        if self._httpd is None:
            self._httpd = self._make_httpd(self.port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()
        self._httpd = None  # type: ignore[assignment]

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults

    def inject(
        self,
        method: str | None = None,
        path: str = ".*",
        *,
        status: int = 500,
        times: int | None = 1,
        retry_after: float | None = None,
        drop: bool = False,
    ) -> Fault:
        """Make the next ``times`` requests matching ``method`` and the ``path`` regex fail (see ``Fault``)."""
        fault = Fault(method, path, status, times, retry_after, drop)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    fault.hits.append((method, path))
                    return fault
        return None

    # ------------------------------------------------------------------ test helpers

    def _get_repo_or_raise(self, repo_id: str, repo_type: str | None) -> _Repo:
        repo = self._repos.get((repo_type or "model", repo_id))
        if repo is None:
            raise KeyError(f"No {repo_type or 'model'} repo {repo_id!r} on the test hub")
        return repo

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type or "model", repo_id) in self._repos

    def repo_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._get_repo_or_raise(repo_id, repo_type).private

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> list[str]:
        """Sorted file paths of the repo at ``revision`` (branch, tag or commit sha)."""
        with self._lock:
            repo = self._get_repo_or_raise(repo_id, repo_type)
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(f"Unknown revision {revision!r} of {repo_id!r}")
            return sorted(repo.tree(sha))

    def read_file(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> bytes:
        with self._lock:
            repo = self._get_repo_or_raise(repo_id, repo_type)
            sha = repo.resolve(revision)
            if sha is None or path not in repo.tree(sha):
                raise KeyError(f"{path!r} not found at {revision!r} of {repo_id!r}")
            entry = repo.tree(sha)[path]
        return self._blob_path(entry["sha256"]).read_bytes()

    def is_lfs(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> bool:
        with self._lock:
            repo = self._get_repo_or_raise(repo_id, repo_type)
            sha = repo.resolve(revision)
            return bool(sha and repo.tree(sha)[path]["lfs"])

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, dict[str, str]]:
        with self._lock:
            repo = self._get_repo_or_raise(repo_id, repo_type)
            return {"branches": dict(repo.branches), "tags": dict(repo.tags)}

    def commit_history(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> list[str]:
        """Commit shas reachable from ``revision`` (first-parent), newest first."""
        with self._lock:
            repo = self._get_repo_or_raise(repo_id, repo_type)
            return self._history(repo, repo.resolve(revision))

    # ------------------------------------------------------------------ storage

    def _repo_file(self, repo: _Repo) -> Path:
        return self.root / "repos" / (repo.repo_type + "s") / repo.repo_id / "repo.json"

    def _save(self, repo: _Repo) -> None:
        path = self._repo_file(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(repo.to_json()))
        os.replace(tmp, path)

    def _load(self) -> None:
        repos_dir = self.root / "repos"
        if not repos_dir.is_dir():
            return
        for path in repos_dir.rglob("repo.json"):
            repo = _Repo.from_json(json.loads(path.read_text()))
            self._repos[(repo.repo_type, repo.repo_id)] = repo

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def _store_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha256)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        with self._lock:
            self._blob_info[sha256] = {"size": len(data), "git_sha1": _git_blob_sha1(data)}
        return sha256

    def _get_blob_info(self, sha256: str) -> dict | None:
        with self._lock:
            info = self._blob_info.get(sha256)
        if info is not None:
            return info
        path = self._blob_path(sha256)
        if not path.is_file():
            return None
        data = path.read_bytes()
        info = {"size": len(data), "git_sha1": _git_blob_sha1(data)}
        with self._lock:
            self._blob_info[sha256] = info
        return info

    def _gitattributes(self) -> bytes:
        return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()

    def _should_use_lfs(self, path: str, size: int) -> bool:
        if self.lfs_threshold is None or size <= 0:
            return False
        name = path.rsplit("/", 1)[-1]
        return size >= self.lfs_threshold or any(fnmatch.fnmatch(name, pat) for pat in LFS_PATTERNS)

    @staticmethod
    def _entry_oid(entry: dict) -> str:
        """Git object id as the Hub reports it (sha1 of the LFS pointer for LFS files)."""
        if entry["lfs"]:
            return _git_blob_sha1(_lfs_pointer(entry["sha256"], entry["size"]))
        return entry["git_sha1"]

    @staticmethod
    def _history(repo: _Repo, sha: str | None) -> list[str]:
        out = []
        while sha:
            out.append(sha)
            parents = repo.commits[sha]["parents"]
            sha = parents[0] if parents else None
        return out

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type, repo_id, private)
        tree: dict[str, dict] = {}
        if self.init_gitattributes:
            data = self._gitattributes()
            sha256 = self._store_bytes(data)
            tree[".gitattributes"] = {
                "sha256": sha256,
                "size": len(data),
                "lfs": False,
                "git_sha1": _git_blob_sha1(data),
            }
        repo.branches[DEFAULT_BRANCH] = repo.new_commit(None, tree, "initial commit")
        self._repos[(repo_type, repo_id)] = repo
        self._save(repo)
        return repo


# Sockets bound by `setup_test_environment`, handed over to the `HubServer` started on that port.
_RESERVED_SOCKETS: dict[int, socket.socket] = {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHubServer/1.0"
    timeout = 300

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        try:
            status = int(code)
        except (TypeError, ValueError):
            status = 0
        self.hub.request_log.append((self.command, self.path, status))

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep test output clean; see HubServer.request_log

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        self._body_consumed = False
        auth = self.headers.get("Authorization")
        if auth is not None:
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
            with self.hub._lock:
                self.hub.seen_tokens.append(token)
        fault = self.hub._take_fault(method, self.path)
        if fault is not None and fault.drop:  # hang up without an answer (the request body is left unread)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            if fault is not None:
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                raise _HubError(fault.status, f"Injected fault: {fault.status}", headers=headers)
            self._route(method)
        except _HubError as err:
            self._send_error(err)
        except ConnectionError:
            self.close_connection = True
        except Exception as err:  # pragma: no cover - server bug: make it visible
            traceback.print_exc(file=sys.stderr)
            self._send_error(_HubError(500, f"Internal test hub error: {err!r}"))

    def _iter_body(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        if self._body_consumed:
            return
        self._body_consumed = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("truncated chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            return
                remaining = size
                while remaining > 0:
                    data = self.rfile.read(min(remaining, chunk_size))
                    if not data:
                        raise ConnectionError("truncated chunked body")
                    remaining -= len(data)
                    yield data
                self.rfile.readline()  # CRLF after each chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                data = self.rfile.read(min(remaining, chunk_size))
                if not data:
                    raise ConnectionError("truncated body")
                remaining -= len(data)
                yield data

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> Any:
        raw = self._read_body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Invalid JSON body: {err}") from err

    def _finish_body(self) -> None:
        """Make sure the request body is consumed so the keep-alive connection stays in sync."""
        if self._body_consumed:
            return
        if self.command in ("GET", "HEAD") and "Content-Length" not in self.headers:
            self._body_consumed = True
            return
        try:
            for _ in self._iter_body():
                pass
        except Exception:
            self.close_connection = True

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str | None = None):
        self._finish_body()
        self.send_response(status)
        headers = dict(headers or {})
        if content_type is not None:
            headers.setdefault("Content-Type", content_type)
        headers.setdefault("Content-Length", str(len(body)))
        headers.setdefault("X-Request-Id", "local-" + secrets.token_hex(6))
        for key, value in headers.items():
            self.send_header(key, str(value))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type="application/json; charset=utf-8")

    def _send_error(self, err: _HubError) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " ")[:1000], **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({**err.body, "error": err.message}, status=err.status, headers=headers)

    # ------------------------------------------------------------------ auth

    def _authenticated(self, write: bool) -> bool:
        """Raise 401 on a wrong token (or a missing one on write endpoints); return True if the token is valid."""
        expected = self.hub.token
        if expected is None:
            return True
        auth = self.headers.get("Authorization")
        if auth is None:
            if write:
                raise _HubError(401, "Authorization header is required for this endpoint (no token provided).")
            return False
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        if token != expected:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> _Repo:
        authenticated = self._authenticated(write)
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository not found: {repo_type} {repo_id}", code="RepoNotFound")
        if repo.private and self.hub.enforce_private and not authenticated:
            raise _HubError(401, f"Repository not found: {repo_type} {repo_id}", code="RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str | None) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return sha

    # ------------------------------------------------------------------ routing

    def _route(self, method: str) -> None:
        split = urlsplit(self.path)
        raw_segments = split.path.split("/")[1:]
        segs = [unquote(s) for s in raw_segments]
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self._query_lists = parse_qs(split.query, keep_blank_values=True)

        if segs and segs[-1] == "":
            segs = segs[:-1]
        if not segs:
            raise _HubError(404, "Not found")

        if segs[0] == "api":
            return self._route_api(method, segs[1:], query)
        if segs[0] == "lfs-upload" and method == "PUT" and len(segs) == 2:
            return self._lfs_upload(segs[1])

        # /{prefix}{repo}.git/info/lfs/objects/batch
        if len(segs) >= 5 and segs[-4:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            repo_type, rest = self._split_type(segs[:-4])
            if rest and rest[-1].endswith(".git"):
                rest = rest[:-1] + [rest[-1][: -len(".git")]]
                return self._lfs_batch(repo_type, "/".join(rest))

        # /{prefix}{repo}/resolve/{revision}/{path}
        if method in ("GET", "HEAD"):
            repo_type, rest = self._split_type(segs)
            for idx in (1, 2):
                if len(rest) > idx + 2 and rest[idx] == "resolve":
                    return self._resolve_file(method, repo_type, "/".join(rest[:idx]), rest[idx + 1], rest[idx + 2 :])
        raise _HubError(404, f"Not found: {method} {split.path}")

    @staticmethod
    def _split_type(segs: list[str]) -> tuple[str, list[str]]:
        if segs and segs[0] in _TYPE_FROM_PLURAL and segs[0] != "models":
            return _TYPE_FROM_PLURAL[segs[0]], segs[1:]
        return "model", segs

    def _route_api(self, method: str, segs: list[str], query: dict[str, str]) -> None:
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if segs == ["agent-harnesses"] and method == "GET":
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if segs == ["validate-yaml"] and method == "POST":
            self._read_body()
            return self._send_json({"errors": [], "warnings": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if segs == ["lfs-verify"] and method == "POST":
            return self._lfs_verify()
        if not segs or segs[0] not in _TYPE_FROM_PLURAL:
            raise _HubError(404, f"Not found: /api/{'/'.join(segs)}")

        repo_type = _TYPE_FROM_PLURAL[segs[0]]
        rest = segs[1:]
        if not rest:
            if method == "GET":
                return self._list_repos(repo_type, query)
            raise _HubError(405, "Method not allowed")
        if len(rest) >= 2 and rest[1] not in _REPO_SUBPATHS:
            repo_id, sub = f"{rest[0]}/{rest[1]}", rest[2:]
        else:
            repo_id, sub = rest[0], rest[1:]

        action = sub[0] if sub else None
        args = sub[1:]
        if action is None and method == "GET":
            return self._repo_info(repo_type, repo_id, None, query)
        if action == "revision" and method == "GET" and args:
            return self._repo_info(repo_type, repo_id, "/".join(args), query)
        if action == "tree" and method == "GET":
            revision = args[0] if args else DEFAULT_BRANCH
            return self._tree(repo_type, repo_id, revision, "/".join(args[1:]), query)
        if action == "paths-info" and method == "POST":
            return self._paths_info(repo_type, repo_id, "/".join(args) or DEFAULT_BRANCH)
        if action == "refs" and method == "GET":
            return self._refs(repo_type, repo_id, query)
        if action == "commits" and method == "GET":
            return self._commits(repo_type, repo_id, "/".join(args) or DEFAULT_BRANCH)
        if action == "preupload" and method == "POST":
            return self._preupload(repo_type, repo_id, "/".join(args) or DEFAULT_BRANCH, query)
        if action == "commit" and method == "POST":
            return self._commit(repo_type, repo_id, "/".join(args) or DEFAULT_BRANCH, query)
        if action == "branch" and args and method in ("POST", "DELETE"):
            return self._branch(method, repo_type, repo_id, "/".join(args))
        if action == "tag" and args and method in ("POST", "DELETE"):
            return self._tag(method, repo_type, repo_id, "/".join(args))
        if action == "settings" and method == "PUT":
            return self._settings(repo_type, repo_id)
        if action == "auth-check" and method == "GET":
            self._repo(repo_type, repo_id)
            return self._send_json({})
        raise _HubError(404, f"Not found: {method} /api/{'/'.join(segs)}")

    # ------------------------------------------------------------------ account / repos

    def _whoami(self) -> None:
        hub = self.hub
        if hub.token is not None and self.headers.get("Authorization") is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        self._authenticated(write=False)
        self._send_json(
            {
                "type": "user",
                "id": "000000000000000000000001",
                "name": hub.username,
                "fullname": "Test User",
                "email": "test-user@example.com",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": "write"}},
            }
        )

    def _create_repo(self) -> None:
        body = self._json_body()
        self._authenticated(write=True)
        name = body.get("name")
        if not name or "/" in name:
            raise _HubError(400, f"Invalid repo name: {name!r}")
        organization = body.get("organization") or self.hub.username
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {repo_type!r}")
        if "visibility" in body and body["visibility"] is not None:
            private = body["visibility"] != "public"
        else:
            private = bool(body.get("private", False))
        repo_id = f"{organization}/{name}"
        url = f"{self.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub._repos:
                # the client reads `url` from the 409 body when exist_ok=True
                raise _HubError(409, "You already created this repo", body={"url": url})
            self.hub._create_repo(repo_type, repo_id, private)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        body = self._json_body()
        self._authenticated(write=True)
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.hub.username}/{body.get('name')}"
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id, write=True)
            del self.hub._repos[(repo_type, repo_id)]
            with contextlib.suppress(FileNotFoundError):
                self.hub._repo_file(repo).unlink()
        self._send_json({})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id, write=True)
            if body.get("visibility") is not None:
                repo.private = body["visibility"] != "public"
            elif body.get("private") is not None:
                repo.private = bool(body["private"])
            self.hub._save(repo)
        self._send_json({})

    def _repo_info_json(self, repo: _Repo, sha: str, blobs: bool) -> dict:
        commit = repo.commits[sha]
        siblings = []
        for path in sorted(commit["tree"]):
            entry = commit["tree"][path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling["size"] = entry["size"]
                sibling["blobId"] = self.hub._entry_oid(entry)
                if entry["lfs"]:
                    pointer = _lfs_pointer(entry["sha256"], entry["size"])
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": len(pointer)}
            siblings.append(sibling)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict[str, Any] = {
            "_id": repo.uid,
            "id": repo.repo_id,
            "author": author,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["tree"].values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info["sdk"] = "static"
        return info

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None, query: dict) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            sha = self._resolve(repo, revision)
            info = self._repo_info_json(repo, sha, blobs=_is_true(query.get("blobs")))
        self._send_json(info)

    def _list_repos(self, repo_type: str, query: dict) -> None:
        authenticated = self._authenticated(write=False)
        author, search = query.get("author"), query.get("search")
        out = []
        with self.hub._lock:
            for (rtype, rid), repo in sorted(self.hub._repos.items()):
                if rtype != repo_type or (repo.private and self.hub.enforce_private and not authenticated):
                    continue
                if author and not rid.startswith(author + "/"):
                    continue
                if search and search.lower() not in rid.lower():
                    continue
                info = self._repo_info_json(repo, repo.branches[DEFAULT_BRANCH], blobs=False)
                out.append(info)
        limit = query.get("limit")
        if limit:
            out = out[: int(limit)]
        self._send_json(out)

    # ------------------------------------------------------------------ listing

    def _tree_entry(self, repo: _Repo, sha: str, path: str, entry: dict | None, expand: bool) -> dict:
        if entry is not None:
            item: dict[str, Any] = {
                "type": "file",
                "oid": self.hub._entry_oid(entry),
                "size": entry["size"],
                "path": path,
            }
            if entry["lfs"]:
                pointer = _lfs_pointer(entry["sha256"], entry["size"])
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
        else:
            tree = repo.tree(sha)
            sub = sorted((p, tree[p]["sha256"]) for p in tree if p.startswith(path + "/"))
            item = {
                "type": "directory",
                "oid": hashlib.sha1(json.dumps(sub).encode()).hexdigest(),
                "size": 0,
                "path": path,
            }
        if expand:
            last = self._last_commit_touching(repo, sha, path, is_file=entry is not None)
            commit = repo.commits[last]
            item["lastCommit"] = {"id": last, "title": commit["title"], "date": commit["date"]}
        return item

    def _last_commit_touching(self, repo: _Repo, sha: str, path: str, is_file: bool) -> str:
        def snapshot(commit_sha: str) -> Any:
            tree = repo.tree(commit_sha)
            if is_file:
                return tree.get(path)
            return sorted((p, e["sha256"]) for p, e in tree.items() if p.startswith(path + "/"))

        current = snapshot(sha)
        while True:
            parents = repo.commits[sha]["parents"]
            if not parents or snapshot(parents[0]) != current:
                return sha
            sha = parents[0]

    @staticmethod
    def _folders(tree: dict[str, dict]) -> set[str]:
        folders = set()
        for path in tree:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folders.add("/".join(parts[:i]))
        return folders

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, query: dict) -> None:
        recursive = _is_true(query.get("recursive"))
        expand = _is_true(query.get("expand"))
        path = path.strip("/")
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            sha = self._resolve(repo, revision)
            tree = repo.tree(sha)
            folders = self._folders(tree)
            if path and path not in folders:
                raise _HubError(
                    404, f"Tree path not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": sha}
                )
            prefix = path + "/" if path else ""
            items = []
            for folder in sorted(folders):
                if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix) :]):
                    items.append(self._tree_entry(repo, sha, folder, None, expand))
            for file_path in sorted(tree):
                if file_path.startswith(prefix) and (recursive or "/" not in file_path[len(prefix) :]):
                    items.append(self._tree_entry(repo, sha, file_path, tree[file_path], expand))
        self._send_json(items, headers={"X-Repo-Commit": sha})

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        raw = self._read_body()
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            body = json.loads(raw or b"{}")
            paths = body.get("paths") or []
            expand = bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = _is_true((form.get("expand") or ["false"])[-1])
        if isinstance(paths, str):
            paths = [paths]
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            sha = self._resolve(repo, revision)
            tree = repo.tree(sha)
            folders = self._folders(tree)
            items = []
            for path in paths:
                path = path.strip("/")
                if path in tree:
                    items.append(self._tree_entry(repo, sha, path, tree[path], expand))
                elif path in folders:
                    items.append(self._tree_entry(repo, sha, path, None, expand))
        self._send_json(items, headers={"X-Repo-Commit": sha})

    def _refs(self, repo_type: str, repo_id: str, query: dict) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            data: dict[str, Any] = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(repo.branches.items())
                ],
                "converts": [],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(repo.tags.items())
                ],
            }
            if _is_true(query.get("include_prs")):
                data["pullRequests"] = [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                    for n, s in sorted(repo.prs.items())
                ]
        self._send_json(data)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            sha = self._resolve(repo, revision)
            items = []
            for commit_sha in self.hub._history(repo, sha):
                commit = repo.commits[commit_sha]
                items.append(
                    {
                        "id": commit_sha,
                        "title": commit["title"],
                        "message": commit["message"],
                        "authors": [{"user": self.hub.username, "avatar": ""}],
                        "date": commit["date"],
                        "formatted": {"title": commit["title"], "message": commit["message"]},
                    }
                )
        self._send_json(items)

    # ------------------------------------------------------------------ branches / tags

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        body = self._json_body()
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id, write=True)
            if method == "DELETE":
                if branch not in repo.branches:
                    raise _HubError(404, f"Branch not found: {branch}", code="RevisionNotFound")
                if branch == DEFAULT_BRANCH:
                    raise _HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
            else:
                if branch in repo.branches:
                    raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
                if not branch or branch.startswith("refs/") or any(c in branch for c in " ~^:?*[\\"):
                    raise _HubError(400, f"Invalid branch name: {branch!r}")
                start = body.get("startingPoint") or DEFAULT_BRANCH
                if body.get("emptyBranch"):
                    repo.branches[branch] = repo.new_commit(None, {}, "empty branch")
                else:
                    repo.branches[branch] = self._resolve(repo, start)
            self.hub._save(repo)
        self._send_json({})

    def _tag(self, method: str, repo_type: str, repo_id: str, arg: str) -> None:
        body = self._json_body()
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id, write=True)
            if method == "DELETE":
                if arg not in repo.tags:
                    raise _HubError(404, f"Tag not found: {arg}", code="RevisionNotFound")
                del repo.tags[arg]
            else:
                tag = body.get("tag")
                if not tag:
                    raise _HubError(400, "Missing 'tag' in payload")
                if tag in repo.tags:
                    raise _HubError(409, f"Reference already exists: refs/tags/{tag}")
                repo.tags[tag] = self._resolve(repo, arg)
            self.hub._save(repo)
        self._send_json({})

    # ------------------------------------------------------------------ uploads

    def _preupload(self, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        body = self._json_body()
        files = body.get("files") or []
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id, write=True)
            sha = self._resolve(repo, revision)
            if not _is_true(query.get("create_pr")) and revision not in repo.branches:
                raise _HubError(400, f"Invalid rev id: {revision} is not a branch", code="RevisionNotFound")
            tree = repo.tree(sha)
            out = []
            for f in files:
                path, size = f["path"], int(f.get("size") or 0)
                self.hub.uploaded_paths.append(path)
                mode = "lfs" if self.hub._should_use_lfs(path, size) else "regular"
                item: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
                existing = tree.get(path)
                if existing is not None:
                    item["oid"] = existing["sha256"] if mode == "lfs" else existing["git_sha1"]
                out.append(item)
        self._send_json({"files": out, "commitOid": sha})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        with self.hub._lock:
            self._repo(repo_type, repo_id, write=True)
        if body.get("operation", "upload") != "upload":
            raise _HubError(400, "Only the 'upload' LFS operation is supported by the test hub")
        objects = []
        for obj in body.get("objects") or []:
            oid, size = str(obj.get("oid", "")).lower(), int(obj.get("size", -1))
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or size < 0:
                objects.append({"oid": oid, "size": max(size, 0), "error": {"code": 422, "message": "Invalid oid"}})
                continue
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub._blob_path(oid).is_file():
                signature = secrets.token_hex(16)
                with self.hub._lock:
                    self.hub._pending_lfs[signature] = (oid, size)
                item["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{signature}", "expires_in": 3600},
                    "verify": {"href": f"{self.hub.url}/api/lfs-verify", "expires_in": 3600},
                }
            objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_upload(self, signature: str) -> None:
        with self.hub._lock:
            pending = self.hub._pending_lfs.get(signature)
        if pending is None:
            raise _HubError(403, "Invalid or expired upload signature")
        oid, size = pending
        sha256 = hashlib.sha256()
        git_sha1 = hashlib.sha1(b"blob %d\0" % size)
        received = 0
        fd, tmp = tempfile.mkstemp(dir=self.hub.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self._iter_body():
                    f.write(chunk)
                    sha256.update(chunk)
                    git_sha1.update(chunk)
                    received += len(chunk)
            if received != size or sha256.hexdigest() != oid:
                raise _HubError(400, f"Uploaded content does not match oid={oid} size={size} (got {received} bytes)")
            final = self.hub._blob_path(oid)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        with self.hub._lock:
            self.hub._pending_lfs.pop(signature, None)
            self.hub._blob_info[oid] = {"size": size, "git_sha1": git_sha1.hexdigest()}
        self._send(200, b"", headers={"ETag": f'"{hashlib.md5(oid.encode()).hexdigest()}"'})

    def _lfs_verify(self) -> None:
        body = self._json_body()
        self._authenticated(write=True)
        oid, size = str(body.get("oid", "")), int(body.get("size", -1))
        info = self.hub._get_blob_info(oid) if re.fullmatch(r"[0-9a-f]{64}", oid) else None
        if info is None or info["size"] != size:
            raise _HubError(404, f"LFS object {oid} not found")
        self._send_json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        raw = self._read_body()
        self._authenticated(write=True)
        try:
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Invalid ndjson commit payload: {err}") from err
        if self.headers.get("Content-Type", "").startswith("application/json") and len(lines) == 1:
            # legacy JSON payload {"summary", "description", "files", "deletedFiles", "lfsFiles"}
            lines = self._legacy_commit_payload(lines[0])
        header: dict = {}
        ops = []
        for item in lines:
            if item.get("key") == "header":
                header = item.get("value") or {}
            else:
                ops.append(item)
        create_pr = _is_true(query.get("create_pr"))

        # Decode/store regular file contents outside the lock.
        prepared = []
        for op in ops:
            key, value = op.get("key"), op.get("value") or {}
            path = self._check_path(value.get("path", ""), allow_folder=key == "deletedFolder")
            if key in ("file", "lfsFile"):
                self.hub.uploaded_paths.append(path)
            if key == "file":
                content = value.get("content", "")
                encoding = value.get("encoding", "utf-8")
                data = base64.b64decode(content) if encoding == "base64" else content.encode()
                sha256 = self.hub._store_bytes(data)
                entry = {"sha256": sha256, "size": len(data), "lfs": False, "git_sha1": _git_blob_sha1(data)}
                prepared.append(("add", path, entry))
            elif key == "lfsFile":
                oid = str(value.get("oid", "")).lower()
                info = self.hub._get_blob_info(oid) if re.fullmatch(r"[0-9a-f]{64}", oid) else None
                if info is None:
                    raise _HubError(422, f"LFS object {oid} for {path!r} was not uploaded")
                entry = {"sha256": oid, "size": info["size"], "lfs": True, "git_sha1": info["git_sha1"]}
                prepared.append(("add", path, entry))
            elif key == "deletedFile":
                prepared.append(("delete", path, None))
            elif key == "deletedFolder":
                prepared.append(("delete_folder", path, None))
            else:
                raise _HubError(400, f"Unknown commit operation key: {key!r}")

        with self.hub._lock:
            repo = self._repo(repo_type, repo_id, write=True)
            base = self._resolve(repo, revision)
            if not create_pr and revision not in repo.branches:
                if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in repo.branches:
                    revision = revision[len("refs/heads/") :]
                else:
                    raise _HubError(400, f"Invalid rev id: {revision} is not a branch", code="RevisionNotFound")
            parent_commit = header.get("parentCommit")
            if parent_commit and not create_pr and not base.startswith(str(parent_commit).lower()):
                raise _HubError(412, f"A commit has happened since. Parent commit {parent_commit} is not {base}.")
            if parent_commit and create_pr:
                base = self._resolve(repo, str(parent_commit))
            tree = dict(repo.tree(base))
            for kind, path, entry in prepared:
                if kind == "add":
                    tree[path] = entry
                elif kind == "delete":
                    if path not in tree:
                        raise _HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                    del tree[path]
                else:
                    prefix = path.strip("/") + "/" if path.strip("/") else ""
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise _HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                    for p in doomed:
                        del tree[p]
            sha = repo.new_commit(base, tree, header.get("summary") or "Update", header.get("description") or "")
            prefix_url = f"{self.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
            pr_url = None
            if create_pr:
                num = max(repo.prs, default=0) + 1
                repo.prs[num] = sha
                pr_url = f"{prefix_url}/discussions/{num}"
            else:
                repo.branches[revision] = sha
            self.hub._save(repo)
        self._send_json(
            {"success": True, "commitOid": sha, "commitUrl": f"{prefix_url}/commit/{sha}", "pullRequestUrl": pr_url}
        )

    @staticmethod
    def _legacy_commit_payload(payload: dict) -> list[dict]:
        items = [
            {"key": "header", "value": {"summary": payload.get("summary"), "description": payload.get("description")}}
        ]
        items += [{"key": "file", "value": f} for f in payload.get("files") or []]
        items += [{"key": "lfsFile", "value": f} for f in payload.get("lfsFiles") or []]
        items += [{"key": "deletedFile", "value": f} for f in payload.get("deletedFiles") or []]
        return items

    @staticmethod
    def _check_path(path: str, allow_folder: bool = False) -> str:
        clean = path.strip("/") if allow_folder else path
        parts = clean.split("/")
        if (not clean and not allow_folder) or clean.startswith("/") or any(p in ("..", ".") for p in parts):
            raise _HubError(400, f"Invalid path in repo: {path!r}")
        if not allow_folder and any(p == "" for p in parts):
            raise _HubError(400, f"Invalid path in repo: {path!r}")
        return clean

    # ------------------------------------------------------------------ downloads

    def _resolve_file(self, method: str, repo_type: str, repo_id: str, revision: str, path_parts: list[str]) -> None:
        path = "/".join(path_parts)
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            sha = self._resolve(repo, revision)
            entry = repo.tree(sha).get(path)
            if entry is None:
                raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": sha})
            entry = dict(entry)
        blob = self.hub._blob_path(entry["sha256"])
        size = entry["size"]
        etag = entry["sha256"] if entry["lfs"] else entry["git_sha1"]
        filename = path.rsplit("/", 1)[-1]
        headers = {
            "ETag": f'"{etag}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename)}; filename=\"{filename}\"",
            "Cache-Control": "private, max-age=0",
        }
        if entry["lfs"]:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(size)

        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and size > 0:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
            if m is None or (not m.group(1) and not m.group(2)):
                raise _HubError(416, f"Invalid range {range_header!r}", headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start = max(size - int(m.group(2)), 0)
            if start > end or start >= size:
                raise _HubError(
                    416, f"Unsatisfiable range {range_header!r}", headers={"Content-Range": f"bytes */{size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        headers["Content-Length"] = str(length)

        self._finish_body()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        with open(blob, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


# ---------------------------------------------------------------------------------------------------------------------
# Test-session helpers
# ---------------------------------------------------------------------------------------------------------------------

_TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HUGGINGFACE_CO_STAGING")
_CACHE_ENV_VARS = (
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
    "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE", "DIFFUSERS_CACHE",
)  # fmt: skip
_OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_OFFLINE_ATTRS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PATCHED_PACKAGES = ("huggingface_hub", "diffusers", "transformers", "peft", "accelerate", "datasets")


def setup_test_environment(tmp_root: Path) -> None:
    """Point the Hugging Face stack at a fresh HF_HOME and at the local test hub, in offline mode by default.

    Must run before ``huggingface_hub`` (or diffusers/transformers) is imported: those read these environment
    variables once, at import time. Reserves a free 127.0.0.1 port (kept bound until the ``hub_server`` fixture
    starts the server on it) and sets ``HF_ENDPOINT`` to it.
    """
    if "huggingface_hub" in sys.modules:
        import warnings

        warnings.warn(
            "setup_test_environment() called after huggingface_hub was imported: HF_ENDPOINT/HF_HOME/offline "
            "settings will not be picked up by modules that already read them.",
            stacklevel=2,
        )
    tmp_root = Path(tmp_root)
    hf_home = tmp_root / "hf_home"
    hf_home.mkdir(parents=True, exist_ok=True)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    _RESERVED_SOCKETS[port] = sock

    for var in _TOKEN_ENV_VARS + _CACHE_ENV_VARS:
        os.environ.pop(var, None)
    os.environ.update(
        {
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        }
    )


def _reserved_port() -> int:
    endpoint = os.environ.get("HF_ENDPOINT", "")
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/?", endpoint)
    if m is None:
        raise RuntimeError(
            f"HF_ENDPOINT={endpoint!r} does not point to a local test hub: call "
            "hub_server.setup_test_environment() in conftest.py before anything imports huggingface_hub."
        )
    return int(m.group(1))


_ONLINE_LOCK = threading.RLock()


@contextlib.contextmanager
def hub_online() -> Iterator[None]:
    """Temporarily disable the Hugging Face offline mode in this process (and in subprocesses started meanwhile).

    huggingface_hub 2.4 decides per request via ``huggingface_hub.constants.is_offline_mode()``, which returns the
    module global ``constants.HF_HUB_OFFLINE`` (read from the env at import time); transformers calls that function.
    diffusers (``utils.hub_utils``, ``loaders.lora_base``, ``models.attention_dispatch``) and datasets
    (``config``) hold *copies* of the flag made at import time, and peft re-reads the env var. So this patches:
    the env vars HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE (-> "0"), and every boolean
    ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` global of already imported modules of
    huggingface_hub, diffusers, transformers, peft, accelerate and datasets. On exit everything is restored, and
    modules first imported inside the block (which copied ``False``) are reset to the offline value too.
    ``constants.HF_HUB_DISABLE_XET`` is forced to True inside the block (the test hub has no Xet backend).
    """
    import huggingface_hub.constants as hf_constants

    with _ONLINE_LOCK:
        offline_before = bool(hf_constants.HF_HUB_OFFLINE)
        saved_env = {var: os.environ.get(var) for var in _OFFLINE_ENV_VARS}
        saved_xet = hf_constants.HF_HUB_DISABLE_XET
        patched: list[tuple[Any, str, Any]] = []
        seen_modules: set[str] = set()
        for name, module in list(sys.modules.items()):
            if module is None or not name.startswith(_PATCHED_PACKAGES):
                continue
            seen_modules.add(name)
            namespace = getattr(module, "__dict__", {})
            for attr in _OFFLINE_ATTRS:
                value = namespace.get(attr)
                if isinstance(value, bool) and value:
                    patched.append((module, attr, value))
                    setattr(module, attr, False)
        for var in _OFFLINE_ENV_VARS:
            os.environ[var] = "0"
        hf_constants.HF_HUB_DISABLE_XET = True
        try:
            yield
        finally:
            for module, attr, value in reversed(patched):
                setattr(module, attr, value)
            if offline_before:
                for name, module in list(sys.modules.items()):
                    if module is None or name in seen_modules or not name.startswith(_PATCHED_PACKAGES):
                        continue
                    namespace = getattr(module, "__dict__", {})
                    for attr in _OFFLINE_ATTRS:
                        if namespace.get(attr) is False:
                            setattr(module, attr, True)
            for var, value in saved_env.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
            hf_constants.HF_HUB_DISABLE_XET = saved_xet


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """Session-wide local hub listening on the port reserved by ``setup_test_environment`` (token ``TEST_TOKEN``)."""
    port = _reserved_port()
    server = HubServer(tmp_path_factory.mktemp("hub_server"), token=TEST_TOKEN, port=port).start()
    try:
        import huggingface_hub.constants as hf_constants

        if hf_constants.ENDPOINT.rstrip("/") != server.url:
            raise RuntimeError(
                f"huggingface_hub points to {hf_constants.ENDPOINT!r}, not to the test hub {server.url!r}: "
                "setup_test_environment() must run before huggingface_hub is imported."
            )
        yield server
    finally:
        server.stop()
