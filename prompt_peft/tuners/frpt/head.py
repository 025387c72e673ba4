"""CAH, the category-specific awareness head (docs/methods.md, FRPT Eq. (7)-(9), on tokens).

``M_R = W_C ⊙ M + (1 - W_C) ⊙ IN(M)`` with ``W_C = sigmoid(W_L · ReLU(W_F · mean_tokens(M)))``: per channel, the
attention decides how much of the raw token to keep and how much of its instance-normalised version, which removes
the image's own channel statistics (the paper's "category-specific" rather than instance-specific cue).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def token_statistics(tokens: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and standard deviation over the tokens ``(B, N, D)`` (biased variance, as IN)."""
    mean = tokens.mean(dim=1, keepdim=True)
    var = tokens.var(dim=1, unbiased=False, keepdim=True)
    return mean, torch.sqrt(var + eps)


class ChannelAttentionHead(nn.Module):
    """CAH on patch tokens ``(B, N, D)``: a bias-free squeeze-excite MLP ``D -> D // r -> D`` (``2·D·(D//r)``
    parameters) and a parameter-free instance norm over the tokens."""

    def __init__(self, dim: int, reduction: int = 8, eps: float = 1e-5, device=None):
        super().__init__()
        if reduction > dim:
            raise ValueError(f"cah_reduction={reduction} is larger than the hidden size {dim}")
        self.eps = eps
        self.squeeze = nn.Linear(dim, dim // reduction, bias=False, device=device)
        self.excite = nn.Linear(dim // reduction, dim, bias=False, device=device)

    def attention(self, patches: torch.Tensor) -> torch.Tensor:
        """``W_C``: ``(B, 1, D)`` in (0, 1)."""
        return torch.sigmoid(self.excite(torch.relu(self.squeeze(patches.mean(dim=1, keepdim=True)))))

    def forward(
        self, patches: torch.Tensor, extra: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The mixed tokens ``M_R``. ``extra`` tokens (e.g. [CLS], ``(B, n, D)``) are mixed with the same weights and
        the *patches'* statistics and returned instead; ``weights`` overrides ``W_C`` (tests, analysis)."""
        weights = self.attention(patches) if weights is None else weights
        mean, std = token_statistics(patches, self.eps)
        tokens = patches if extra is None else extra
        return weights * tokens + (1 - weights) * ((tokens - mean) / std)
