"""Data loading for retrieval: benchmark layouts, image folders and Hub data sets as class-disjoint
`datasets.DatasetDict`s, plus safe RGB decoding, a bad-image scan, and class-aware subsets (a validation split
held out of the training classes, a cap on images per class)."""

from .datasets import (
    IMAGE_EXTENSIONS,
    LOADERS,
    OFFICIAL_COUNTS,
    DatasetCountError,
    contiguous_labels,
    detect_layout,
    load_cars196,
    load_cub200,
    load_flowers102,
    load_hub_dataset,
    load_imagefolder,
    load_inshop,
    load_retrieval_dataset,
    load_sop,
    rgb_transform,
    split_classes,
    with_rgb_images,
)
from .samplers import MPerClassBatchSampler
from .subsets import VALIDATION, hold_out_classes, limit_images_per_class, protocol_splits
from .transforms import SeededRows, eval_transform, make_collate_fn, train_transform
from .images import (
    DEFAULT_MIN_SIZE,
    BadImage,
    BadImagesError,
    ImageDecodeError,
    check_image,
    load_rgb,
    scan_images,
    to_rgb,
)

__all__ = [
    "contiguous_labels",
    "MPerClassBatchSampler",
    "VALIDATION",
    "hold_out_classes",
    "limit_images_per_class",
    "protocol_splits",
    "SeededRows",
    "eval_transform",
    "make_collate_fn",
    "train_transform",
    "DEFAULT_MIN_SIZE",
    "IMAGE_EXTENSIONS",
    "LOADERS",
    "OFFICIAL_COUNTS",
    "BadImage",
    "BadImagesError",
    "DatasetCountError",
    "ImageDecodeError",
    "check_image",
    "detect_layout",
    "load_cars196",
    "load_cub200",
    "load_flowers102",
    "load_hub_dataset",
    "load_imagefolder",
    "load_inshop",
    "load_retrieval_dataset",
    "load_rgb",
    "load_sop",
    "rgb_transform",
    "scan_images",
    "split_classes",
    "to_rgb",
    "with_rgb_images",
]
