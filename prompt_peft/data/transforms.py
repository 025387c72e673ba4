"""Image preprocessing for training and evaluation, derived from the backbone's own image processor.

Evaluation at the backbone's native size calls its transformers image processor unchanged. At another size
(e.g. reduced resolution for CPU runs) the processor's scheme is kept: resize the short side by the same
ratio and centre-crop, or resize straight to a square, with its mean/std and resampling filter. Training adds
the usual metric-learning augmentation (random resized crop + horizontal flip), written with PIL and torch
because torchvision cannot be installed next to every torch build.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import to_rgb

Transform = Callable[[Image.Image], torch.Tensor]


def _native_size(processor) -> tuple[int, Optional[int]]:
    """(crop or target size, short-side resize or None) of a transformers image processor."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = getattr(processor, "size", None) or {}
    if crop:
        return int(crop["height"]), int(size.get("shortest_edge", crop["height"]))
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), None
    return int(size.get("height", 224)), None


def _normalise(image: Image.Image, mean, std) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _resample(processor) -> int:
    value = getattr(processor, "resample", Image.Resampling.BICUBIC)
    return int(getattr(value, "value", value))


def eval_transform(processor, image_size: Optional[int] = None) -> Transform:
    """Deterministic preprocessing for embedding: the processor itself, or its scheme at ``image_size``."""
    if image_size is None:
        return lambda image: processor(images=to_rgb(image), return_tensors="pt")["pixel_values"][0]
    native, resize = _native_size(processor)
    short_side = round(image_size * resize / native) if resize else None
    mean, std, resample = processor.image_mean, processor.image_std, _resample(processor)

    def transform(image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        if short_side is None:
            image = image.resize((image_size, image_size), resample)
        else:
            scale = short_side / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
            left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
        return _normalise(image, mean, std)

    return transform


def train_transform(
    processor,
    image_size: Optional[int] = None,
    scale: tuple[float, float] = (0.16, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.5,
    rng: Optional[random.Random] = None,
) -> Transform:
    """Random resized crop (area ``scale``, aspect ``ratio``) to ``image_size`` + horizontal flip.

    Draws from the global ``random`` module by default: accelerate seeds it, saves it in checkpoints and
    DataLoader workers re-seed it. For exactly reproducible runs pass a per-sample ``rng`` at call time
    (``transform(image, rng)``); :class:`SeededRows` + :func:`make_collate_fn` do that.
    """
    image_size = image_size or _native_size(processor)[0]
    mean, std, resample = processor.image_mean, processor.image_std, _resample(processor)
    default_rng = rng or random

    def transform(image: Image.Image, rng=None) -> torch.Tensor:
        rng = rng or default_rng
        image = to_rgb(image)
        width, height = image.size
        box = (0, 0, width, height)
        for _ in range(10):  # the standard RandomResizedCrop sampling; fall back to the whole image
            area = width * height * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                box = (left, top, left + w, top + h)
                break
        image = image.resize((image_size, image_size), resample, box=box)
        if rng.random() < flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _normalise(image, mean, std)

    return transform


class SeededRows(Dataset):
    """A dataset view whose rows carry ``augment_seed``, a function of ``(seed, epoch, index)`` only.

    Random augmentation then no longer depends on the order in which batches are fetched (accelerate fetches
    one batch ahead) or on which process or worker fetches them, so a resumed run sees the very same images
    as an uninterrupted one. Call :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = dict(self.dataset[index])
        row[AUGMENT_SEED] = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)
        return row


AUGMENT_SEED = "augment_seed"


def make_collate_fn(
    transform: Transform,
    image_column: str = "image",
    label_column: str = "label",
    label_map: Optional[dict[int, int]] = None,
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Batch ``datasets`` rows into ``{"pixel_values": (B, 3, H, W), "labels": (B,)}``.

    ``label_map`` renumbers labels on the fly (e.g. the train classes to ``0..C-1`` for the proxies).
    Rows from :class:`SeededRows` are augmented with their own ``random.Random(augment_seed)``.
    """

    def apply(row: dict[str, Any]) -> torch.Tensor:
        if AUGMENT_SEED in row:
            return transform(row[image_column], random.Random(row[AUGMENT_SEED]))
        return transform(row[image_column])

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [int(row[label_column]) for row in rows]
        return {
            "pixel_values": torch.stack([apply(row) for row in rows]),
            "labels": torch.tensor([label_map[label] for label in labels] if label_map else labels),
        }

    return collate
