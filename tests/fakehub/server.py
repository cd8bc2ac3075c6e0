"""A loopback Hugging Face Hub: the HTTP routes huggingface_hub and datasets call, on 127.0.0.1.

Two listeners: the Hub itself (API, git LFS batch, file resolve) and a storage host standing in for the
Hub's object storage / CDN (a different origin, as on the real Hub: the client sends no token there).
Every request is recorded (method, target, headers, answer); faults can be planted on any route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

from .store import Commit, Entry, HubStore, Repo, wants_lfs

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass
class RecordedRequest:
    """One request as the server saw it."""

    host: str  # "hub" or "storage"
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]
    status: int = 0  # 0: the connection was dropped without an answer


@dataclass
class Fault:
    """Make matching requests fail: after `skip` matching requests pass, the next `times` fail.

    A failure answers `status` (with `Retry-After` when `retry_after` is set) or, with `drop_connection`,
    closes the connection without any answer; with `after_handling` too, the request is carried out first
    (a commit is made) and only its answer is lost. `method` and `path` (a regular expression searched in
    the request path) select the requests; `host` limits it to "hub" or "storage".
    """

    method: str | None = None
    path: str = ""
    host: str | None = None
    status: int = 500
    times: int = 1
    skip: int = 0
    drop_connection: bool = False
    after_handling: bool = False
    retry_after: float | None = None
    seen: int = 0
    fired: int = 0

    def matches(self, host: str, method: str, path: str) -> bool:
        return ((self.host is None or self.host == host) and (self.method is None or self.method == method)
                and re.search(self.path, path) is not None)


@dataclass
class HubStatistics:
    """What was written: successful commits, LFS uploads and bytes, regular files committed."""

    commits: int = 0
    committed_files: int = 0
    deleted_files: int = 0
    lfs_uploads: int = 0
    lfs_bytes: int = 0
    regular_files: int = 0
    regular_bytes: int = 0
    repos_created: int = 0


class HubError(Exception):
    """An error answer: status, message and the Hub's X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """A Hub-compatible server on loopback. Use as a context manager.

    `token`: the one accepted access token; writes need it, reads of private repositories need it.
    `tree_page_size`: entries per page of a tree listing (the Hub pages by 1000).
    """

    def __init__(self, token: str = "hf_fakehub_token", tree_page_size: int = 1000):
        self.token = token
        self.tree_page_size = tree_page_size
        self.store = HubStore()
        self.stats = HubStatistics()
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self._secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._hub = _Server(("127.0.0.1", 0), _Handler, self, "hub")
        self._storage = _Server(("127.0.0.1", 0), _Handler, self, "storage")
        self._threads = [threading.Thread(target=s.serve_forever, name=f"fakehub-{s.role}", daemon=True)
                         for s in (self._hub, self._storage)]

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        """The Hub URL, for HF_ENDPOINT."""
        return "http://127.0.0.1:%d" % self._hub.server_address[1]

    @property
    def storage_url(self) -> str:
        return "http://127.0.0.1:%d" % self._storage.server_address[1]

    def start(self) -> "FakeHub":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self._hub, self._storage):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def fail(self, **kwargs) -> Fault:
        """Plant a `Fault` (see its fields) and return it."""
        fault = Fault(**kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def reset_records(self) -> None:
        """Forget recorded requests, statistics and faults (the repositories stay)."""
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.stats = HubStatistics()

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.store.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file of a revision."""
        repo = self.repo(repo_id, repo_type)
        commit = repo.resolve(revision)
        return {path: self.store.content(repo, entry) for path, entry in commit.files.items()}

    def write_requests(self) -> list[RecordedRequest]:
        """Requests that create or change something (repo creation, preupload, LFS, commits, branches, uploads)."""
        writing = re.compile(r"/api/repos/create|/preupload/|/commit/|/branch/|/info/lfs/|^/upload/")
        return [r for r in self.requests if r.method in ("POST", "PUT", "DELETE") and writing.search(r.target)
                and "/paths-info/" not in r.target]

    def token_leaks(self, token: str | None = None) -> list[RecordedRequest]:
        """Requests carrying the token anywhere but the Hub's Authorization header (URL, other headers, storage)."""
        token = token or self.token
        leaks = []
        for request in self.requests:
            for name, value in request.headers.items():
                allowed = request.host == "hub" and name.lower() == "authorization"
                if token in value and not allowed:
                    leaks.append(request)
            if token in unquote(request.target):
                leaks.append(request)
        return leaks

    # ------------------------------------------------------------------ plumbing used by the handler

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def take_fault(self, host: str, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(host, method, path):
                    fault.seen += 1
                    if fault.seen > fault.skip and fault.fired < fault.times:
                        fault.fired += 1
                        return fault
        return None

    def sign(self, path: str) -> str:
        return hmac.new(self._secret, path.encode(), hashlib.sha256).hexdigest()[:32]

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, hub: FakeHub, role: str):
        super().__init__(address, handler)
        self.hub = hub
        self.role = role

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def _json(data, status: int = 200, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(status, json.dumps(data).encode(), dict(headers or {}))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ------------------------------------------------------------------ request cycle

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def _serve(self) -> None:
        split = urlsplit(self.path)
        self.raw_path, self.query = split.path, parse_qs(split.query)
        record = RecordedRequest(self.server.role, self.command, self.path, dict(self.headers.items()))
        self.hub.record(record)
        body = self._read_body()
        fault = self.hub.take_fault(self.server.role, self.command, self.raw_path)
        if fault is not None and fault.drop_connection:
            if fault.after_handling:
                try:
                    self._route(body)
                except HubError:
                    pass
            self.close_connection = True
            return
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            answer = _json({"error": f"planted fault {fault.status}"}, fault.status, headers)
        else:
            try:
                answer = self._route(body)
            except HubError as error:
                headers = {"X-Error-Message": error.message}
                if error.code:
                    headers["X-Error-Code"] = error.code
                answer = _json({"error": error.message}, error.status, headers)
        record.status = answer.status
        self._send(answer)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, answer: _Answer) -> None:
        try:
            self.send_response(answer.status)
            headers = {"Content-Type": answer.content_type, **answer.headers}
            headers.setdefault("Content-Length", str(len(answer.body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ------------------------------------------------------------------ auth

    def _token(self) -> str | None:
        value = self.headers.get("Authorization")
        if value is None:
            return None
        token = value.removeprefix("Bearer ").strip()
        if token != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _require_token(self) -> None:
        if self._token() is None:
            raise HubError(401, "You must be authenticated to do this")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.store.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self._token() is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ routing

    def _route(self, body: bytes) -> _Answer:
        segments = self.raw_path.lstrip("/").split("/")
        if self.server.role == "storage":
            return self._storage_route(segments, body)
        if segments[:3] == ["api", "repos", "create"] and self.command == "POST":
            return self._create_repo(body)
        if segments[:2] == ["api", "validate-yaml"] and self.command == "POST":
            return self._validate_yaml(body)
        if len(segments) >= 4 and segments[0] == "api" and segments[1] in REPO_TYPES:
            repo = self._repo(REPO_TYPES[segments[1]], f"{segments[2]}/{segments[3]}")
            return self._api_route(repo, segments[4:], body)
        repo_type = REPO_TYPES.get(segments[0]) if segments[0] in ("datasets", "spaces") else "model"
        rest = segments[1:] if repo_type != "model" else segments
        if len(rest) >= 2 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(self._repo(repo_type, f"{rest[0]}/{rest[1][:-4]}"), body)
        if len(rest) >= 5 and rest[2] == "resolve" and self.command in ("GET", "HEAD"):
            repo = self._repo(repo_type, f"{rest[0]}/{rest[1]}")
            return self._resolve(repo, rest[3], unquote("/".join(rest[4:])))
        raise HubError(404, f"no route for {self.command} {self.raw_path}")

    def _api_route(self, repo: Repo, rest: list[str], body: bytes) -> _Answer:
        action = rest[0] if rest else ""
        if not rest and self.command == "GET":
            return self._info(repo, repo.resolve("main"))
        if action == "revision" and len(rest) == 2 and self.command == "GET":
            return self._info(repo, self._commit(repo, rest[1]))
        if action == "preupload" and len(rest) == 2 and self.command == "POST":
            return self._preupload(repo, rest[1], body)
        if action == "commit" and len(rest) == 2 and self.command == "POST":
            return self._commit_route(repo, rest[1], body)
        if action == "paths-info" and len(rest) == 2 and self.command == "POST":
            return self._paths_info(repo, rest[1], body)
        if action == "tree" and len(rest) >= 2 and self.command == "GET":
            return self._tree(repo, rest[1], unquote("/".join(rest[2:])))
        if action == "branch" and len(rest) >= 2 and self.command == "POST":
            return self._create_branch(repo, unquote("/".join(rest[1:])), body)
        raise HubError(404, f"no route for {self.command} {self.raw_path}")

    # ------------------------------------------------------------------ repositories

    def _create_repo(self, body: bytes) -> _Answer:
        self._require_token()
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        private = payload.get("private") is True or payload.get("visibility") == "private"
        repo, created = self.hub.store.create_repo(repo_type, repo_id, private)
        url = f"{self.hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        if not created:
            return _json({"error": "You already created this repo", "url": url}, 409)
        self.hub.count(repos_created=1)
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _create_branch(self, repo: Repo, branch: str, body: bytes) -> _Answer:
        self._require_token()
        payload = json.loads(body or b"{}")
        start = self._commit(repo, payload.get("startingPoint") or "main")
        if not self.hub.store.create_branch(repo, branch, start):
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        return _json({})

    def _info(self, repo: Repo, commit: Commit) -> _Answer:
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": entry.size, "blobId": entry.blob_id}
            if entry.lfs_sha256 is not None:
                lfs = entry.as_json()["lfs"]
                sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256, "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        data = {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": commit.oid, "lastModified": commit.date,
                "createdAt": commit.date, "private": repo.private, "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
        if repo.repo_type == "model":
            data["modelId"] = repo.repo_id
        return _json(data)

    def _validate_yaml(self, body: bytes) -> _Answer:
        content = json.loads(body).get("content", "")
        match = re.match(r"^---\n(.*?\n)---\n", content, re.DOTALL)
        if match is None:
            return _json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return _json({"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []}, 400)
        if not isinstance(data, dict):
            return _json({"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    # ------------------------------------------------------------------ writing

    def _preupload(self, repo: Repo, revision: str, body: bytes) -> _Answer:
        self._require_token()
        commit = repo.resolve(unquote(revision))
        files = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item.get("sample") or "")
            lfs = wants_lfs(item["path"], int(item["size"]), sample)
            existing = commit.files.get(item["path"]) if commit else None
            answer = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if existing is not None:
                answer["oid"] = existing.lfs_sha256 if existing.lfs_sha256 else existing.blob_id
            files.append(answer)
        return _json({"files": files, "commitOid": commit.oid if commit else None})

    def _lfs_batch(self, repo: Repo, body: bytes) -> _Answer:
        self._require_token()
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for item in payload["objects"]:
            oid, size = item["oid"], int(item["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if (repo.key, oid) not in self.hub.store.lfs_objects:
                path = f"/upload/{repo.repo_type}/{repo.repo_id}/{oid}"
                href = f"{self.hub.storage_url}{path}?size={size}&signature={self.hub.sign(f'{path}:{size}')}"
                answer["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(answer)
        return _Answer(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), {},
                       "application/vnd.git-lfs+json")

    def _commit_route(self, repo: Repo, revision: str, body: bytes) -> _Answer:
        self._require_token()
        branch = unquote(revision)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and repo.branches[branch] != parent and not repo.branches[branch].startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        regular: dict[str, bytes] = {}
        lfs: dict[str, tuple[str, int]] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                regular[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                stored = self.hub.store.lfs_objects.get((repo.key, value["oid"]))
                if stored is None:
                    raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that does "
                                        f"not exist. For instance: {value['path']}")
                lfs[value["path"]] = (value["oid"], len(stored))
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self.hub.store.commit(repo, branch, header.get("summary") or "", regular, lfs, deleted)
        self.hub.count(commits=1, committed_files=len(regular) + len(lfs), deleted_files=len(deleted),
                       regular_files=len(regular), regular_bytes=sum(map(len, regular.values())))
        url = f"{self.hub.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        return _json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    # ------------------------------------------------------------------ reading

    def _paths_info(self, repo: Repo, revision: str, body: bytes) -> _Answer:
        commit = self._commit(repo, revision)
        form = parse_qs(body.decode(), keep_blank_values=True)
        if "paths" not in form and body.startswith(b"{"):
            form = {"paths": json.loads(body).get("paths", [])}
        folders = repo.directories(commit)
        answer = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                answer.append(commit.files[path].as_json())
            elif path in folders:
                answer.append(self._folder_json(path))
        return _json(answer)

    def _tree(self, repo: Repo, revision: str, path: str) -> _Answer:
        commit = self._commit(repo, revision)
        path = path.strip("/")
        folders = repo.directories(commit)
        if path and path not in folders:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = f"{path}/" if path else ""
        items = [self._folder_json(folder) for folder in sorted(folders)
                 if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix):])]
        items += [entry.as_json() for name, entry in sorted(commit.files.items())
                  if name.startswith(prefix) and (recursive or "/" not in name[len(prefix):])]
        start = int(self.query.get("cursor", ["0"])[0])
        page = items[start: start + self.hub.tree_page_size]
        headers = {}
        if start + self.hub.tree_page_size < len(items):
            query = {k: v[0] for k, v in self.query.items() if k != "cursor"}
            query["cursor"] = str(start + self.hub.tree_page_size)
            target = self.hub.endpoint + self.raw_path + "?" + "&".join(f"{k}={quote(v)}" for k, v in query.items())
            headers["Link"] = f'<{target}>; rel="next"'
        return _json(page, headers=headers)

    @staticmethod
    def _folder_json(path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    def _resolve(self, repo: Repo, revision: str, path: str) -> _Answer:
        commit = self._commit(repo, revision)
        entry = commit.files.get(path)
        base = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry is None:
            raise_headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", **base}
            return _json({"error": "Entry not found"}, 404, raise_headers)
        if entry.lfs_sha256 is not None:
            location = f"/lfs/{repo.repo_type}/{repo.repo_id}/{entry.lfs_sha256}"
            headers = {**base, "Location": f"{self.hub.storage_url}{location}?signature={self.hub.sign(location)}",
                       "ETag": f'"{entry.blob_id}"', "X-Linked-Etag": f'"{entry.lfs_sha256}"',
                       "X-Linked-Size": str(entry.size)}
            return _Answer(302, b"", headers, "text/plain")
        return self._ranged(self.hub.store.content(repo, entry), {**base, "ETag": f'"{entry.blob_id}"'})

    def _ranged(self, content: bytes, headers: dict[str, str]) -> _Answer:
        """The content, or the part a `Range: bytes=...` header asks for (206)."""
        requested = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", requested or "")
        if match is None or self.command == "HEAD":
            return _Answer(200, content, headers, "application/octet-stream")
        first, last = match.groups()
        if first == "":
            start, end = max(len(content) - int(last), 0), len(content) - 1
        else:
            start, end = int(first), min(int(last) if last else len(content) - 1, len(content) - 1)
        if start >= len(content) and len(content) > 0:
            return _Answer(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"}, "text/plain")
        part = content[start: end + 1]
        return _Answer(206, part, {**headers, "Content-Range": f"bytes {start}-{end}/{len(content)}"},
                       "application/octet-stream")

    # ------------------------------------------------------------------ storage host

    def _storage_route(self, segments: list[str], body: bytes) -> _Answer:
        # /upload/<type>/<owner>/<name>/<sha256> (PUT) and /lfs/<type>/<owner>/<name>/<sha256> (GET, HEAD)
        if len(segments) != 5 or segments[0] not in ("upload", "lfs"):
            raise HubError(404, "no such object")
        repo_key, oid = (segments[1], f"{segments[2]}/{segments[3]}"), segments[4]
        signature = self.query.get("signature", [""])[0]
        if segments[0] == "upload" and self.command == "PUT":
            size = int(self.query.get("size", ["-1"])[0])
            if not hmac.compare_digest(signature, self.hub.sign(f"{self.raw_path}:{size}")):
                raise HubError(403, "bad signature")
            if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "the uploaded content does not match its oid and size")
            with self.hub.store.lock:
                new = (repo_key, oid) not in self.hub.store.lfs_objects
                self.hub.store.lfs_objects[(repo_key, oid)] = body
            if new:
                self.hub.count(lfs_uploads=1, lfs_bytes=len(body))
            return _Answer(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, "text/plain")
        if segments[0] == "lfs" and self.command in ("GET", "HEAD"):
            if not hmac.compare_digest(signature, self.hub.sign(self.raw_path)):
                raise HubError(403, "bad signature")
            content = self.hub.store.lfs_objects.get((repo_key, oid))
            if content is None:
                raise HubError(404, "no such object")
            return self._ranged(content, {"ETag": f'"{oid}"'})
        raise HubError(405, "method not allowed")


__all__ = ["FakeHub", "Fault", "HubStatistics", "RecordedRequest", "Entry"]
