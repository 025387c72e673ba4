"""Metric-learning losses shared by the prompt_peft methods.

pytorch-metric-learning computes the same Proxy-Anchor loss, but it is not a dependency of the package and
it owns its proxies; here the proxies are adapter parameters, so the loss is a pure function of
(embeddings, labels, proxies). tests/test_losses.py checks it against pytorch-metric-learning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def proxy_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
    positive_normalisation: str = "with_positives",
) -> torch.Tensor:
    """Proxy-Anchor loss (Kim et al., CVPR 2020).

    ``loss = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - margin)))
           + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x,p) + margin)))``
    with ``s`` the cosine similarity, ``P+`` the proxies that have a positive in the batch.

    Args:
        embeddings: ``(B, E)``; normalised inside.
        labels: ``(B,)`` integer class ids in ``[0, num_classes)``.
        proxies: ``(num_classes, E)``; normalised inside.
        positive_normalisation: ``"with_positives"`` divides the positive term by the number of proxies
            with a positive in the batch (the paper); ``"all"`` divides by the number of classes.
    """
    if embeddings.ndim != 2 or proxies.ndim != 2 or embeddings.shape[1] != proxies.shape[1]:
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)} and proxies {tuple(proxies.shape)} must be (B, E) and (C, E)"
        )
    labels = labels.reshape(-1)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"got {labels.shape[0]} labels for {embeddings.shape[0]} embeddings")
    num_classes = proxies.shape[0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (num_classes={num_classes}); "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    if positive_normalisation not in ("with_positives", "all"):
        raise ValueError(f"positive_normalisation must be 'with_positives' or 'all', got {positive_normalisation!r}")

    cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(proxies.float(), dim=1).T  # (B, C)
    positive = F.one_hot(labels.long(), num_classes).bool()  # (B, C)
    neg_inf = torch.finfo(cos.dtype).min
    # log(1 + sum_i exp(z_i)) == logsumexp([0, z_1, ...]): stable for alpha = 32 where exp overflows fp16/bf16.
    pos_logits = torch.where(positive, -alpha * (cos - margin), neg_inf)
    neg_logits = torch.where(~positive, alpha * (cos + margin), neg_inf)
    zeros = cos.new_zeros(1, num_classes)
    pos_term = torch.logsumexp(torch.cat([zeros, pos_logits]), dim=0)  # (C,); 0 for proxies without positives
    neg_term = torch.logsumexp(torch.cat([zeros, neg_logits]), dim=0)
    with_positives = positive.any(dim=0)
    pos_denominator = with_positives.sum().clamp_min(1) if positive_normalisation == "with_positives" else num_classes
    return pos_term.sum() / pos_denominator + neg_term.sum() / num_classes
