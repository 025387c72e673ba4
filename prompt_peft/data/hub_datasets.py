"""CUB-200-2011, Cars196 and Oxford Flowers-102 from Hub copies, pinned, split by class, counts checked.

`load_benchmark_from_hub("flowers102")` is what `load_retrieval_dataset("flowers102")` does without a root
directory (and what `examples/train_dml.py --dataset flowers102` does without `--data_root`). It loads a Hub
copy with `datasets.load_dataset` at a pinned commit, pools the copy's own splits (they are classification
splits), applies the retrieval protocol's class-disjoint split (first half of the official class ids for
training, the rest held out, as in the deep-metric-learning literature) and checks the official image and
class counts, so a changed or partial copy fails loudly instead of shifting results.

How the copies were chosen (from their dataset cards and file listings, read before pinning; the copies
themselves could not be downloaded while writing this): each has an `image` column and a `label` `ClassLabel`
covering every class of the data set. The official counts are checked at load time, not assumed.

* Flowers-102: `nelorth/oxford-flowers` (train 7,169 + test 1,020 = 8,189 images). Its label names are the
  official class ids as strings, in string order (`"1"`, `"10"`, `"100"`, ...), so the class id is read from
  the name; the flower names (`FLOWERS102_CLASS_NAMES`, the data set's `cat_to_name.json`) replace them.
  We found no card or schema of the other candidate, `dpdl-benchmark/oxford_flowers102`.
* CUB-200-2011: `Donghyun99/CUB-200-2011` (its viewer lists train 5,994 + test 5,794 = 11,788 images, the
  official classification split).
  `pkuHaowei/cub-200-2011-birds` has a bare integer label and no class names, so it was not chosen.
* Cars196: `Donghyun99/Stanford-Cars` (196 class names in the official order, starting with "AM General
  Hummer SUV 2000"). We found no card or schema of `isaacchung/StanfordCars`.

The class id of a label is the integer its name starts with when every name starts with one (`"1"`,
`"001.Black_footed_Albatross"`), else its position + 1 (names in the official order). The official count
check of the *split* (e.g. CUB classes 1-100 = 5,864 images) is what verifies that this reading of the class
ids is right: a copy with the classes in another order fails it.

**Pinning.** `HUB_SOURCES[name].revision` is the full commit sha of the copy's data upload as listed in its
"Files and versions" history; `datasets` resolves it exactly (later pushes to the copy cannot change what is
loaded). Pass `revision="main"` (or `--dataset_revision main` in the scripts) to follow the copy instead, and
`repo_id=` to load a mirror with the same schema.

SOP and In-Shop have no faithful Hub copy: they load from their official list files only
(`load_retrieval_dataset("sop", "<dir>")`); without a directory the error says where to get them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import ClassLabel, DatasetDict

__all__ = [
    "FLOWERS102_CLASS_NAMES",
    "HUB_SOURCES",
    "OFFICIAL_ONLY",
    "HubSource",
    "load_benchmark_from_hub",
]

#: Oxford Flowers-102 class names by official class id 1..102 (the data set's `cat_to_name.json`).
FLOWERS102_CLASS_NAMES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy",
    "daffodil", "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata",
    "japanese anemone", "black-eyed susan", "silverbush", "californian poppy", "osteospermum",
    "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen", "watercress",
    "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea", "camellia", "mallow",
    "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip


@dataclass(frozen=True)
class HubSource:
    """A pinned Hub copy of a benchmark and how to split it (classes 1..`n_train_classes` train)."""

    repo_id: str
    revision: str
    n_classes: int
    n_train_classes: int
    title: str
    image_column: str = "image"
    label_column: str = "label"
    #: Names by official class id, used when the copy's own label names are bare ids.
    class_names: tuple[str, ...] | None = None


HUB_SOURCES: dict[str, HubSource] = {
    "flowers102": HubSource(
        "nelorth/oxford-flowers",
        "a37b1891609c0376fa81eced756e7863e1bd873b",
        n_classes=102,
        n_train_classes=51,
        title="Oxford Flowers-102",
        class_names=FLOWERS102_CLASS_NAMES,
    ),
    "cub200": HubSource(
        "Donghyun99/CUB-200-2011",
        "0e344a8256fa95fe1e5c05325d407a94a961dbab",
        n_classes=200,
        n_train_classes=100,
        title="CUB-200-2011",
    ),
    "cars196": HubSource(
        "Donghyun99/Stanford-Cars",
        "c9c43a068ed98f2bb655814a01eacbe2afc2e3f1",
        n_classes=196,
        n_train_classes=98,
        title="Cars196",
    ),
}

#: Benchmarks without a faithful Hub copy, and where to get their official files.
OFFICIAL_ONLY: dict[str, str] = {
    "sop": (
        "Stanford Online Products has no faithful Hub copy; download Stanford_Online_Products.zip from the "
        "authors' page (https://cvgl.stanford.edu/projects/lifted_struct/), unpack it and pass its folder "
        "(holding Ebay_train.txt / Ebay_test.txt) as --data_root"
    ),
    "inshop": (
        "In-Shop Clothes Retrieval has no faithful Hub copy; download it from the DeepFashion page "
        "(https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html): Img/img.zip and "
        "Eval/list_eval_partition.txt, unpack them into one folder and pass it as --data_root"
    ),
}


def _class_ids(label_feature: Any, values: Sequence[int], n_classes: int, title: str) -> dict[int, int]:
    """Label value -> official class id (1-based), from the names' leading integers or their order."""
    if isinstance(label_feature, ClassLabel):
        names = label_feature.names
        leading = [re.match(r"\s*0*(\d+)", name) for name in names]
        if all(leading):
            ids = {value: int(match.group(1)) for value, match in enumerate(leading)}
        else:
            ids = {value: value + 1 for value in range(len(names))}
        known = len(names)
    else:  # a bare integer label: 0-based when it starts at 0
        present = sorted(set(values))
        offset = 1 if present and present[0] == 0 else 0
        ids = {value: value + offset for value in present}
        known = len(present)
    if known != n_classes or sorted(ids.values()) != list(range(1, n_classes + 1)):
        raise ValueError(
            f"{title}: expected labels for the {n_classes} official classes (ids 1..{n_classes}), found {known} "
            f"labels with ids {sorted(ids.values())[:5]}...; this is not the schema the loader was written for"
        )
    return ids


def load_benchmark_from_hub(
    name: str,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> DatasetDict:
    """`cub200`, `cars196` or `flowers102` from its pinned Hub copy (`HUB_SOURCES`), as `train` / `test`.

    Labels follow the on-disk loaders: a global `ClassLabel`, label = official class id - 1, train classes
    first, with class names. `repo_id` / `revision` override the pinned copy (same schema expected);
    `load_kwargs` go to `datasets.load_dataset` (e.g. `cache_dir`); `options` are the checks every loader
    takes (`check_counts=True` compares with the official counts; see `load_retrieval_dataset`).
    """
    from datasets import load_dataset

    from .datasets import OFFICIAL_COUNTS, load_hub_dataset

    if name in OFFICIAL_ONLY:
        raise FileNotFoundError(OFFICIAL_ONLY[name])
    if name not in HUB_SOURCES:
        raise ValueError(f"no Hub copy is known for {name!r}; known: {sorted(HUB_SOURCES)}")
    source = HUB_SOURCES[name]
    repo_id = repo_id or source.repo_id
    revision = revision or source.revision
    raw = load_dataset(repo_id, revision=revision, **(load_kwargs or {}))
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({"train": raw})
    first = next(iter(raw.values()))
    for column in (source.image_column, source.label_column):
        if column not in first.column_names:
            raise ValueError(f"{repo_id}@{revision}: no column {column!r}; columns are {first.column_names}")
    feature = first.features[source.label_column]
    values = [v for split in raw.values() for v in split.unique(source.label_column)]
    title = f"{source.title} ({repo_id}@{revision[:12]})"
    class_id = _class_ids(feature, values, source.n_classes, title)
    by_id = sorted(class_id, key=class_id.get)  # label values in official class order
    train = [v for v in by_id if class_id[v] <= source.n_train_classes]
    test = [v for v in by_id if class_id[v] > source.n_train_classes]

    own_names = feature.names if isinstance(feature, ClassLabel) else None
    if source.class_names is not None and (own_names is None or all(n.strip().isdigit() for n in own_names)):
        names = {v: source.class_names[class_id[v] - 1] for v in by_id}
    elif own_names is not None:
        names = {v: own_names[v] for v in by_id}
    else:
        names = {v: str(class_id[v]) for v in by_id}

    if options.get("check_counts", True) and options.get("expected_counts") is None:
        options = {**options, "expected_counts": OFFICIAL_COUNTS[name]}
    columns = {"image_column": source.image_column, "label_column": source.label_column}
    return load_hub_dataset(
        raw, train_classes=train, test_classes=test, class_names=names, title=title, **columns, **options,
    )
