"""A small Hugging Face Hub for tests: the real `huggingface_hub` client talks to it over 127.0.0.1.

What is unusual here: nothing is mocked on the client side. `HF_ENDPOINT` points at this server and
`huggingface_hub` (create_repo, create_commit with regular and LFS files, hf_hub_download,
snapshot_download, model_info, list_repo_tree, branches) speaks its ordinary HTTP protocol to it, the
way the library's own staging tests speak to hub-ci. Only the subset of the API those calls need is
served; anything else answers 404 and is recorded in `HubServer.requests`, so a test can see what a
client asked for.

Storage: repo metadata (branches, commits, file tables) in memory, file contents on disk under
`root/`: regular files by git blob sha1, LFS objects by sha256. Every commit is a new revision with
its own 40-hex sha; `main` and any other branch point at one. Repo ids must be namespaced
(`owner/name`); `create_repo("name")` puts the repo under the token's user, as the Hub does.

Xet is not served: clients must run with `HF_HUB_DISABLE_XET=1`, so uploads use the LFS basic
transfer (batch endpoint, then one PUT per object).

Run standalone for manual poking:  python tests/hub_server.py --port 8777
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


USER = "user"
DEFAULT_TOKEN = "hf_test_server_token"
MAX_BODY_BYTES = 1 << 30  # refuse bodies over 1 GiB
SOCKET_TIMEOUT_S = 30  # a stalled client cannot hold a handler thread longer than this
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model", ".npy",
    ".npz", ".pkl", ".zip", ".gz", ".tar", ".arrow", ".parquet", ".wav", ".flac", ".mp3", ".mp4",
    ".png", ".jpg", ".jpeg", ".tfevents",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores larger files in LFS whatever their name
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
REPO_TYPE_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
REPO = r"(?P<repo>[^/]+/[^/]+)"  # owner/name, still URL-quoted
KIND = r"(?P<kind>models|datasets|spaces)"
PREFIX = r"(?:(?P<prefix>datasets|spaces)/)?"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An error answer: HTTP status, the Hub's `X-Error-Code` (if any) and a message."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.error_code, self.headers = status, message, error_code, headers or {}
        self.body = body  # extra JSON fields, e.g. the existing repo's `url` on a 409 from create


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    blob_id: str  # git sha1 of the content (regular) or of the LFS pointer (LFS)
    lfs_sha256: str | None = None

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.blob_id

    def tree_json(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs_sha256 is not None:
            pointer_size = len(lfs_pointer(self.lfs_sha256, self.size))
            entry["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": pointer_size}
        return entry


@dataclasses.dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclasses.dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch name or a full commit sha -> its commit; 404 RevisionNotFound otherwise."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


class HubState:
    """Repos, their revisions and the blob store; every method that changes them takes the lock."""

    def __init__(self, root: str, token: str):
        self.root, self.token = root, token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self.commit_counter = 0
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
        os.makedirs(os.path.join(root, "lfs"), exist_ok=True)

    # -- blob store -------------------------------------------------------------------------------
    def blob_path(self, entry: FileEntry) -> str:
        if entry.lfs_sha256 is not None:
            return os.path.join(self.root, "lfs", entry.lfs_sha256)
        return os.path.join(self.root, "blobs", entry.blob_id)

    def _write_atomically(self, path: str, content: bytes) -> None:
        if os.path.exists(path):
            return
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)

    def store_regular(self, path_in_repo: str, content: bytes) -> FileEntry:
        blob_id = git_blob_sha1(content)
        self._write_atomically(os.path.join(self.root, "blobs", blob_id), content)
        return FileEntry(path_in_repo, len(content), blob_id)

    def store_lfs_object(self, sha256: str, content: bytes) -> None:
        actual = hashlib.sha256(content).hexdigest()
        if actual != sha256:
            raise HubError(400, f"LFS object sha256 mismatch: expected {sha256}, got {actual}")
        self._write_atomically(os.path.join(self.root, "lfs", sha256), content)

    def has_lfs_object(self, sha256: str) -> bool:
        return os.path.exists(os.path.join(self.root, "lfs", sha256))

    # -- repos ------------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            # The Hub does not tell a private repo from a missing one.
            raise HubError(404 if repo is None else 401, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool, url: str = "") -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:  # the client reads `url` from this answer when exist_ok=True
                raise HubError(409, f"You already created this {repo_type} repo", url=url)
            repo = Repo(repo_type, repo_id, private, now_iso())
            self.repos[(repo_type, repo_id)] = repo
            gitattributes = self.store_regular(".gitattributes", GITATTRIBUTES.encode())
            self._add_commit(repo, None, "initial commit", "", {".gitattributes": gitattributes}, "main")
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            if self.repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")

    def _add_commit(self, repo: Repo, parent: str | None, title: str, message: str, files: dict, branch: str):
        self.commit_counter += 1
        tree = json.dumps({p: e.etag for p, e in sorted(files.items())})
        oid = hashlib.sha1(f"{parent}\n{tree}\n{title}\n{self.commit_counter}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, title, message, now_iso(), files)
        repo.branches[branch] = oid
        return repo.commits[oid]

    def commit(self, repo: Repo, branch: str, lines: list[dict]) -> Commit:
        """Apply one NDJSON commit payload (header, file, lfsFile, deletedFile, deletedFolder) to a branch."""
        with self.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            if not lines or lines[0].get("key") != "header":
                raise HubError(400, "The first line of a commit payload must be its header")
            header = lines[0]["value"]
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.oid.startswith(parent_commit):
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {branch} ({head.oid})")
            files = dict(head.files)
            for number, line in enumerate(lines[1:], start=2):
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"Commit line {number}: invalid path {path!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Commit line {number}: only base64 file content is supported")
                    files[path] = self.store_regular(path, base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    sha256, size = value.get("oid"), value.get("size")
                    if value.get("algo", "sha256") != "sha256" or not self.has_lfs_object(sha256 or ""):
                        raise HubError(422, f"Commit line {number}: LFS object {sha256} for {path} was not uploaded")
                    size = size if size is not None else os.path.getsize(os.path.join(self.root, "lfs", sha256))
                    files[path] = FileEntry(path, size, git_blob_sha1(lfs_pointer(sha256, size)), sha256)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"Commit line {number}: cannot delete missing file {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = path.rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(folder)}
                else:
                    raise HubError(400, f"Commit line {number}: unknown operation {key!r}")
            return self._add_commit(repo, head.oid, header.get("summary", ""), header.get("description", ""), files, branch)

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.resolve(starting_point or "main").oid

    def delete_branch(self, repo: Repo, branch: str) -> None:
        with self.lock:
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")


def tree_entries(commit: Commit, path: str, recursive: bool) -> list[dict]:
    """Files and folders under `path` in a commit, as the tree API lists them (folders first)."""
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    folders, files = {}, []
    for file_path, entry in sorted(commit.files.items()):
        if not file_path.startswith(prefix):
            continue
        parts = file_path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            folder = prefix + "/".join(parts[:depth])
            folders[folder] = {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "path": folder}
        if recursive or len(parts) == 1:
            files.append(entry.tree_json())
    if prefix and not folders and not files:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
    return list(folders.values()) + files


def read_front_matter(text: str) -> dict | None:
    """The YAML block at the top of a README, parsed; None when there is none; HubError when it is invalid."""
    match = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(\r?\n|$)", text, re.DOTALL)
    if match is None:
        return None
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise HubError(400, f"Invalid YAML in README.md metadata: {error}") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise HubError(400, "README.md metadata must be a YAML mapping")
    return metadata or {}


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes each request through `ROUTES`: (method, path regex, handler). Errors become Hub error answers."""

    server: "_HubHTTPServer"
    timeout = SOCKET_TIMEOUT_S

    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", rf"/api/{KIND}/{REPO}", "repo_info"),
        ("GET", rf"/api/{KIND}/{REPO}/revision/(?P<revision>[^/]+)", "repo_info"),
        ("GET", rf"/api/{KIND}/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", "list_tree"),
        ("POST", rf"/api/{KIND}/{REPO}/paths-info/(?P<revision>[^/]+)", "paths_info"),
        ("GET", rf"/api/{KIND}/{REPO}/refs", "list_refs"),
        ("GET", rf"/api/{KIND}/{REPO}/commits/(?P<revision>[^/]+)", "list_commits"),
        ("POST", rf"/api/{KIND}/{REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", rf"/api/{KIND}/{REPO}/commit/(?P<revision>[^/]+)", "commit"),
        ("POST", rf"/api/{KIND}/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("DELETE", rf"/api/{KIND}/{REPO}/branch/(?P<branch>[^/]+)", "delete_branch"),
        ("POST", rf"/{PREFIX}{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<sha256>[0-9a-f]{64})", "lfs_upload"),
        ("POST", r"/lfs-verify/(?P<sha256>[0-9a-f]{64})", "lfs_verify"),
        ("HEAD", rf"/{PREFIX}{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
        ("GET", rf"/{PREFIX}{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    ]
    COMPILED_ROUTES = [(method, re.compile(pattern + "$"), name) for method, pattern, name in ROUTES]

    # -- plumbing ---------------------------------------------------------------------------------
    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def log_message(self, format, *args):  # keep pytest output clean; `requests` records everything
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        return self.server.url

    def dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        route_name, status = "unknown", 404
        try:
            for route_method, pattern, name in self.COMPILED_ROUTES:
                match = pattern.match(split.path)
                if match and route_method == method:
                    route_name = name
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status = getattr(self, f"route_{name}")(**params) or 200
                    break
            else:
                raise HubError(404, f"The test Hub does not serve {method} {split.path}")
        except HubError as error:
            status = error.status
            self.send_error_answer(error)
        except Exception as error:  # a bug here must reach the test as a 500, not hang the client
            status = 500
            self.send_error_answer(HubError(500, f"{type(error).__name__}: {error}"))
        finally:
            self.server.record(method, split.path, route_name, status)

    def read_body(self) -> bytes:
        """The request body, from Content-Length or chunked transfer encoding; bounded by MAX_BODY_BYTES."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:  # ends at the zero-size chunk; every iteration consumes input or raises
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise HubError(400, "Truncated chunked body")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, "Request body too large")
                if size == 0:
                    self.rfile.readline(1024)  # the empty line after the last chunk (no trailers expected)
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "Request body too large")
        return self.rfile.read(length) if length else b""

    def read_json(self):
        body = self.read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not JSON: {error}") from None

    def send_json(self, payload, status: int = 200, headers: dict | None = None, content_type="application/json"):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def send_error_answer(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message.splitlines()[0][:200], **error.headers}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        self.send_json({"error": error.message, **error.body}, error.status, headers)

    def authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.state.token}"

    def require_token(self) -> None:
        if not self.authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def repo(self, kind_or_type: str, repo: str, write: bool = False) -> Repo:
        if write:
            self.require_token()
        repo_type = REPO_TYPE_PLURALS.get(kind_or_type, kind_or_type)
        return self.state.get_repo(repo_type, repo, self.authorized())

    def repo_url(self, repo: Repo) -> str:
        return f"{self.base_url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # -- repos ------------------------------------------------------------------------------------
    def route_create_repo(self):
        self.require_token()
        payload = self.read_json()
        name, organization = payload.get("name"), payload.get("organization") or USER
        if not name or not re.fullmatch(r"[\w.-]+", name) or not re.fullmatch(r"[\w.-]+", organization):
            raise HubError(400, f"Invalid repo name: {organization}/{name}")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
        repo_id = f"{organization}/{name}"
        repo = self.state.create_repo(repo_type, repo_id, private, url=f"{self.base_url}/{URL_PREFIXES[repo_type]}{repo_id}")
        return self.send_json({"url": self.repo_url(repo), "name": repo.repo_id, "id": repo.repo_id})

    def route_delete_repo(self):
        self.require_token()
        payload = self.read_json()
        repo_id = f"{payload.get('organization') or USER}/{payload.get('name')}"
        self.state.delete_repo(payload.get("type") or "model", repo_id)
        return self.send_json({})

    def route_validate_yaml(self):
        payload = self.read_json()
        if read_front_matter(payload.get("content", "")) is None:
            return self.send_json({"errors": [], "warnings": [{"message": "Empty metadata"}]})
        return self.send_json({"errors": [], "warnings": []})

    def route_whoami(self):
        self.require_token()
        token_info = {"displayName": "test token", "role": "write"}
        return self.send_json(
            {"type": "user", "name": USER, "fullname": "Test User", "orgs": [], "auth": {"type": "access_token", "accessToken": token_info}}
        )

    def route_repo_info(self, kind, repo, revision="main"):
        repo_obj = self.repo(kind, repo)
        commit = repo_obj.resolve(revision)
        siblings = []
        for entry in sorted(commit.files.values(), key=lambda e: e.path):
            sibling = {"rfilename": entry.path, "size": entry.size, "blobId": entry.blob_id}
            if entry.lfs_sha256 is not None:
                sibling["lfs"] = entry.tree_json()["lfs"] | {"sha256": entry.lfs_sha256}
            siblings.append(sibling)
        card_data = None
        if "README.md" in commit.files:
            with open(self.state.blob_path(commit.files["README.md"]), encoding="utf-8") as f:
                try:
                    card_data = read_front_matter(f.read())
                except HubError:
                    card_data = None
        card_data = card_data or {}
        owner = repo_obj.repo_id.split("/")[0]
        info = {
            "_id": hashlib.sha1(repo_obj.repo_id.encode()).hexdigest()[:24],
            "id": repo_obj.repo_id,
            "author": owner,
            "sha": commit.oid,
            "createdAt": repo_obj.created_at,
            "lastModified": commit.date,
            "private": repo_obj.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card_data.get("tags") or []),
            "siblings": siblings,
            "cardData": card_data,
        }
        if repo_obj.repo_type == "model":
            info |= {"modelId": repo_obj.repo_id, "library_name": card_data.get("library_name")}
            info |= {"pipeline_tag": card_data.get("pipeline_tag")}
        return self.send_json(info)

    def route_list_tree(self, kind, repo, revision, path=""):
        commit = self.repo(kind, repo).resolve(revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        return self.send_json(tree_entries(commit, path, recursive))

    def route_paths_info(self, kind, repo, revision):
        commit = self.repo(kind, repo).resolve(revision)
        body = self.read_body()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        answer = []
        for path in paths:
            if path in commit.files:
                answer.append(commit.files[path].tree_json())
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                answer.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path})
        return self.send_json(answer)

    def route_list_refs(self, kind, repo):
        repo_obj = self.repo(kind, repo)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in sorted(repo_obj.branches.items())
        ]
        return self.send_json({"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def route_list_commits(self, kind, repo, revision):
        repo_obj = self.repo(kind, repo)
        commit, history = repo_obj.resolve(revision), []
        while commit is not None and len(history) <= len(repo_obj.commits):  # bounded even on a corrupt chain
            history.append(
                {"id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date, "authors": [{"user": USER}]}
            )
            commit = repo_obj.commits.get(commit.parent) if commit.parent else None
        return self.send_json(history)

    def route_create_branch(self, kind, repo, branch):
        repo_obj = self.repo(kind, repo, write=True)
        self.state.create_branch(repo_obj, branch, self.read_json().get("startingPoint"))
        return self.send_json({})

    def route_delete_branch(self, kind, repo, branch):
        self.state.delete_branch(self.repo(kind, repo, write=True), branch)
        return self.send_json({})

    # -- uploads ----------------------------------------------------------------------------------
    def route_preupload(self, kind, repo, revision):
        commit = self.repo(kind, repo, write=True).resolve(revision)
        answer = []
        for file in self.read_json().get("files", []):
            path, size = file["path"], int(file.get("size", 0))
            sample = base64.b64decode(file.get("sample", ""))
            is_lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample
            existing = commit.files.get(path)
            # The oid the client compares with its own (sha256 for LFS, git sha1 for regular) to skip no-op uploads.
            oid = None if existing is None else (existing.lfs_sha256 or existing.blob_id)
            answer.append({"path": path, "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False, "oid": oid})
        return self.send_json({"files": answer, "commitOid": commit.oid})

    def route_lfs_batch(self, repo, prefix=None):
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(prefix, "model")
        self.repo(repo_type, repo, write=True)
        payload = self.read_json()
        if payload.get("operation") != "upload":
            raise HubError(400, "The test Hub only serves LFS uploads through the batch API")
        objects = []
        for item in payload.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                objects.append({"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "Invalid object"}})
            elif self.state.has_lfs_object(oid):
                objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips it
            else:
                upload = {"href": f"{self.base_url}/lfs-upload/{oid}", "header": {}}
                verify = {"href": f"{self.base_url}/lfs-verify/{oid}", "header": {}}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}})
        return self.send_json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def route_lfs_upload(self, sha256):
        # Like a pre-signed storage URL: no Authorization header (the client sends none), the oid is the key.
        self.state.store_lfs_object(sha256, self.read_body())
        self.send_response(200)
        self.send_header("ETag", f'"{sha256}"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return 200

    def route_lfs_verify(self, sha256):
        payload = self.read_json()
        path = os.path.join(self.state.root, "lfs", sha256)
        if not os.path.exists(path) or os.path.getsize(path) != payload.get("size"):
            raise HubError(422, f"LFS object {sha256} is missing or has the wrong size")
        return self.send_json({})

    def route_commit(self, kind, repo, revision):
        if self.query.get("create_pr"):
            raise HubError(501, "The test Hub does not serve pull requests")
        repo_obj = self.repo(kind, repo, write=True)
        lines = []
        for number, raw in enumerate(self.read_body().splitlines(), start=1):
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError as error:
                    raise HubError(400, f"Commit line {number} is not JSON: {error}") from None
        commit = self.state.commit(repo_obj, revision, lines)
        url = f"{self.repo_url(repo_obj)}/commit/{commit.oid}"
        return self.send_json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    # -- downloads --------------------------------------------------------------------------------
    def route_resolve(self, repo, revision, path, prefix=None):
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(prefix, "model")
        commit = self.repo(repo_type, repo).resolve(revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        with open(self.state.blob_path(entry), "rb") as f:
            content = f.read()
        status, start = 200, 0
        range_match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "").strip())
        if range_match and int(range_match.group(1)) < len(content):
            status, start = 206, int(range_match.group(1))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{entry.etag}"')
        self.send_header("X-Repo-Commit", commit.oid)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        if entry.lfs_sha256 is not None:
            self.send_header("X-Linked-Etag", f'"{entry.lfs_sha256}"')
            self.send_header("X-Linked-Size", str(entry.size))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(content[start:])
        return status


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    state: HubState
    url: str

    def record(self, method: str, path: str, route: str, status: int) -> None:
        with self.state.lock:
            self.requests.append((method, path, route, status))


class HubServer:
    """The test Hub on 127.0.0.1 and an ephemeral port, served from a thread.

    >>> with HubServer() as hub:
    ...     env = hub.client_env()   # HF_ENDPOINT, token, HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0, ...
    """

    def __init__(self, root: str | None = None, token: str = DEFAULT_TOKEN, port: int = 0):
        self._tmp = tempfile.TemporaryDirectory(prefix="test-hub-") if root is None else None
        self.root = root or self._tmp.name
        self.token = token
        self._httpd = _HubHTTPServer(("127.0.0.1", port), HubRequestHandler)
        self._httpd.state = HubState(self.root, token)
        self._httpd.requests = []
        self.url = self._httpd.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> HubState:
        return self._httpd.state

    @property
    def requests(self) -> list[tuple[str, str, str, int]]:
        """(method, path, route name, status) for every request served so far."""
        return list(self._httpd.requests)

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home: str, base: dict | None = None) -> dict[str, str]:
        """Environment for a client process: this endpoint, online, no Xet, a fresh cache, our token."""
        env = dict(os.environ if base is None else base)
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            env[key] = "0"
        env.update(
            HF_ENDPOINT=self.url,
            HF_TOKEN=self.token,
            HF_HOME=hf_home,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "HF_HUB_CACHE"):
            env.pop(key, None)
        return env

    def run_client(self, code: str, args: dict, hf_home: str, timeout: float = 120, cwd: str | None = None) -> dict:
        """Run `code` in a fresh Python process pointed at this Hub; it gets `args` as JSON in sys.argv[1]
        and answers with one JSON object on its last stdout line, which is returned."""
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            env=self.client_env(hf_home),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(f"Hub client process failed ({result.returncode}):\n{result.stderr[-6000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8777)
    parser.add_argument("--root", default=None, help="where blobs are stored (default: a temporary folder)")
    args = parser.parse_args()
    hub = HubServer(root=args.root, port=args.port).start()
    print(f"HF_ENDPOINT={hub.url} HF_TOKEN={hub.token} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()
