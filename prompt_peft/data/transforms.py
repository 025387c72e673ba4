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


def _size_field(size, key: str):
    # a dict, or transformers 5's SizeDict (attributes, None when unset)
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _native_size(processor) -> tuple[int, Optional[int]]:
    """(crop or target size, short-side resize or None) of an image processor: transformers' own (``size`` /
    ``crop_size``), timm's (``data_config``: input size and ``crop_pct``) or a NaFlex one (SigLIP 2: the square of
    ``max_num_patches`` patches)."""
    data_config = getattr(processor, "data_config", None)
    if data_config:  # timm: resize the short side to size / crop_pct, centre-crop
        size = int(data_config["input_size"][-1])
        crop_pct = data_config.get("crop_pct") or 1.0
        return size, (math.floor(size / crop_pct) if crop_pct < 1 else None)
    if getattr(processor, "max_num_patches", None):  # NaFlex: the native grid, as a square
        return int(math.isqrt(processor.max_num_patches)) * int(processor.patch_size), None
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = getattr(processor, "size", None) or {}
    if crop:
        height = _size_field(crop, "height")
        return height, _size_field(size, "shortest_edge") or height
    shortest = _size_field(size, "shortest_edge")
    if shortest:
        return shortest, None
    return _size_field(size, "height") or 224, None


def _normalise(image: Image.Image, mean, std) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


_TIMM_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _resample(processor) -> int:
    data_config = getattr(processor, "data_config", None)
    if data_config:
        return int(_TIMM_RESAMPLE.get(data_config.get("interpolation"), Image.Resampling.BICUBIC))
    value = getattr(processor, "resample", Image.Resampling.BICUBIC)
    return int(getattr(value, "value", value))


def _mean_std(processor) -> tuple[list[float], list[float]]:
    data_config = getattr(processor, "data_config", None)
    if data_config:
        return list(data_config["mean"]), list(data_config["std"])
    return list(processor.image_mean), list(processor.image_std)


def preprocessing_of(processor, image_size: Optional[int] = None) -> dict[str, Any]:
    """The evaluation preprocessing of ``processor`` at ``image_size`` (default: its native size), as plain values
    an adapter config can record: ``image_size``, ``resize_shortest_edge`` (None: resize straight to the square),
    ``mean``, ``std``, ``resample`` (PIL), and ``processor``: True when it is the processor's own call (its native
    size, a processor that returns images), which :func:`eval_transform` then calls for identical numbers."""
    native, resize = _native_size(processor)
    size = image_size or native
    mean, std = _mean_std(processor)
    return {
        "image_size": size,
        "resize_shortest_edge": round(size * resize / native) if resize else None,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "resample": _resample(processor),
        "processor": image_size is None and not getattr(processor, "max_num_patches", None),
    }


def transform_from_preprocessing(preprocessing: dict[str, Any], processor=None) -> Transform:
    """The deterministic transform a recorded :func:`preprocessing_of` describes (``processor`` is called when the
    record says it was the processor's own call and one is given)."""
    if preprocessing.get("processor") and processor is not None:
        return lambda image: processor(images=to_rgb(image), return_tensors="pt")["pixel_values"][0]
    image_size, short_side = int(preprocessing["image_size"]), preprocessing.get("resize_shortest_edge")
    mean, std, resample = preprocessing["mean"], preprocessing["std"], int(preprocessing["resample"])

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


def eval_transform(processor, image_size: Optional[int] = None) -> Transform:
    """Deterministic preprocessing for embedding: the processor itself, or its scheme at ``image_size``."""
    return transform_from_preprocessing(preprocessing_of(processor, image_size), processor)


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
    (mean, std), resample = _mean_std(processor), _resample(processor)
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
