"""Retrieval metrics: equality with pytorch-metric-learning, brute-force Recall@K, edge cases, evaluate shim.

Two kinds of randomised fixtures are used:

* "lattice" embeddings: 16 entries of +-1 in 64 dims. They normalise exactly to +-1/4 and every dot
  product is a multiple of 1/16, so all implementations (faiss IP, faiss L2, torch, numpy) compute
  bit-identical similarities. That gives many exact ties, on which every implementation has to
  follow the same tie rule (descending similarity, ascending index) to agree.
* Gaussian class clusters: realistic continuous embeddings (ties only between exact duplicates of
  the same class, which cannot change any metric).
"""

import functools
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prompt_peft.retrieval import EVALUATE_METRIC_PATH, evaluate_embeddings
from prompt_peft.retrieval import metrics as metrics_module
from prompt_peft.retrieval.knn import default_chunk_size

pml_accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")

# 64 is above the largest R (39), so the search depth is set by ks there, by R otherwise.
KS = (1, 2, 4, 8, 64)
PML_KEYS = {
    "recall@1": "precision_at_1",
    "map@r": "mean_average_precision_at_r",
    "r_precision": "r_precision",
}


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


def class_labels(rng, sizes):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return labels[rng.permutation(len(labels))]


def mixed_sizes(rng, n_classes):
    """Very different class sizes: singletons (lone queries), pairs, small and large classes."""
    return rng.choice([1, 1, 2, 2, 3, 4, 6, 9, 15, 40], size=n_classes)


def lattice_embeddings(rng, labels, moves=8):
    """Raw +-1 vectors (norm 4) around a random centre per class; see the module docstring."""
    d, nnz = 64, 16
    centres = np.zeros((labels.max() + 1, d), np.float32)
    for c in centres:
        c[rng.choice(d, nnz, replace=False)] = rng.choice([-1, 1], nnz)
    x = centres[labels].copy()
    for row in x:
        for _ in range(rng.integers(0, moves + 1)):  # move one non-zero to a random empty slot
            row[rng.choice(np.flatnonzero(row))] = 0
            row[rng.choice(np.flatnonzero(row == 0))] = rng.choice([-1, 1])
    return x


def add_duplicates(rng, x, labels, n_same, n_cross):
    """Overwrite samples with exact copies of others: of the same class and of other classes."""
    x = x.copy()
    for _ in range(n_same):
        cls = rng.choice(np.flatnonzero(np.bincount(labels) > 1))
        i, j = rng.choice(np.flatnonzero(labels == cls), 2, replace=False)
        x[i] = x[j]
    for _ in range(n_cross):
        i, j = rng.choice(len(x), 2, replace=False)
        x[i] = x[j]
    return x


def gaussian_embeddings(rng, labels, dim=32, spread=1.0):
    centres = rng.normal(size=(labels.max() + 1, dim))
    return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)


@functools.cache
def lattice_case(seed, n_classes=150):
    rng = np.random.default_rng(seed)
    labels = class_labels(rng, mixed_sizes(rng, n_classes))
    x = add_duplicates(rng, lattice_embeddings(rng, labels), labels, n_same=30, n_cross=30)
    return x, labels


@functools.cache
def gaussian_case(seed, n_classes=150):
    rng = np.random.default_rng(seed)
    labels = class_labels(rng, mixed_sizes(rng, n_classes))
    x = add_duplicates(rng, gaussian_embeddings(rng, labels), labels, n_same=30, n_cross=0)
    return x, labels


def split(seed, n):
    """Random query/gallery split (In-Shop style); some query classes end up absent from the gallery."""
    return np.random.default_rng(seed + 1000).random(n) < 0.4


# ----------------------------------------------------------------------------------------------
# references: pytorch-metric-learning and brute force
# ----------------------------------------------------------------------------------------------


def pml(query, query_labels, reference=None, reference_labels=None):
    """PML AccuracyCalculator on L2-normalised embeddings (its testers normalise with F.normalize)."""
    calc = pml_accuracy.AccuracyCalculator(
        include=tuple(PML_KEYS.values()), k="max_bin_count", device=torch.device("cpu")
    )

    def norm(a):
        return F.normalize(torch.from_numpy(a), dim=1)

    if reference is None:
        return calc.get_accuracy(norm(query), torch.from_numpy(query_labels))
    return calc.get_accuracy(
        norm(query), torch.from_numpy(query_labels), norm(reference), torch.from_numpy(reference_labels)
    )


def brute_force_recall(query, query_labels, reference=None, reference_labels=None, ks=KS):
    """Recall@K from a full similarity matrix and a stable argsort (ties by ascending index)."""
    self_mode = reference is None
    if self_mode:
        reference, reference_labels = query, query_labels
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    sim = q @ r.T
    if self_mode:
        np.fill_diagonal(sim, -np.inf)  # exclusion by index
    order = np.argsort(-sim, axis=1, kind="stable")
    if self_mode:
        order = order[:, :-1]  # the query itself, ranked last
    match = reference_labels[order] == query_labels[:, None]
    has_relevant = match.any(axis=1)  # lone queries are left out, as in PML
    return {f"recall@{k}": match[has_relevant, :k].any(axis=1).mean() for k in ks}


@functools.cache
def references_for(make_case, seed, gallery):
    """PML and brute-force results for a fixture (cached: shared by the backend parametrisations)."""
    x, labels = make_case(seed)
    if not gallery:
        return (x, labels), pml(x, labels), brute_force_recall(x, labels)
    is_query = split(seed, len(labels))
    args = x[is_query], labels[is_query], x[~is_query], labels[~is_query]
    return args, pml(*args), brute_force_recall(*args)


def assert_matches(ours, pml_result, brute):
    for key, pml_key in PML_KEYS.items():
        assert ours[key] == pytest.approx(pml_result[pml_key], abs=1e-6), key
    for key, value in brute.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


# ----------------------------------------------------------------------------------------------
# equality with PML and brute force
# ----------------------------------------------------------------------------------------------


def test_pml_faiss_l2_orders_ties_by_index():
    """PML searches with faiss IndexFlatL2, which keeps tied items in ascending index order.

    That is our tie rule, so PML and we agree even on tied data. If a faiss release changed it, the
    lattice comparisons below would fail; this test names the cause.
    """
    faiss = pytest.importorskip("faiss")
    x = lattice_embeddings(np.random.default_rng(0), np.arange(500) % 50) / 4
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, found = index.search(x, 20)
    expected = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :20]
    assert (found == expected).all()


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("make_case,seed", [(lattice_case, 0), (lattice_case, 1), (gaussian_case, 2)])
def test_self_retrieval_matches_pml_and_brute_force(make_case, seed, backend):
    (x, labels), pml_result, brute = references_for(make_case, seed, gallery=False)
    assert np.bincount(labels).min() == 1 and np.bincount(labels).max() == 40  # lone and large classes
    ours = evaluate_embeddings(x, labels, ks=KS, backend=backend)
    assert 0.05 < ours["map@r"] < 0.9  # a fixture where the ranking actually matters
    assert_matches(ours, pml_result, brute)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("make_case,seed", [(lattice_case, 4), (gaussian_case, 5)])
def test_query_gallery_matches_pml_and_brute_force(make_case, seed, backend):
    (q, ql, g, gl), pml_result, brute = references_for(make_case, seed, gallery=True)
    assert not np.isin(ql, gl).all()  # some queries have no relevant gallery item (lone)
    ours = evaluate_embeddings(q, ql, g, gl, ks=KS, backend=backend)
    assert_matches(ours, pml_result, brute)


def test_gallery_mode_excludes_nothing():
    """With a separate gallery, a gallery item identical to the query (same index or not) is a valid hit."""
    x, labels = gaussian_case(2)
    ours = evaluate_embeddings(x, labels, x, labels, ks=(1,))
    assert ours["recall@1"] == 1.0  # every query retrieves itself first
    assert_matches(ours, pml(x, labels, x, labels), {})


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_backends_and_chunk_sizes_give_identical_metrics(backend):
    x, labels = lattice_case(7)
    reference = evaluate_embeddings(x, labels, ks=(1, 5, 10, 50), backend="torch", chunk_size=10_000)
    for chunk in (250, 1000):  # uneven last chunks; 1266 % 250 = 16 < 20 queries takes faiss' non-BLAS path
        assert (
            evaluate_embeddings(x, labels, ks=(1, 5, 10, 50), backend=backend, chunk_size=chunk) == reference
        )


def test_torch_and_numpy_inputs_agree():
    x, labels = gaussian_case(8)
    from_numpy = evaluate_embeddings(x, labels)
    assert evaluate_embeddings(torch.from_numpy(x), torch.from_numpy(labels)) == from_numpy
    # String labels are fine too: only equality of labels matters.
    assert evaluate_embeddings(x, np.array([f"class-{v}" for v in labels])) == from_numpy


# ----------------------------------------------------------------------------------------------
# hand-computed cases
# ----------------------------------------------------------------------------------------------


def test_exact_duplicate_of_query_counts_as_neighbour():
    """Self-exclusion is by index: a duplicate of the query (another sample) is still retrieved."""
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]], np.float32)
    labels = np.array([0, 0, 1, 2])  # sample 2 and 3 are lone
    out = evaluate_embeddings(x, labels, ks=(1,))
    # An equality-based exclusion would drop sample 1 for query 0 (and vice versa) and give 0.
    assert out == {"recall@1": 1.0, "map@r": 1.0, "r_precision": 1.0}


def test_hand_computed_map_at_r():
    # Angles on the unit circle; query 0 (label 0) ranks: 1 (label 1), 2 (label 0), 3 (label 0), 4 (label 1).
    angles = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array([0, 1, 0, 0, 1])
    out = evaluate_embeddings(x[:1], labels[:1], x[1:], labels[1:], ks=(1, 2, 3))
    # R = 2: ranks 1..2 hold (miss, hit) -> r_precision 1/2, AP@R = (1/2) * (1/2) = 0.25
    assert out == {"recall@1": 0.0, "recall@2": 1.0, "recall@3": 1.0, "map@r": 0.25, "r_precision": 0.5}


def test_lone_queries_are_left_out():
    # Two tight pairs (0,1) and (2,3); sample 4 is alone in its class and its nearest neighbour is 0.
    x = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, -0.3]], np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    out = evaluate_embeddings(x, labels, ks=(1,))
    assert out == {"recall@1": 1.0, "map@r": 1.0, "r_precision": 1.0}  # 0.8 if sample 4 were counted
    assert pml(x, labels)["precision_at_1"] == 1.0


def test_all_lone_gives_nan_like_pml():
    x = np.eye(4, dtype=np.float32)
    with pytest.warns(UserWarning, match="lone"):
        out = evaluate_embeddings(x, np.arange(4), ks=(1, 2))
    assert set(out) == {"recall@1", "recall@2", "map@r", "r_precision"}
    assert all(np.isnan(v) for v in out.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(pml(x, np.arange(4))["precision_at_1"])


# ----------------------------------------------------------------------------------------------
# search size and memory bound
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("self_mode,expected", [(True, 11), (False, 12)])
def test_searches_only_the_neighbours_the_metrics_need(monkeypatch, self_mode, expected):
    """SOP-like sizes (2..12 per class): k = max(max(ks), max R) = 11 (+1 for self inside the search)."""
    seen = []
    original = metrics_module.knn_chunks

    def spy(query, reference, k, **kwargs):
        seen.append((k, kwargs["exclude_self"]))
        return original(query, reference, k, **kwargs)

    monkeypatch.setattr(metrics_module, "knn_chunks", spy)
    rng = np.random.default_rng(9)
    sizes = rng.integers(2, 13, 40)
    sizes[0] = 12
    labels = class_labels(rng, sizes)
    x = gaussian_embeddings(rng, labels)
    if self_mode:
        evaluate_embeddings(x, labels, ks=(1, 2, 4, 8))
    else:
        evaluate_embeddings(x, labels, x, labels, ks=(1, 2, 4, 8))
    assert seen == [(expected, self_mode)]


def test_sop_sized_chunks_stay_small():
    # One chunk's similarity block for a 60,502-item gallery is at most 256 MiB, never N x N.
    rows = default_chunk_size(60_502)
    assert rows * 60_502 * 4 <= 256 * 2**20 and rows < 60_502


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

GOOD = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
GOOD_LABELS = np.array([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"query_labels": GOOD_LABELS[:5]}, "5 entries"),
        ({"query": GOOD[0]}, "2-D"),
        ({"query": GOOD[:, None]}, "2-D"),
        ({"query": np.where(np.eye(6, 4) > 0, np.nan, GOOD)}, "NaN"),
        ({"query": np.where(np.eye(6, 4) > 0, np.inf, GOOD)}, "NaN or infinite"),
        ({"query": np.zeros((0, 4)), "query_labels": np.zeros(0)}, "empty"),
        ({"query": np.zeros((6, 0)), "query_labels": GOOD_LABELS}, "empty"),
        ({"query_labels": GOOD_LABELS[:, None]}, "1-D"),
        ({"reference": GOOD[:, :3], "reference_labels": GOOD_LABELS}, "dimensions differ"),
        ({"reference": GOOD, "reference_labels": GOOD_LABELS[:4]}, "4 entries"),
        ({"reference": GOOD}, "reference_labels are required"),
        ({"reference_labels": GOOD_LABELS}, "without reference"),
        ({"ks": (1, 0)}, "positive"),
        ({"ks": (-2,)}, "positive"),
        ({"ks": ()}, "non-empty"),
        ({"ks": (1.5,)}, "integers"),
        ({"ks": (1, 6)}, "exceeds the 5 references"),  # self mode: 6 samples -> 5 candidates
        ({"reference": GOOD[:3], "reference_labels": GOOD_LABELS[:3], "ks": (4,)}, "exceeds the 3"),
        ({"backend": "gpu", "ks": (1,)}, "backend"),
    ],
)
def test_invalid_inputs_raise(kwargs, message):
    args = {"query": GOOD, "query_labels": GOOD_LABELS} | kwargs
    with pytest.raises(ValueError, match=message):
        evaluate_embeddings(**args)


def test_k_equal_to_gallery_size_is_allowed():
    out = evaluate_embeddings(GOOD, GOOD_LABELS, ks=(5,))
    assert out["recall@5"] == 1.0


# ----------------------------------------------------------------------------------------------
# evaluate shim
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "script"])
def test_evaluate_module_loads_offline_and_matches(tmp_path, monkeypatch, form):
    """`evaluate.load(<folder or script>)` offline, with sockets blocked; same numbers as the plain function."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # used if evaluate is imported here
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)  # in case it was imported before

    def no_network(*args, **kwargs):
        raise AssertionError("evaluate.load tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    x, labels = gaussian_case(2)
    path = EVALUATE_METRIC_PATH if form == "folder" else os.path.join(EVALUATE_METRIC_PATH, "retrieval_metrics.py")
    metric = evaluate.load(path, cache_dir=str(tmp_path / "cache"))
    half = len(x) // 2
    metric.add_batch(predictions=x[:half], references=labels[:half])
    metric.add_batch(predictions=x[half:], references=labels[half:])
    assert metric.compute(ks=[1, 3, 10]) == evaluate_embeddings(x, labels, ks=(1, 3, 10))
