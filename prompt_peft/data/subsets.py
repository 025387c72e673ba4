"""Class-aware subsets of a retrieval `DatasetDict`: a validation split held out of the training classes, and a
cap on the images per class (a cheaper protocol that keeps every class).

Hyper-parameters chosen on the test classes overstate every method; a validation split made of *training*
classes keeps the test classes untouched until the single final evaluation. Retrieval is evaluated on unseen
classes, so the validation split is class-disjoint from what is trained on, like the test split.
"""

from __future__ import annotations

import random
from collections import defaultdict

from datasets import Dataset, DatasetDict

from .datasets import split_classes

VALIDATION = "validation"


def _labels(ds: Dataset) -> list:
    return ds.with_format(None)["label"] if len(ds) else []


def hold_out_classes(
    splits: DatasetDict, fraction: float, *, seed: int = 0, source: str = "train", name: str = VALIDATION
) -> DatasetDict:
    """Move a seeded, class-disjoint ``fraction`` of the classes of ``splits[source]`` into ``splits[name]``.

    The classes are drawn by :func:`split_classes` (``random.Random(seed)``: the same seed gives the same
    classes on every machine; at least one class stays on each side). Other splits are returned unchanged.

    Raises:
        ValueError: ``fraction`` outside (0, 1), ``source`` missing, ``name`` already present, or fewer than
            two classes in ``source``.
    """
    if isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ValueError(f"the validation fraction of the training classes must be in (0, 1), got {fraction!r}")
    if source not in splits:
        raise ValueError(f"no {source!r} split to hold classes out of; the splits are {sorted(splits)}")
    if name in splits:
        raise ValueError(f"the data set already has a {name!r} split; refusing to replace it")
    labels = _labels(splits[source])
    if len(set(labels)) < 2:
        raise ValueError(f"the {source!r} split has {len(set(labels))} class(es); a validation split needs >= 2")
    _, held_out = split_classes(labels, test_ratio=fraction, seed=seed)
    held = set(held_out)
    keep = [i for i, label in enumerate(labels) if label not in held]
    moved = [i for i, label in enumerate(labels) if label in held]
    out = {key: ds for key, ds in splits.items() if key != source}
    return DatasetDict({source: splits[source].select(keep), name: splits[source].select(moved), **out})


def check_image_cap(max_images, name: str = "max images per class") -> None:
    """Raises ``ValueError`` unless ``max_images`` is a positive integer (scripts call it before any data loads)."""
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"{name} must be a positive integer, got {max_images!r}")


def limit_images_per_class(ds: Dataset, max_images: int, *, seed: int = 0) -> Dataset:
    """At most ``max_images`` rows of each class of ``ds``, drawn with ``random.Random(seed)`` (row order kept)."""
    check_image_cap(max_images)
    rows_of: dict = defaultdict(list)
    for i, label in enumerate(_labels(ds)):
        rows_of[label].append(i)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(rows_of, key=str):  # a fixed class order: the draw does not depend on row order
        rows = rows_of[label]
        chosen += rows if len(rows) <= max_images else rng.sample(rows, max_images)
    return ds.select(sorted(chosen))


def protocol_splits(
    splits: DatasetDict,
    *,
    val_classes: float = 0.0,
    val_seed: int = 0,
    eval_images_per_class: int | None = None,
    train_images_per_class: int | None = None,
) -> DatasetDict:
    """The splits a training job uses: ``val_classes`` > 0 holds that fraction of the training classes out as
    ``"validation"`` (:func:`hold_out_classes`, seeded by ``val_seed``); ``eval_images_per_class`` caps every
    split but ``"train"`` at that many images per class, ``train_images_per_class`` the ``"train"`` split
    (:func:`limit_images_per_class`, same seed; the cap is taken after the validation classes are held out, so
    they keep all their images).

    Why cap training images: a fixed step budget then covers more epochs of a smaller set, the regime of the
    papers (tens of epochs), at a cost a CPU affords."""
    if val_classes:
        splits = hold_out_classes(splits, val_classes, seed=val_seed)
    caps = {"train": train_images_per_class}
    caps.update({key: eval_images_per_class for key in splits if key != "train"})
    if any(cap is not None for cap in caps.values()):
        splits = DatasetDict(
            {
                key: ds if caps[key] is None else limit_images_per_class(ds, caps[key], seed=val_seed)
                for key, ds in splits.items()
            }
        )
    return splits
