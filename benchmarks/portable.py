"""Run records are committed: they name no path of the machine that wrote them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def portable(arg: str) -> str:
    """``arg`` without this machine's layout: the interpreter is ``python``, paths in the checkout are relative
    to it, other local paths become ``<local>/<name>`` (Hub ids and options are kept)."""
    if arg == sys.executable:
        return "python"
    if arg.startswith("-") or not (os.path.isabs(arg) or os.path.exists(arg)):
        return arg
    path = Path(arg).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else f"<local>/{path.name}"
