"""A fake Hugging Face Hub on loopback: just enough of the Hub's HTTP API for `huggingface_hub` uploads.

`FakeHub` serves the routes that `HfApi.create_repo`, `upload_folder` / `create_commit` (preupload + NDJSON commit),
`repo_info`, `HfFileSystem` (tree, paths-info, resolve) and `datasets.Dataset.push_to_hub` call, keeps the repositories
in memory, and records every request (method, path, headers, body) and every commit (path -> bytes), so tests can check
what a `push_to_hub` really sends. Text files are answered as `"regular"` uploads (their bytes go base64 in the
commit); binary weights and data files (`*.safetensors`, `*.bin`, `*.parquet`, ...) as `"lfs"`, as the Hub's default
`.gitattributes` does, and go through the LFS batch API with the "basic" transfer (one PUT, then verify) to this same
server. `datasets` needs that: it deletes each parquet shard right after its preupload. The Xet transfer is switched off
in the clients (`HF_HUB_DISABLE_XET`), since its storage protocol is not HTTP JSON. Anything else is answered 404 with a
message naming the request, and listed in `unhandled`, so a test shows which part of the API is missing.

```python
with FakeHub(token="hf_x") as hub:
    hub.patch_clients(monkeypatch)
    HfApi().upload_folder(repo_id="user/model", folder_path="out", token="hf_x")
assert "README.md" in hub.repo_files("user/model")
```
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO = r"(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_WEB_REPO = r"(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)"
_LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".arrow", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".pkl", ".npy",
                 ".gguf", ".zip", ".gz", ".tar", ".model", ".msgpack")  # fmt: skip
_LFS_MIN_SIZE = 10 * 1024 * 1024
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(rf"^/api/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("POST", re.compile(rf"^/api/{_REPO}/paths-info/(?P<rev>[^/]+)$"), "paths_info"),
    ("GET", re.compile(rf"^/{_WEB_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_WEB_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("POST", re.compile(rf"^/{_WEB_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/fake-lfs/objects/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
    ("POST", re.compile(r"^/fake-lfs/verify/(?P<oid>[0-9a-f]{64})$"), "lfs_verify"),
]  # fmt: skip


def git_blob_sha(data: bytes) -> str:
    """The git object id of `data` as a blob (what the Hub calls a regular file's `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    """Whether the fake Hub stores this file with LFS: binary weight/data suffixes, or 10 MiB and more."""
    return path.endswith(_LFS_SUFFIXES) or size >= _LFS_MIN_SIZE


def _oid(path: str, data: bytes) -> str:
    """The oid the preupload answer gives for an existing file: sha256 for LFS files, the git blob id otherwise (what
    `CommitOperationAdd._local_oid` compares it with, to skip unchanged files)."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path, len(data)) else git_blob_sha(data)


@dataclass
class RecordedRequest:
    """One HTTP request as the fake Hub received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    """One commit the fake Hub accepted: the files it added (path -> bytes, LFS files resolved to their uploaded
    content), which of them came as LFS pointers, and the paths it deleted."""

    repo_type: str
    repo_id: str
    revision: str
    oid: str
    summary: str
    files: dict[str, bytes]
    lfs: list[str]
    deleted: list[str]


@dataclass
class FakeRepo:
    """A repository: its head commit's files on `main`, and a snapshot of the files at every commit id."""

    repo_type: str
    repo_id: str
    private: bool
    head: str
    files: dict[str, bytes]
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)


class HubError(Exception):
    """An error answer: HTTP status, message, and the `X-Error-Code` that `huggingface_hub` maps to its errors."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    server: _HubHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the recorded requests say what happened

    def do_GET(self) -> None:
        self.server.hub._dispatch(self)

    def do_HEAD(self) -> None:
        self.server.hub._dispatch(self)

    def do_POST(self) -> None:
        self.server.hub._dispatch(self)

    def do_PUT(self) -> None:
        self.server.hub._dispatch(self)

    def do_DELETE(self) -> None:
        self.server.hub._dispatch(self)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub


class FakeHub:
    """The fake Hub server (a context manager). `token`: when given, write requests (repo creation, preupload,
    commit) must carry `Authorization: Bearer <token>`, others are answered 401 as the Hub does; reads are public."""

    def __init__(self, *, token: str | None = None, user: str = "user") -> None:
        self.token = token
        self.user = user
        self.requests: list[RecordedRequest] = []
        self.commits: list[Commit] = []
        self.unhandled: list[str] = []
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle -----

    def start(self) -> FakeHub:
        self._server = _HubHTTPServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The endpoint to give clients (what `HF_ENDPOINT` would hold)."""
        if self._server is None:
            raise RuntimeError("FakeHub is not running.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def patch_clients(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point `huggingface_hub`, `transformers` and `datasets` of this process at this server, online, until
        `monkeypatch` undoes it at the end of the test.

        `HF_ENDPOINT` and `HF_HUB_OFFLINE` are read once at import into module constants (`datasets` copies them
        into its own config, and `transformers` caches one `HfApi`), so setting the environment is not enough: the
        copies are patched too. Telemetry is switched off, so only the calls under test reach the server, and so is
        the Xet transfer, so that binary files take the LFS route this server implements.
        """
        import datasets.config
        import huggingface_hub.constants as hub_constants
        import transformers.utils.hub as transformers_hub

        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(hub_constants, "ENDPOINT", self.url)
        monkeypatch.setattr(
            hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", self.url)
        monkeypatch.setattr(
            datasets.config, "HUB_DATASETS_URL", self.url + "/datasets/{repo_id}/resolve/{revision}/{path}"
        )
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt on first use, with the new endpoint

    # ----- what tests read -----

    def repo_files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """The files on `main` of a repository (path -> bytes)."""
        return dict(self.repos[(repo_type, repo_id)].files)

    def committed_files(self) -> dict[str, list[bytes]]:
        """Every file content any commit added, by path (a path committed twice has two entries)."""
        out: dict[str, list[bytes]] = {}
        for commit in self.commits:
            for path, data in commit.files.items():
                out.setdefault(path, []).append(data)
        return out

    # ----- dispatch -----

    def _dispatch(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        body = handler.read_body()
        record = RecordedRequest(
            method=handler.command,
            path=split.path,
            query=parse_qs(split.query),
            headers={name: value for name, value in handler.headers.items()},
            body=body,
        )
        with self._lock:
            self.requests.append(record)
        try:
            for method, pattern, name in _ROUTES:
                match = pattern.match(split.path)
                if method == handler.command and match:
                    with self._lock:
                        status, payload, headers = getattr(self, "_" + name)(record, match.groupdict())
                    break
            else:
                self.unhandled.append(f"{handler.command} {handler.path}")
                raise HubError(404, f"fake Hub: no handler for {handler.command} {handler.path}")
        except HubError as err:
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            handler.send(err.status, json.dumps({"error": err.message}).encode(), headers)
            return
        if isinstance(payload, bytes):
            handler.send(status, payload, headers)
        else:
            handler.send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})

    # ----- helpers -----

    def _check_write_token(self, request: RecordedRequest) -> None:
        authorization = request.headers.get("Authorization") or request.headers.get("authorization")
        if authorization is None or not authorization.startswith("Bearer "):
            raise HubError(401, "fake Hub: write requests need an Authorization: Bearer <token> header")
        if self.token is not None and authorization != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, groups: dict[str, str | None]) -> FakeRepo:
        repo_type = _TYPES[groups.get("kind") or "models"]
        repo_id = unquote(groups["repo"] or "")
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_type}/{repo_id} not found", "RepoNotFound")
        return repo

    def _snapshot(self, repo: FakeRepo, revision: str | None) -> tuple[str, dict[str, bytes]]:
        revision = unquote(revision) if revision else "main"
        if revision == "main":
            return repo.head, repo.files
        if revision in repo.snapshots:
            return revision, repo.snapshots[revision]
        raise HubError(404, f"Revision {revision} not found in {repo.repo_id}", "RevisionNotFound")

    def _commit_files(self, repo: FakeRepo, files: dict[str, bytes]) -> str:
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.head, repo.files = oid, files
        repo.snapshots[oid] = dict(files)
        return oid

    @staticmethod
    def _entry(path: str, data: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
        if is_lfs(path, len(data)):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    @staticmethod
    def _folder(path: str) -> dict[str, Any]:
        return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}

    # ----- routes: each returns (status, JSON payload or bytes, extra headers) -----

    def _whoami(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        self._check_write_token(request)
        return 200, {"type": "user", "name": self.user, "auth": {"accessToken": {"role": "write"}}}, {}

    def _validate_yaml(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        return 200, {"errors": [], "warnings": []}, {}

    def _create_repo(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        self._check_write_token(request)
        body = json.loads(request.body or b"{}")
        name, organization = body["name"], body.get("organization") or self.user
        repo_type = body.get("type") or "model"
        repo_id = f"{organization}/{name}"
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return 409, {"error": "You already created this repo", "url": url}, {}
        repo = FakeRepo(repo_type, repo_id, bool(body.get("private")), head="", files={})
        self._commit_files(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self.repos[(repo_type, repo_id)] = repo
        return 200, {"url": url, "name": repo_id}, {}

    def _repo_info(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        repo = self._repo(groups)
        sha, files = self._snapshot(repo, groups.get("rev"))
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(files.items())]
        return 200, {"id": repo.repo_id, "sha": sha, "private": repo.private, "siblings": siblings}, {}

    def _preupload(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        self._check_write_token(request)
        repo = self._repo(groups)
        _, existing = self._snapshot(repo, groups.get("rev"))
        files = json.loads(request.body)["files"]
        answers = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if is_lfs(f["path"], f["size"]) else "regular",
                "shouldIgnore": False,
                "oid": _oid(f["path"], existing[f["path"]]) if f["path"] in existing else None,
            }
            for f in files
        ]
        return 200, {"files": answers, "commitOid": repo.head}, {}

    def _commit(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        self._check_write_token(request)
        if request.query.get("create_pr"):
            raise HubError(400, "fake Hub: pull requests are not implemented")
        repo = self._repo(groups)
        revision = unquote(groups["rev"])
        if revision != "main":
            raise HubError(400, f"fake Hub: commits go to main only, not {revision!r}")
        files = dict(repo.files)
        added: dict[str, bytes] = {}
        lfs: list[str] = []
        deleted: list[str] = []
        summary = ""
        for line in request.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != repo.head:
                    raise HubError(412, f"parentCommit {parent} is not the head {repo.head}")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"fake Hub: unexpected encoding {value.get('encoding')!r}")
                added[value["path"]] = files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value.get("oid") not in self.lfs_objects:
                    raise HubError(400, f"LFS object {value.get('oid')} of {value.get('path')} was never uploaded")
                added[value["path"]] = files[value["path"]] = self.lfs_objects[value["oid"]]
                lfs.append(value["path"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
                deleted.append(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    del files[path]
                    deleted.append(path)
            else:
                raise HubError(400, f"fake Hub: commit line {key!r} is not implemented")
        oid = self._commit_files(repo, files)
        self.commits.append(Commit(repo.repo_type, repo.repo_id, revision, oid, summary, added, lfs, deleted))
        commit_url = f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{oid}"
        return 200, {"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": None}, {}

    def _tree(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        repo = self._repo(groups)
        _, files = self._snapshot(repo, groups.get("rev"))
        base = unquote(groups.get("path") or "").strip("/")
        recursive = (request.query.get("recursive") or ["false"])[0].lower() in ("true", "1")
        prefix = base + "/" if base else ""
        below = {path: data for path, data in files.items() if path.startswith(prefix)}
        if base and not below:
            raise HubError(404, f"{base} does not exist on main", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(below.items()):
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if depth == 1 or recursive:
                    entries.setdefault(folder, self._folder(folder))
            if len(parts) == 1 or recursive:
                entries[path] = self._entry(path, data)
        return 200, list(entries.values()), {}

    def _paths_info(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        repo = self._repo(groups)
        _, files = self._snapshot(repo, groups.get("rev"))
        content_type = request.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(request.body).get("paths", [])
        else:
            paths = parse_qs(request.body.decode()).get("paths", [])
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(self._entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append(self._folder(path))
        return 200, out, {}

    def _resolve(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        repo = self._repo(groups)
        sha, files = self._snapshot(repo, groups.get("rev"))
        path = unquote(groups["path"])
        if path not in files:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound")
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream"}
        byte_range = request.headers.get("Range", "")
        if byte_range.startswith("bytes="):
            start_text, _, end_text = byte_range[len("bytes=") :].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            return 206, data[start : end + 1], headers
        return 200, data, headers

    def _lfs_batch(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        self._check_write_token(request)
        self._repo(groups)
        body = json.loads(request.body)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, f"fake Hub: only basic LFS uploads are implemented, got {body!r}")
        objects = []
        for obj in body["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/fake-lfs/objects/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/fake-lfs/verify/{obj['oid']}"},
                }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _lfs_put(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        if hashlib.sha256(request.body).hexdigest() != groups["oid"]:
            raise HubError(400, f"LFS upload does not match its oid {groups['oid']}")
        self.lfs_objects[groups["oid"]] = request.body
        return 200, b"", {}

    def _lfs_verify(self, request: RecordedRequest, groups: dict) -> tuple[int, Any, dict[str, str]]:
        self._check_write_token(request)
        body = json.loads(request.body)
        stored = self.lfs_objects.get(groups["oid"])
        if stored is None or body.get("oid") != groups["oid"] or body.get("size") != len(stored):
            raise HubError(404, f"LFS object {groups['oid']} was not uploaded", "EntryNotFound")
        return 200, {"success": True}, {}
