"""The run's output folder: never overwritten by accident, the final adapter written atomically, checkpoints reported.

A save killed half-way used to leave a truncated ``adapter_model.safetensors`` and no config, and a second run into
the same folder silently replaced the first run's adapter. :func:`save_atomically` writes into a temporary sibling
folder and renames it into place (atomic on one file system), so the target is either the old complete adapter or
the new complete one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class OutputDirExistsError(FileExistsError):
    """The run would replace an adapter already in its output folder."""


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool = False, resuming: bool = False) -> None:
    """Refuse to start a run whose final adapter would replace an existing one (before any work is done).

    ``overwrite`` (``--overwrite_output_dir``) allows it; so does resuming a run from its checkpoints, which writes
    the adapter that run was going to write.
    """
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise OutputDirExistsError(f"--output_dir {root} exists and is not a folder")
    adapter = root / "adapter"
    if adapter.exists() and any(adapter.iterdir()) and not (overwrite or resuming):
        raise OutputDirExistsError(
            f"{adapter} already holds an adapter; refusing to overwrite it. Pass --overwrite_output_dir to replace "
            "it, or choose another --output_dir."
        )


def save_atomically(save, target: str | os.PathLike) -> Path:
    """Call ``save(folder)`` on a temporary sibling folder, then move it to ``target`` in one rename.

    ``save`` is e.g. ``model.save_pretrained``. An existing ``target`` is replaced only once the new folder is
    complete; a crash at any point leaves either the old folder or the new one, never a mix or a truncated file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    for path in partial.rglob("*"):  # on disk before the rename makes them visible
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    if target.exists():
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(partial, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(partial, target)
    return target


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of all files under ``path`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def describe_checkpoints(checkpoints_dir: str | os.PathLike) -> str | None:
    """One line saying where the run's checkpoints are and how much disk they take (None when there are none)."""
    from .checkpoints import list_checkpoints

    found = list_checkpoints(checkpoints_dir)
    if not found:
        return None
    size = sum(folder_size(p) for p in found)
    return (
        f"{len(found)} checkpoint(s) ({', '.join(p.name for p in found)}) in {checkpoints_dir}: {size / 1e6:.1f} MB. "
        "They are only needed to resume this run; --save_total_limit sets how many are kept."
    )
