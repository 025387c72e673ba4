"""Nearest-neighbour search over L2-normalised embeddings (cosine similarity).

Two tools live here:

* :func:`exact_knn` -- exact k-nearest-neighbour search done in chunks of queries, with a faiss
  (``IndexFlatIP``) or a pure-torch backend. It is what the retrieval metrics use, so it never
  builds the full ``N x N`` similarity matrix.
* :class:`EmbeddingIndex` -- a persistent faiss index (exact, IVF or HNSW) with ids and labels,
  for serving a gallery.

**Tie rule.** Both backends of :func:`exact_knn` rank by descending cosine similarity and order equal
similarities by ascending reference index; that also decides which tied items make it into the top k.
faiss ``IndexFlatIP`` does not follow one fixed rule for ties on its own, so rows where a tie crosses
the k-th position are re-ranked exactly (see :func:`_resolve_ties`). faiss ``IndexFlatL2``, which
pytorch-metric-learning uses, breaks ties by ascending index too, so both agree on tied data.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "faiss", "torch")
INDEX_KINDS = ("flat", "ivf", "hnsw")
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


def _require_faiss():
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


def _check_dims(query: torch.Tensor, reference: torch.Tensor) -> None:
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query and reference dimensions differ: {query.shape[1]} vs {reference.shape[1]}")


def _pick_backend(backend: str, query: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss":
        _require_faiss()
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


def _knn_chunks(query, reference, k, *, exclude_self, backend, chunk_size) -> Iterator:
    """Yield ``(start, scores, indices)`` for consecutive chunks of normalised queries.

    ``k`` counts neighbours after self-exclusion; one more is searched per query for the self match
    and one more to detect ties across the cut.
    """
    n_ref = reference.shape[0]
    wanted = k + int(exclude_self)
    searched = min(wanted + 1, n_ref)
    if backend == "faiss":
        faiss = _require_faiss()
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
    _check_dims(q, r)
    available = r.shape[0] - int(self_mode)
    if not isinstance(k, (int, np.integer)) or not 0 < k <= available:
        raise ValueError(f"k must be an integer in [1, {available}] (the number of references), got {k!r}")
    chosen = _pick_backend(backend, q)
    chunk = chunk_size or default_chunk_size(r.shape[0])
    scores = torch.empty(q.shape[0], k, dtype=torch.float32, device=q.device)
    indices = torch.empty(q.shape[0], k, dtype=torch.int64, device=q.device)
    for start, s, i in _knn_chunks(q, r, int(k), exclude_self=self_mode, backend=chosen, chunk_size=chunk):
        scores[start : start + len(s)] = s
        indices[start : start + len(i)] = i
    return scores, indices


# ----------------------------------------------------------------------------------------------
# persistent index for serving
# ----------------------------------------------------------------------------------------------

_INDEX_FILE = "index.faiss"
_META_FILE = "index.json"
_ARRAYS_FILE = "index_arrays.npz"
_FORMAT_VERSION = 1
_PARAMS = {
    "flat": set(),
    "ivf": {"nlist", "nprobe"},
    "hnsw": {"M", "ef_construction", "ef_search"},
}


def _ivf_defaults(n: int, params: dict) -> dict:
    # nlist ~ 4 sqrt(N), but keep >= 39 training points per centroid (below that faiss warns and
    # k-means is poor); probe 1/8 of the lists by default, which favours recall over speed.
    nlist = params.get("nlist") or max(1, min(int(4 * math.sqrt(n)), n // 39))
    nprobe = params.get("nprobe") or max(1, nlist // 8)
    return {"nlist": int(nlist), "nprobe": int(min(nprobe, nlist))}


def _hnsw_defaults(params: dict) -> dict:
    return {
        "M": int(params.get("M", 32)),
        "ef_construction": int(params.get("ef_construction", 40)),
        "ef_search": int(params.get("ef_search", 64)),
    }


class EmbeddingIndex:
    """A faiss index of L2-normalised embeddings (inner product = cosine) with ids and optional labels.

    Build with :meth:`build`, query with :meth:`search`, persist with :meth:`save` / :meth:`load`.
    On disk a saved index is a folder with ``index.faiss`` (faiss' own format), ``index.json``
    (metadata) and ``index_arrays.npz`` (ids and labels, read with ``allow_pickle=False``).

    Kinds: ``"flat"`` (exact, the default), ``"ivf"`` (``IndexIVFFlat``; params ``nlist``, ``nprobe``;
    trained on the embeddings) and ``"hnsw"`` (``IndexHNSWFlat``; params ``M``, ``ef_construction``,
    ``ef_search``). The approximate kinds are for large galleries; report evaluation numbers with
    the exact one.
    """

    def __init__(self, index, ids: np.ndarray, labels: np.ndarray | None, kind: str, params: dict):
        self.index = index
        self.ids = ids
        self.labels = labels
        self.kind = kind
        self.params = params

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(kind={self.kind!r}, size={len(self)}, dim={self.dim}, params={self.params})"

    @classmethod
    def build(cls, embeddings, ids=None, labels=None, kind: str = "flat", **params) -> EmbeddingIndex:
        """Index ``embeddings`` (``(n, d)``, normalised here).

        Args:
            embeddings: gallery vectors (numpy or torch).
            ids: one id per vector (integers or strings); defaults to ``0..n-1``. Must be unique.
            labels: optional integer label per vector, returned by ``search(..., return_labels=True)``.
            kind: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
            **params: kind-specific options (see the class docstring).
        """
        faiss = _require_faiss()
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
        unknown = set(params) - _PARAMS[kind]
        if unknown:
            raise ValueError(
                f"unknown parameters for kind={kind!r}: {sorted(unknown)}; allowed: {sorted(_PARAMS[kind])}"
            )
        x = np.ascontiguousarray(l2_normalize(as_embeddings(embeddings)).cpu().numpy())
        n, d = x.shape
        ids = cls._check_ids(ids, n)
        labels = cls._check_labels(labels, n)

        if kind == "flat":
            index, params = faiss.IndexFlatIP(d), {}
        elif kind == "ivf":
            params = _ivf_defaults(n, params)
            if params["nlist"] > n:
                raise ValueError(f"nlist={params['nlist']} exceeds the number of embeddings ({n})")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
            index.train(x)
        else:
            params = _hnsw_defaults(params)
            index = faiss.IndexHNSWFlat(d, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["ef_construction"]
        index.add(x)
        out = cls(index, ids, labels, kind, params)
        out._apply_search_params()
        return out

    @staticmethod
    def _check_ids(ids, n: int) -> np.ndarray:
        if ids is None:
            return np.arange(n, dtype=np.int64)
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
        if ids.ndim != 1 or len(ids) != n:
            raise ValueError(f"ids must be 1-D with one entry per embedding ({n}), got shape {ids.shape}")
        if ids.dtype.kind in "iu":
            ids = ids.astype(np.int64)
        elif ids.dtype.kind in "UO":
            ids = ids.astype(str)  # fixed-width unicode: stored in .npz without pickle
        else:
            raise ValueError(f"ids must be integers or strings, got dtype {ids.dtype}")
        if len(np.unique(ids)) != n:
            raise ValueError("ids must be unique")
        return ids

    @staticmethod
    def _check_labels(labels, n: int) -> np.ndarray | None:
        if labels is None:
            return None
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1 or len(labels) != n:
            raise ValueError(f"labels must be 1-D with one entry per embedding ({n}), got shape {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        return labels.astype(np.int64)

    def _apply_search_params(self) -> None:
        if self.kind == "ivf":
            self.index.nprobe = self.params["nprobe"]
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = self.params["ef_search"]

    def search(self, queries, k: int, *, return_labels: bool = False):
        """Top-``k`` gallery items for each query, by descending cosine similarity.

        Returns ``(scores, ids)`` (numpy, shapes ``(n, k)``), plus ``labels`` when ``return_labels``.
        Slots an approximate index could not fill have score ``-inf``, id ``-1`` (or ``""`` for string
        ids) and label ``-1``.
        """
        q = l2_normalize(as_embeddings(queries, "queries"))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index has {self.dim}")
        if not isinstance(k, (int, np.integer)) or not 0 < k <= len(self):
            raise ValueError(f"k must be an integer in [1, {len(self)}], got {k!r}")
        if self.kind == "hnsw":
            # HNSW returns at most efSearch results; widen it for large k.
            self.index.hnsw.efSearch = max(self.params["ef_search"], int(k))
        scores, pos = self.index.search(np.ascontiguousarray(q.cpu().numpy()), int(k))
        missing = pos < 0
        safe = np.where(missing, 0, pos)
        ids = self.ids[safe]
        ids[missing] = "" if ids.dtype.kind == "U" else -1
        scores[missing] = -np.inf
        if not return_labels:
            return scores, ids
        if self.labels is None:
            raise ValueError("this index was built without labels")
        labels = self.labels[safe]
        labels[missing] = -1
        return scores, ids, labels

    def save(self, directory) -> Path:
        """Write the index to ``directory`` (created if needed); returns the folder path."""
        faiss = _require_faiss()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / _INDEX_FILE))
        arrays = {"ids": self.ids}
        if self.labels is not None:
            arrays["labels"] = self.labels
        np.savez(directory / _ARRAYS_FILE, **arrays)
        meta = {
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "params": self.params,
            "dim": self.dim,
            "size": len(self),
            "metric": "inner_product",
            "normalized": True,
            "faiss_version": getattr(faiss, "__version__", "unknown"),
        }
        (directory / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory) -> EmbeddingIndex:
        """Read an index written by :meth:`save`. Raises ``FileNotFoundError`` or ``ValueError`` (corrupt)."""
        faiss = _require_faiss()
        directory = Path(directory)
        for name in (_INDEX_FILE, _META_FILE, _ARRAYS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: not a saved EmbeddingIndex folder")
        try:
            meta = json.loads((directory / _META_FILE).read_text())
            kind, params, dim, size = meta["kind"], meta["params"], meta["dim"], meta["size"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"corrupt metadata in {directory / _META_FILE}: {err}") from None
        if meta.get("format_version") != _FORMAT_VERSION or kind not in INDEX_KINDS or not isinstance(params, dict):
            raise ValueError(f"unsupported index metadata in {directory / _META_FILE}: {meta}")
        try:
            index = faiss.read_index(str(directory / _INDEX_FILE))
        except RuntimeError as err:
            raise ValueError(f"cannot read faiss index {directory / _INDEX_FILE}: {err}") from None
        try:
            with np.load(directory / _ARRAYS_FILE, allow_pickle=False) as arrays:
                ids = arrays["ids"]
                labels = arrays["labels"] if "labels" in arrays.files else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"cannot read {directory / _ARRAYS_FILE}: {err}") from None
        if index.d != dim or index.ntotal != size or len(ids) != size or (labels is not None and len(labels) != size):
            raise ValueError(
                f"inconsistent index folder {directory}: metadata says {size} x {dim}, faiss index holds "
                f"{index.ntotal} x {index.d}, {len(ids)} ids"
            )
        out = cls(index, ids, labels, kind, params)
        out._apply_search_params()
        return out
