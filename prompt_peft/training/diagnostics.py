"""Training diagnostics of proxy-based losses, for the tracker: is the geometry of proxies and embeddings sane?

A healthy Proxy-Anchor run has proxies pointing in different directions (mean mutual cosine near 0) and each
embedding closer to its own class's proxy than to the others. A collapse (every proxy one direction, embeddings
pushed away from all of them) shows up here within a few steps, long before the retrieval metrics say so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .step import find_tuner


@torch.no_grad()
def proxy_diagnostics(model: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cosine statistics of the proxies the adapter's loss object uses now (its ``loss_proxies``) and a batch.

    Returns ``{}`` when the loss has no proxies (or no class was configured), else (all mean cosines):
    ``proxies/mutual_cosine`` between different proxies, ``proxies/own_cosine`` of each embedding to its
    class's proxy, ``proxies/other_cosine`` to the other classes' proxies. ``model``: a PeftModel, possibly
    wrapped by DDP; ``labels``: the loss's class ids of ``embeddings``.
    """
    head = find_tuner(model).embedding_head()
    adapter = head.running_adapter()
    if adapter is None or adapter not in head.proxies:
        return {}
    loss = head.loss_object(adapter)
    proxies = loss.loss_proxies(head, adapter) if hasattr(loss, "loss_proxies") else None
    if proxies is None:
        return {}
    proxies = F.normalize(proxies.detach().float(), dim=-1)
    embeddings = F.normalize(embeddings.detach().float().to(proxies.device), dim=-1)
    num_classes = proxies.shape[0]
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=proxies.device)
    cosines = embeddings @ proxies.T
    own = F.one_hot(labels.to(proxies.device).long(), num_classes).bool()
    return {
        "proxies/mutual_cosine": (proxies @ proxies.T)[off_diagonal].mean().item() if num_classes > 1 else 0.0,
        "proxies/own_cosine": cosines[own].mean().item(),
        "proxies/other_cosine": cosines[~own].mean().item() if num_classes > 1 else 0.0,
    }
