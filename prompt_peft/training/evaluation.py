"""The evaluation loop: embed the held-out split(s) and compute the retrieval metrics."""

from __future__ import annotations

from typing import Callable, Optional

from ..retrieval import evaluate_embeddings
from ..retrieval.extract import embed_dataset


def evaluate_retrieval(
    model,
    splits,
    collate_fn: Callable,
    *,
    accelerator=None,
    batch_size: int = 64,
    num_workers: int = 0,
    ks=(1, 2, 4, 8),
    return_embeddings: bool = False,
):
    """Recall@K, MAP@R and R-Precision of ``model`` on a ``DatasetDict``.

    Uses ``query`` against ``gallery`` when both exist (In-Shop), else ``test`` searched against itself
    (each query excluded by index). Every process embeds its share; every process gets the same metrics.
    With ``return_embeddings`` also returns ``{split: (embeddings, labels)}`` (e.g. for a retrieval gallery).
    """

    def embed(name: str):
        return embed_dataset(
            model,
            splits[name],
            collate_fn,
            batch_size=batch_size,
            num_workers=num_workers,
            accelerator=accelerator,
            desc=f"Embedding {name}",
        )

    if "query" in splits and "gallery" in splits:
        embedded = {"query": embed("query"), "gallery": embed("gallery")}
        metrics = evaluate_embeddings(*embedded["query"], *embedded["gallery"], ks=ks)
    else:
        embedded = {"test": embed("test")}
        metrics = evaluate_embeddings(*embedded["test"], ks=ks)
    return (metrics, embedded) if return_embeddings else metrics


def evaluate_frozen_backbone(model, splits, collate_fn: Callable, **kwargs):
    """`evaluate_retrieval` of the backbone alone (the adapter of a ``PeftModel`` disabled): the baseline an
    adapter has to beat, measured with the same data, resolution and pooled token."""
    unwrapped = kwargs["accelerator"].unwrap_model(model) if kwargs.get("accelerator") is not None else model
    with unwrapped.disable_adapter():
        return evaluate_retrieval(unwrapped, splits, collate_fn, **kwargs)


def format_metrics(metrics: dict[str, float], prefix: Optional[str] = None) -> str:
    """One readable line, e.g. ``epoch 3 | R@1 71.20 | R@2 80.05 | ... | MAP@R 31.4 | RP 40.2`` (percent)."""
    names = {"map@r": "MAP@R", "r_precision": "RP"}
    parts = [names.get(k, k.replace("recall@", "R@")) + f" {100 * v:.2f}" for k, v in metrics.items()]
    return " | ".join(([prefix] if prefix else []) + parts)
