"""The benchmarks from their Hub copies (prompt_peft.data.hub_datasets), against the loopback Hub.

Each test publishes a small parquet data set in the schema of the chosen copy (Flowers: label names are the
class ids in string order; CUB: "001.Name" labels; Cars: bare names in the official order) with the copy's
classification splits, then loads it the way `--dataset <name>` without `--data_root` does. Every image is
filled with its official class id, so the labels can be checked row by row against the pixels.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from huggingface_hub import HfApi
from PIL import Image as PILImage

from prompt_peft.data import DatasetCountError, hub_datasets, load_retrieval_dataset
from prompt_peft.data.hub_datasets import FLOWERS102_CLASS_NAMES, HUB_SOURCES, HubSource, load_benchmark_from_hub

# huggingface_hub's upload of raw bytes through httpx2 (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _per_class(class_id: int) -> int:
    return class_id % 3 + 1  # 1-3 images: split counts depend on which classes went where


def _publish(fake_hub, tmp_path, repo_id: str, names: list[str], label_of_class: dict[int, int]) -> tuple[str, dict]:
    """Upload a copy with a random (classification) train/test split; returns (commit sha, expected counts)."""
    rng = random.Random(0)
    rows = {"train": {"image": [], "label": []}, "test": {"image": [], "label": []}}
    for class_id, label in label_of_class.items():
        for _ in range(_per_class(class_id)):
            split = rows["train" if rng.random() < 0.7 else "test"]
            split["image"].append({"bytes": _png(class_id), "path": None})
            split["label"].append(label)
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    for split, columns in rows.items():
        path = tmp_path / f"{split}.parquet"
        Dataset.from_dict(columns, features=features).to_parquet(str(path))
        api.upload_file(
            path_or_fileobj=str(path),
            path_in_repo=f"data/{split}-00000-of-00001.parquet",
            repo_id=repo_id,
            repo_type="dataset",
        )
    n = len(label_of_class)
    train_images = sum(_per_class(c) for c in label_of_class if c <= n // 2)
    total = sum(_per_class(c) for c in label_of_class)
    counts = {"all": (total, n), "train": (train_images, n // 2), "test": (total - train_images, n - n // 2)}
    return fake_hub.head(repo_id, repo_type="dataset"), counts


def _check(dd: DatasetDict, n_classes: int) -> None:
    """Classes 1..n/2 train, the rest test; label = official class id - 1 (read back from the pixels)."""
    assert list(dd) == ["train", "test"]
    for split, ds in dd.items():
        for row in ds:
            class_id = int(np.asarray(row["image"])[0, 0, 0])
            assert row["label"] == class_id - 1
            assert (class_id <= n_classes // 2) == (split == "train")
    assert dd["train"].features["label"].num_classes == n_classes


@pytest.fixture
def pin(monkeypatch):
    """Point the pinned source of a benchmark at the loopback copy."""

    def apply(name: str, repo_id: str, revision: str) -> None:
        source = HUB_SOURCES[name]
        monkeypatch.setitem(
            hub_datasets.HUB_SOURCES,
            name,
            HubSource(
                repo_id,
                revision,
                source.n_classes,
                source.n_train_classes,
                source.title,
                class_names=source.class_names,
            ),
        )

    return apply


def test_flowers_default_is_the_pinned_hub_copy(fake_hub, tmp_path, pin):
    names = sorted(str(i) for i in range(1, 103))  # nelorth/oxford-flowers: ids as strings, string order
    sha, counts = _publish(fake_hub, tmp_path, "org/flowers", names, {int(n): i for i, n in enumerate(names)})
    HfApi().upload_file(path_or_fileobj=b"later", path_in_repo="extra.txt", repo_id="org/flowers", repo_type="dataset")
    pin("flowers102", "org/flowers", sha)
    cache = {"cache_dir": str(tmp_path / "datasets")}

    # The official counts are checked by default: a partial copy fails loudly.
    with pytest.raises(DatasetCountError, match="expected 8,189 images in 102 classes"):
        load_retrieval_dataset("flowers102", load_kwargs=cache)

    dd = load_retrieval_dataset("flowers102", load_kwargs=cache, expected_counts=counts)
    _check(dd, 102)
    label = dd["train"].features["label"]
    assert label.names[0] == "pink primrose" and label.names[101] == "blackberry lily"  # ids -> flower names
    assert sum(len(ds) for ds in dd.values()) == counts["all"][0]
    assert sha != fake_hub.head("org/flowers", repo_type="dataset")  # the pin, not the moved main, was loaded


def test_cub_and_cars_schemas(fake_hub, tmp_path):
    cache = {"cache_dir": str(tmp_path / "datasets")}
    cub_names = [f"{i:03d}.Bird_{i}" for i in range(1, 201)]
    # Shuffle the label order of the CUB copy: the class id must come from the name, not the position.
    order = list(range(1, 201))
    random.Random(1).shuffle(order)
    shuffled = [cub_names[i - 1] for i in order]
    sha, counts = _publish(fake_hub, tmp_path, "org/cub", shuffled, {c: order.index(c) for c in range(1, 201)})
    dd = load_benchmark_from_hub("cub200", repo_id="org/cub", revision=sha, load_kwargs=cache, expected_counts=counts)
    _check(dd, 200)
    assert dd["test"].features["label"].names[100] == "101.Bird_101"

    car_names = [f"Make{i} Model Sedan 2012" for i in range(1, 197)]  # official order, no leading id
    sha, counts = _publish(fake_hub, tmp_path, "org/cars", car_names, {c: c - 1 for c in range(1, 197)})
    dd = load_benchmark_from_hub("cars196", repo_id="org/cars", revision=sha, load_kwargs=cache, expected_counts=counts)
    _check(dd, 196)
    assert dd["train"].features["label"].names[:2] == ["Make1 Model Sedan 2012", "Make2 Model Sedan 2012"]


def test_wrong_schema_and_official_only(fake_hub, tmp_path):
    names = [f"{i:03d}.Bird" for i in range(1, 101)]  # 100 classes: not CUB-200
    sha, _ = _publish(fake_hub, tmp_path, "org/half-cub", names, {c: c - 1 for c in range(1, 101)})
    with pytest.raises(ValueError, match="expected labels for the 200 official classes"):
        load_benchmark_from_hub(
            "cub200", repo_id="org/half-cub", revision=sha, load_kwargs={"cache_dir": str(tmp_path / "datasets")}
        )
    with pytest.raises(FileNotFoundError, match="no faithful Hub copy"):
        load_benchmark_from_hub("sop")


def test_pins_are_full_commit_shas():
    for name, source in HUB_SOURCES.items():
        assert len(source.revision) == 40 and int(source.revision, 16) >= 0, name
    assert len(FLOWERS102_CLASS_NAMES) == len(set(FLOWERS102_CLASS_NAMES)) == 102
