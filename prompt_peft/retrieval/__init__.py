"""Retrieval evaluation and search: Recall@K / MAP@R / R-Precision (identical to pytorch-metric-learning),
exact chunked kNN (faiss or torch), and a persistent faiss index for serving.

``EVALUATE_METRIC_PATH`` is the path of the bundled `evaluate` metric script, loadable offline with
``evaluate.load(EVALUATE_METRIC_PATH)``.
"""

from pathlib import Path

from .index import EmbeddingIndex, exact_knn
from .metrics import evaluate_embeddings

EVALUATE_METRIC_PATH = str(Path(__file__).parent / "evaluate_metric" / "retrieval_metrics.py")

__all__ = ["EVALUATE_METRIC_PATH", "EmbeddingIndex", "evaluate_embeddings", "exact_knn"]
