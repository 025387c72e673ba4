"""Run records are committed: they name no path of the machine that wrote them."""

from __future__ import annotations

import json
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


def write_record(output_dir: str | os.PathLike, stem: str, report: dict, markdown: str) -> Path:
    """``<output_dir>/<stem>.json`` (the report) and ``<stem>.md`` (its Markdown), which is also printed."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)
    return out / f"{stem}.json"
