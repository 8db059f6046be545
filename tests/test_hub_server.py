"""The test Hub (tests/hub_server.py) against the real `huggingface_hub` client.

The client runs in a subprocess: `huggingface_hub` reads HF_ENDPOINT at import time and this test
process runs offline (conftest.py). One subprocess performs a table of client calls and reports
what it saw; the tests below check each line of that report. Error answers are checked with raw
HTTP from this process.
"""

import json
import socket
import urllib.error
import urllib.request

import pytest
from hub_server import HubServer


CLIENT_CALLS = r"""
import json, os, sys
from huggingface_hub import (CommitOperationAdd, HfApi, ModelCard, hf_hub_download, snapshot_download)

report = {}
api = HfApi()
def error_name(call):
    try:
        call()
    except Exception as error:
        return type(error).__name__
    return None

repo = "org/server-demo"
report["create_url"] = str(api.create_repo(repo))
report["create_twice"] = error_name(lambda: api.create_repo(repo))
report["create_exist_ok"] = str(api.create_repo(repo, exist_ok=True))
weights = os.urandom(3000)
first = api.create_commit(repo, [
    CommitOperationAdd("README.md", b"---\nlicense: mit\ntags: [demo]\n---\n# Demo\n"),
    CommitOperationAdd("model.safetensors", weights),
    CommitOperationAdd("sub/notes.txt", b"v1"),
], commit_message="first")
report["noop_commit_keeps_sha"] = api.create_commit(
    repo, [CommitOperationAdd("sub/notes.txt", b"v1")], commit_message="no-op").oid == first.oid
second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="sub/notes.txt", repo_id=repo)
report["new_revision"] = second.oid != first.oid
info = api.model_info(repo)
report["info_sha_is_head"] = info.sha == second.oid
report["siblings"] = sorted(s.rfilename for s in info.siblings)
report["card_license"] = info.card_data.license
tree = {f.path: f for f in api.list_repo_tree(repo, recursive=True)}
report["tree_paths"] = sorted(tree)
import hashlib
report["tree_lfs_sha256_ok"] = tree["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
report["top_level_tree"] = sorted(f.path for f in api.list_repo_tree(repo))
report["download_main"] = open(hf_hub_download(repo, "sub/notes.txt")).read()
report["download_old_sha"] = open(hf_hub_download(repo, "sub/notes.txt", revision=first.oid)).read()
report["download_lfs_ok"] = open(hf_hub_download(repo, "model.safetensors"), "rb").read() == weights
report["snapshot_files"] = sorted(
    os.path.relpath(os.path.join(d, f), p) for p in [snapshot_download(repo, revision=first.oid)]
    for d, _, fs in os.walk(p) for f in fs)
report["missing_file"] = error_name(lambda: hf_hub_download(repo, "nope.txt"))
report["missing_revision"] = error_name(lambda: hf_hub_download(repo, "sub/notes.txt", revision="nope"))
report["missing_repo"] = error_name(lambda: api.model_info("org/missing"))
report["file_exists"] = [api.file_exists(repo, "sub/notes.txt"), api.file_exists(repo, "nope.txt")]
api.create_branch(repo, branch="dev", revision=first.oid)
api.upload_file(path_or_fileobj=b"dev", path_in_repo="sub/notes.txt", repo_id=repo, revision="dev")
report["branches"] = sorted(b.name for b in api.list_repo_refs(repo).branches)
report["branch_download"] = open(hf_hub_download(repo, "sub/notes.txt", revision="dev")).read()
report["main_untouched"] = open(hf_hub_download(repo, "sub/notes.txt", revision="main", force_download=True)).read()
report["dev_history"] = [c.title for c in api.list_repo_commits(repo, revision="dev")]
report["branch_twice"] = error_name(lambda: api.create_branch(repo, branch="dev"))
report["card_load"] = ModelCard.load(repo).data.to_dict()
report["invalid_yaml"] = error_name(lambda: api.upload_file(
    path_or_fileobj=b"---\nlicense: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo))
api.create_repo("org/secret", private=True)
report["private_with_token"] = api.model_info("org/secret").private
report["private_without_token"] = error_name(lambda: HfApi(token=False).model_info("org/secret"))
report["write_without_token"] = error_name(lambda: HfApi(token=False).create_repo("org/anonymous"))
api.delete_repo("org/secret")
report["deleted"] = api.repo_exists("org/secret")
print(json.dumps(report))
"""

EXPECTED_REPORT = [
    ("create_url", lambda url: url.endswith("/org/server-demo")),
    ("create_twice", "HfHubHTTPError"),
    ("create_exist_ok", lambda url: url.endswith("/org/server-demo")),
    ("noop_commit_keeps_sha", True),
    ("new_revision", True),
    ("info_sha_is_head", True),
    ("siblings", [".gitattributes", "README.md", "model.safetensors", "sub/notes.txt"]),
    ("card_license", "mit"),
    ("tree_paths", [".gitattributes", "README.md", "model.safetensors", "sub", "sub/notes.txt"]),
    ("tree_lfs_sha256_ok", True),
    ("top_level_tree", [".gitattributes", "README.md", "model.safetensors", "sub"]),
    ("download_main", "v2"),
    ("download_old_sha", "v1"),
    ("download_lfs_ok", True),
    ("snapshot_files", [".gitattributes", "README.md", "model.safetensors", "sub/notes.txt"]),
    ("missing_file", "RemoteEntryNotFoundError"),
    ("missing_revision", "RevisionNotFoundError"),
    ("missing_repo", "RepositoryNotFoundError"),
    ("file_exists", [True, False]),
    ("branches", ["dev", "main"]),
    ("branch_download", "dev"),
    ("main_untouched", "v2"),
    ("dev_history", ["Upload sub/notes.txt with huggingface_hub", "first", "initial commit"]),
    ("branch_twice", "HfHubHTTPError"),
    ("card_load", {"license": "mit", "tags": ["demo"]}),
    ("invalid_yaml", "ValueError"),
    ("private_with_token", True),
    ("private_without_token", "RepositoryNotFoundError"),
    ("write_without_token", "HfHubHTTPError"),
    ("deleted", False),
]


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def client_report(hub, tmp_path_factory):
    return hub.run_client(CLIENT_CALLS, {}, str(tmp_path_factory.mktemp("hf_home")), timeout=60)


@pytest.mark.parametrize("key, expected", EXPECTED_REPORT, ids=[key for key, _ in EXPECTED_REPORT])
def test_client_call(client_report, key, expected):
    value = client_report[key]
    assert expected(value) if callable(expected) else value == expected, f"{key}: {value!r}"


def test_uploads_went_through_lfs_and_validation(hub, client_report):
    routes = {route for _, _, route, _ in hub.requests}
    assert {"validate_yaml", "preupload", "lfs_batch", "lfs_upload", "lfs_verify", "commit", "resolve"} <= routes
    assert ("unknown", 404) not in {(route, status) for _, _, route, status in hub.requests}


def _http(hub, method, path, body=None, token=True, headers=None):
    request = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {hub.token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def _commit_body(*lines):
    header = {"key": "header", "value": {"summary": "raw"}}
    return "\n".join(json.dumps(line) for line in (header, *lines)).encode()


MISSING_LFS = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 1}}
# (name, method, path, body, token, expected status, expected X-Error-Code)
ERROR_CASES = [
    ("unknown route", "GET", "/api/spaces-of-doom", None, True, 404, None),
    ("missing repo", "GET", "/api/models/org/missing", None, True, 404, "RepoNotFound"),
    ("missing file", "HEAD", "/org/raw/resolve/main/nope.bin", None, True, 404, "EntryNotFound"),
    ("missing revision", "HEAD", "/org/raw/resolve/nope/README.md", None, True, 404, "RevisionNotFound"),
    ("missing tree path", "GET", "/api/models/org/raw/tree/main/nope", None, True, 404, "EntryNotFound"),
    ("private without token", "GET", "/api/models/org/raw-private", None, False, 401, "RepoNotFound"),
    ("create without token", "POST", "/api/repos/create", b'{"name": "x", "organization": "org"}', False, 401, None),
    ("commit to a sha", "POST", "/api/models/org/raw/commit/" + "a" * 40, _commit_body(), True, 404, "RevisionNotFound"),
    ("commit LFS never uploaded", "POST", "/api/models/org/raw/commit/main", _commit_body(MISSING_LFS), True, 422, None),
    ("commit stale parent", "POST", "/api/models/org/raw/commit/main",
     json.dumps({"key": "header", "value": {"summary": "s", "parentCommit": "f" * 40}}).encode(), True, 412, None),
    ("commit unsafe path", "POST", "/api/models/org/raw/commit/main",
     _commit_body({"key": "file", "value": {"path": "../x", "content": "", "encoding": "base64"}}), True, 400, None),
    ("LFS upload with wrong content", "PUT", "/lfs-upload/" + "0" * 64, b"not the object", False, 400, None),
    ("pull requests", "POST", "/api/models/org/raw/commit/main?create_pr=1", _commit_body(), True, 501, None),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, method, path, body, token, status, error_code", ERROR_CASES, ids=[case[0] for case in ERROR_CASES]
)
def test_error_answers(hub, name, method, path, body, token, status, error_code):
    for repo_id, private in (("org/raw", False), ("org/raw-private", True)):
        if ("model", repo_id) not in hub.state.repos:
            hub.state.create_repo("model", repo_id, private)
    got_status, headers = _http(hub, method, path, body, token)
    assert got_status == status, f"{name}: {got_status}"
    assert headers.get("X-Error-Code") == error_code
    if error_code == "EntryNotFound":  # the client caches a file's absence per commit
        assert len(headers.get("X-Repo-Commit", "")) == 40


def test_server_binds_loopback_and_shuts_down():
    server = HubServer().start()
    host, port = server.url.removeprefix("http://").split(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert _http(server, "GET", "/api/whoami-v2")[0] == 200
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()
