"""Semantic proxies: integrating per-sample candidates into a running proxy per class (docs/methods.md, VPTSP-G).

Pure tensor code, independent of the backbone: the GRU-ReLU cell (VPTSP-G), the EMA update (VPTSP-M), the
per-class sequential integration over a batch, and the mix with the learnable proxy bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import LossInputs, ProxyAnchorLoss


class SemanticGRUCell(nn.Module):
    """The paper's integration unit: a GRU cell with ReLU in place of tanh ("keeps the scale"), in embedding space.

    With row vectors ``q`` (candidate) and ``h`` (previous proxy)::

        z = sigmoid(q W_iz + h W_hz + b_iz)
        r = sigmoid(q W_ir + h W_hr + b_ir)
        n = relu(q W_in + r * (h W_hn) + b_in)
        h' = (1 - z) * n + z * h            # the code's convention (the paper swaps z and 1 - z)

    Six ``E x E`` matrices (xavier-uniform) and three biases (zero); the code's unused ``W_ia`` is not allocated.
    """

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.input_weight = nn.Parameter(torch.empty(3, dim, dim, device=device))  # W_iz, W_ir, W_in
        self.hidden_weight = nn.Parameter(torch.empty(3, dim, dim, device=device))  # W_hz, W_hr, W_hn
        self.bias = nn.Parameter(torch.zeros(3, dim, device=device))  # b_iz, b_ir, b_in
        for weights in (self.input_weight, self.hidden_weight):
            for w in weights.data:
                nn.init.xavier_uniform_(w)

    def forward(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        wi, wh, b = self.input_weight, self.hidden_weight, self.bias
        z = torch.sigmoid(q @ wi[0] + h @ wh[0] + b[0])
        r = torch.sigmoid(q @ wi[1] + h @ wh[1] + b[1])
        n = torch.relu(q @ wi[2] + r * (h @ wh[2]) + b[2])
        return (1 - z) * n + z * h


def within_class_rank(labels: torch.Tensor) -> torch.Tensor:
    """For each sample, how many earlier samples of the batch share its label (0 for the first)."""
    same = labels[:, None] == labels[None, :]
    earlier = torch.ones_like(same).tril(-1)
    return (same & earlier).sum(dim=1)


def integrate_gru(
    cell: SemanticGRUCell,
    proxies: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """New proxy table: each class of the batch folds its candidates into its proxy one sample at a time, in batch
    order (vectorised over classes), then the updated rows are L2-normalised. Other rows are returned unchanged.

    Args:
        proxies: ``(C, E)`` previous (unit-norm, detached) semantic proxies.
        candidates: ``(B, E)`` per-sample candidates ``q``.
        labels: ``(B,)`` class ids.
    """
    classes, inverse = torch.unique(labels, return_inverse=True)
    rank = within_class_rank(labels)
    # in the cell's precision: under autocast the candidates arrive in bf16 / fp16, the loss runs outside it
    candidates = candidates.to(cell.input_weight.dtype)
    state = proxies[classes].to(candidates.dtype)
    for step in range(int(rank.max()) + 1 if labels.numel() else 0):
        chosen = rank == step
        rows = inverse[chosen]
        updated = F.dropout(cell(candidates[chosen], state[rows]), p=dropout, training=training)
        state = state.index_put((rows,), updated)  # out of place: earlier states stay in the graph
    return proxies.to(state.dtype).index_put((classes,), F.normalize(state, dim=-1))


def integrate_ema(proxies: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, keep: float) -> torch.Tensor:
    """VPTSP-M: ``P_c <- normalize(keep * P_c + (1 - keep) * mean of the batch's candidates of class c)``."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    candidates = candidates.to(proxies.dtype)  # the running table's precision, as in integrate_gru
    sums = candidates.new_zeros(len(classes), candidates.shape[1]).index_add(0, inverse, candidates)
    means = sums / torch.bincount(inverse, minlength=len(classes)).unsqueeze(1).to(sums.dtype)
    mixed = keep * proxies[classes].to(means.dtype) + (1 - keep) * means
    return proxies.to(mixed.dtype).index_put((classes,), F.normalize(mixed, dim=-1))


def mix_proxies(proxy_bias: torch.Tensor, semantic: torch.Tensor, ratio: float) -> torch.Tensor:
    """The loss's proxies (Eq. 8): ``ratio * proxy_bias + (1 - ratio) * semantic`` (normalised inside the loss)."""
    return ratio * proxy_bias + (1 - ratio) * semantic.to(proxy_bias.dtype)


@dataclass
class SemanticProxyAnchorLoss(ProxyAnchorLoss):
    """VPTSP-G's loss object: fold the proxy branch's candidates (if any) into the head's semantic proxies, then
    Proxy-Anchor against ``mix_proxies(proxy bias, semantic proxies, proxy_bias_ratio)``.

    The head provides ``proxies[adapter]`` (the bias), ``semantic_proxies(adapter)`` and
    ``update_semantic_proxies(adapter, candidates, labels)`` (which also stores the new table).
    """

    proxy_bias_ratio: float = 0.1
    center_proxies: bool = True

    def __call__(self, inputs: LossInputs, head, adapter: str) -> torch.Tensor:
        semantic = None
        if inputs.candidates is not None:
            labels = inputs.candidate_labels.to(inputs.candidates.device)
            semantic = head.update_semantic_proxies(adapter, inputs.candidates, labels)
        return self.on_proxies(inputs, self.loss_proxies(head, adapter, semantic))

    def loss_proxies(self, head, adapter: str, semantic: torch.Tensor | None = None) -> torch.Tensor:
        """The mixed proxies (Eq. 8), minus their mean over classes when ``center_proxies`` (the class-independent
        part carries no class information; only Proxy-Anchor's negative term would act on it, pushing every
        embedding away from every proxy). ``semantic`` defaults to the head's stored running proxies."""
        semantic = head.semantic_proxies(adapter) if semantic is None else semantic
        proxies = mix_proxies(head.proxies[adapter], semantic, self.proxy_bias_ratio)
        return proxies - proxies.mean(dim=0, keepdim=True) if self.center_proxies else proxies
