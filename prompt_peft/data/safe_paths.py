"""Image rows of a Hub or parquet data set may only point at files inside the data set's own folder.

A ``datasets.Image`` value can hold a file path instead of bytes; ``datasets`` then opens that path on the local
disk (a relative one against the current directory). A downloaded data set whose rows hold ``/home/me/.ssh/...``
or ``../../secret.png`` would make the job read, and train on, any local file. :func:`confine_image_paths`
refuses such rows, naming them, and makes in-folder relative paths absolute so that they are read from the data
set's folder rather than from wherever the job was started.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, Image


class UnsafeImagePathError(ValueError):
    """Image rows that point outside the data set's folder; ``rows`` lists ``(split, row, path)``."""

    def __init__(self, message: str, rows: list[tuple[str, int, str]]) -> None:
        super().__init__(message)
        self.rows = rows


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def _is_url(path: str) -> bool:
    return "://" in path or "::" in path  # remote (hf://, https://); chained fsspec URLs are refused below


def confine_image_paths(
    title: str, splits: dict[str, Dataset], roots: Sequence[str | os.PathLike], base: str | os.PathLike | None
) -> dict[str, Dataset]:
    """Check every path-only image row of ``splits`` against ``roots`` (the data set's folders).

    Relative paths are taken relative to ``base`` (the data set's folder; None: relative paths are refused) and
    rewritten as absolute paths there. Rows holding bytes are not touched. Raises :class:`UnsafeImagePathError`
    listing every offending row.
    """
    real_roots = [os.path.realpath(root) for root in roots]
    bad: list[tuple[str, int, str]] = []
    rewrites: dict[str, dict[int, str]] = {}
    for split, ds in splits.items():
        row = 0
        for batch in ds.select_columns(["image"]).with_format("arrow").iter(batch_size=4096):
            images = batch.column("image").combine_chunks()
            no_bytes = images.field("bytes").is_null().to_pylist()
            for offset, (path, by_path) in enumerate(zip(images.field("path").to_pylist(), no_bytes)):
                if not by_path or not path:
                    continue
                if "::" in path:
                    bad.append((split, row + offset, path))
                    continue
                if _is_url(path):
                    continue
                if not os.path.isabs(path) and base is None:
                    bad.append((split, row + offset, path))
                    continue
                resolved = os.path.realpath(os.path.join(os.fspath(base or ""), path))
                if not _inside(resolved, real_roots):
                    bad.append((split, row + offset, path))
                elif resolved != path:
                    rewrites.setdefault(split, {})[row + offset] = resolved
            row += len(batch)
    if bad:
        listing = "\n".join(f"  {split} row {row}: {path}" for split, row, path in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        where = ", ".join(str(Path(root)) for root in roots) or "(none: only rows holding image bytes are accepted)"
        raise UnsafeImagePathError(
            f"{title}: {len(bad)} image row(s) hold a file path outside the data set's folder ({where}); refusing to "
            f"read local files a data set points at:\n{listing}{more}",
            bad,
        )
    return {split: _rewrite(ds, rewrites.get(split)) for split, ds in splits.items()}


def _rewrite(ds: Dataset, paths: dict[int, str] | None) -> Dataset:
    if not paths:
        return ds
    feature = ds.features["image"]

    def absolute(batch, indices):
        batch["image"] = [
            {"path": paths[i], "bytes": None} if i in paths else image for i, image in zip(indices, batch["image"])
        ]
        return batch

    raw = ds.cast_column("image", Image(decode=False))
    return raw.map(absolute, batched=True, with_indices=True).cast_column("image", feature)
