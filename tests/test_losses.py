"""Proxy-Anchor loss against pytorch-metric-learning and against a direct computation."""

import math

import pytest
import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss

from prompt_peft.losses import proxy_anchor_loss


def direct(emb, labels, proxies, margin, alpha, normalisation):
    """The paper's formula written with explicit loops."""
    emb = torch.nn.functional.normalize(emb.double(), dim=1)
    proxies = torch.nn.functional.normalize(proxies.double(), dim=1)
    num_classes = proxies.shape[0]
    pos, neg, with_pos = 0.0, 0.0, 0
    for c in range(num_classes):
        sims = emb @ proxies[c]
        is_pos = labels == c
        if is_pos.any():
            with_pos += 1
            pos += math.log1p(torch.exp(-alpha * (sims[is_pos] - margin)).sum().item())
        neg += math.log1p(torch.exp(alpha * (sims[~is_pos] + margin)).sum().item())
    denominator = with_pos if normalisation == "with_positives" else num_classes
    return pos / denominator + neg / num_classes


@pytest.mark.parametrize("seed", range(5))
def test_matches_pytorch_metric_learning(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes, dim = 7, 12
    emb = torch.randn(20, dim, generator=g, requires_grad=True)
    labels = torch.randint(0, num_classes - 2, (20,), generator=g)  # some proxies have no positive
    reference = ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32)
    proxies = reference.proxies.detach().clone().requires_grad_(True)

    ours = proxy_anchor_loss(emb, labels, proxies, margin=0.1, alpha=32)
    theirs = reference(emb, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    (g_emb_ours, g_prox_ours) = torch.autograd.grad(ours, (emb, proxies))
    (g_emb_theirs, g_prox_theirs) = torch.autograd.grad(theirs, (emb, reference.proxies))
    torch.testing.assert_close(g_emb_ours, g_emb_theirs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_prox_ours, g_prox_theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalisation", ["with_positives", "all"])
def test_matches_the_formula(normalisation):
    g = torch.Generator().manual_seed(3)
    emb, proxies = torch.randn(9, 5, generator=g), torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1])
    ours = proxy_anchor_loss(emb, labels, proxies, 0.1, 32.0, positive_normalisation=normalisation)
    assert ours.item() == pytest.approx(direct(emb, labels, proxies, 0.1, 32.0, normalisation), rel=1e-5)


def test_stable_where_exp_overflows():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).half()
    proxies = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])  # positive similarity -1: exp(32 * 1.1) overflows fp16
    loss = proxy_anchor_loss(emb, torch.tensor([0, 1]), proxies)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(direct(emb.float(), torch.tensor([0, 1]), proxies, 0.1, 32.0,
                                                "with_positives"), rel=1e-5)


def test_bad_input_is_reported():
    emb, proxies = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        proxy_anchor_loss(emb, torch.tensor([0, 1, 5]), proxies)
    with pytest.raises(ValueError, match="3 embeddings"):
        proxy_anchor_loss(emb, torch.tensor([0, 1]), proxies)
    with pytest.raises(ValueError, match=r"\(B, E\) and \(C, E\)"):
        proxy_anchor_loss(emb, torch.tensor([0, 1, 2]), torch.randn(5, 3))
