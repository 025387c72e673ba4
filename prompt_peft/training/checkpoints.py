"""Crash-safe Accelerate checkpoints: a checkpoint directory exists only once it is complete.

``accelerator.save_state`` writes several files; a run killed half-way would leave a directory that looks
like a checkpoint but cannot be loaded. We write into ``<name>.tmp`` and rename it into place (atomic on one
file system) after every process has finished writing, so ``latest`` always points at a loadable state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

_PATTERN = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


def save_checkpoint(
    accelerator, checkpoints_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2
) -> Path:
    """Save the full training state (model, optimiser, scheduler, RNGs, ``state``) as ``step_<step>``."""
    root = Path(checkpoints_dir)
    final, partial = root / f"step_{step}", root / f"step_{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({**state, "step": step}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (``*.tmp`` leftovers of an interrupted save are ignored)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_checkpoint(spec: Optional[str], checkpoints_dir: str | os.PathLike) -> Optional[Path]:
    """``"latest"`` -> newest complete checkpoint (None if there is none yet); a path -> that checkpoint."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete prompt_peft checkpoint (no {STATE_FILE}).")
    return path


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore the state saved by :func:`save_checkpoint`; returns its ``state`` dict (with ``step``)."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())
