"""Training diagnostics of proxy-based losses, for the tracker: is the geometry of proxies and embeddings sane?

A healthy Proxy-Anchor run has proxies pointing in different directions (mean mutual cosine near 0) and each
embedding closer to its own class's proxy than to the others. A collapse (every proxy one direction, embeddings
pushed away from all of them) shows up here within a few steps, long before the retrieval metrics say so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tuners.prompted import EmbeddingHead


@torch.no_grad()
def proxy_diagnostics(model: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cosine statistics of the proxies the loss uses now (``head.loss_proxies``) and a batch's embeddings.

    Returns ``{}`` for a model without a prompt_peft head or without proxies, else (all mean cosines):
    ``proxies/mutual_cosine`` between different proxies, ``proxies/own_cosine`` of each embedding to its
    class's proxy, ``proxies/other_cosine`` to the other classes' proxies. ``labels`` are the loss's class ids.
    """
    head = next((m for m in model.modules() if isinstance(m, EmbeddingHead)), None)
    adapter = head.running_adapter() if head is not None else None
    proxies = head.loss_proxies(adapter) if adapter is not None else None
    if proxies is None:
        return {}
    proxies = F.normalize(proxies.detach().float(), dim=-1)
    embeddings = F.normalize(embeddings.detach().float().to(proxies.device), dim=-1)
    num_classes = proxies.shape[0]
    mutual = proxies @ proxies.T
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=proxies.device)
    cosines = embeddings @ proxies.T
    own = F.one_hot(labels.to(proxies.device).long(), num_classes).bool()
    return {
        "proxies/mutual_cosine": mutual[off_diagonal].mean().item() if num_classes > 1 else 0.0,
        "proxies/own_cosine": cosines[own].mean().item(),
        "proxies/other_cosine": cosines[~own].mean().item() if num_classes > 1 else 0.0,
    }
