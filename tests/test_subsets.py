"""Validation split held out of the training classes, and the per-class image cap (prompt_peft.data.subsets)."""

from collections import Counter

import pytest
from datasets import Dataset, DatasetDict

from prompt_peft.data import VALIDATION, hold_out_classes, limit_images_per_class, protocol_splits


def make_splits(train_classes=10, test_classes=4, per_class=5):
    def rows(classes):
        labels = [c for c in classes for _ in range(per_class)]
        return Dataset.from_dict({"image": [f"{c}/{i}.jpg" for i, c in enumerate(labels)], "label": labels})

    return DatasetDict(
        {"train": rows(range(train_classes)), "test": rows(range(train_classes, train_classes + test_classes))}
    )


def classes(ds):
    return set(ds["label"])


def test_validation_classes_are_a_seeded_disjoint_fraction_of_the_training_classes():
    splits = make_splits()
    out = hold_out_classes(splits, 0.2, seed=1)
    assert set(out) == {"train", VALIDATION, "test"}
    assert len(classes(out[VALIDATION])) == 2  # 20 % of 10
    assert classes(out["train"]).isdisjoint(classes(out[VALIDATION]))
    assert classes(out["train"]) | classes(out[VALIDATION]) == classes(splits["train"])
    assert len(out["train"]) + len(out[VALIDATION]) == len(splits["train"])  # every image of a class moves
    assert out["test"]["label"] == splits["test"]["label"]  # the test split is untouched
    again = hold_out_classes(splits, 0.2, seed=1)
    assert again[VALIDATION]["image"] == out[VALIDATION]["image"]
    held_out = {frozenset(classes(hold_out_classes(splits, 0.2, seed=s)[VALIDATION])) for s in range(6)}
    assert len(held_out) > 1  # the seed chooses the classes


@pytest.mark.parametrize(
    "fraction, splits_kwargs, match",
    [
        (0.0, {}, "must be in"),
        (1.0, {}, "must be in"),
        (True, {}, "must be in"),
        (0.2, {"train_classes": 1}, "needs >= 2"),
    ],
)
def test_bad_validation_requests_are_refused(fraction, splits_kwargs, match):
    with pytest.raises(ValueError, match=match):
        hold_out_classes(make_splits(**splits_kwargs), fraction)


def test_an_existing_validation_split_is_not_replaced():
    splits = hold_out_classes(make_splits(), 0.2)
    with pytest.raises(ValueError, match="already has"):
        hold_out_classes(splits, 0.2)
    with pytest.raises(ValueError, match="no 'train' split"):
        hold_out_classes(DatasetDict({"test": splits["test"]}), 0.2)


def test_image_cap_keeps_every_class_and_is_seeded():
    ds = Dataset.from_dict({"label": [0] * 7 + [1] * 2 + [2] * 4, "image": [str(i) for i in range(13)]})
    capped = limit_images_per_class(ds, 3, seed=0)
    assert Counter(capped["label"]) == {0: 3, 1: 2, 2: 3}
    assert capped["image"] == limit_images_per_class(ds, 3, seed=0)["image"]
    assert len({tuple(limit_images_per_class(ds, 3, seed=s)["image"]) for s in range(6)}) > 1
    with pytest.raises(ValueError, match="positive integer"):
        limit_images_per_class(ds, 0)


def test_protocol_splits_cap_evaluation_splits_only():
    splits = make_splits(per_class=6)
    out = protocol_splits(splits, val_classes=0.2, val_seed=0, eval_images_per_class=2)
    assert Counter(out["test"]["label"]) == {c: 2 for c in range(10, 14)}
    assert set(Counter(out[VALIDATION]["label"]).values()) == {2}
    assert set(Counter(out["train"]["label"]).values()) == {6}  # training images are not capped by it
    assert protocol_splits(splits) is splits


def test_protocol_splits_cap_training_images_after_holding_out_validation():
    splits = make_splits(per_class=6)
    out = protocol_splits(splits, val_classes=0.2, val_seed=0, train_images_per_class=2)
    full = protocol_splits(splits, val_classes=0.2, val_seed=0)
    assert set(Counter(out["train"]["label"]).values()) == {2}
    assert set(out["train"]["label"]) == set(full["train"]["label"])  # every training class kept
    assert out[VALIDATION]["image"] == full[VALIDATION]["image"]  # the validation classes keep all their images
    assert out["test"]["image"] == splits["test"]["image"]
    assert set(out["train"]["image"]) < set(full["train"]["image"])
    both = protocol_splits(splits, val_classes=0.2, train_images_per_class=3, eval_images_per_class=2)
    assert set(Counter(both["train"]["label"]).values()) == {3}
    assert set(Counter(both["test"]["label"]).values()) == {2}
