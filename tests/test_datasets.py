"""Retrieval data-set loaders on small fake trees of every layout, plus the real Flowers-102 asset."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from prompt_peft.data import (
    BadImagesError,
    DatasetCountError,
    detect_layout,
    load_cars196,
    load_cub200,
    load_flowers102,
    load_hub_dataset,
    load_imagefolder,
    load_inshop,
    load_retrieval_dataset,
    load_rgb,
    load_sop,
    split_classes,
    with_rgb_images,
)

QUIET = {"check_counts": False, "progress": False}


def jpeg(path: Path, seed: int = 0, size=(24, 20)) -> Path:
    """A tiny but valid JPEG whose content depends on `seed`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")
    return path


def labels_by_name(ds: Dataset) -> dict[str, set[int]]:
    names = ds.features["label"].names
    return {names[label]: label for label in set(ds["label"])}


def assert_class_disjoint(dd: DatasetDict, train: str = "train") -> None:
    train_labels = set(dd[train]["label"])
    for split, ds in dd.items():
        if split != train:
            assert not train_labels & set(ds["label"]), split


# ------------------------------------------------------------------------------------------------------------
# fake trees


def make_cub(base: Path, class_ids=(1, 2, 101, 102), per_class: int = 3) -> Path:
    root = base / "CUB_200_2011"
    images, labels, classes = [], [], []
    image_id = 0
    for class_id in class_ids:
        folder = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {folder}")
        for k in range(per_class):
            image_id += 1
            jpeg(root / "images" / folder / f"img_{k}.jpg", seed=image_id)
            images.append(f"{image_id} {folder}/img_{k}.jpg")
            labels.append(f"{image_id} {class_id}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def make_sop(base: Path, info_files: bool = False) -> Path:
    root = base / "Stanford_Online_Products"
    lists = root / "Info_Files" if info_files else root
    lists.mkdir(parents=True, exist_ok=True)
    image_id = 0
    for split, class_ids in [("train", [1, 2, 3]), ("test", [4, 5])]:
        rows = ["image_id class_id super_class_id path"]
        for class_id in class_ids:
            super_id, folder = (1, "bicycle_final") if class_id % 2 else (2, "chair_final")
            for k in range(2):
                image_id += 1
                rel = f"{folder}/{class_id}_{k}.JPG"
                jpeg(root / rel, seed=image_id)
                rows.append(f"{image_id} {class_id} {super_id} {rel}")
        (lists / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def make_inshop(root: Path) -> Path:
    rows = []
    entries = [
        ("train", "id_00000001", 3),
        ("train", "id_00000002", 2),
        ("query", "id_00000007", 2),
        ("gallery", "id_00000007", 1),
        ("query", "id_00000009", 1),
        ("gallery", "id_00000009", 2),
    ]
    n = 0
    for status, item, count in entries:
        for _ in range(count):
            n += 1
            rel = f"img/WOMEN/Dresses/{item}/{n:02d}_1_front.jpg"
            jpeg(root / rel, seed=n)
            rows.append(f"{rel} {item} {status}")
    (root / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return root


def make_flowers(base: Path, class_ids=(1, 2, 10, 52, 60), names: bool = True) -> Path:
    root = base / "flowers102"
    for class_id in class_ids:
        for k in range(class_id % 3 + 1):  # 2, 3, 2, 2, 1 images
            jpeg(root / str(class_id) / f"image_{class_id:03d}{k}.jpg", seed=class_id * 10 + k)
    if names:
        (root / "cat_to_name.json").write_text(json.dumps({str(c): f"flower {c}" for c in class_ids}))
    return root


def make_imagefolder(root: Path, n_classes: int = 6, per_class: int = 2) -> Path:
    for c in range(n_classes):
        for k in range(per_class):
            jpeg(root / f"class_{c}" / f"{k}.jpg", seed=c * 100 + k)
    return root


# ------------------------------------------------------------------------------------------------------------
# CUB-200-2011 and the shared checks (counts, missing files, bad images)


def test_cub_split_labels_and_names(tmp_path):
    make_cub(tmp_path)
    dd = load_cub200(tmp_path, **QUIET)  # the parent of CUB_200_2011/ is accepted too
    assert set(dd) == {"train", "test"}
    assert (len(dd["train"]), len(dd["test"])) == (6, 6)
    names = dd["train"].features["label"].names
    assert names == ["001.Bird_1", "002.Bird_2", "101.Bird_101", "102.Bird_102"]
    assert set(dd["train"]["label"]) == {0, 1} and set(dd["test"]["label"]) == {2, 3}
    assert dd["test"].features["label"] == dd["train"].features["label"]  # one global ClassLabel
    assert_class_disjoint(dd)
    first = dd["test"][0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (24, 20)
    assert names[first["label"]] == "101.Bird_101"


def test_official_count_check_fires_on_a_partial_copy(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(DatasetCountError) as info:
        load_cub200(tmp_path, progress=False)  # check_counts=True is the default
    message = str(info.value)
    assert "CUB-200-2011: expected 11,788 images in 200 classes, found 12 in 4 classes" in message
    assert "train split: expected 5,864 images in 100 classes, found 6 in 2 classes" in message
    assert "check_counts=False" in message


def test_count_check_names_missing_files(tmp_path):
    root = make_cub(tmp_path)
    gone = root / "images" / "101.Bird_101" / "img_1.jpg"
    gone.unlink()
    with pytest.raises(DatasetCountError) as info:
        load_cub200(root, expected_counts={"all": (12, 4), "test": (6, 2)}, progress=False)
    message = str(info.value)
    assert "expected 12 images in 4 classes, found 11 in 4 classes" in message
    assert "test split: expected 6 images in 2 classes, found 5 in 2 classes" in message
    assert f"1 files listed in images.txt do not exist, e.g. {gone}" in message
    # Correct expected counts pass.
    jpeg(gone)
    assert (
        len(load_cub200(root, expected_counts={"all": (12, 4), "test": (6, 2)}, progress=False)["test"]) == 6
    )


def test_missing_files_raise_or_are_skipped_explicitly(tmp_path, caplog):
    root = make_cub(tmp_path)
    gone = root / "images" / "002.Bird_2" / "img_0.jpg"
    gone.unlink()
    with pytest.raises(BadImagesError) as info:
        load_cub200(root, **QUIET)
    assert str(gone) in str(info.value) and "file does not exist" in str(info.value)
    assert "on_bad_image='skip'" in str(info.value)
    assert [bad.path for bad in info.value.bad] == [str(gone)]
    with caplog.at_level(logging.WARNING, logger="prompt_peft.data"):
        dd = load_cub200(root, on_bad_image="skip", **QUIET)
    assert len(dd["train"]) == 5
    assert str(gone) in caplog.text and "on_bad_image='skip'" in caplog.text


def test_missing_annotation_file_names_file_and_layout(tmp_path):
    root = make_cub(tmp_path)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_cub200(root, **QUIET)
    assert "image_class_labels.txt" in str(info.value) and "Expected layout" in str(info.value)
    with pytest.raises(FileNotFoundError, match="cars_annos.mat"):
        load_cars196(tmp_path / "nowhere", **QUIET)
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        load_sop(tmp_path / "nowhere", **QUIET)
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        load_inshop(tmp_path / "nowhere", **QUIET)
    with pytest.raises(FileNotFoundError, match="flowers102"):
        load_flowers102(tmp_path / "nowhere", **QUIET)


def test_malformed_annotation_line_is_reported(tmp_path):
    root = make_cub(tmp_path)
    with open(root / "image_class_labels.txt", "a") as f:
        f.write("13\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt:13: expected 2 fields"):
        load_cub200(root, **QUIET)


def test_verify_images_reports_each_kind_of_bad_image(tmp_path, caplog):
    root = make_imagefolder(tmp_path / "folder", n_classes=4)
    data = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data, "JPEG")
    (root / "class_0" / "truncated.jpg").write_bytes(data.getvalue()[:200])
    (root / "class_1" / "empty.jpg").write_bytes(b"")
    (root / "class_2" / "tiny.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (1, 1)).save(root / "class_2" / "tiny.png")
    Image.new("CMYK", (20, 20)).save(root / "class_3" / "cmyk.jpg")  # odd mode, but fine
    bad_names = {"truncated.jpg", "empty.jpg", "tiny.png"}
    # Without verification the broken files are not decoded, so they load (and would fail at training time).
    assert sum(map(len, load_imagefolder(root, seed=None, **QUIET).values())) == 12
    with pytest.raises(BadImagesError) as info:
        load_imagefolder(root, seed=None, verify_images=True, num_workers=2, **QUIET)
    assert {Path(bad.path).name for bad in info.value.bad} == bad_names
    assert "3 of 12 images are unusable" in str(info.value)
    assert "too small: 1×1" in str(info.value) and "truncated" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="prompt_peft.data"):
        dd = load_imagefolder(root, seed=None, verify_images=True, on_bad_image="skip", **QUIET)
    assert sum(map(len, dd.values())) == 9
    assert all(name in caplog.text for name in bad_names)
    assert all(load_rgb(row["image"]).mode == "RGB" for split in dd.values() for row in split)


def test_skipping_under_count_check_says_what_was_skipped(tmp_path):
    root = make_imagefolder(tmp_path / "folder", n_classes=2)
    (root / "class_0" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetCountError, match=r"found 4 in 2 classes; 1 more images were skipped"):
        load_imagefolder(
            root, verify_images=True, on_bad_image="skip", expected_counts={"all": (5, 2)}, progress=False
        )


def test_bad_option_is_rejected(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(ValueError, match="on_bad_image"):
        load_cub200(tmp_path, on_bad_image="ignore", **QUIET)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['verify'\]"):
        load_cub200(tmp_path, verify=True, **QUIET)


# ------------------------------------------------------------------------------------------------------------
# Cars196


def write_cars_mat(
    path: Path, rows: list[dict], names: list[str] | None = None, key: str = "annotations"
) -> None:
    sio = pytest.importorskip("scipy.io", reason="scipy is needed to write the fake Cars196 .mat files")
    fields = list(rows[0])
    annotations = np.array(
        [tuple(row[f] for f in fields) for row in rows], dtype=[(f, object) for f in fields]
    )
    content = {key: annotations.reshape(1, -1)}
    if names is not None:
        content["class_names"] = np.array(names, dtype=object).reshape(1, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(path, content)


def test_cars196_annos_layout(tmp_path):
    rows = []
    for n, class_id in enumerate([1, 1, 98, 99, 99, 196], start=1):
        rel = f"car_ims/{n:06d}.jpg"
        jpeg(tmp_path / rel, seed=n)
        rows.append(
            {
                "relative_im_path": rel,
                "bbox_x1": 1,
                "bbox_y1": 1,
                "bbox_x2": 9,
                "bbox_y2": 9,
                "class": class_id,
                "test": n % 2,
            }
        )
    names = [f"Car model {i}" for i in range(1, 197)]
    write_cars_mat(tmp_path / "cars_annos.mat", rows, names)
    dd = load_cars196(tmp_path, **QUIET)
    assert (len(dd["train"]), len(dd["test"])) == (3, 3)  # by class (1–98 / 99–196), not by the `test` flag
    assert labels_by_name(dd["train"]) == {"Car model 1": 0, "Car model 98": 1}
    assert labels_by_name(dd["test"]) == {"Car model 99": 2, "Car model 196": 3}
    assert detect_layout(tmp_path) == "cars196"
    with pytest.raises(
        DatasetCountError, match="expected 16,185 images in 196 classes, found 6 in 4 classes"
    ):
        load_cars196(tmp_path, progress=False)


def test_cars196_devkit_layout(tmp_path):
    names = [f"Car model {i}" for i in range(1, 197)]
    write_cars_mat(tmp_path / "devkit" / "cars_meta.mat", [{"x": 0}], names, key="unused")
    for annos, folder, classes in [
        ("devkit/cars_train_annos.mat", "cars_train", [1, 150]),
        ("cars_test_annos_withlabels.mat", "cars_test", [2, 150, 151]),
    ]:
        rows = []
        for n, class_id in enumerate(classes, start=1):
            jpeg(tmp_path / folder / f"{n:05d}.jpg", seed=n + class_id)
            rows.append(
                {
                    "bbox_x1": 1,
                    "bbox_y1": 1,
                    "bbox_x2": 9,
                    "bbox_y2": 9,
                    "class": class_id,
                    "fname": f"{n:05d}.jpg",
                }
            )
        write_cars_mat(tmp_path / annos, rows)
    dd = load_cars196(tmp_path, **QUIET)
    assert sorted(
        Path(p["path"]).parent.name
        for p in dd["train"].cast_column("image", ImageFeature(decode=False))["image"]
    ) == ["cars_test", "cars_train"]
    assert labels_by_name(dd["train"]) == {"Car model 1": 0, "Car model 2": 1}
    assert labels_by_name(dd["test"]) == {"Car model 150": 2, "Car model 151": 3}
    assert len(dd["test"]) == 3


# ------------------------------------------------------------------------------------------------------------
# SOP, In-Shop, Flowers


@pytest.mark.parametrize("info_files", [False, True])
def test_sop(tmp_path, info_files):
    make_sop(tmp_path, info_files=info_files)
    dd = load_sop(tmp_path, **QUIET)
    assert (len(dd["train"]), len(dd["test"])) == (6, 4)
    assert dd["train"].features["label"].names == ["1", "2", "3", "4", "5"]
    assert set(dd["test"]["label"]) == {3, 4}
    assert_class_disjoint(dd)
    assert dd["train"].features["super_label"].names == ["bicycle", "chair"]
    assert dd["test"]["super_label"] == [1, 1, 0, 0]  # classes 4 (chair), 5 (bicycle)


def test_inshop_query_gallery(tmp_path):
    make_inshop(tmp_path)
    dd = load_inshop(tmp_path, **QUIET)
    assert {s: len(ds) for s, ds in dd.items()} == {"train": 5, "query": 3, "gallery": 3}
    assert dd["train"].features["label"].names == ["id_00000001", "id_00000002", "id_00000007", "id_00000009"]
    assert set(dd["query"]["label"]) == set(dd["gallery"]["label"]) == {2, 3}
    assert_class_disjoint(dd)
    with pytest.raises(DatasetCountError, match=r"query split: expected 14,218 images, found 3"):
        load_inshop(tmp_path, progress=False)


def test_inshop_rejects_unknown_status_and_shared_items(tmp_path):
    root = make_inshop(tmp_path / "a")
    with open(root / "list_eval_partition.txt", "a") as f:
        f.write("img/x.jpg id_00000003 validation\n")
    with pytest.raises(ValueError, match="unknown evaluation_status 'validation'"):
        load_inshop(root, **QUIET)
    root = make_inshop(tmp_path / "b")
    with open(root / "list_eval_partition.txt", "a") as f:
        f.write("img/WOMEN/Dresses/id_00000001/01_1_front.jpg id_00000001 query\n")
    with pytest.raises(ValueError, match="class-disjoint"):
        load_inshop(root, **QUIET)


def test_flowers_split_numeric_order_and_names(tmp_path, caplog):
    make_flowers(tmp_path)
    dd = load_flowers102(tmp_path, **QUIET)
    names = dd["train"].features["label"].names
    assert names == ["flower 1", "flower 2", "flower 10", "flower 52", "flower 60"]  # 10 after 2
    assert (len(dd["train"]), len(dd["test"])) == (2 + 3 + 2, 2 + 1)
    assert set(dd["train"]["label"]) == {0, 1, 2} and set(dd["test"]["label"]) == {3, 4}
    with pytest.raises(
        DatasetCountError, match="expected 8,189 images in 102 classes, found 10 in 5 classes"
    ):
        load_flowers102(tmp_path, progress=False)
    make_flowers(tmp_path / "unnamed", names=False)
    with caplog.at_level(logging.WARNING, logger="prompt_peft.data"):
        unnamed = load_flowers102(tmp_path / "unnamed" / "flowers102", **QUIET)
    assert unnamed["test"].features["label"].names[-1] == "60" and "cat_to_name.json" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# image folders and class splitting


def test_split_classes_is_seeded_and_disjoint():
    classes = [f"c{i}" for i in range(20)]
    train, test = split_classes(classes, test_ratio=0.25, seed=3)
    assert (len(train), len(test)) == (15, 5) and not set(train) & set(test)
    assert set(train) | set(test) == set(classes)
    # the input order does not matter
    assert split_classes(list(reversed(classes)), test_ratio=0.25, seed=3) == (train, test)
    assert split_classes(classes, test_ratio=0.25, seed=4) != (train, test)
    ordered = split_classes(classes, seed=None)
    assert ordered[0] == [f"c{i}" for i in range(10)]  # natural order: c2 before c10
    train, test = split_classes(["a", "b"], test_ratio=0.01)  # at least one class on each side
    assert len(train) == len(test) == 1
    with pytest.raises(ValueError):
        split_classes(["only"])
    with pytest.raises(ValueError):
        split_classes(classes, test_ratio=1.0)


def test_imagefolder_seeded_split_is_deterministic(tmp_path, caplog):
    root = make_imagefolder(tmp_path / "folder", n_classes=10)
    (root / "class_0" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    with caplog.at_level(logging.WARNING, logger="prompt_peft.data"):
        first = load_imagefolder(root, test_ratio=0.3, seed=7, **QUIET)
    assert "empty_class" in caplog.text
    again = load_imagefolder(root, test_ratio=0.3, seed=7, **QUIET)
    other = load_imagefolder(root, test_ratio=0.3, seed=8, **QUIET)
    names = first["train"].features["label"].names
    test_classes = sorted(labels_by_name(first["test"]))
    assert len(test_classes) == 3 and len(first["train"]) == 14 and len(first["test"]) == 6
    assert test_classes == sorted(labels_by_name(again["test"]))
    assert test_classes != sorted(labels_by_name(other["test"]))
    assert_class_disjoint(first)
    assert set(first["train"]["label"]) == set(range(7))  # train classes first: labels 0..6
    assert names[7:] == test_classes
    explicit = load_imagefolder(root, test_classes=["class_1", "class_9"], **QUIET)
    assert sorted(labels_by_name(explicit["test"])) == ["class_1", "class_9"]
    with pytest.raises(ValueError, match="unknown classes"):
        load_imagefolder(root, test_classes=["nope"], **QUIET)


# ------------------------------------------------------------------------------------------------------------
# Hub / parquet


def image_bytes(seed: int) -> bytes:
    data = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), seed * 10 % 256, dtype=np.uint8)).save(data, "PNG")
    return data.getvalue()


def hub_like(n_classes: int = 6, per_class: int = 2) -> Dataset:
    names = [f"species {i}" for i in range(n_classes)]
    rows = [(image_bytes(c * per_class + k), c) for c in range(n_classes) for k in range(per_class)]
    return Dataset.from_dict(
        {
            "img": [{"bytes": b, "path": None} for b, _ in rows],
            "fine_label": [c for _, c in rows],
            "other": [0] * len(rows),
        },
        features=Features(
            {"img": ImageFeature(), "fine_label": ClassLabel(names=names), "other": Value("int32")}
        ),
    )


def test_hub_loader_reads_local_parquet(tmp_path):
    path = tmp_path / "data" / "train-00000.parquet"
    path.parent.mkdir()
    hub_like().to_parquet(str(path))
    options = dict(
        image_column="img",
        label_column="fine_label",
        test_ratio=0.5,
        seed=1,
        load_kwargs={"cache_dir": str(tmp_path / "cache")},
        **QUIET,
    )
    dd = load_hub_dataset(str(path), **options)
    assert dd["train"].column_names == ["image", "label"]
    assert (len(dd["train"]), len(dd["test"])) == (6, 6)
    assert_class_disjoint(dd)
    assert all(name.startswith("species ") for name in dd["train"].features["label"].names)
    assert dd["test"][0]["image"].size == (20, 20)
    # the same through the dispatcher, by name and by a parquet path, and with verification
    by_name = load_retrieval_dataset("hub", str(path), **options)
    by_path = load_retrieval_dataset(str(path), verify_images=True, **options)
    assert by_name["test"]["label"] == by_path["test"]["label"] == dd["test"]["label"]
    folder = load_hub_dataset(str(tmp_path / "data"), **options)
    assert folder["test"]["label"] == dd["test"]["label"]


def test_hub_loader_class_lists_and_existing_splits():
    ds = hub_like()
    dd = load_hub_dataset(ds, image_column="img", label_column="fine_label", train_classes=[0, 2, 4], **QUIET)
    assert labels_by_name(dd["train"]) == {"species 0": 0, "species 2": 1, "species 4": 2}
    assert labels_by_name(dd["test"]) == {"species 1": 3, "species 3": 4, "species 5": 5}
    by_name = load_hub_dataset(
        ds, image_column="img", label_column="fine_label", test_classes=["species 5"], **QUIET
    )
    assert labels_by_name(by_name["test"]) == {"species 5": 5} and len(by_name["train"]) == 10
    source = DatasetDict({"fit": ds.select(range(6)), "held_out": ds.select(range(6, 12))})
    kept = load_hub_dataset(
        source,
        image_column="img",
        label_column="fine_label",
        splits={"train": "fit", "test": "held_out"},
        **QUIET,
    )
    assert (len(kept["train"]), len(kept["test"])) == (6, 6)
    assert labels_by_name(kept["test"]) == {"species 3": 3, "species 4": 4, "species 5": 5}
    overlapping = DatasetDict({"a": ds.select(range(7)), "b": ds.select(range(5, 12))})
    with pytest.raises(ValueError, match="class-disjoint"):
        load_hub_dataset(
            overlapping,
            image_column="img",
            label_column="fine_label",
            splits={"train": "a", "test": "b"},
            **QUIET,
        )
    with pytest.raises(ValueError, match="no column 'image'"):
        load_hub_dataset(ds, label_column="fine_label", **QUIET)
    with pytest.raises(DatasetCountError, match="expected 99 images"):
        load_hub_dataset(
            ds,
            image_column="img",
            label_column="fine_label",
            expected_counts={"all": (99, 6)},
            progress=False,
        )


def test_hub_loader_string_labels_and_bad_bytes():
    rows = {
        "image": [{"bytes": image_bytes(i), "path": None} for i in range(4)]
        + [{"bytes": b"junk", "path": None}],
        "label": ["cat", "cat", "dog", "dog", "eel"],
    }
    ds = Dataset.from_dict(rows, features=Features({"image": ImageFeature(), "label": Value("string")}))
    with pytest.raises(BadImagesError, match="cannot identify"):
        load_hub_dataset(ds, test_classes=["eel"], verify_images=True, **QUIET)
    dd = load_hub_dataset(ds, test_classes=["dog", "eel"], verify_images=True, on_bad_image="skip", **QUIET)
    assert dd["train"].features["label"].names == ["cat", "dog", "eel"]
    assert len(dd["test"]) == 2


# ------------------------------------------------------------------------------------------------------------
# dispatch and training-time decoding


def test_dispatch_by_name_and_auto_detect(tmp_path):
    make_cub(tmp_path / "cub")
    make_sop(tmp_path / "sop")
    make_inshop(tmp_path / "inshop")
    make_flowers(tmp_path / "flowers")
    make_imagefolder(tmp_path / "folder")
    expected = {
        "cub": "cub200",
        "sop": "sop",
        "inshop": "inshop",
        "flowers": "flowers102",
        "folder": "imagefolder",
    }
    for folder, layout in expected.items():
        assert detect_layout(tmp_path / folder) == layout
        dd = load_retrieval_dataset(tmp_path / folder, **QUIET)
        assert_class_disjoint(dd)
    assert len(load_retrieval_dataset("cub", tmp_path / "cub", **QUIET)["test"]) == 6
    assert len(load_retrieval_dataset("CUB-200-2011", tmp_path / "cub", **QUIET)["test"]) == 6
    assert len(load_retrieval_dataset("imagefolder", tmp_path / "folder", seed=None, **QUIET)["train"]) == 6
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        load_retrieval_dataset("mnist")
    with pytest.raises(ValueError, match="needs root"):
        load_retrieval_dataset("imagefolder")
    # SOP and In-Shop have no Hub copy: the error says where the official files are
    with pytest.raises(FileNotFoundError, match="needs root.*no faithful Hub copy.*lifted_struct"):
        load_retrieval_dataset("sop")
    with pytest.raises(FileNotFoundError, match="no faithful Hub copy.*DeepFashion"):
        load_retrieval_dataset("inshop")


def test_with_rgb_images_decodes_through_load_rgb(tmp_path):
    root = make_imagefolder(tmp_path / "folder", n_classes=2, per_class=1)
    Image.new("P", (20, 20)).save(root / "class_0" / "palette.png")
    dd = load_imagefolder(root, seed=None, **QUIET)
    decoded = with_rgb_images(dd, transform=lambda im: im.size)
    assert decoded["train"][0]["image"] == (24, 20)
    assert load_rgb(with_rgb_images(dd["train"])[1]["image"]).mode == "RGB"
    (root / "class_0" / "0.jpg").write_bytes(b"broken")
    with pytest.raises(OSError, match="0.jpg"):
        with_rgb_images(dd["train"])[0]


# ------------------------------------------------------------------------------------------------------------
# the real Flowers-102 asset


@pytest.mark.real_assets
def test_real_flowers102_official_counts(flowers_root):
    # check_counts=True (the default) checks the official counts
    dd = load_retrieval_dataset("flowers102", flowers_root, progress=False)
    assert (len(dd["train"]), len(dd["test"])) == (3_493, 4_696)
    assert len(set(dd["train"]["label"])) == 51 and len(set(dd["test"]["label"])) == 51
    assert_class_disjoint(dd)
    names = dd["train"].features["label"].names
    assert len(names) == 102 and names[0] == "pink primrose"
    assert detect_layout(flowers_root) == "flowers102"
    rows = with_rgb_images(dd["test"]).select(range(0, 4_696, 1_000))
    for row in rows:
        assert row["image"].mode == "RGB" and min(row["image"].size) == 160
