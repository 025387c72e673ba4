"""Loaders that turn the standard retrieval benchmarks (and any image folder or Hub data set) into a
`datasets.DatasetDict` with class-disjoint splits.

Every loader returns splits `train` / `test` (`train` / `query` / `gallery` for In-Shop) with the features

* `image`: `datasets.Image()`, stored as the file path and decoded lazily on access;
* `label`: a **global** `ClassLabel` over all classes of the data set, train classes first. Train labels are
  therefore `0 .. n_train_classes - 1` (ready for a proxy or softmax loss) and test labels are
  `n_train_classes .. n_classes - 1`, so a label never means two classes in two splits. For CUB, Cars and
  Flowers, whose train classes are the first ones, the label is the official class id minus one.

The retrieval protocol splits by class (zero-shot), not the classification splits the data sets ship with, as in
the deep-metric-learning literature (see docs/data.md). Official image and class counts are checked by default
(`check_counts=True`), so a broken download fails loudly instead of shifting results.

Every loader also takes these keyword options (see `load_retrieval_dataset`):

* `check_counts` / `expected_counts`: compare against the official counts, or against your own
  `{"all" | split: (n_images, n_classes or None)}`;
* `verify_images`: decode every image up front (threads, progress bar) with the same code used at training
  time;
* `on_bad_image`: `"raise"` (default) reports missing/unreadable/tiny files in one error; `"skip"` leaves them
  out and logs a warning that lists them;
* `min_size`, `num_workers`, `progress`: passed to `scan_images`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, concatenate_datasets

from .images import DEFAULT_MIN_SIZE, BadImage, BadImagesError, describe_bad_images, load_rgb, scan_images
from .safe_paths import confine_image_paths

logger = logging.getLogger(__name__)

OnBadImage = Literal["raise", "skip"]
Counts = Mapping[str, tuple[int, int | None]]

#: Image file name endings accepted by `load_imagefolder` (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: Official counts, `split -> (images, classes)`; "all" is the whole data set. Source: the data sets' releases and
#: docs/data.md (Flowers classes 1–51 / 52–102 counted on the provided copy). In-Shop's query and gallery
#: class counts are not pinned separately: together they are the 3,985 test items, which "all" and "train"
#: imply.
OFFICIAL_COUNTS: dict[str, dict[str, tuple[int, int | None]]] = {
    "cub200": {"all": (11_788, 200), "train": (5_864, 100), "test": (5_924, 100)},
    "cars196": {"all": (16_185, 196), "train": (8_054, 98), "test": (8_131, 98)},
    "sop": {"all": (120_053, 22_634), "train": (59_551, 11_318), "test": (60_502, 11_316)},
    "inshop": {
        "all": (52_712, 7_982),
        "train": (25_882, 3_997),
        "query": (14_218, None),
        "gallery": (12_612, None),
    },
    "flowers102": {"all": (8_189, 102), "train": (3_493, 51), "test": (4_696, 51)},
}


class DatasetCountError(ValueError):
    """The loaded data set does not have the expected number of images or classes."""


# ------------------------------------------------------------------------------------------------------------
# shared machinery


@dataclass
class _Options:
    """The checking options every loader accepts (documented on `load_retrieval_dataset`)."""

    check_counts: bool = True
    expected_counts: Counts | None = None
    verify_images: bool = False
    on_bad_image: OnBadImage = "raise"
    min_size: int | None = DEFAULT_MIN_SIZE
    num_workers: int | None = None
    progress: bool = True
    skipped: list[BadImage] | None = None  # receives every image left out by on_bad_image="skip"

    def __post_init__(self) -> None:
        if self.on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {self.on_bad_image!r}")


def _options(options: Mapping[str, Any]) -> _Options:
    unknown = sorted(set(options) - set(_Options.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the checks take {sorted(_Options.__dataclass_fields__)}")
    return _Options(**options)


@dataclass
class _Split:
    """One split as plain lists, before it becomes a `Dataset`."""

    paths: list[str] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)  # the layout's own class ids, mapped to labels later
    extra: dict[str, list[Any]] = field(default_factory=dict)


def _fmt(n: int) -> str:
    return f"{n:,}"


def _natural_key(text: Any) -> list[Any]:
    """Sort "2" before "10" and "class_2" before "class_10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(text))]


def _require_file(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: annotation file {path} not found. Expected layout: {layout}")
    return path


def _read_rows(path: Path, n_fields: int, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
    """Yield `(line number, fields)` of a whitespace-separated file; a malformed line raises, naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number <= skip or not line.strip():
                continue
            fields = line.split(maxsplit=n_fields - 1)
            if len(fields) != n_fields:
                raise ValueError(f"{path}:{number}: expected {n_fields} fields, got {line.rstrip()!r}")
            yield number, [x.strip() for x in fields]


def _class_label(train_keys: Iterable[Any], other_keys: Iterable[Any], name_of: Callable[[Any], str]) -> tuple:
    """Global label mapping with train classes first; returns (`ClassLabel`, key -> label id)."""
    ordered = list(dict.fromkeys([*train_keys, *other_keys]))
    names = [name_of(key) for key in ordered]
    if len(set(names)) != len(names):  # ClassLabel needs unique names; fall back to "<key> <name>"
        names = [f"{key} {name}" for key, name in zip(ordered, names)]
    return ClassLabel(names=names), {key: index for index, key in enumerate(ordered)}


def _split_classes_of(splits: Mapping[str, _Split]) -> tuple[list[Any], list[Any]]:
    train = sorted(set(splits["train"].keys), key=_natural_key) if "train" in splits else []
    others = {key for name, split in splits.items() if name != "train" for key in split.keys}
    overlap = others.intersection(train)
    if overlap:
        examples = sorted(overlap, key=_natural_key)[:5]
        raise ValueError(
            f"train and test splits share {len(overlap)} classes, e.g. {examples}; the retrieval protocol"
            " needs class-disjoint splits"
        )
    return train, sorted(others, key=_natural_key)


def _check_counts(name: str, dd: DatasetDict, expected: Counts, notes: Sequence[str]) -> None:
    classes = {split: set(ds.unique("label")) for split, ds in dd.items()}  # arrow-side, fast on 120k rows
    found = {split: (len(ds), len(classes[split])) for split, ds in dd.items()}
    found["all"] = (sum(len(ds) for ds in dd.values()), len(set().union(*classes.values())))
    problems = []
    for split in ["all", *[s for s in expected if s != "all"]]:
        if split not in expected:
            continue
        want_images, want_classes = expected[split]
        have_images, have_classes = found.get(split, (0, 0))
        if have_images != want_images or (want_classes is not None and have_classes != want_classes):
            prefix = "" if split == "all" else f"{split} split: "
            in_classes = "" if want_classes is None else f" in {_fmt(want_classes)} classes"
            problems.append(
                f"{prefix}expected {_fmt(want_images)} images{in_classes}, "
                f"found {_fmt(have_images)} in {_fmt(have_classes)} classes"
            )
    if problems:
        raise DatasetCountError(
            f"{name}: {'; '.join(problems)}"
            + "".join(f"; {note}" for note in notes)
            + ". Re-download or repair the data set, or pass check_counts=False to use a partial or modified"
            " copy."
        )


def _examples(bad: Sequence[BadImage], limit: int = 3) -> str:
    return ", ".join(item.path for item in bad[:limit]) + (", ..." if len(bad) > limit else "")


def _image_items(ds: Dataset) -> Iterator[dict[str, Any]]:
    """The undecoded `{"path", "bytes"}` values of the image column, batch by batch (bytes can be large)."""
    raw = ds.select_columns(["image"]).cast_column("image", Image(decode=False))
    for batch in raw.iter(batch_size=256):
        yield from batch["image"]


def _missing_files(ds: Dataset) -> list[tuple[int, BadImage]]:
    """Rows whose image is a path to a file that does not exist (rows holding bytes are not read)."""
    missing = []
    row = 0
    for batch in ds.select_columns(["image"]).with_format("arrow").iter(batch_size=4096):
        images = batch.column("image").combine_chunks()
        no_bytes = images.field("bytes").is_null().to_pylist()  # validity bitmap only: the bytes stay unread
        for offset, (path, by_path) in enumerate(zip(images.field("path").to_pylist(), no_bytes)):
            if by_path and not (path and os.path.isfile(path)):
                missing.append((row + offset, BadImage(str(path), "file does not exist")))
        row += len(batch)
    return missing


def _find_bad(name: str, split: str, ds: Dataset, options: _Options) -> tuple[list[tuple[int, BadImage]], set[int]]:
    """Rows of `ds` whose file does not exist, and (with `verify_images`) rows that fail `check_image`."""
    missing = _missing_files(ds)
    missing_rows = {row for row, _ in missing}
    if not options.verify_images:
        return missing, missing_rows
    present = [row for row in range(len(ds)) if row not in missing_rows]
    items = (item for row, item in enumerate(_image_items(ds)) if row not in missing_rows)
    found = scan_images(
        items,
        total=len(present),
        min_size=options.min_size,
        num_workers=options.num_workers,
        progress=options.progress,
        desc=f"{name} {split}: verifying images",
    )
    return missing + [(present[position], bad) for position, bad in found], missing_rows


def _finish(
    name: str,
    splits: Mapping[str, Dataset],
    options: _Options,
    *,
    official: str | None,
    listed_in: str,
) -> DatasetDict:
    """Find missing (and, if asked, undecodable) images, apply `on_bad_image`, check the counts."""
    skip = options.on_bad_image == "skip"
    missing: list[BadImage] = []
    unreadable: list[BadImage] = []
    kept = {}
    for split, ds in splits.items():
        bad_rows, missing_rows = _find_bad(name, split, ds, options)
        missing += [item for row, item in bad_rows if row in missing_rows]
        unreadable += [item for row, item in bad_rows if row not in missing_rows]
        # Without "skip", only absent files are left out, so that the count check counts what exists.
        drop = {row for row, _ in bad_rows} if skip else missing_rows
        kept[split] = ds.select([i for i in range(len(ds)) if i not in drop]) if drop else ds
    dd = DatasetDict(kept)
    bad = missing + unreadable
    if bad and skip and options.skipped is not None:
        options.skipped.extend(bad)
    if bad and skip:
        logger.warning(
            "%s: leaving out %d unusable image(s) because on_bad_image='skip':\n%s",
            name,
            len(bad),
            describe_bad_images(bad, limit=50),
        )

    expected = options.expected_counts or (OFFICIAL_COUNTS.get(official) if official else None)
    if options.check_counts and expected:
        notes = []
        if missing:
            notes.append(f"{_fmt(len(missing))} files listed in {listed_in} do not exist, e.g. {_examples(missing)}")
        if unreadable:
            what = "were skipped" if skip else "are unreadable or too small"
            notes.append(f"{_fmt(len(unreadable))} more images {what}, e.g. {_examples(unreadable)}")
        _check_counts(name, dd, expected, notes)

    if bad and not skip:
        raise BadImagesError(
            f"{name}: {_fmt(len(bad))} of {_fmt(sum(len(ds) for ds in splits.values()))} images are unusable"
            f" ({_fmt(len(missing))} missing, {_fmt(len(unreadable))} unreadable or too small):\n"
            f"{describe_bad_images(bad)}\n"
            "Repair or re-download them, or pass on_bad_image='skip' to leave them out (a warning lists"
            " them).",
            bad,
        )
    return dd


def _build(
    name: str,
    splits: Mapping[str, _Split],
    options: _Options,
    *,
    name_of: Callable[[Any], str] = str,
    official: str | None,
    listed_in: str,
    extra_features: Mapping[str, Any] | None = None,
) -> DatasetDict:
    """Paths and class keys -> DatasetDict with a global ClassLabel (train classes first), then checked."""
    train_keys, other_keys = _split_classes_of(splits)
    label, label_of = _class_label(train_keys, other_keys, name_of)
    features = Features({"image": Image(), "label": label, **(extra_features or {})})
    datasets = {
        split: Dataset.from_dict(
            {"image": s.paths, "label": [label_of[k] for k in s.keys], **s.extra}, features=features
        )
        for split, s in splits.items()
    }
    return _finish(name, datasets, options, official=official, listed_in=listed_in)


# ------------------------------------------------------------------------------------------------------------
# benchmark layouts


def _find_root(root: str | os.PathLike, folder: str, *markers: str) -> Path:
    """Accept either the data set's own folder or its parent (e.g. `.../CUB_200_2011` or `...`)."""
    root = Path(root).expanduser()
    if not any((root / m).exists() for m in markers) and any((root / folder / m).exists() for m in markers):
        return root / folder
    return root


def load_cub200(root: str | os.PathLike, **options: Any) -> DatasetDict:
    """CUB-200-2011: classes 1–100 train (5,864 images), 101–200 test (5,924 images).

    `root` is `CUB_200_2011/` (holding `images.txt`, `image_class_labels.txt`, `classes.txt`, `images/`) or
    its parent. Class names are those of `classes.txt` (e.g. `001.Black_footed_Albatross`); the label is the
    class id minus one. `train_test_split.txt` is the classification split and is not used.
    """
    opts = _options(options)
    root = _find_root(root, "CUB_200_2011", "images.txt")
    layout = "CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, images/<class>/<file>.jpg}"
    image_rows = _read_rows(_require_file(root / "images.txt", "CUB-200-2011", layout), 2)
    label_rows = _read_rows(_require_file(root / "image_class_labels.txt", "CUB-200-2011", layout), 2)
    class_rows = _read_rows(_require_file(root / "classes.txt", "CUB-200-2011", layout), 2)
    paths = {image_id: path for _, (image_id, path) in image_rows}
    class_names = {int(class_id): class_name for _, (class_id, class_name) in class_rows}
    splits = {"train": _Split(), "test": _Split()}
    for number, (image_id, class_id) in label_rows:
        if image_id not in paths:
            raise ValueError(f"{root / 'image_class_labels.txt'}:{number}: image id {image_id} not in images.txt")
        split = splits["train" if int(class_id) <= 100 else "test"]
        split.paths.append(str(root / "images" / paths[image_id]))
        split.keys.append(int(class_id))
    return _build(
        "CUB-200-2011",
        splits,
        opts,
        name_of=lambda k: class_names.get(k, str(k)),
        official="cub200",
        listed_in="images.txt",
    )


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError as err:  # scipy is optional: only the Cars196 .mat annotations need it
        raise ImportError(f"reading {path.name} (Cars196 annotations) needs scipy: pip install scipy") from err
    return loadmat(path, simplify_cells=True)


def _as_list(value: Any) -> list[Any]:
    # simplify_cells turns a 1-element struct array into a bare dict/str
    return [value] if isinstance(value, (dict, str)) else list(value)


def load_cars196(root: str | os.PathLike, **options: Any) -> DatasetDict:
    """Cars196 (Stanford Cars): classes 1–98 train (8,054 images), 99–196 test (8,131 images).

    `root` holds either the layout used by metric-learning code, `cars_annos.mat` + `car_ims/`, or the devkit
    layout: `devkit/cars_meta.mat`, `devkit/cars_train_annos.mat`, `cars_test_annos_withlabels.mat` (in
    `root` or `devkit/`), `cars_train/`, `cars_test/`. Both cover the same 16,185 images; the official
    train/test columns (a classification split) are ignored. Needs scipy to read the `.mat` files.
    """
    opts = _options(options)
    root = Path(root).expanduser()
    layout = (
        "cars_annos.mat + car_ims/*.jpg, or devkit/{cars_meta,cars_train_annos}.mat + "
        "cars_test_annos_withlabels.mat + cars_train/ + cars_test/"
    )
    records: list[tuple[str, int]] = []
    if (root / "cars_annos.mat").is_file() or not (root / "devkit").is_dir():
        mat = _loadmat(_require_file(root / "cars_annos.mat", "Cars196", layout))
        class_names = [str(n) for n in _as_list(mat["class_names"])]
        records = [(str(root / a["relative_im_path"]), int(a["class"])) for a in _as_list(mat["annotations"])]
        listed_in = "cars_annos.mat"
    else:
        meta = _loadmat(_require_file(root / "devkit" / "cars_meta.mat", "Cars196", layout))
        class_names = [str(n) for n in _as_list(meta["class_names"])]
        test_annos = root / "cars_test_annos_withlabels.mat"
        if not test_annos.is_file():
            test_annos = root / "devkit" / test_annos.name
        for annos, folder in [
            (root / "devkit" / "cars_train_annos.mat", "cars_train"),
            (test_annos, "cars_test"),
        ]:
            mat = _loadmat(_require_file(annos, "Cars196", layout))
            records += [(str(root / folder / a["fname"]), int(a["class"])) for a in _as_list(mat["annotations"])]
        listed_in = "the devkit annotations"
    splits = {"train": _Split(), "test": _Split()}
    for path, class_id in records:
        split = splits["train" if class_id <= 98 else "test"]
        split.paths.append(path)
        split.keys.append(class_id)

    def name_of(class_id: int) -> str:
        return class_names[class_id - 1] if 0 < class_id <= len(class_names) else str(class_id)

    return _build("Cars196", splits, opts, name_of=name_of, official="cars196", listed_in=listed_in)


def load_sop(root: str | os.PathLike, **options: Any) -> DatasetDict:
    """Stanford Online Products: `Ebay_train.txt` (11,318 classes, 59,551 images) / `Ebay_test.txt` (11,316
    classes, 60,502 images).

    `root` is `Stanford_Online_Products/` or its parent; the two lists may also sit in `Info_Files/`. Columns:
    `image_id class_id super_class_id path` after a header line; paths are relative to `root`. Class names are
    the class ids; an extra `super_label` feature holds the 12 super-classes (named after their folders, e.g.
    `bicycle`).
    """
    opts = _options(options)
    root = _find_root(root, "Stanford_Online_Products", "Ebay_train.txt", "Info_Files/Ebay_train.txt")
    if not (root / "Ebay_train.txt").is_file() and (root / "Info_Files" / "Ebay_train.txt").is_file():
        lists = root / "Info_Files"
    else:
        lists = root
    layout = "Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super_class>_final/<file>.JPG}"
    splits: dict[str, _Split] = {}
    super_names: dict[int, str] = {}
    for split, file in [("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")]:
        s = splits[split] = _Split(extra={"super_label": []})
        for _, (_, class_id, super_id, path) in _read_rows(_require_file(lists / file, "SOP", layout), 4, skip=1):
            s.paths.append(str(root / path))
            s.keys.append(int(class_id))
            s.extra["super_label"].append(int(super_id))
            super_names.setdefault(int(super_id), path.split("/", 1)[0].removesuffix("_final"))
    super_index = {super_id: index for index, super_id in enumerate(sorted(super_names))}  # ids are 1-based
    for s in splits.values():
        s.extra["super_label"] = [super_index[i] for i in s.extra["super_label"]]
    super_label = ClassLabel(names=[super_names[i] for i in sorted(super_names)])
    return _build(
        "Stanford Online Products",
        splits,
        opts,
        official="sop",
        listed_in="Ebay_train/test.txt",
        extra_features={"super_label": super_label},
    )


def load_inshop(root: str | os.PathLike, **options: Any) -> DatasetDict:
    """In-Shop Clothes Retrieval (DeepFashion): splits `train` (3,997 items, 25,882 images), `query` (14,218)
    and `gallery` (12,612); query and gallery share the 3,985 test items and have no images in common.

    `root` holds `list_eval_partition.txt` (or `Eval/list_eval_partition.txt`): a count line, a header line
    `image_name item_id evaluation_status`, then one image per line. Image paths (`img/...`) are resolved
    against `root`, or `root/Img` when `root/img` does not exist. Class names are the item ids
    (`id_00000001`).
    """
    opts = _options(options)
    root = Path(root).expanduser()
    partition = root / "list_eval_partition.txt"
    if not partition.is_file() and (root / "Eval" / partition.name).is_file():
        partition = root / "Eval" / partition.name
    layout = "list_eval_partition.txt (or Eval/list_eval_partition.txt) + img/<...>/<file>.jpg"
    _require_file(partition, "In-Shop", layout)
    image_root = root / "Img" if not (root / "img").exists() and (root / "Img").is_dir() else root
    splits = {"train": _Split(), "query": _Split(), "gallery": _Split()}
    for number, (path, item_id, status) in _read_rows(partition, 3, skip=2):
        if status not in splits:
            raise ValueError(f"{partition}:{number}: unknown evaluation_status {status!r}")
        splits[status].paths.append(str(image_root / path))
        splits[status].keys.append(item_id)
    return _build("In-Shop", splits, opts, official="inshop", listed_in=partition.name)


def load_flowers102(root: str | os.PathLike, **options: Any) -> DatasetDict:
    """Oxford 102 Flowers in the asset's layout: classes 1–51 train (3,493 images), 52–102 test (4,696).

    `root` is `flowers102/` (class folders `1/` .. `102/` of JPEGs, plus `cat_to_name.json`) or its parent.
    Class names come from `cat_to_name.json` (label = class id - 1); without it the folder ids are used, with
    a warning.
    """
    opts = _options(options)
    root = _find_root(root, "flowers102", "1")
    folders = (
        sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if root.is_dir()
        else []
    )
    if not folders:
        raise FileNotFoundError(
            f"Flowers-102: no class folders 1/ .. 102/ in {root}. "
            "Expected layout: flowers102/<class id 1..102>/*.jpg + cat_to_name.json"
        )
    names_file = root / "cat_to_name.json"
    if names_file.is_file():
        names = json.loads(names_file.read_text(encoding="utf-8"))
    else:
        logger.warning("Flowers-102: %s not found; class names will be the folder ids", names_file)
        names = {}
    splits = {"train": _Split(), "test": _Split()}
    for folder in folders:
        class_id = int(folder.name)
        split = splits["train" if class_id <= 51 else "test"]
        files = _image_files(folder)
        split.paths += files
        split.keys += [class_id] * len(files)
    return _build(
        "Flowers-102",
        splits,
        opts,
        name_of=lambda k: names.get(str(k), str(k)),
        official="flowers102",
        listed_in="the class folders",
    )


# ------------------------------------------------------------------------------------------------------------
# generic sources: image folders and Hub / parquet data sets


def split_classes(
    classes: Iterable[Any], *, test_ratio: float = 0.5, seed: int | None = 0
) -> tuple[list[Any], list[Any]]:
    """Split class keys into (train, test), both sorted naturally.

    `seed=None` takes the first classes in natural sort order for training (the CUB/Cars convention); an
    integer seed shuffles them with `random.Random(seed)`, so the same seed gives the same split on every
    machine. `test_ratio` is the fraction of classes held out (at least one class on each side).
    """
    ordered = sorted(set(classes), key=_natural_key)
    if len(ordered) < 2:
        raise ValueError(f"need at least 2 classes to split, got {len(ordered)}")
    if not 0 < test_ratio < 1:
        raise ValueError(f"test_ratio must be between 0 and 1, got {test_ratio}")
    n_test = min(max(round(len(ordered) * test_ratio), 1), len(ordered) - 1)
    if seed is not None:
        random.Random(seed).shuffle(ordered)
    train, test = ordered[: len(ordered) - n_test], ordered[len(ordered) - n_test :]
    return sorted(train, key=_natural_key), sorted(test, key=_natural_key)


def _resolve_class_lists(
    classes: Sequence[Any],
    train_classes: Sequence[Any] | None,
    test_classes: Sequence[Any] | None,
    test_ratio: float,
    seed: int | None,
) -> tuple[list[Any], list[Any]]:
    if train_classes is None and test_classes is None:
        return split_classes(classes, test_ratio=test_ratio, seed=seed)
    known = set(classes)
    unknown = [c for c in [*(train_classes or []), *(test_classes or [])] if c not in known]
    if unknown:
        raise ValueError(f"unknown classes {unknown[:5]}; known classes are e.g. {sorted(known, key=_natural_key)[:5]}")
    train = list(train_classes) if train_classes is not None else [c for c in classes if c not in set(test_classes)]
    test = list(test_classes) if test_classes is not None else [c for c in classes if c not in set(train)]
    return train, test


def _image_files(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    suffixes = tuple(e.lower() for e in extensions)
    return sorted(
        (
            str(p)
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(suffixes)
        ),
        key=_natural_key,
    )


def load_imagefolder(
    root: str | os.PathLike,
    *,
    test_ratio: float = 0.5,
    seed: int | None = 0,
    train_classes: Sequence[str] | None = None,
    test_classes: Sequence[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    **options: Any,
) -> DatasetDict:
    """Any `root/<class name>/<image>` folder, split by class into `train` / `test`.

    Classes are split with `split_classes(test_ratio, seed)` (deterministic for a given seed; `seed=None`
    keeps the first classes in natural order for training), or by explicit `train_classes` / `test_classes`
    (folder names; give one and the other is the rest; with both, classes in neither are left out). Files
    whose names do not end with one of `extensions` and hidden entries are ignored; empty class folders are
    left out with a warning. No counts are checked unless `expected_counts` is given.
    """
    opts = _options(options)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found. Expected layout: <root>/<class name>/<image>")
    files = {d.name: _image_files(d, extensions) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    empty = sorted(name for name, paths in files.items() if not paths)
    if empty:
        logger.warning("image folder %s: leaving out %d class folder(s) without images: %s", root, len(empty), empty)
    classes = sorted((name for name, paths in files.items() if paths), key=_natural_key)
    if not classes:
        raise FileNotFoundError(f"no class folders with images in {root}. Expected layout: <root>/<class name>/<image>")
    train, test = _resolve_class_lists(classes, train_classes, test_classes, test_ratio, seed)
    splits = {"train": _Split(), "test": _Split()}
    for split, split_classes_ in [("train", train), ("test", test)]:
        for name in split_classes_:
            splits[split].paths += files[name]
            splits[split].keys += [name] * len(files[name])
    return _build(f"image folder {root}", splits, opts, official=None, listed_in="the class folders")


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _is_parquet_path(path: str) -> bool:
    return (
        path.endswith(".parquet")
        or _is_glob(path)
        or (os.path.isdir(path) and bool(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)))
    )


def _data_folders(path: str, load_kwargs: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """``(roots, base)`` for `confine_image_paths`: a local data set's own folder; for a Hub id, the caches its
    files are downloaded to (relative paths refused)."""
    if os.path.isdir(path) or _is_parquet_path(path):
        folder = path if os.path.isdir(path) else os.path.dirname(path.split("*")[0].split("?")[0].split("[")[0])
        folder = os.path.abspath(folder or ".")
        return [folder], folder
    import datasets.config
    from huggingface_hub import constants

    caches = [datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE, load_kwargs.get("cache_dir")]
    return [os.fspath(c) for c in caches if c], None


def load_hub_dataset(
    path: str | os.PathLike | Dataset | DatasetDict,
    *,
    image_column: str = "image",
    label_column: str = "label",
    splits: Mapping[str, str] | None = None,
    source_splits: str | Sequence[str] | None = None,
    test_ratio: float = 0.5,
    seed: int | None = 0,
    train_classes: Sequence[Any] | None = None,
    test_classes: Sequence[Any] | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    class_names: Mapping[Any, str] | None = None,
    title: str | None = None,
    **options: Any,
) -> DatasetDict:
    """A data set with an image column and a label column, from the Hub, local parquet files, or memory.

    Args:
        path: a `datasets.load_dataset` id (`"org/name"`), a local `.parquet` file, glob or folder of parquet
            files, or an already loaded `Dataset` / `DatasetDict`.
        image_column, label_column: the source column names; they become `image` (`datasets.Image()`) and
            `label`. Other columns are dropped.
        splits: keep the source's own splits when they are already class-disjoint: maps our split names to
            source split names, e.g. `{"train": "train", "test": "test"}`. Overlapping classes raise.
        source_splits: otherwise the source splits to pool (default: all) before splitting by class with
            `test_ratio` / `seed` (see `split_classes`) or by `train_classes` / `test_classes` (label values:
            ints for a `ClassLabel` or integer column, strings for a string column).
        load_kwargs: extra arguments for `datasets.load_dataset` (e.g. `name`, `revision`, `cache_dir`).
        class_names: label value -> class name; replaces the names below.
        title: how messages name the data set (default: `path`).

    Class names come from the source `ClassLabel` when there is one, else from the label values.
    """
    opts = _options(options)
    folders = None  # where path-only image rows may point (None: in memory, the caller's own data)
    if isinstance(path, (Dataset, DatasetDict)):
        source, title = path, title or "in-memory data set"
    else:
        from datasets import load_dataset

        path = os.fspath(path)
        title = title or path
        folders = _data_folders(path, load_kwargs or {})
        if _is_parquet_path(path):
            files = os.path.join(path, "**", "*.parquet") if os.path.isdir(path) else path
            source = load_dataset("parquet", data_files=files, **(load_kwargs or {}))
        else:
            source = load_dataset(path, **(load_kwargs or {}))
    if isinstance(source, Dataset):
        source = DatasetDict({"train": source})
    first = next(iter(source.values()))
    for column in (image_column, label_column):
        if column not in first.column_names:
            raise ValueError(f"{title}: no column {column!r}; columns are {first.column_names}")

    def keys_of(ds: Dataset) -> list[Any]:
        return ds.select_columns(["_key"]).with_format("arrow")["_key"].to_pylist()

    label_feature = first.features[label_column]
    names = label_feature.names if isinstance(label_feature, ClassLabel) else None

    def as_ids(classes: Sequence[Any] | None) -> list[Any] | None:
        """Class lists may name `ClassLabel` classes by name as well as by id."""
        if classes is None or names is None:
            return None if classes is None else list(classes)
        return [names.index(c) if isinstance(c, str) and c in names else c for c in classes]

    def tidy(ds: Dataset) -> Dataset:
        ds = ds.select_columns([image_column, label_column])
        if image_column != "image":
            ds = ds.rename_column(image_column, "image")
        if not isinstance(ds.features["image"], Image):
            ds = ds.cast_column("image", Image())
        return ds.rename_column(label_column, "_key") if label_column != "_key" else ds

    if splits is not None:
        unknown = [s for s in splits.values() if s not in source]
        if unknown:
            raise ValueError(f"{title}: no split(s) {unknown}; it has {list(source)}")
        parts = {ours: tidy(source[theirs]) for ours, theirs in splits.items()}
        train_keys, other_keys = _split_classes_of({s: _Split(keys=keys_of(ds)) for s, ds in parts.items()})
    else:
        pooled_names = [source_splits] if isinstance(source_splits, str) else list(source_splits or source)
        pooled = concatenate_datasets([tidy(source[s]) for s in pooled_names])
        keys = keys_of(pooled)
        train_keys, other_keys = _resolve_class_lists(
            sorted(set(keys), key=_natural_key), as_ids(train_classes), as_ids(test_classes), test_ratio, seed
        )
        train_set, test_set = set(train_keys), set(other_keys)
        parts = {
            "train": pooled.select([i for i, k in enumerate(keys) if k in train_set]),
            "test": pooled.select([i for i, k in enumerate(keys) if k in test_set]),
        }

    def name_of(key: Any) -> str:
        if class_names is not None and key in class_names:
            return class_names[key]
        return names[key] if names is not None else str(key)

    label, label_of = _class_label(train_keys, other_keys, name_of)
    datasets = {}
    for split, ds in parts.items():
        labels = [label_of[k] for k in keys_of(ds)]
        datasets[split] = ds.remove_columns("_key").add_column("label", labels).cast_column("label", label)
    if folders is not None:
        datasets = confine_image_paths(title, datasets, *folders)
    return _finish(f"Hub data set {title}", datasets, opts, official=None, listed_in=title)


# ------------------------------------------------------------------------------------------------------------
# dispatch and training-time decoding

LOADERS: dict[str, Callable[..., DatasetDict]] = {
    "cub200": load_cub200,
    "cars196": load_cars196,
    "sop": load_sop,
    "inshop": load_inshop,
    "flowers102": load_flowers102,
    "imagefolder": load_imagefolder,
    "hub": load_hub_dataset,
}
_ALIASES = {
    "cub": "cub200",
    "cub2002011": "cub200",
    "cars": "cars196",
    "stanfordcars": "cars196",
    "stanfordonlineproducts": "sop",
    "deepfashioninshop": "inshop",
    "flowers": "flowers102",
    "oxfordflowers102": "flowers102",
    "parquet": "hub",
}


def _canonical(name: str) -> str | None:
    key = re.sub(r"[-_ ]", "", name.lower())
    key = _ALIASES.get(key, key)
    return key if key in LOADERS else None


def detect_layout(root: str | os.PathLike) -> str:
    """Name of the loader whose layout `root` has (`cub200`, `cars196`, `sop`, `inshop`, `flowers102`, else
    `imagefolder` when `root` has sub-folders); raises `ValueError` when none fits."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")

    def has(*names: str) -> bool:
        return any((root / n).exists() for n in names)

    if has("images.txt", "CUB_200_2011/images.txt"):
        return "cub200"
    if has("cars_annos.mat", "devkit/cars_train_annos.mat"):
        return "cars196"
    sop_lists = ("Ebay_train.txt", "Info_Files/Ebay_train.txt")
    if has(*sop_lists, *(f"Stanford_Online_Products/{p}" for p in sop_lists)):
        return "sop"
    if has("list_eval_partition.txt", "Eval/list_eval_partition.txt"):
        return "inshop"
    if has("cat_to_name.json", "flowers102/cat_to_name.json"):
        return "flowers102"
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return "imagefolder"
    raise ValueError(f"cannot tell the layout of {root}: no known annotation files and no class sub-folders")


def load_retrieval_dataset(
    name_or_path: str | os.PathLike, root: str | os.PathLike | None = None, **kwargs: Any
) -> DatasetDict:
    """Load a retrieval data set as a `DatasetDict` with class-disjoint splits.

    Args:
        name_or_path: a loader name (`cub200`, `cars196`, `sop`, `inshop`, `flowers102`, `imagefolder`, `hub`,
            or an alias such as `cub`, `cars`, `flowers`), or a directory whose layout is detected
            (`detect_layout`), or a `.parquet` file / glob (loaded with `load_hub_dataset`).
        root: the data set's directory for the named layouts; for `hub`, the Hub id or parquet path. Without
            it, `cub200`, `cars196` and `flowers102` load their pinned Hub copy
            (`prompt_peft.data.hub_datasets.load_benchmark_from_hub`; `revision=` / `repo_id=` override the
            pin), and `sop` / `inshop` raise `FileNotFoundError` saying where to get the official files.
        **kwargs: the loader's own options, plus the checks every loader takes:
            `check_counts=True` compare with the official counts (`OFFICIAL_COUNTS`) and raise
            `DatasetCountError` on a mismatch; `expected_counts={"all" | split: (images, classes or None)}`
            replaces them (also for `imagefolder` and `hub`, which have none); `verify_images=False` decode
            every image before returning; `on_bad_image="raise"` raise `BadImagesError` listing missing,
            unreadable or tiny files, or `"skip"` to leave them out with a logged warning; `min_size=16`
            smallest acceptable shorter side for `verify_images`; `num_workers` threads for it;
            `progress=True` show a progress bar; `skipped=<a list>` receives the `BadImage` of every image
            left out by `on_bad_image="skip"`.

    Files listed in annotations but absent on disk are always detected (a cheap stat); decoding every image is
    opt-in because it takes minutes on SOP (about 2,000 small images/s on 2 cores).
    """
    text = os.fspath(name_or_path)
    loader_name = _canonical(text)
    if loader_name is not None and not (root is None and os.path.isdir(text)):
        if root is None:
            from .hub_datasets import HUB_SOURCES, OFFICIAL_ONLY, load_benchmark_from_hub

            if loader_name in HUB_SOURCES:  # no local copy: the pinned Hub copy
                return load_benchmark_from_hub(loader_name, **kwargs)
            if loader_name in OFFICIAL_ONLY:
                raise FileNotFoundError(f"{text} needs root= (its official files). {OFFICIAL_ONLY[loader_name]}")
            raise ValueError(f"load_retrieval_dataset({text!r}) needs root= (the data set's directory or source)")
        return LOADERS[loader_name](root, **kwargs)
    if root is not None:
        raise ValueError(f"unknown data set {text!r}; use one of {sorted(LOADERS)}")
    if os.path.isdir(text):
        return LOADERS[detect_layout(text)](text, **kwargs)
    if text.endswith(".parquet") or _is_glob(text):
        return load_hub_dataset(text, **kwargs)
    raise ValueError(f"unknown data set {text!r}: not one of {sorted(LOADERS)}, nor a directory or a parquet path")


def rgb_transform(
    transform: Callable[[Any], Any] | None = None, column: str = "image"
) -> Callable[[dict[str, list]], dict[str, list]]:
    """A `Dataset.with_transform` function that decodes `column` with `load_rgb`, then applies `transform`.

    Use it on a column cast to `Image(decode=False)` (see `with_rgb_images`), so that decoding errors name the
    file and every image is RGB with EXIF orientation applied.
    """

    def apply(batch: dict[str, list]) -> dict[str, list]:
        images = [load_rgb(item) for item in batch[column]]
        batch[column] = images if transform is None else [transform(image) for image in images]
        return batch

    return apply


def with_rgb_images(
    ds: Dataset | DatasetDict, transform: Callable[[Any], Any] | None = None, column: str = "image"
) -> Dataset | DatasetDict:
    """`ds` with `column` decoded on access by `load_rgb` (always RGB, clear errors), then `transform`."""
    return ds.cast_column(column, Image(decode=False)).with_transform(rgb_transform(transform, column))


def contiguous_labels(split: Dataset, label_column: str = "label"):
    """A split's labels as ``0..C-1`` (proxies and class prompts are indexed by class; a data set's ClassLabels
    may not be contiguous): ``(labels (N,) int64 tensor, {original label: new label})``. Reads the label column
    only, without decoding images."""
    import numpy as np
    import torch

    original = np.asarray(split.with_format("numpy")[label_column]).tolist()
    mapping = {label: i for i, label in enumerate(sorted(set(original)))}
    return torch.tensor([mapping[label] for label in original]), mapping
