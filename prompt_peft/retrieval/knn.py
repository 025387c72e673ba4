"""Exact k-nearest-neighbour search over L2-normalised embeddings (cosine similarity), for the retrieval metrics.

:func:`exact_knn` searches in chunks of queries, with a faiss (``IndexFlatIP``) or a pure-torch backend, so it
never builds the full ``N x N`` similarity matrix. :mod:`prompt_peft.retrieval.metrics` computes its numbers on
it; the serving index (:mod:`prompt_peft.retrieval.index`) reuses its input checks and normalisation.

**Tie rule.** Both backends rank by descending cosine similarity and order equal similarities by ascending
reference index; that also decides which tied items make it into the top k. faiss ``IndexFlatIP`` does not follow
one fixed rule for ties on its own, so rows where a tie crosses the k-th position are re-ranked exactly (see
:func:`_resolve_ties`). faiss ``IndexFlatL2``, which pytorch-metric-learning uses, breaks ties by ascending index
too, so both agree on tied data.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "as_embeddings",
    "check_dims",
    "default_chunk_size",
    "exact_knn",
    "knn_chunks",
    "l2_normalize",
    "pick_backend",
    "require_faiss",
]

BACKENDS = ("auto", "faiss", "torch")
# Upper bound for one chunk's similarity block (torch backend), in bytes; keeps SOP-sized search small.
_CHUNK_BYTES = 256 * 2**20
_MAX_CHUNK = 4096


def _faiss():
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def require_faiss():
    faiss = _faiss()
    if faiss is None:
        raise ImportError("faiss is not installed: `pip install faiss-cpu` (or use backend='torch')")
    return faiss


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def as_embeddings(x, name: str = "embeddings") -> torch.Tensor:
    """Check and convert ``x`` (numpy array, torch tensor or nested sequence) to a float32 ``(n, d)`` tensor.

    Torch tensors keep their device. Raises ``ValueError`` for a wrong rank, an empty array, or
    NaN/inf values.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.from_numpy(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a numeric array of shape (n, dim): {err}") from None
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation in float32, as pytorch-metric-learning's testers do (zero rows stay zero)."""
    return F.normalize(x, p=2, dim=1).contiguous()


def check_dims(query: torch.Tensor, reference: torch.Tensor) -> None:
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query and reference dimensions differ: {query.shape[1]} vs {reference.shape[1]}")


def pick_backend(backend: str, query: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss":
        require_faiss()
        return "faiss"
    if backend == "auto":
        # CUDA tensors stay on the GPU with torch; faiss-cpu would copy them back to the host.
        if query.is_cuda or _faiss() is None:
            return "torch"
        return "faiss"
    return "torch"


def default_chunk_size(n_reference: int) -> int:
    """Number of queries per chunk so that one chunk's similarity block stays under ~256 MiB."""
    return max(1, min(_MAX_CHUNK, _CHUNK_BYTES // (4 * max(1, n_reference))))


# ----------------------------------------------------------------------------------------------
# exact chunked search
# ----------------------------------------------------------------------------------------------


def _resolve_ties(query, reference, scores, indices, k):
    """Apply the tie rule to candidate lists holding up to ``k + 1`` sorted results per query.

    If the k-th and (k+1)-th scores are equal, the tie crosses the cut and the backend may have kept
    any of the tied items; those rows are re-ranked from their full similarity row with a stable sort.
    Finally every row is ordered by (descending score, ascending index).
    """
    if scores.shape[1] > k:
        crossing = scores[:, k - 1] == scores[:, k]
        scores, indices = scores[:, :k].clone(), indices[:, :k].clone()
        rows = crossing.nonzero().squeeze(1)
        if rows.numel():
            sim = query[rows] @ reference.T
            order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
            scores[rows] = sim.gather(1, order)
            indices[rows] = order
    # Two stable sorts: first by index, then by descending score.
    indices, perm = indices.sort(dim=1, stable=True)
    scores = scores.gather(1, perm)
    scores, perm = scores.sort(dim=1, descending=True, stable=True)
    return scores, indices.gather(1, perm)


def _drop_self(scores, indices, start):
    """Remove each query's own index (self-retrieval); if it is not among the results, drop the last one.

    Exclusion is by index, so an exact duplicate of the query still counts as a neighbour.
    """
    rows = indices.shape[0]
    own = torch.arange(start, start + rows, device=indices.device).unsqueeze(1)
    drop = indices == own
    drop[~drop.any(dim=1), -1] = True
    keep = ~drop
    return scores[keep].view(rows, -1), indices[keep].view(rows, -1)


def knn_chunks(query, reference, k, *, exclude_self, backend, chunk_size) -> Iterator:
    """Yield ``(start, scores, indices)`` for consecutive chunks of normalised queries.

    ``k`` counts neighbours after self-exclusion; one more is searched per query for the self match
    and one more to detect ties across the cut.
    """
    n_ref = reference.shape[0]
    wanted = k + int(exclude_self)
    searched = min(wanted + 1, n_ref)
    if backend == "faiss":
        faiss = require_faiss()
        index = faiss.IndexFlatIP(reference.shape[1])
        index.add(reference.cpu().numpy())
    for start in range(0, query.shape[0], chunk_size):
        q = query[start : start + chunk_size]
        if backend == "faiss":
            s, i = index.search(q.cpu().numpy(), searched)
            s, i = torch.from_numpy(s).to(q.device), torch.from_numpy(i).to(q.device)
        else:
            s, i = torch.topk(q @ reference.T, searched, dim=1)
        s, i = _resolve_ties(q, reference, s, i, wanted)
        if exclude_self:
            s, i = _drop_self(s, i, start)
        yield start, s, i


def exact_knn(query, reference=None, k: int = 10, *, backend: str = "auto", chunk_size: int | None = None):
    """Exact cosine k-nearest neighbours, computed in chunks of queries (never an ``N x N`` matrix).

    Args:
        query: ``(n, d)`` embeddings (numpy or torch; CUDA tensors are searched on the GPU by the torch backend).
        reference: ``(m, d)`` gallery. ``None`` searches the query set itself and excludes each query
            from its own neighbours by index.
        k: neighbours per query.
        backend: ``"faiss"`` (``IndexFlatIP``), ``"torch"``, or ``"auto"`` (faiss when installed and the
            query is not on a GPU).
        chunk_size: queries per chunk; by default chosen so one chunk's similarity block is ~256 MiB.

    Returns:
        ``(scores, indices)``: float32 ``(n, k)`` cosine similarities and int64 ``(n, k)`` reference
        indices, ranked by descending similarity with ties in ascending index order.
    """
    q = l2_normalize(as_embeddings(query, "query"))
    self_mode = reference is None
    r = q if self_mode else l2_normalize(as_embeddings(reference, "reference").to(q.device))
    check_dims(q, r)
    available = r.shape[0] - int(self_mode)
    if not isinstance(k, (int, np.integer)) or not 0 < k <= available:
        raise ValueError(f"k must be an integer in [1, {available}] (the number of references), got {k!r}")
    chosen = pick_backend(backend, q)
    chunk = chunk_size or default_chunk_size(r.shape[0])
    scores = torch.empty(q.shape[0], k, dtype=torch.float32, device=q.device)
    indices = torch.empty(q.shape[0], k, dtype=torch.int64, device=q.device)
    for start, s, i in knn_chunks(q, r, int(k), exclude_self=self_mode, backend=chosen, chunk_size=chunk):
        scores[start : start + len(s)] = s
        indices[start : start + len(i)] = i
    return scores, indices
