"""Load a training job's data with every image checked before the first step.

One corrupt file used to stop training at step 0 (or mid-epoch) with a traceback. :func:`load_checked` decodes
every image of a local data set up front (threads, a progress bar), then either stops with the full list of
unusable files (also written to a text file) or, with ``skip_bad=True``, leaves them out and returns them so the
run can count them in its results.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from .datasets import load_retrieval_dataset
from .images import BadImage, BadImagesError


def is_local_data(dataset: str, data_root: str | os.PathLike | None) -> bool:
    """True when the images are read from local files (a folder or parquet files), not a Hub data set."""
    source = os.fspath(data_root) if data_root is not None else dataset
    return os.path.exists(source.split("*")[0]) or os.path.isdir(dataset)


def load_checked(
    dataset: str,
    data_root: str | os.PathLike | None = None,
    *,
    scan: bool | None = None,
    skip_bad: bool = False,
    report_file: str | os.PathLike | None = None,
    **options: Any,
) -> tuple[DatasetDict, list[BadImage]]:
    """``load_retrieval_dataset`` with a pre-flight scan; returns the splits and the images left out.

    Args:
        scan: decode every image before returning (default: on for local data, see :func:`is_local_data`;
            Hub data sets are checked as they are read).
        skip_bad: leave unusable images out (they are returned) instead of stopping.
        report_file: where the full list of unusable images is written when the scan stops the run.
        **options: passed to ``load_retrieval_dataset`` (``check_counts``, ``num_workers``, ``progress``, ...).
    """
    if scan is None:
        scan = is_local_data(dataset, data_root)
    skipped: list[BadImage] = []
    try:
        splits = load_retrieval_dataset(
            dataset,
            data_root,
            verify_images=scan,
            on_bad_image="skip" if skip_bad else "raise",
            skipped=skipped,
            **options,
        )
    except BadImagesError as error:
        if report_file is None:
            raise
        report = Path(report_file)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(f"{item}\n" for item in error.bad))
        raise BadImagesError(
            f"{error}\nAll {len(error.bad)} are listed in {report}. To train without them pass --skip_bad_images "
            "(they are counted in results.json).",
            error.bad,
        ) from None
    return splits, skipped
