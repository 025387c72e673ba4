"""A loopback fake of the Hugging Face Hub for offline tests (stdlib only), plus its pytest fixture.

Why: ``push_to_hub`` / ``from_pretrained("org/name")`` must be tested without a network, and no installable
package provides the upload half of the Hub API. This module serves the smallest endpoint set
that huggingface_hub 2.4 needs on ``127.0.0.1:<ephemeral port>``, so every client code path
(``HfApi.create_repo``, ``upload_folder``/``create_commit``, LFS batch upload, ``hf_hub_download``,
``snapshot_download``, ``model_info``, ``ModelCard.load``, ``PreTrainedModel``/``PeftModel`` ``push_to_hub`` and
``from_pretrained``) stays real.

Quick use in a test (the ``fake_hub`` fixture starts a server and points huggingface_hub and transformers at it)::

    def test_roundtrip(fake_hub):
        model.push_to_hub("org/tiny-vit")                 # goes to 127.0.0.1
        again = ViTModel.from_pretrained("org/tiny-vit")  # downloads into a per-test HF cache
        assert "config.json" in fake_hub.files("org/tiny-vit")
        old_sha = fake_hub.head("org/tiny-vit")           # 40-hex commit of `main`

Wiring (``tests/`` is not a package; pytest puts it on ``sys.path`` because of ``tests/conftest.py``): add
``from hub_server import fake_hub  # noqa: F401`` to ``tests/conftest.py`` (or ``pytest_plugins = ["hub_server"]``);
a test module can also declare ``pytest_plugins = ["hub_server"]`` itself. Importing this module is cheap (stdlib + pytest only).

The fixture yields the :class:`FakeHub`; useful members: ``endpoint``, ``hf_home`` / ``cache_dir`` (per-test HF home
and hub cache), ``upload_mode`` (``"lfs"`` | ``"regular"``, settable), ``enable_xet()``, ``files(repo_id, revision)``,
``head(repo_id)``, ``commits(repo_id)``, ``lfs_paths(repo_id)``, ``requests`` (``(method, path)`` log),
``validated_yaml`` (READMEs sent to ``/api/validate-yaml``) and ``errors`` (server-side bugs, answered with 599).

Outside pytest: ``with FakeHub() as hub: ...`` (``hub.endpoint``), then point the client at it with
``HF_ENDPOINT=<hub.endpoint>`` *before* importing huggingface_hub (e.g. in a subprocess), or with
:func:`patch_hf_hub` in-process. Offline-cache tests use :func:`fill_hf_cache` and need no server.

What the server models
----------------------
* Repos of type model (dataset/space ids work the same way, under ``/datasets/...`` and ``/api/datasets/...``).
* A real commit history: every commit gets a new 40-hex sha, branches (``main`` and any created with
  ``create_branch``) point at commits, and every older commit sha stays resolvable (``revision=<sha>``).
  A new repo starts with one commit holding ``.gitattributes``, as on the Hub.
* Upload modes (answer of ``preupload``): ``"lfs"`` (default) marks ``*.safetensors``, ``*.bin``, ... , any binary
  sample (a NUL byte in the first 512 bytes, e.g. PNG) and any file of 10 MB or more as LFS, like the Hub's
  ``.gitattributes`` rules; ``"regular"`` answers "regular" for every file under 10 MB (needed when Xet is enabled
  on the client, because this server does not speak Xet). LFS objects use the basic transfer (batch → PUT →
  verify); multipart and Xet are not implemented.
* Downloads: ``HEAD``/``GET /{id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob sha1; for LFS
  files the sha1 of the pointer, plus ``X-Linked-Etag`` = sha256 and ``X-Linked-Size``), ``Content-Length`` and
  ``Range`` support. Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound`` with
  ``X-Repo-Commit``), which ``hf_raise_for_status`` maps to the proper exceptions.
* Authentication is not checked; any token works. Pull requests (``create_pr``) are not supported (400).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "fake_hub", "fill_hf_cache", "git_blob_sha1", "patch_hf_hub"]

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files of 10 MB or more in LFS whatever their type
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz", ".pkl",
    ".pickle", ".zip", ".gz", ".tar", ".tgz", ".zst", ".parquet", ".arrow", ".png", ".jpg", ".jpeg", ".gif",
)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
FAKE_USER = "fake-user"
_ZERO_SHA = "0" * 40
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as ETag and tree ``oid`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


# --------------------------------------------------------------------------------------------------- repo model


@dataclass(eq=False)
class Blob:
    """File content as stored in a commit; ``lfs`` files are served with the LFS headers."""

    data: bytes
    lfs: bool = False

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def git_oid(self) -> str:
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def upload_oid(self) -> str:
        """The oid the client compares with its local one to skip unchanged files (sha256 for LFS, git sha1 else)."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.data), "oid": self.git_oid}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str = ""
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_type: str  # "model" | "dataset" | "space"
    repo_id: str
    private: bool = False
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit sha (older commits stay resolvable)."""
        sha = self.branches.get(revision)
        if sha is None and _SHA_RE.match(revision):
            sha = revision
        return self.commits.get(sha) if sha else None

    def history(self, revision: str) -> list[Commit]:
        out, commit = [], self.resolve(revision)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


# --------------------------------------------------------------------------------------------------- server


class FakeHub:
    """In-memory Hub served over HTTP/1.1 on 127.0.0.1 from a daemon thread.

    ``upload_mode`` is ``"lfs"`` (Hub-like rules, see module docstring) or ``"regular"`` (every file < 10 MB is
    regular); it can be changed at any time. ``requests`` logs ``(method, path)`` of every request served.
    """

    def __init__(self, upload_mode: str = "lfs", lfs_suffixes=LFS_SUFFIXES, lfs_threshold: int = LFS_THRESHOLD):
        self.upload_mode = upload_mode
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.validated_yaml: list[str] = []  # README contents POSTed to /api/validate-yaml
        self.errors: list[str] = []  # unexpected server-side exceptions (answered with 599)
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        # Set by the ``fake_hub`` fixture: the per-test HF home, its hub cache, and the monkeypatch in use.
        self.hf_home: Path | None = None
        self.cache_dir: Path | None = None
        self._monkeypatch = None

    def enable_xet(self) -> None:
        """Exercise the client's default (Xet-enabled) upload path: client Xet on, server answers "regular".

        Only inside the ``fake_hub`` fixture (the change is undone at teardown).
        """
        if self._monkeypatch is None:
            raise RuntimeError("enable_xet() needs the fake_hub fixture")
        from huggingface_hub import constants

        self.upload_mode = "regular"
        self._monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
        self._monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def upload_mode(self) -> str:
        return self._upload_mode

    @upload_mode.setter
    def upload_mode(self, mode: str) -> None:
        if mode not in ("lfs", "regular"):
            raise ValueError(f"upload_mode must be 'lfs' or 'regular', got {mode!r}")
        self._upload_mode = mode

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        hub = self

        class _Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False  # keep-alive client connections would otherwise block server_close()

            def process_request(self, request, client_address):
                with hub.lock:
                    hub._connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with hub.lock:
                    hub._connections.discard(request)
                super().shutdown_request(request)

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], OSError):  # a client that went away is not worth a traceback
                    super().handle_error(request, client_address)

        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open keep-alive connections and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # ends serve_forever
        with self.lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:  # wake handler threads blocked on idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()  # without this the port keeps accepting and a client hangs until its timeout
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- introspection for tests ------------------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha that ``revision`` points at."""
        return self.repo(repo_id, repo_type).resolve(revision).sha

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit shas reachable from ``revision``, newest first."""
        return [c.sha for c in self.repo(repo_id, repo_type).history(revision)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: content}`` of the repo at ``revision``."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return {path: blob.data for path, blob in commit.files.items()}

    def lfs_paths(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> set[str]:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return {path for path, blob in commit.files.items() if blob.lfs}

    # -- state changes (called by the handler, under the lock) ----------------------------------------------------

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        if size >= self.lfs_threshold:
            return True
        if self.upload_mode == "regular":
            return False
        return path.lower().endswith(self.lfs_suffixes) or b"\0" in sample

    def _new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, Blob], title: str, message: str) -> Commit:
        seed = json.dumps(
            [repo.repo_type, repo.repo_id, parent.sha if parent else None, title, next(self._counter),
             sorted((p, b.git_oid) for p, b in files.items())]
        )
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.sha if parent else None, files, title, message)
        repo.commits[commit.sha] = commit
        return commit

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_type, repo_id, private)
            lfs_rules = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in self.lfs_suffixes)
            first = self._new_commit(repo, None, {".gitattributes": Blob(lfs_rules.encode())}, "initial commit", "")
            repo.branches["main"] = first.sha
            self.repos[(repo_type, repo_id)] = repo
            return repo


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.headers = status, message, error_code, headers or {}


def _repo_not_found(repo_id: str) -> _HTTPError:
    return _HTTPError(404, f"Repository not found: {repo_id}", "RepoNotFound")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # httpx keeps connections alive; every response carries Content-Length
    server_version = "FakeHub/1.0"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid Nagle + delayed-ACK stalls (40 ms)

    def log_message(self, format, *args):  # keep test output clean
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host') or f'127.0.0.1:{self.server.server_address[1]}'}"

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body=b"", headers: dict | None = None, content_type: str | None = None) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            content_type = content_type or "application/json"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", content_type or "application/octet-stream")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._read_body() if self.command in ("POST", "PUT", "DELETE") else b""
        with self.hub.lock:
            self.hub.requests.append((self.command, unquote(url.path)))
        try:
            route = self._route(self.command, url.path.split("/")[1:])
            if route is None:
                raise _HTTPError(404, f"no route for {self.command} {url.path}")
            handler, args = route
            status, payload, headers = handler(*args, query=query, body=body)
            self._send(status, payload, headers)
        except _HTTPError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            self._send(err.status, {"error": err.message}, headers)
        except Exception as exc:  # noqa: BLE001  (a server bug: answer instead of dropping the connection, keep a trace)
            with self.hub.lock:
                self.hub.errors.append(f"{self.command} {self.path}: {traceback.format_exc()}")
            self._send(599, {"error": f"fake hub error: {exc!r}"})  # 599: not retried by the client

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routing -------------------------------------------------------------------------------------------------

    def _route(self, method: str, seg: list[str]):
        """Map raw (still URL-quoted) path segments to a handler; ``{rev}`` and paths are unquoted here."""
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self.h_create_repo, ()
            if method in ("POST", "DELETE") and rest == ["repos", "delete"]:
                return self.h_delete_repo, ()
            if method == "POST" and rest == ["validate-yaml"]:
                return self.h_validate_yaml, ()
            if method == "GET" and rest == ["whoami-v2"]:
                return self.h_whoami, ()
            if len(rest) >= 3 and rest[0] in REPO_TYPES:
                key = (REPO_TYPES[rest[0]], f"{rest[1]}/{rest[2]}")
                action, args = rest[3:4], rest[4:]
                if not action and method in ("GET", "HEAD"):
                    return self.h_info, (key, "main")
                table = {
                    ("GET", "revision"): self.h_info, ("HEAD", "revision"): self.h_info,
                    ("POST", "preupload"): self.h_preupload, ("POST", "commit"): self.h_commit,
                    ("GET", "tree"): self.h_tree, ("POST", "paths-info"): self.h_paths_info,
                    ("GET", "commits"): self.h_commits, ("POST", "branch"): self.h_create_branch,
                }
                if action == ["refs"] and method == "GET":
                    return self.h_refs, (key,)
                handler = table.get((method, action[0] if action else ""))
                if handler is not None and args:
                    rev, path = unquote(args[0]), unquote("/".join(args[1:]))
                    return (handler, (key, rev, path)) if handler == self.h_tree else (handler, (key, rev))
            return None
        if seg[:1] == ["__lfs"] and len(seg) >= 2:
            if method == "PUT" and len(seg) == 2:
                return self.h_lfs_put, (seg[1],)
            if method == "POST" and seg[2:] == ["verify"]:
                return self.h_lfs_verify, (seg[1],)
            return None
        repo_type = "model"
        if seg[:1] in (["datasets"], ["spaces"]):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if method == "POST" and seg[2:] == ["info", "lfs", "objects", "batch"] and seg[1].endswith(".git"):
            return self.h_lfs_batch, ((repo_type, f"{seg[0]}/{seg[1][:-4]}"),)
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self.h_resolve, ((repo_type, f"{seg[0]}/{seg[1]}"), unquote(seg[3]), unquote("/".join(seg[4:])))
        return None

    # -- helpers -----------------------------------------------------------------------------------------------

    def _repo(self, key: tuple[str, str]) -> Repo:
        repo = self.hub.repos.get(key)
        if repo is None:
            raise _repo_not_found(key[1])
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.base_url}/{prefix}{repo.repo_id}"

    # -- API handlers: each returns (status, body, headers) ----------------------------------------------------

    def h_create_repo(self, *, query, body):
        data = json.loads(body or b"{}")
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or FAKE_USER}/{data['name']}"
        private = data.get("private") or data.get("visibility") == "private"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                repo = self.hub.repos[(repo_type, repo_id)]
                return 409, {"error": "You already created this repo", "url": self._repo_url(repo)}, {}
            repo = self.hub.create_repo(repo_id, repo_type, bool(private))
        return 200, {"url": self._repo_url(repo), "name": repo_id, "id": repo_id}, {}

    def h_delete_repo(self, *, query, body):
        data = json.loads(body or b"{}")
        key = (data.get("type") or "model", f"{data.get('organization') or FAKE_USER}/{data['name']}")
        with self.hub.lock:
            if self.hub.repos.pop(key, None) is None:
                raise _repo_not_found(key[1])
        return 200, b"", {}

    def h_validate_yaml(self, *, query, body):
        # Only the real Hub knows its metadata schema; record what was sent and accept it.
        with self.hub.lock:
            self.hub.validated_yaml.append(json.loads(body or b"{}").get("content", ""))
        return 200, {"errors": [], "warnings": []}, {}

    def h_whoami(self, *, query, body):
        return 200, {"type": "user", "name": FAKE_USER, "fullname": "Fake User", "orgs": [],
                     "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}}, {}

    def h_info(self, key, rev="main", *, query, body):
        with self.hub.lock:
            repo = self._repo(key)
            commit = self._commit(repo, rev)
            siblings = []
            for path, blob in sorted(commit.files.items()):
                sib = {"rfilename": path, "size": len(blob.data), "blobId": blob.git_oid}
                if blob.lfs:
                    sib["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
                siblings.append(sib)
        info = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": commit.sha, "private": repo.private, "disabled": False,
                "gated": False, "downloads": 0, "likes": 0, "tags": [], "lastModified": commit.date,
                "createdAt": repo.created_at, "siblings": siblings}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return 200, info, {}

    def h_preupload(self, key, rev, *, query, body):
        if query.get("create_pr"):
            raise _HTTPError(400, "create_pr is not supported by the fake hub")
        files = json.loads(body)["files"]
        with self.hub.lock:
            commit = self._commit(self._repo(key), rev)
            out = []
            for f in files:
                sample = base64.b64decode(f.get("sample") or "")
                existing = commit.files.get(f["path"])
                out.append({"path": f["path"], "shouldIgnore": False,
                            "uploadMode": "lfs" if self.hub._is_lfs(f["path"], f.get("size", 0), sample) else "regular",
                            "oid": existing.upload_oid if existing is not None else None})
        return 200, {"files": out, "commitOid": commit.sha}, {}

    def h_commit(self, key, rev, *, query, body):
        if query.get("create_pr"):
            raise _HTTPError(400, "create_pr is not supported by the fake hub")
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not items or items[0].get("key") != "header":
            raise _HTTPError(400, "the first ndjson line must be the commit header")
        header = items[0]["value"]
        with self.hub.lock:
            repo = self._repo(key)
            if rev not in repo.branches:
                if repo.resolve(rev) is not None:
                    raise _HTTPError(400, f"cannot commit on {rev}: not a branch")
                raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.commits[repo.branches[rev]]
            if header.get("parentCommit") not in (None, head.sha):
                raise _HTTPError(412, f"parentCommit {header['parentCommit']} is not the head of {rev} ({head.sha})")
            files = dict(head.files)
            for item in items[1:]:
                kind, value = item["key"], item["value"]
                path = value["path"]
                if kind == "file":
                    files[path] = Blob(base64.b64decode(value["content"]))
                elif kind == "lfsFile":
                    data = self.hub.lfs_objects.get(value["oid"])
                    if data is None:
                        raise _HTTPError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                    files[path] = Blob(data, lfs=True)
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HTTPError(404, f"cannot delete {path}: no such file", "EntryNotFound")
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise _HTTPError(400, f"unsupported commit operation {kind!r}")
            commit = self.hub._new_commit(repo, head, files, header.get("summary") or "update",
                                          header.get("description") or "")
            repo.branches[rev] = commit.sha
        return 200, {"success": True, "commitOid": commit.sha,
                     "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}"}, {}

    def _entries(self, commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and prefix[:-1] in commit.files:
            return [commit.files[prefix[:-1]].tree_entry(prefix[:-1])]
        files, dirs = [], {}
        for p, blob in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                d = prefix + "/".join(parts[:depth])
                dirs.setdefault(d, hashlib.sha1(f"{commit.sha}:{d}".encode()).hexdigest())
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                files.append(blob.tree_entry(p))
        if prefix and not files and not dirs:
            raise _HTTPError(404, f"{path} does not exist at {commit.sha}", "EntryNotFound",
                             {"X-Repo-Commit": commit.sha})
        folders = [{"type": "directory", "path": d, "oid": oid, "size": 0} for d, oid in sorted(dirs.items())]
        return sorted(folders + files, key=lambda e: e["path"])

    def h_tree(self, key, rev, path, *, query, body):
        recursive = query.get("recursive", "").lower() in ("1", "true")
        with self.hub.lock:
            commit = self._commit(self._repo(key), rev)
            return 200, self._entries(commit, path, recursive), {}

    def h_paths_info(self, key, rev, *, query, body):
        try:
            paths = json.loads(body).get("paths", [])
        except ValueError:  # form-encoded
            paths = parse_qs(body.decode()).get("paths", [])
        with self.hub.lock:
            commit = self._commit(self._repo(key), rev)
            out = []
            for p in paths:
                if p in commit.files:
                    out.append(commit.files[p].tree_entry(p))
                elif any(f.startswith(p.rstrip("/") + "/") for f in commit.files):
                    out.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0})
        return 200, out, {}

    def h_commits(self, key, rev, *, query, body):
        with self.hub.lock:
            repo = self._repo(key)
            self._commit(repo, rev)
            items = [{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                      "authors": [{"user": FAKE_USER}]} for c in repo.history(rev)]
        return 200, items, {}

    def h_refs(self, key, *, query, body):
        with self.hub.lock:
            repo = self._repo(key)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in repo.branches.items()]
        return 200, {"branches": branches, "tags": [], "converts": [], "pullRequests": []}, {}

    def h_create_branch(self, key, branch, *, query, body):
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        with self.hub.lock:
            repo = self._repo(key)
            if branch in repo.branches:
                raise _HTTPError(409, f"branch {branch} already exists")
            repo.branches[branch] = self._commit(repo, start).sha
        return 200, {}, {}

    # -- LFS (basic transfer) ----------------------------------------------------------------------------------------

    def h_lfs_batch(self, key, *, query, body):
        data = json.loads(body)
        if data.get("operation") != "upload":
            raise _HTTPError(400, "the fake hub only implements LFS uploads (downloads go through /resolve)")
        self._repo(key)
        objects = []
        for obj in data.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:  # no "actions" = already stored, the client skips the upload
                entry["actions"] = {"upload": {"href": f"{self.base_url}/__lfs/{oid}", "header": {}},
                                    "verify": {"href": f"{self.base_url}/__lfs/{oid}/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, \
            {"Content-Type": "application/vnd.git-lfs+json"}

    def h_lfs_put(self, oid, *, query, body):
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HTTPError(400, f"uploaded content does not hash to {oid}")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
        return 200, b"", {}

    def h_lfs_verify(self, oid, *, query, body):
        data = json.loads(body or b"{}")
        stored = self.hub.lfs_objects.get(oid)
        if stored is None or len(stored) != data.get("size", len(stored)):
            raise _HTTPError(404, f"LFS object {oid} not found")
        return 200, {"success": True}, {}

    # -- downloads -----------------------------------------------------------------------------------------------

    def h_resolve(self, key, rev, path, *, query, body):
        with self.hub.lock:
            commit = self._commit(self._repo(key), rev)
            blob = commit.files.get(path)
        if blob is None:
            raise _HTTPError(404, f"{path} does not exist at {commit.sha}", "EntryNotFound",
                             {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.git_oid}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        data, total = blob.data, len(blob.data)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and match.group(0) != "bytes=-":
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), total - 1) if last else total - 1
            else:  # suffix range: the last N bytes
                start, end = max(total - int(last), 0), total - 1
            if start >= total or start > end:
                raise _HTTPError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            return 206, data[start:end + 1], headers
        return 200, data, headers


# --------------------------------------------------------------------------------------------------- client wiring


def patch_hf_hub(monkeypatch, endpoint: str | None, hf_home, *, disable_xet: bool = True,
                 token: str | None = "hf_fake_token", offline: bool = False) -> None:
    """Point huggingface_hub (and transformers / datasets if imported) at ``endpoint`` and a private HF home.

    huggingface_hub reads its environment once, at import (``constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``,
    ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``, ...), and some objects copy the endpoint when they
    are built, so setting ``HF_ENDPOINT`` inside a test is not enough. This patches, undone by ``monkeypatch``:

    * ``huggingface_hub.constants``: ``ENDPOINT`` (API calls) and ``HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url``,
      i.e. every download), the cache/home paths (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``,
      ``HF_XET_CACHE``, token paths, small state files) so nothing touches ``~/.cache/huggingface``,
      ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` (the server has no Xet; with ``disable_xet=False`` set the hub's
      ``upload_mode`` to ``"regular"``).
    * ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi()`` behind ``create_repo``, ``model_info``,
      ``file_exists``, ``upload_folder``, ... is built at import with the old endpoint; and the import-time copies
      ``utils._cache_manager.HF_HUB_CACHE`` (``scan_cache_dir()``), ``utils._cache_assets.HF_ASSETS_CACHE``.
    * ``transformers.utils.hub._hf_api``: transformers' lazily created shared ``HfApi`` (reset to ``None``).
    * ``datasets.config.HF_ENDPOINT`` / ``HUB_DATASETS_URL`` when datasets is imported.
    * environment: ``HF_TOKEN`` (any string works, the server ignores it; ``None`` removes it), and ``HF_ENDPOINT``,
      ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE`` so that subprocesses started by the
      test see the same configuration.
    """
    from huggingface_hub import constants, hf_api

    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    values = {
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache), "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"), "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"), "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "HF_HUB_OFFLINE": offline, "HF_HUB_DISABLE_XET": disable_xet, "HF_HUB_DISABLE_TELEMETRY": True,
    }
    if endpoint is not None:
        endpoint = endpoint.rstrip("/")
        values["ENDPOINT"] = endpoint
        values["HUGGINGFACE_CO_URL_TEMPLATE"] = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    # Copies made with ``from ..constants import X`` at import time (scan_cache_dir(), cached_assets_path()).
    for module, name, value in (("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(hub_cache)),
                                ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(hf_home / "assets")),
                                ("huggingface_hub.utils._git_credential", "ENDPOINT", endpoint)):
        if module in sys.modules and value is not None:
            monkeypatch.setattr(sys.modules[module], name, value)

    if "transformers.utils.hub" in sys.modules:
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None and endpoint is not None:
        monkeypatch.setattr(datasets_config, "HF_ENDPOINT", endpoint, raising=False)
        monkeypatch.setattr(datasets_config, "HUB_DATASETS_URL",
                            endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}", raising=False)
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", offline, raising=False)

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var, on in (("HF_HUB_DISABLE_XET", disable_xet), ("HF_HUB_OFFLINE", offline)):
        if on:
            monkeypatch.setenv(var, "1")
        else:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


def fill_hf_cache(cache_dir, repo_id: str, src_dir, revision: str = "main", repo_type: str = "model",
                  commit: str | None = None) -> str:
    """Place the files of ``src_dir`` in a Hugging Face hub cache as if ``repo_id`` had been downloaded.

    Layout: ``<cache_dir>/<type>s--<org>--<name>/snapshots/<commit>/<files>`` plus
    ``refs/<revision>`` holding the commit; plain files are enough (no ``blobs/`` symlinks). ``commit`` defaults to
    a sha1 over the folder's content, so refilling with the same files is idempotent. With ``HF_HUB_OFFLINE=1`` and
    ``HF_HUB_CACHE=cache_dir`` (set before huggingface_hub is imported), ``from_pretrained(repo_id)`` then resolves
    from this folder; ``revision=<commit>`` works too. Returns the commit sha.
    """
    src_dir = Path(src_dir)
    if commit is None:
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
            digest.update(path.relative_to(src_dir).as_posix().encode() + b"\0" + path.read_bytes())
        commit = digest.hexdigest()
    if not _SHA_RE.match(commit):
        raise ValueError(f"commit must be 40 lowercase hex characters, got {commit!r}")
    repo_dir = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(src_dir, repo_dir / "snapshots" / commit, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return commit


try:
    import pytest
except ImportError:  # the server itself is usable without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_hub(monkeypatch, tmp_path):
        """A running :class:`FakeHub` with huggingface_hub/transformers pointed at it (see :func:`patch_hf_hub`).

        Per test: a fresh server (empty), HF home ``tmp_path / "hf_home"`` (cache in ``.../hub``), ``HF_TOKEN`` set to
        a dummy, Xet disabled (LFS files use the basic LFS transfer). To exercise the client's Xet-enabled upload
        path, call ``fake_hub.enable_xet()``: it switches the server to ``upload_mode="regular"`` and the client
        constant back on. ``fake_hub.hf_home`` / ``fake_hub.cache_dir`` give the paths. The server is stopped and
        every patch undone at teardown.
        """
        hub = FakeHub().start()
        endpoint = hub.endpoint
        hub.hf_home = tmp_path / "hf_home"
        hub.cache_dir = hub.hf_home / "hub"
        hub._monkeypatch = monkeypatch
        try:
            patch_hf_hub(monkeypatch, endpoint, hub.hf_home)
            yield hub
        finally:
            hub.stop()
            hub._monkeypatch = None
            # transformers may have built its shared HfApi during the test, after our patch: drop it so that no
            # later test talks to this (now closed) endpoint.
            tf_hub = sys.modules.get("transformers.utils.hub")
            if tf_hub is not None and getattr(getattr(tf_hub, "_hf_api", None), "endpoint", "") == endpoint:
                tf_hub._hf_api = None


if __name__ == "__main__":  # manual use: python tests/hub_server.py  -> serve until Ctrl-C
    with FakeHub(upload_mode=os.environ.get("FAKE_HUB_UPLOAD_MODE", "lfs")) as _hub:
        print(f"fake hub at {_hub.endpoint} (HF_ENDPOINT={_hub.endpoint} HF_HUB_DISABLE_XET=1)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
