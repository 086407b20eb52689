"""A local in-memory fake of the Hugging Face Hub HTTP API for tests (stdlib only).

Protocol-level test double, NOT Hub validation: it serves the endpoints huggingface_hub 2.x, transformers,
peft and datasets call for create-repo / commit (regular + basic LFS) / download / listing (docs/design.md, Stack §7),
so that ``push_to_hub`` and ``from_pretrained`` / ``load_dataset`` code paths run end to end offline. It does
not model auth scopes, Xet, multipart LFS, branches, PRs or real git object ids.

The server binds 127.0.0.1 only. ``conftest.py`` starts one per pytest session at import time and points
``HF_ENDPOINT`` at it (HF libraries read the endpoint at import); the ``fake_hub`` fixture then switches the
offline flags off for one test (see :meth:`FakeHub.activate`).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

FAKE_TOKEN = "hf_fake_token_for_tests"
FAKE_USER = "tester"
LFS_SUFFIXES = (".parquet", ".safetensors", ".bin", ".arrow", ".pt", ".pth", ".npy", ".png", ".jpg", ".zip", ".gz")
_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _File:
    data: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else _git_blob_sha1(self.data)

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": _git_blob_sha1(self.data), "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": hashlib.sha256(self.data).hexdigest(), "size": len(self.data), "pointerSize": 134}
        return entry


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    commits: list[tuple[str, str, dict[str, _File]]] = field(default_factory=list)  # (oid, title, snapshot)

    def snapshot(self, revision: str | None) -> tuple[str, dict[str, _File]] | None:
        if not revision or revision in ("main", "refs/heads/main"):
            oid, _, files = self.commits[-1]
            return oid, files
        for oid, _, files in self.commits:
            if oid == revision:
                return oid, files
        return None


class FakeHub:
    """In-memory Hub state + a ThreadingHTTPServer on 127.0.0.1.

    Attributes: ``endpoint`` (``http://127.0.0.1:<port>``), ``token``, ``user``, ``requests`` (log of
    ``(method, path)``). Helpers: :meth:`list_repo_files`, :meth:`read_file`, :meth:`commit_titles`,
    :meth:`reset`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the fake Hub only binds loopback addresses, got {host!r}")
        self.token, self.user = FAKE_TOKEN, FAKE_USER
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)

    @classmethod
    def start(cls, host: str = "127.0.0.1", port: int = 0) -> FakeHub:
        hub = cls(host, port)
        hub._thread.start()
        return hub

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ state helpers for tests
    def reset(self) -> None:
        """Forget all repos, LFS objects and the request log."""
        with self._lock:
            self.repos.clear()
            self.lfs_objects.clear()
            self.requests.clear()

    def _repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            known = sorted(f"{t}:{r}" for t, r in self.repos)
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the fake Hub; repos: {known}") from None

    def list_repo_files(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Paths in the latest commit of a repo (sorted)."""
        return sorted(self._repo(repo_id, repo_type).commits[-1][2])

    def read_file(self, repo_id: str, path: str, repo_type: str = "model") -> bytes:
        """Raw bytes of ``path`` in the latest commit."""
        return self._repo(repo_id, repo_type).commits[-1][2][path].data

    def commit_titles(self, repo_id: str, repo_type: str = "model") -> list[str]:
        return [title for _, title, _ in self._repo(repo_id, repo_type).commits]

    # ------------------------------------------------------------------ pytest integration
    def activate(self, monkeypatch) -> FakeHub:
        """Make HF libraries talk to this server for one test (all changes undone by ``monkeypatch``).

        Sets ``HF_TOKEN``, turns the offline flags off in the environment, ``huggingface_hub.constants``
        (also read by transformers and peft) and ``datasets.config``, clears HfFileSystem's instance cache,
        and installs a guard that refuses DNS lookups and connections to any non-loopback address.
        """
        import datasets.config
        import huggingface_hub.constants as hub_constants
        from huggingface_hub import HfFileSystem

        if hub_constants.ENDPOINT != self.endpoint:
            raise RuntimeError(
                f"huggingface_hub was imported with HF_ENDPOINT={hub_constants.ENDPOINT!r}, not the fake Hub "
                f"{self.endpoint!r}: HF_ENDPOINT must be set (conftest.py) before HF libraries are imported"
            )
        self.reset()
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.setenv(name, "0")
        monkeypatch.setenv("HF_TOKEN", self.token)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True, raising=False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
        HfFileSystem.clear_instance_cache()
        _install_loopback_guard(monkeypatch)
        return self

    # ------------------------------------------------------------------ request handling
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        path, query = unquote(url.path), parse_qs(url.query)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((h.command, path))
        parts = [p for p in path.split("/") if p]
        try:
            self._route(h, h.command, parts, path, query, body)
        except _HTTPError as err:
            _reply(h, err.status, {"error": err.message}, headers=err.headers)

    def _route(self, h, method, parts, path, query, body) -> None:  # noqa: C901 - a flat routing table
        if method == "GET" and path == "/api/whoami-v2":
            return _reply(h, 200, {"type": "user", "name": self.user, "fullname": "Fake Tester", "orgs": [],
                                   "auth": {"accessToken": {"displayName": "fake", "role": "write"}}})
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(h, json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return _reply(h, 200, {"errors": [], "warnings": []})
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            return self._lfs_put(h, parts[1], body)
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
            repo_type = parts[1][:-1]
            repo = self._get_repo(f"{parts[2]}/{parts[3]}", repo_type)
            rest = parts[4:]
            if method == "GET" and not rest:
                return self._repo_info(h, repo, "main")
            if method == "GET" and rest[0] == "revision":
                return self._repo_info(h, repo, "/".join(rest[1:]))
            if method == "POST" and rest[0] == "preupload":
                return self._preupload(h, json.loads(body))
            if method == "POST" and rest[0] == "commit":
                return self._commit(h, repo, body)
            if method == "GET" and rest[0] == "tree":
                return self._tree(h, repo, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and rest[0] == "paths-info":
                return self._paths_info(h, repo, rest[1], h.headers.get("Content-Type", ""), body)
            raise _HTTPError(404, f"unsupported repo API route {method} {path}")
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(h, json.loads(body))
        if method in ("GET", "HEAD") and "resolve" in parts:
            i = parts.index("resolve")
            repo_type = "dataset" if parts[0] == "datasets" else "space" if parts[0] == "spaces" else "model"
            ns = parts[1:i] if repo_type != "model" else parts[:i]
            if len(ns) != 2 or len(parts) < i + 3:
                raise _HTTPError(404, f"bad resolve url {path}", {"X-Error-Code": "RepoNotFound"})
            repo = self._get_repo("/".join(ns), repo_type)
            return self._resolve(h, repo, parts[i + 1], "/".join(parts[i + 2:]))
        if method == "GET" and path == "/api/agent-harnesses":
            raise _HTTPError(404, "not served by the fake Hub")
        raise _HTTPError(404, f"unsupported route {method} {path}")

    def _get_repo(self, repo_id: str, repo_type: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HTTPError(404, f"Repository {repo_id} not found", {"X-Error-Code": "RepoNotFound"})
        return repo

    def _snapshot(self, repo: _Repo, revision: str) -> tuple[str, dict[str, _File]]:
        snap = repo.snapshot(revision)
        if snap is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
        return snap

    def _create_repo(self, h, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        if repo_type not in _TYPE_PREFIX:
            raise _HTTPError(400, f"unknown repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.endpoint}/{_TYPE_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                return _reply(h, 409, {"error": "You already created this repo", "url": url})
            repo = _Repo(repo_id, repo_type, private=bool(payload.get("private") or payload.get("visibility") == "private"))
            repo.commits.append((_new_oid(repo_id, "init"), "initial commit", {".gitattributes": _File(b"*.parquet filter=lfs\n", False)}))
            self.repos[(repo_type, repo_id)] = repo
        _reply(h, 200, {"url": url, "name": repo_id, "id": repo_id})

    def _repo_info(self, h, repo: _Repo, revision: str) -> None:
        oid, files = self._snapshot(repo, revision)
        _reply(h, 200, {"id": repo.repo_id, "_id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                        "sha": oid, "private": repo.private, "disabled": False, "gated": False, "tags": [],
                        "downloads": 0, "likes": 0, "lastModified": "2026-01-01T00:00:00.000Z",
                        "createdAt": "2026-01-01T00:00:00.000Z",
                        "siblings": [{"rfilename": p, "size": f.data.__len__()} for p, f in sorted(files.items())]})

    def _preupload(self, h, payload: dict) -> None:
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                  "shouldIgnore": False, "oid": None} for f in payload.get("files", [])]
        _reply(h, 200, {"files": files, "commitOid": None})

    def _lfs_batch(self, h, payload: dict) -> None:
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        _reply(h, 200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, h, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HTTPError(400, f"sha256 mismatch for LFS object {oid}")
        with self._lock:
            self.lfs_objects[oid] = body
        _reply(h, 200, {})

    def _commit(self, h, repo: _Repo, body: bytes) -> None:
        with self._lock:
            files = dict(repo.commits[-1][2])
            title = "commit"
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    title = value.get("summary") or title
                elif key == "file":
                    files[value["path"]] = _File(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = self.lfs_objects.get(value["oid"])
                    if data is None:
                        raise _HTTPError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = _File(data, True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise _HTTPError(400, f"unsupported commit operation {key!r}")
            oid = _new_oid(repo.repo_id, title)
            repo.commits.append((oid, title, files))
        prefix = _TYPE_PREFIX[repo.repo_type]
        _reply(h, 200, {"commitUrl": f"{self.endpoint}/{prefix}{repo.repo_id}/commit/{oid}", "commitOid": oid,
                        "commitMessage": title, "pullRequestUrl": None, "success": True})

    def _entries(self, files: dict[str, _File], folder: str, recursive: bool) -> list[dict] | None:
        folder = folder.strip("/")
        prefix = folder + "/" if folder else ""
        if folder and folder not in _directories(files):
            return None
        out: dict[str, dict] = {}
        for p, f in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                d = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    out.setdefault(d, {"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
                if not recursive:
                    break
            if recursive or len(rest) == 1:
                out[p] = f.tree_entry(p)
        return list(out.values())

    def _tree(self, h, repo: _Repo, revision: str, folder: str, query: dict) -> None:
        _, files = self._snapshot(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = self._entries(files, folder, recursive)
        if entries is None:
            raise _HTTPError(404, f"{folder} does not exist on main", {"X-Error-Code": "EntryNotFound"})
        _reply(h, 200, entries)

    def _paths_info(self, h, repo: _Repo, revision: str, content_type: str, body: bytes) -> None:
        _, files = self._snapshot(repo, revision)
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        dirs = _directories(files)
        result = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                result.append(files[p].tree_entry(p))
            elif p in dirs:
                result.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": p})
        _reply(h, 200, result)

    def _resolve(self, h, repo: _Repo, revision: str, path: str) -> None:
        oid, files = self._snapshot(repo, revision)
        headers = {"X-Repo-Commit": oid}
        f = files.get(path)
        if f is None:
            raise _HTTPError(404, f"Entry not found: {path}", {"X-Error-Code": "EntryNotFound", **headers})
        data, status = f.data, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and h.command == "GET":
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = min(int(end_s) if end_s else len(f.data) - 1, len(f.data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(f.data)}"
            data, status = f.data[start:end + 1], 206
        headers.update({"ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"})
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(len(f.data))})
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(data)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _directories(files: dict[str, _File]) -> set[str]:
    dirs = set()
    for p in files:
        parts = p.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return dirs


_OID_COUNTER = [0]


def _new_oid(repo_id: str, title: str) -> str:
    _OID_COUNTER[0] += 1
    return hashlib.sha1(f"{repo_id}\0{title}\0{_OID_COUNTER[0]}\0{time.time_ns()}".encode()).hexdigest()


def _reply(h, status: int, payload, headers: dict | None = None, content_type: str = "application/json") -> None:
    data = json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(data)


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _dispatch(self):
            hub._handle(self)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        def log_message(self, format, *args):  # silence stderr logging
            pass

    return Handler


def _is_loopback_host(host) -> bool:
    if host in (None, "localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host)).is_loopback
    except ValueError:
        return False


class NonLoopbackConnectionError(ConnectionError):
    """Raised by the fake-Hub network guard when code tries to reach anything but 127.0.0.1."""


def _install_loopback_guard(monkeypatch) -> None:
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_loopback_host(host):
            raise NonLoopbackConnectionError(f"fake-Hub test tried to resolve non-loopback host {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback_host(address[0]):
            raise NonLoopbackConnectionError(f"fake-Hub test tried to connect to non-loopback {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
