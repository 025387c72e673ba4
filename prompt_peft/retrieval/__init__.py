"""Retrieval evaluation and search: Recall@K / MAP@R / R-Precision (identical to pytorch-metric-learning),
exact chunked kNN (faiss or torch), and a persistent faiss index for serving.

``EVALUATE_METRIC_PATH`` is the folder of the bundled `evaluate` metric, loadable offline with
``evaluate.load(EVALUATE_METRIC_PATH)``.
"""

from pathlib import Path

from .extract import embed_dataset, pooled_features
from .index import EmbeddingIndex
from .knn import exact_knn
from .metrics import evaluate_embeddings

# evaluate.load accepts the folder (named like its script) or the script itself.
EVALUATE_METRIC_PATH = str(Path(__file__).parent / "retrieval_metrics")

__all__ = [
    "EVALUATE_METRIC_PATH",
    "EmbeddingIndex",
    "embed_dataset",
    "evaluate_embeddings",
    "exact_knn",
    "pooled_features",
]
