"""Tests of the loopback fake Hub (tests/hub_server.py) through the real huggingface_hub client."""

import hashlib
import socket
import threading
from pathlib import Path

import hub_server
import pytest
from hub_server import FakeHub, fill_hf_cache, git_blob_sha1, patch_hf_hub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

fake_hub = hub_server.fake_hub  # the fixture; redundant once tests/conftest.py imports it
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT

REPO = "org/files"


def _write(folder, files):
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


@pytest.fixture
def sample_folder(tmp_path):
    return _write(tmp_path / "upload", {
        "config.json": b'{"a": 1}\n',
        "weights.safetensors": bytes(range(256)) * 64,  # LFS by suffix in "lfs" mode
        "sub/notes.txt": b"hello\n",
    })


def test_fixture_points_client_at_server(fake_hub):
    assert constants.ENDPOINT == fake_hub.endpoint
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(fake_hub.endpoint + "/")
    assert constants.HF_HUB_CACHE == str(fake_hub.cache_dir)
    assert constants.HF_HUB_DISABLE_XET is True
    assert HfApi().endpoint == fake_hub.endpoint
    import huggingface_hub

    url = huggingface_hub.create_repo("org/module-level-api")  # module-level function = import-time HfApi()
    assert url.startswith(fake_hub.endpoint)


def test_create_repo_and_info(fake_hub):
    api = HfApi()
    url = api.create_repo("org/new")
    assert url.repo_id == "org/new" and url.startswith(fake_hub.endpoint)
    with pytest.raises(Exception) as excinfo:
        api.create_repo("org/new")
    assert excinfo.value.response.status_code == 409
    assert api.create_repo("org/new", exist_ok=True).repo_id == "org/new"

    info = api.model_info("org/new")
    assert info.id == "org/new" and len(info.sha) == 40
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert api.model_info("org/new", revision=info.sha).sha == info.sha


@pytest.mark.parametrize("mode", ["lfs", "regular"])
def test_upload_folder_and_download(fake_hub, sample_folder, mode):
    fake_hub.upload_mode = mode
    api = HfApi()
    api.create_repo(REPO)
    info = api.upload_folder(repo_id=REPO, folder_path=sample_folder, commit_message="add files")
    assert info.oid == fake_hub.head(REPO)

    lfs_used = ("POST", f"/{REPO}.git/info/lfs/objects/batch") in fake_hub.requests
    assert lfs_used == (mode == "lfs")
    assert fake_hub.lfs_paths(REPO) == ({"weights.safetensors"} if mode == "lfs" else set())

    for name in ("config.json", "weights.safetensors", "sub/notes.txt"):
        local = hf_hub_download(REPO, name)
        assert Path(local).read_bytes() == (sample_folder / name).read_bytes()
        assert local.startswith(str(fake_hub.cache_dir))

    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert set(tree) == {".gitattributes", "config.json", "weights.safetensors", "sub", "sub/notes.txt"}
    assert tree["config.json"].blob_id == git_blob_sha1(b'{"a": 1}\n')
    weights = (sample_folder / "weights.safetensors").read_bytes()
    if mode == "lfs":
        assert tree["weights.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert [e.path for e in api.list_repo_tree(REPO)] == [".gitattributes", "config.json", "sub",
                                                          "weights.safetensors"]
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/notes.txt"]

    snap = snapshot_download(REPO)
    assert Path(f"{snap}/sub/notes.txt").read_bytes() == b"hello\n"

    # Re-uploading the same files: the client sees equal oids in preupload and makes no commit.
    head = fake_hub.head(REPO)
    assert api.upload_folder(repo_id=REPO, folder_path=sample_folder).oid == head
    assert fake_hub.head(REPO) == head


def test_xet_enabled_client_with_regular_mode(fake_hub, sample_folder):
    fake_hub.enable_xet()
    assert constants.HF_HUB_DISABLE_XET is False
    api = HfApi()
    api.create_repo(REPO)
    info = api.upload_folder(repo_id=REPO, folder_path=sample_folder)  # Xet on -> pipelined upload path
    assert info.oid == fake_hub.head(REPO)
    assert fake_hub.files(REPO)["weights.safetensors"] == (sample_folder / "weights.safetensors").read_bytes()
    assert not any("xet" in path or path.endswith("/batch") for _, path in fake_hub.requests)


def test_commit_history_and_old_revisions(fake_hub, tmp_path):
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="value.txt", repo_id=REPO).oid
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="value.txt", repo_id=REPO).oid
    api.delete_file("value.txt", repo_id=REPO)
    third = fake_hub.head(REPO)
    assert len({first, second, third}) == 3
    assert fake_hub.commits(REPO)[:3] == [third, second, first]
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:3] == [third, second, first]

    assert Path(hf_hub_download(REPO, "value.txt", revision=first)).read_bytes() == b"v1"
    assert Path(hf_hub_download(REPO, "value.txt", revision=second)).read_bytes() == b"v2"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "value.txt")  # deleted on main

    api.create_branch(REPO, branch="dev", revision=second)
    assert api.model_info(REPO, revision="dev").sha == second
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "dev"}


def test_error_codes_map_to_hub_exceptions(fake_hub):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    api.create_repo(REPO)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="f" * 40)
    assert api.file_exists(REPO, ".gitattributes") and not api.file_exists(REPO, "missing.json")
    assert not fake_hub.errors


def test_resolve_headers_and_ranges(fake_hub):
    api = HfApi()
    api.create_repo(REPO)
    data = bytes(range(200))
    api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id=REPO)  # binary -> LFS
    head = fake_hub.head(REPO)
    url = f"{fake_hub.endpoint}/{REPO}/resolve/main/blob.bin"
    session = get_session()

    r = session.head(url)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["X-Repo-Commit"] == head
    assert r.headers["Content-Length"] == "200"
    assert r.headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert r.headers["X-Linked-Size"] == "200"

    r = session.get(url, headers={"Range": "bytes=150-"})
    assert r.status_code == 206 and r.content == data[150:]
    assert r.headers["Content-Range"] == "bytes 150-199/200"
    r = session.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert session.get(url, headers={"Range": "bytes=500-"}).status_code == 416

    r = session.head(f"{fake_hub.endpoint}/{REPO}/resolve/main/nothing.txt")
    assert r.status_code == 404
    assert r.headers["X-Error-Code"] == "EntryNotFound" and r.headers["X-Repo-Commit"] == head
    assert session.head(f"{fake_hub.endpoint}/org/none/resolve/main/x").headers["X-Error-Code"] == "RepoNotFound"


def test_stop_closes_everything(monkeypatch, tmp_path):
    before = {t.ident for t in threading.enumerate()}
    hub = FakeHub().start()
    port = int(hub.endpoint.rsplit(":", 1)[1])
    patch_hf_hub(monkeypatch, hub.endpoint, tmp_path)  # also clears an HF_HUB_OFFLINE=1 set for the whole run
    api = HfApi(endpoint=hub.endpoint, token="x")
    api.create_repo("org/keepalive")  # leaves an idle keep-alive connection in the client pool
    hub.stop()
    hub.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.name == "fake-hub"]
    assert not leftover


def test_fill_hf_cache_layout(tmp_path):
    src = _write(tmp_path / "src", {"a.json": b"{}", "sub/b.txt": b"b"})
    commit = fill_hf_cache(tmp_path / "cache", "org/name", src)
    repo = tmp_path / "cache" / "models--org--name"
    assert (repo / "refs" / "main").read_text() == commit and len(commit) == 40
    assert (repo / "snapshots" / commit / "sub" / "b.txt").read_bytes() == b"b"
    assert fill_hf_cache(tmp_path / "cache", "org/name", src) == commit  # content-addressed, idempotent
    from huggingface_hub import try_to_load_from_cache

    assert try_to_load_from_cache("org/name", "a.json", cache_dir=tmp_path / "cache").endswith(
        f"snapshots/{commit}/a.json")


def test_dataset_repos(fake_hub):
    api = HfApi()
    url = api.create_repo("org/data", repo_type="dataset")
    assert url == f"{fake_hub.endpoint}/datasets/org/data"
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id="org/data", repo_type="dataset")
    api.upload_file(path_or_fileobj=bytes(100), path_in_repo="x.parquet", repo_id="org/data", repo_type="dataset")
    assert api.dataset_info("org/data").sha == fake_hub.head("org/data", repo_type="dataset")
    assert Path(hf_hub_download("org/data", "train.csv", repo_type="dataset")).read_bytes() == b"a,b\n1,2\n"
    assert fake_hub.lfs_paths("org/data", repo_type="dataset") == {"x.parquet"}
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/data", "train.csv")  # a model repo of that name does not exist
