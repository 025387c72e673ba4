"""Retrieval metrics for deep metric learning: Recall@K, MAP@R and R-Precision.

The numbers are defined exactly as pytorch-metric-learning's ``AccuracyCalculator`` computes
``precision_at_1``, ``mean_average_precision_at_r`` and ``r_precision`` (with ``k="max_bin_count"``):

* Embeddings are L2-normalised and compared by cosine similarity.
* Self-retrieval (no reference given): every query is removed from its own neighbour list **by
  index**, so an exact duplicate of another sample still counts as a neighbour.
* R (per query) is the number of references with the query's label, not counting the query itself.
* "Lone" queries, with R = 0 (a singleton class in self-retrieval, or a label absent from the
  gallery), are left out of every metric, Recall@K included. If every query is lone, all metrics are NaN.
* Recall@K is the DML hit rate: the fraction of queries with at least one same-label item among the
  K nearest neighbours. Recall@1 equals pytorch-metric-learning's ``precision_at_1``.
* Ties in similarity are ordered by ascending reference index (see :mod:`prompt_peft.retrieval.knn`).

Only ``max(max(ks), max R)`` neighbours are searched per query, in chunks of queries, so the
memory needed is bounded by the chunk size rather than by ``N x N``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch

from .knn import as_embeddings, check_dims, default_chunk_size, knn_chunks, l2_normalize, pick_backend

DEFAULT_KS = (1, 2, 4, 8)


def _check_ks(ks) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks) if isinstance(ks, Iterable) else None
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    if min(ks) <= 0:
        raise ValueError(f"ks must be positive, got {ks}")
    return tuple(dict.fromkeys(int(k) for k in ks))  # de-duplicate, keep order


def _as_labels(labels, n: int, name: str) -> np.ndarray:
    if labels is None:
        raise ValueError(f"{name} are required")
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries but there are {n} embeddings")
    return labels


def _encode_labels(query_labels: np.ndarray, reference_labels: np.ndarray):
    """Map both label arrays to contiguous int64 codes (so arbitrary label values compare exactly)."""
    try:
        _, codes = np.unique(np.concatenate([query_labels, reference_labels]), return_inverse=True)
    except TypeError as err:
        raise ValueError(f"labels must be comparable values of one type: {err}") from None
    codes = codes.astype(np.int64).reshape(-1)
    return codes[: len(query_labels)], codes[len(query_labels) :]


def _chunk_scores(neighbour_labels, labels, relevant, ks):
    """Per-query hits for each K, R-Precision and AP@R for one chunk of queries.

    ``neighbour_labels`` is ``(c, k)`` in rank order, ``labels`` and ``relevant`` (R) are ``(c,)``.
    Lone queries (R = 0) get NaN scores; the caller leaves them out.
    """
    match = neighbour_labels == labels.unsqueeze(1)
    hits = {k: match[:, :k].any(dim=1) for k in ks}
    ranks = torch.arange(1, match.shape[1] + 1, device=match.device)
    in_top_r = ranks.unsqueeze(0) <= relevant.unsqueeze(1)
    correct = (match & in_top_r).to(torch.float64)
    r = relevant.to(torch.float64)
    r_precision = correct.sum(dim=1) / r
    # AP@R = (1/R) * sum over the first R ranks i of precision@i, counted where rank i is correct.
    average_precision = (correct.cumsum(dim=1) * correct / ranks).sum(dim=1) / r
    return hits, r_precision, average_precision


def evaluate_embeddings(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    ks=DEFAULT_KS,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision of a retrieval embedding, identical to pytorch-metric-learning.

    Queries without any relevant reference ("lone") are left out of every metric, as PML does, and
    tied similarities rank by ascending reference index (module docstring has the details).

    Args:
        query: ``(n, d)`` query embeddings (numpy array or torch tensor; CUDA tensors are evaluated
            on the GPU by the torch backend).
        query_labels: ``(n,)`` class labels of the queries.
        reference: ``(m, d)`` gallery embeddings, or ``None`` for self-retrieval (the query set is
            searched against itself, each query excluded by index).
        reference_labels: ``(m,)`` gallery labels; required when ``reference`` is given.
        ks: the K values for Recall@K.
        backend: exact-search backend, ``"auto"``, ``"faiss"`` or ``"torch"``. Both give the same
            numbers unless two similarities differ only by float rounding (their BLAS sums differ).
        chunk_size: queries per search chunk (default: ~256 MiB of similarities per chunk).

    Returns:
        ``{"recall@K": ..., "map@r": ..., "r_precision": ...}`` as Python floats.

    Raises:
        ValueError: bad shapes, mismatched lengths, NaN/inf, empty input, a dimension mismatch,
            non-positive ``ks`` or a K larger than the number of references a query can retrieve.
    """
    ks = _check_ks(ks)
    q = as_embeddings(query, "query")
    q_labels = _as_labels(query_labels, len(q), "query_labels")
    self_mode = reference is None
    if self_mode:
        if reference_labels is not None:
            raise ValueError("reference_labels given without reference embeddings")
        r, r_labels = q, q_labels
    else:
        r = as_embeddings(reference, "reference").to(q.device)
        r_labels = _as_labels(reference_labels, len(r), "reference_labels")
        check_dims(q, r)
    candidates = len(r) - int(self_mode)
    if max(ks) > candidates:
        raise ValueError(
            f"max(ks)={max(ks)} exceeds the {candidates} references each query can retrieve"
            + (" (the query itself is excluded)" if self_mode else "")
        )

    q_codes, r_codes = _encode_labels(q_labels, r_labels)
    counts = np.bincount(r_codes, minlength=int(max(q_codes.max(), r_codes.max())) + 1)
    relevant = counts[q_codes] - int(self_mode)  # R per query
    not_lone = relevant > 0
    keys = [f"recall@{k}" for k in ks] + ["map@r", "r_precision"]
    if not not_lone.any():
        warnings.warn("no query has a relevant reference (all are lone); every metric is NaN", stacklevel=2)
        return {key: float("nan") for key in keys}

    # Only as many neighbours as the metrics look at: max K for Recall@K, max R for MAP@R.
    k = max(max(ks), int(relevant[not_lone].max()))
    backend = pick_backend(backend, q)
    chunk = chunk_size or default_chunk_size(len(r))
    q = l2_normalize(q)
    r = q if self_mode else l2_normalize(r)

    device = q.device
    q_codes_t = torch.from_numpy(q_codes).to(device)
    r_codes_t = torch.from_numpy(r_codes).to(device)
    relevant_t = torch.from_numpy(relevant).to(device)
    not_lone_t = torch.from_numpy(not_lone).to(device)
    # Per-query scores are kept (n floats each) and averaged once at the end, so the result does not
    # depend on the chunk size or backend, not even in the last bit.
    n = len(q)
    hits = {kk: torch.zeros(n, dtype=torch.bool, device=device) for kk in ks}
    r_precision = torch.zeros(n, dtype=torch.float64, device=device)
    average_precision = torch.zeros(n, dtype=torch.float64, device=device)
    for start, _, indices in knn_chunks(q, r, k, exclude_self=self_mode, backend=backend, chunk_size=chunk):
        rows = slice(start, start + len(indices))
        chunk_hits, r_precision[rows], average_precision[rows] = _chunk_scores(
            r_codes_t[indices], q_codes_t[rows], relevant_t[rows], ks
        )
        for kk in ks:
            hits[kk][rows] = chunk_hits[kk]

    out = {f"recall@{kk}": hits[kk][not_lone_t].double().mean().item() for kk in ks}
    out["map@r"] = average_precision[not_lone_t].mean().item()
    out["r_precision"] = r_precision[not_lone_t].mean().item()
    return out
