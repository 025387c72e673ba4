"""SHIP's offline statistics from the frozen backbone (docs/methods.md, SHIP): semantic levels and attribute prototypes.

Pure functions, in the order they are used:

* :func:`collect_statistics` runs the frozen backbone over training data once, keeping per image one feature per
  block (its [CLS] token, or the mean of its patch tokens), and accumulates the mean layer-to-layer cosine
  affinity online (so any data set size fits in memory) while reservoir-sampling the last block's features of
  ``prototype_images`` images for k-means;
* :func:`semantic_levels` is the greedy threshold chain on the affinity;
* :func:`kmeans` (k-means++ init, seeded Lloyd iterations) gives the attribute prototypes;
* :func:`fit_hierarchy` does all of it and returns a :class:`SemanticHierarchy`.

Why a separate step and not part of ``get_peft_model``: the number of levels fixes the prompt shapes, so the
levels must exist before the prompt parameters do, and they need data. Two ways in, both ending with levels in
the adapter config and prototypes in the adapter file:

1. ``get_peft_model(backbone, SHIPConfig(...))`` then ``model.fit_hierarchy(train_loader)``: the tuner runs this
   module on its frozen backbone (adapters disabled), stores the levels in the config, (re)creates the prompt
   parameters for them and fills the prototype buffer. Call it before building the optimiser.
2. ``hierarchy = fit_hierarchy(backbone, train_loader)`` on the bare backbone, ``SHIPConfig(levels=hierarchy.levels)``,
   ``get_peft_model``, then ``model.apply_hierarchy(hierarchy)`` for the prototypes: useful to inspect the
   levels or reuse one hierarchy for several runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from ...backbones import BackboneSpec


@dataclass
class SemanticHierarchy:
    """What :func:`fit_hierarchy` found: the level starts, the prototypes ``(k, D)`` and the affinity ``(L, L)``."""

    levels: list[int]
    prototypes: Optional[torch.Tensor]
    affinity: torch.Tensor
    num_images: int


# ---------------------------------------------------------------------------------------------------- levels


def layer_affinity(features: torch.Tensor) -> torch.Tensor:
    """Mean over images of the cosine-similarity matrix between the blocks' features: ``(L, N, D) -> (L, L)``."""
    normed = F.normalize(features.double(), dim=-1)
    return torch.einsum("lnd,mnd->lm", normed, normed) / features.shape[1]


def semantic_levels(affinity: torch.Tensor, share_threshold: float, end_layer: Optional[int] = None) -> list[int]:
    """First block of each semantic level, by the greedy chain of SHIP's code.

    Block ``j`` joins the current level while its affinity to the level's first block is at least
    ``share_threshold``; otherwise it starts a new level. Levels may start only before ``end_layer``.
    """
    affinity = torch.as_tensor(affinity)
    if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity must be a square (L, L) matrix, got shape {tuple(affinity.shape)}")
    levels, head = [0], 0
    for j in range(1, affinity.shape[0]):
        if affinity[head, j] < share_threshold:
            levels.append(j)
            head = j
    end = affinity.shape[0] if end_layer is None else end_layer
    return [start for start in levels if start < end]


# ---------------------------------------------------------------------------------------------------- k-means


def kmeans(
    x: torch.Tensor, k: int, *, seed: int = 42, max_iter: int = 300, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with k-means++ seeding; returns ``(centroids (k, D), labels (N,))``, computed in float64.

    Deterministic for a given ``seed``. Stops when the centroids move less (squared, summed) than
    ``tol`` times the mean per-feature variance (scikit-learn's criterion). A cluster left empty is re-seeded
    with the point farthest from its centroid.
    """
    x = x.detach().to(torch.float64)
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means needs at least k={k} samples, got {n}: lower num_prototypes or use more images")
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(x, k, generator)
    threshold = tol * x.var(dim=0, unbiased=False).mean()
    for _ in range(max_iter):
        labels = torch.cdist(x, centroids).argmin(dim=1)
        updated = _cluster_means(x, labels, k, centroids)
        shift = (updated - centroids).pow(2).sum()
        centroids = updated
        if shift <= threshold:
            break
    labels = torch.cdist(x, centroids).argmin(dim=1)
    return _cluster_means(x, labels, k, centroids), labels


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(x.shape[0], (1,), generator=generator)
    chosen = [x[first[0]]]
    closest = (x - chosen[0]).pow(2).sum(dim=1)
    for _ in range(1, k):
        # Next centre with probability proportional to the squared distance to the nearest chosen one.
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        index = torch.multinomial(weights, 1, generator=generator)[0]
        chosen.append(x[index])
        closest = torch.minimum(closest, (x - x[index]).pow(2).sum(dim=1))
    return torch.stack(chosen)


def _cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int, previous: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k)
    means = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        far = (x - previous[labels]).pow(2).sum(dim=1).argsort(descending=True)
        means[empty] = x[far[: len(empty)]]
    return means


# ---------------------------------------------------------------------------------------------------- features


def _pixels(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["pixel_values"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        "fit_hierarchy expects batches that are pixel tensors, dicts with 'pixel_values', or (pixels, labels) "
        f"pairs; got {type(batch).__name__}"
    )


class _Reservoir:
    """Uniform sample of at most ``size`` rows from a stream (Algorithm R), seeded."""

    def __init__(self, size: int, seed: int):
        self.size, self.seen, self.rows = size, 0, []
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        for row in rows:
            if self.seen < self.size:
                self.rows.append(row)
            else:
                j = int(torch.randint(self.seen + 1, (1,), generator=self.generator))
                if j < self.size:
                    self.rows[j] = row
            self.seen += 1

    def sample(self) -> torch.Tensor:
        return torch.stack(self.rows)


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    dataloader: Iterable,
    *,
    feature: Optional[str] = None,
    max_images: Optional[int] = None,
    prototype_images: int = 1000,
    seed: int = 42,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run ``model`` (a frozen backbone) over the data; returns ``(affinity (L, L), last-block sample (n, D), N)``.

    Per image and block the feature is the block output's [CLS] token (``feature="cls"``) or the mean of its
    patch tokens (``"mean"``), before the final norm; ``None`` picks "cls" when the backbone has one. Give the
    bare backbone, or a PeftModel whose adapters are disabled.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = BackboneSpec.from_model(base)
    if feature is None:
        feature = "cls" if spec.num_prefix_tokens else "mean"
    if feature == "cls" and spec.num_prefix_tokens == 0:
        raise ValueError(f"{spec.model_class} has no [CLS] token: use hierarchy_feature='mean'")
    if feature not in ("cls", "mean"):
        raise ValueError(f"feature must be 'cls' or 'mean', got {feature!r}")
    blocks = base.get_submodule(spec.block_list)
    parameter = next(p for p in base.parameters() if p.is_floating_point())
    captured: list[Optional[torch.Tensor]] = [None] * len(blocks)

    def keep(index):
        def hook(module, args, output):
            tokens = output[0] if isinstance(output, tuple) else output
            pooled = tokens[:, 0] if feature == "cls" else tokens[:, spec.num_prefix_tokens :].mean(dim=1)
            captured[index] = pooled.float()

        return hook

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(blocks)]
    affinity_sum = torch.zeros(len(blocks), len(blocks), dtype=torch.float64)
    reservoir = _Reservoir(prototype_images, seed)
    seen = 0
    was_training = base.training
    base.eval()
    try:
        for batch in dataloader:
            pixels = _pixels(batch)
            if max_images is not None:
                pixels = pixels[: max_images - seen]
            if len(pixels) == 0:
                break
            base(**spec.model_inputs(base, pixels.to(device=parameter.device, dtype=parameter.dtype)))
            features = torch.stack(captured).cpu()  # (L, B, D)
            normed = F.normalize(features.double(), dim=-1)
            affinity_sum += torch.einsum("lbd,mbd->lm", normed, normed)
            reservoir.add(features[-1])
            seen += len(pixels)
            if max_images is not None and seen >= max_images:
                break
    finally:
        for handle in handles:
            handle.remove()
        base.train(was_training)
    if seen == 0:
        raise ValueError("fit_hierarchy got no images from the data loader")
    return (affinity_sum / seen).float(), reservoir.sample(), seen


def fit_hierarchy(
    model: nn.Module,
    dataloader: Iterable,
    *,
    share_threshold: float = 0.95,
    end_layer: Optional[int] = None,
    feature: Optional[str] = None,
    num_prototypes: Optional[int] = 200,
    max_images: Optional[int] = None,
    prototype_images: int = 1000,
    seed: int = 42,
) -> SemanticHierarchy:
    """Semantic levels and attribute prototypes of a frozen backbone on training data (docs/methods.md, SHIP).

    ``num_prototypes=None`` skips k-means (SHIP without attribute prompts). The prototypes are the mean
    last-block features of the k-means clusters of at most ``prototype_images`` randomly sampled images.
    When ``model`` is a PeftModel its adapters are disabled for the pass.

    The result depends only on the images and their order (k-means runs seeded on the CPU in float64). With
    several processes, give every process the same unsharded loader (or fit once and share the result), so that
    all of them build prompts of the same shapes.
    """
    context = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
    with context:
        affinity, sample, seen = collect_statistics(
            model, dataloader, feature=feature, max_images=max_images, prototype_images=prototype_images, seed=seed
        )
    levels = semantic_levels(affinity, share_threshold, end_layer)
    prototypes = None
    if num_prototypes:
        prototypes = kmeans(sample, num_prototypes, seed=seed)[0].float()
    return SemanticHierarchy(levels=levels, prototypes=prototypes, affinity=affinity, num_images=seen)
