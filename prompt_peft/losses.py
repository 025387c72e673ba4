"""Metric-learning losses shared by the prompt_peft methods, as small composable objects.

A loss object is called as ``loss(inputs, head, adapter)``: ``inputs`` is a :class:`LossInputs` (the values one
training step produced, possibly gathered over processes), ``head`` the embedding head whose per-adapter tensors
(proxies, classifier) the loss reads. Each method's head builds its default loss from the config; any other loss
object can replace it with ``model.base_model.set_loss(loss)``, without subclassing a head.

pytorch-metric-learning computes the same Proxy-Anchor loss, but it is not a dependency of the package and
it owns its proxies; here the proxies are adapter parameters, so the loss is a pure function of
(embeddings, labels, proxies). tests/test_losses.py checks it against pytorch-metric-learning.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ClassifierCrossEntropy",
    "LossInputs",
    "ProxyAnchorLoss",
    "WeightedSum",
    "proxy_anchor_loss",
]


@dataclass
class LossInputs:
    """What a loss needs from one training step, as values (never read back from modules).

    Attributes:
        embeddings: ``(B, E)`` L2-normalised embeddings of the sample branch.
        labels: ``(B,)`` class ids of ``embeddings``.
        features: ``(B, D)`` pooled features, for a loss on them (FRPT's classifier), or None.
        candidates: ``(B', E)`` outputs of a proxy branch (VPTSP-G's semantic candidates), or None.
        candidate_labels: ``(B',)`` class ids of ``candidates``.
        auxiliary: the sum of the blocks' auxiliary loss terms (SHIP's prompt matching loss), or None; added to
            the loss as it is (it is already a mean over the local batch).
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    features: Optional[torch.Tensor] = None
    candidates: Optional[torch.Tensor] = None
    candidate_labels: Optional[torch.Tensor] = None
    auxiliary: Optional[torch.Tensor] = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], names: Sequence[str]) -> "LossInputs":
        """A copy with ``fn`` applied to the named fields that are set (e.g. a gather over processes)."""
        return replace(self, **{n: fn(getattr(self, n)) for n in names if getattr(self, n) is not None})

    @classmethod
    def batch_fields(cls) -> tuple[str, ...]:
        """The fields with one row per sample (all but ``auxiliary``)."""
        return tuple(f.name for f in fields(cls) if f.name != "auxiliary")


@dataclass
class ProxyAnchorLoss:
    """Proxy-Anchor against the head's proxies (``head.proxies[adapter]``); see :func:`proxy_anchor_loss`."""

    margin: float = 0.1
    alpha: float = 32.0
    positive_normalisation: str = "with_positives"

    def __call__(self, inputs: LossInputs, head: Any, adapter: str) -> torch.Tensor:
        return self.on_proxies(inputs, self.loss_proxies(head, adapter))

    def loss_proxies(self, head: Any, adapter: str) -> torch.Tensor:
        """The ``(C, E)`` proxies the loss compares embeddings with, as they are now (also read by
        :func:`prompt_peft.training.proxy_diagnostics`)."""
        return head.proxies[adapter]

    def on_proxies(self, inputs: LossInputs, proxies: torch.Tensor) -> torch.Tensor:
        return proxy_anchor_loss(
            inputs.embeddings,
            inputs.labels,
            proxies,
            margin=self.margin,
            alpha=self.alpha,
            positive_normalisation=self.positive_normalisation,
        )


@dataclass
class ClassifierCrossEntropy:
    """Cross-entropy of the head's classifier (``head.classifier[adapter]``) on the pooled ``features``."""

    label_smoothing: float = 0.0

    def __call__(self, inputs: LossInputs, head: Any, adapter: str) -> torch.Tensor:
        if inputs.features is None:
            raise ValueError("ClassifierCrossEntropy needs LossInputs.features; this head does not produce them")
        logits = head.classifier[adapter](inputs.features)
        return F.cross_entropy(logits, inputs.labels, label_smoothing=self.label_smoothing)


@dataclass
class WeightedSum:
    """``sum_i weight_i * loss_i(inputs)``; terms with weight 0 are not computed."""

    terms: Sequence[tuple[float, Callable[[LossInputs, Any, str], torch.Tensor]]]

    def __call__(self, inputs: LossInputs, head: Any, adapter: str) -> torch.Tensor:
        total = inputs.embeddings.new_zeros(())
        for weight, loss in self.terms:
            if weight:
                total = total + weight * loss(inputs, head, adapter)
        return total

    def loss_proxies(self, head: Any, adapter: str) -> Optional[torch.Tensor]:
        """The proxies of the first weighted term that has some (None if none has)."""
        for weight, loss in self.terms:
            if weight and hasattr(loss, "loss_proxies"):
                return loss.loss_proxies(head, adapter)
        return None


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
