"""A persistent faiss index (exact, IVF or HNSW) with ids and labels, for serving a gallery.

Exact search for the metrics is :func:`prompt_peft.retrieval.knn.exact_knn` (re-exported here).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from .knn import as_embeddings, exact_knn, l2_normalize, require_faiss

__all__ = ["INDEX_KINDS", "EmbeddingIndex", "exact_knn"]

INDEX_KINDS = ("flat", "ivf", "hnsw")


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
        faiss = require_faiss()
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
        faiss = require_faiss()
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
        faiss = require_faiss()
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
