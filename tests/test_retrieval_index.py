"""Nearest-neighbour search: exact chunked kNN (both backends) and the persistent EmbeddingIndex."""

import json

import numpy as np
import pytest
import torch

from prompt_peft.retrieval import EmbeddingIndex, exact_knn

faiss = pytest.importorskip("faiss")


def clustered(seed, n=3000, dim=32, clusters=100, spread=0.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def lattice(seed, n=1200, dim=64, nnz=16):
    """+-1 entries at 16 random places: exact float arithmetic, hence many exact ties in similarity."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, nnz, replace=False)] = rng.choice([-1, 1], nnz)
    x[10:20] = x[0]  # exact duplicates of sample 0
    return x


def brute_force_knn(query, reference, k, self_mode):
    """Full similarity matrix + stable argsort: descending similarity, ties by ascending index."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ r.T.astype(np.float64)
    if self_mode:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), order


def exact_recall(found, expected):
    """Mean fraction of the exact top-k that an approximate search returned."""
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), expected.tolist())])


# ----------------------------------------------------------------------------------------------
# exact_knn
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("data", ["lattice", "clustered"])
@pytest.mark.parametrize("self_mode", [True, False])
def test_exact_knn_matches_brute_force(backend, data, self_mode):
    x = lattice(0) if data == "lattice" else clustered(0, n=1500)[0]
    query, reference = (x, None) if self_mode else (x[:400], x[400:])
    expected_scores, expected = brute_force_knn(query, x if self_mode else reference, 25, self_mode)
    scores, indices = exact_knn(query, reference, 25, backend=backend, chunk_size=128)
    # Same neighbours in the same order, ties included (lattice data has plenty of them).
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-6)


def test_exact_knn_self_mode_keeps_duplicates():
    x = lattice(1)
    _, indices = exact_knn(x, None, 9, backend="faiss")
    # Samples 0 and 10..19 are identical: each one's neighbours are the 9 others of lower index first.
    assert indices[0].tolist() == list(range(10, 19))
    assert indices[15].tolist() == [0, 10, 11, 12, 13, 14, 16, 17, 18]
    assert (indices != torch.arange(len(x))[:, None]).all()  # never the query itself


def test_exact_knn_backends_agree_with_torch_tensors():
    x, _ = clustered(1, n=800)
    a = exact_knn(torch.from_numpy(x), k=12, backend="faiss")
    b = exact_knn(x, k=12, backend="torch", chunk_size=50)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((np.ones((5, 3)), None, 5), {}, r"k must be an integer in \[1, 4\]"),
        ((np.ones((5, 3)), np.ones((2, 3)), 3), {}, r"\[1, 2\]"),
        ((np.ones((5, 3)), np.ones((4, 2)), 1), {}, "dimensions differ"),
        ((np.ones((5, 3)), None, 0), {}, "k must be"),
        ((np.ones(5), None, 1), {}, "2-D"),
        ((np.ones((5, 3)), None, 1), {"backend": "annoy"}, "backend"),
    ],
)
def test_exact_knn_rejects_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        exact_knn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# EmbeddingIndex
# ----------------------------------------------------------------------------------------------


def test_flat_index_is_exact_and_maps_ids_and_labels():
    x, labels = clustered(2, n=1000)
    ids = np.array([f"img_{i:04d}.jpg" for i in range(len(x))])
    index = EmbeddingIndex.build(x[100:], ids=ids[100:], labels=labels[100:])
    assert (len(index), index.dim, index.kind) == (900, 32, "flat")
    scores, found, found_labels = index.search(x[:100], 10, return_labels=True)
    expected_scores, expected = brute_force_knn(x[:100], x[100:], 10, self_mode=False)
    np.testing.assert_array_equal(found, ids[100:][expected])
    np.testing.assert_array_equal(found_labels, labels[100:][expected])
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


@pytest.mark.parametrize(
    "kind,params",
    [
        ("ivf", {}),
        ("hnsw", {}),
        ("ivf", {"nlist": 32, "nprobe": 8}),
        ("hnsw", {"M": 16, "ef_construction": 20, "ef_search": 32}),
    ],
)
def test_approximate_indexes_have_high_recall(kind, params):
    x, _ = clustered(3, spread=1.0)  # overlapping clusters: not every list holds whole clusters
    index = EmbeddingIndex.build(x[500:], kind=kind, **params)
    _, found = index.search(x[:500], 10)
    _, expected = brute_force_knn(x[:500], x[500:], 10, self_mode=False)
    assert exact_recall(found, expected) >= 0.9
    if kind == "ivf" and not params:
        assert index.params == {"nlist": 64, "nprobe": 8}  # min(4 sqrt(N), N // 39) lists, 1/8 probed
    else:
        assert params.items() <= index.params.items()


def test_approximate_index_is_not_trivially_exact():
    """A deliberately starved IVF (1 of 64 lists probed) loses neighbours: the recall check above can fail."""
    x, _ = clustered(3, spread=1.0)
    index = EmbeddingIndex.build(x[500:], kind="ivf", nlist=64, nprobe=1)
    _, found = index.search(x[:500], 10)
    _, expected = brute_force_knn(x[:500], x[500:], 10, self_mode=False)
    assert exact_recall(found, expected) < 0.9


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    x, labels = clustered(4, n=2000)
    ids = np.arange(len(x)) * 7 + 3
    index = EmbeddingIndex.build(x, ids=ids, labels=labels, kind=kind)
    before = index.search(x[:50], 15, return_labels=True)
    index.save(tmp_path / "gallery")
    assert sorted(p.name for p in (tmp_path / "gallery").iterdir()) == [
        "index.faiss",
        "index.json",
        "index_arrays.npz",
    ]
    loaded = EmbeddingIndex.load(tmp_path / "gallery")
    assert (loaded.kind, loaded.params, len(loaded), loaded.dim) == (index.kind, index.params, 2000, 32)
    after = loaded.search(x[:50], 15, return_labels=True)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_string_ids_round_trip_without_pickle(tmp_path):
    x, _ = clustered(5, n=300)
    ids = [f"product/{i}" for i in range(len(x))]
    EmbeddingIndex.build(x, ids=ids).save(tmp_path)
    with np.load(tmp_path / "index_arrays.npz", allow_pickle=False) as arrays:
        assert arrays["ids"].dtype.kind == "U"
    _, found = EmbeddingIndex.load(tmp_path).search(x[:3], 1)
    assert found[:, 0].tolist() == ids[:3]


def test_unfilled_slots_are_marked():
    # One IVF list probed out of 8: some queries have fewer than k candidates.
    x, _ = clustered(6, n=400, clusters=8, spread=0.05)
    index = EmbeddingIndex.build(x, kind="ivf", nlist=8, nprobe=1)
    scores, found = index.search(x[:20], 200)
    missing = found == -1
    assert missing.any()
    assert np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()


@pytest.mark.parametrize(
    "build_kwargs,message",
    [
        ({"embeddings": np.zeros((0, 8))}, "empty"),
        ({"embeddings": np.full((4, 8), np.nan)}, "NaN"),
        ({"embeddings": np.ones(8)}, "2-D"),
        ({"kind": "lsh"}, "kind"),
        ({"kind": "ivf", "M": 16}, "unknown parameters"),
        ({"ids": [1, 1, 2, 3]}, "unique"),
        ({"ids": [1, 2]}, "one entry per embedding"),
        ({"ids": [0.5, 1.5, 2.5, 3.5]}, "integers or strings"),
        ({"labels": [0.5, 1, 1, 1]}, "integers"),
        ({"kind": "ivf", "nlist": 10}, "exceeds the number"),
    ],
)
def test_build_rejects_bad_input(build_kwargs, message):
    args = {"embeddings": np.random.default_rng(0).normal(size=(4, 8))} | build_kwargs
    with pytest.raises(ValueError, match=message):
        EmbeddingIndex.build(**args)


def test_search_rejects_bad_input():
    index = EmbeddingIndex.build(np.random.default_rng(0).normal(size=(20, 8)))
    with pytest.raises(ValueError, match="dimension 4, the index has 8"):
        index.search(np.ones((2, 4)), 3)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((2, 8), np.inf), 3)
    with pytest.raises(ValueError, match=r"\[1, 20\]"):
        index.search(np.ones((2, 8)), 21)
    with pytest.raises(ValueError, match="without labels"):
        index.search(np.ones((2, 8)), 3, return_labels=True)


def test_load_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        EmbeddingIndex.load(tmp_path / "nothing-here")
    x = np.random.default_rng(0).normal(size=(50, 8))
    good = EmbeddingIndex.build(x)

    corrupt_index = good.save(tmp_path / "a")
    (corrupt_index / "index.faiss").write_bytes(b"definitely not a faiss index")
    with pytest.raises(ValueError, match="cannot read faiss index"):
        EmbeddingIndex.load(corrupt_index)

    truncated = good.save(tmp_path / "b")
    data = (truncated / "index.faiss").read_bytes()
    (truncated / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read faiss index"):
        EmbeddingIndex.load(truncated)

    bad_json = good.save(tmp_path / "c")
    (bad_json / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt metadata"):
        EmbeddingIndex.load(bad_json)

    mismatch = good.save(tmp_path / "d")
    meta = json.loads((mismatch / "index.json").read_text())
    (mismatch / "index.json").write_text(json.dumps(meta | {"size": 49}))
    with pytest.raises(ValueError, match="inconsistent"):
        EmbeddingIndex.load(mismatch)

    bad_arrays = good.save(tmp_path / "e")
    (bad_arrays / "index_arrays.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        EmbeddingIndex.load(bad_arrays)
