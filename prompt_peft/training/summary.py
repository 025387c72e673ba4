"""What a finished training run tells its user: the end-of-run summary and the adapter card's contents.

`examples/train_dml.py` builds one summary dict per run (`results.json`); these helpers turn it into

* `format_run_summary(summary, output_dir)`: a short text block printed at the end (frozen vs adapter metrics,
  time, what was written where and how big it is);
* `card_kwargs(summary, figures, settings)`: the arguments of `prompt_peft.hub.save_adapter` /
  `push_adapter_to_hub` (results table, parameters, training settings, resolution, figures), so the saved
  adapter folder and the Hub repo carry the same card.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..hub import RetrievalResult, is_local_path

METRIC_NAMES = {
    "recall@1": "R@1",
    "recall@2": "R@2",
    "recall@4": "R@4",
    "recall@8": "R@8",
    "map@r": "MAP@R",
    "r_precision": "R-Prec",
}
# The settings shown in the card, in this order (everything else stays in results.json).
CARD_SETTINGS = (
    "dataset", "image_size", "method_kwargs", "embedding_dim", "num_epochs", "max_steps", "batch_size",
    "m_per_class", "learning_rate", "proxy_lr", "warmup_ratio", "weight_decay", "mixed_precision", "seed",
)  # fmt: skip


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n_bytes: int) -> str:
    """``1536 -> '1.5 KB'`` (powers of 1024, one decimal)."""
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _metric_rows(summary: Mapping[str, Any]) -> list[tuple[str, Mapping[str, float]]]:
    rows = []
    if summary.get("baseline_metrics"):
        rows.append(("frozen backbone", summary["baseline_metrics"]))
    if summary.get("final_metrics"):
        rows.append(("adapter", summary["final_metrics"]))
    return rows


def format_run_summary(summary: Mapping[str, Any], output_dir: str | os.PathLike) -> str:
    """The end-of-run text: held-out metrics (frozen backbone, adapter and the difference, in %), time, and
    every file or folder of ``output_dir`` with its size, the adapter folder's files listed one by one."""
    output_dir = Path(output_dir)
    lines = [f"Finished {summary.get('method', '?')} on {summary.get('dataset', '?')}: {summary.get('steps', 0)} steps"]
    train, evals = summary.get("train_seconds"), summary.get("eval_seconds_total")
    if train is not None:
        timing = f"training {_duration(train)}"
        if evals:
            timing += f", evaluation {_duration(evals)}"
        lines[0] += f" ({timing})."
    rows = _metric_rows(summary)
    if rows:
        keys = [k for k in METRIC_NAMES if k in rows[-1][1]]
        where = f" ({summary['eval_images']:,} held-out images)" if summary.get("eval_images") else ""
        lines.append(f"Retrieval on classes unseen in training{where}, %:")
        lines.append("  " + " " * 16 + "".join(f"{METRIC_NAMES[k]:>8}" for k in keys))
        for name, metrics in rows:
            lines.append(f"  {name:<16}" + "".join(f"{100 * metrics[k]:8.2f}" for k in keys))
        if len(rows) == 2:
            base, adapted = rows[0][1], rows[1][1]
            lines.append(f"  {'change':<16}" + "".join(f"{100 * (adapted[k] - base[k]):+8.2f}" for k in keys))
    if output_dir.is_dir():
        lines.append(f"Written to {output_dir}:")
        for path in sorted(output_dir.iterdir()):
            if path.name == "adapter" and path.is_dir():
                files = ", ".join(f"{p.name} {human_size(_size(p))}" for p in sorted(path.iterdir()) if p.is_file())
                lines.append(f"  adapter/  {files}")
            else:
                suffix = "/" if path.is_dir() else ""
                lines.append(f"  {path.name}{suffix}  {human_size(_size(path))}")
    return "\n".join(lines)


def _shown_backbone(summary: Mapping[str, Any], base_model_id: str | None) -> str:
    if base_model_id:
        return base_model_id
    backbone = str(summary.get("backbone", ""))
    return f"{Path(backbone).name} (local folder)" if is_local_path(backbone) else backbone


def card_kwargs(
    summary: Mapping[str, Any],
    figures: Mapping[str, str | os.PathLike],
    settings: Mapping[str, Any],
    *,
    base_model_id: str | None = None,
) -> dict[str, Any]:
    """Card arguments for `prompt_peft.hub.save_adapter` / `push_adapter_to_hub` from a run's summary.

    ``figures`` maps captions to PNG files (copied next to the card); ``settings`` are the run's arguments
    (those in `CARD_SETTINGS` are shown). The frozen backbone's numbers, when measured, go into the
    description rather than the results table: the model-index must describe this adapter only.
    """
    results = []
    if summary.get("final_metrics"):
        metrics = {METRIC_NAMES.get(k, k): v for k, v in summary["final_metrics"].items()}
        results = [RetrievalResult(str(summary.get("dataset")), metrics, dataset_split="test (held-out classes)")]
    training = {"backbone": _shown_backbone(summary, base_model_id)}
    for key in CARD_SETTINGS:
        value = settings.get(key)
        if key == "image_size":
            value = f"{value} px" if value else "the backbone processor's"
        elif key == "method_kwargs" and isinstance(value, str):
            value = json.dumps(json.loads(value)) if value.strip() not in ("", "{}") else None
        if value is not None:
            training[key.replace("_", " ")] = value
    training["optimiser steps"] = summary.get("steps")
    if summary.get("train_seconds") is not None:
        training["training time"] = _duration(summary["train_seconds"])
    description = None
    if summary.get("baseline_metrics") and summary.get("final_metrics"):
        base, adapted = summary["baseline_metrics"], summary["final_metrics"]
        parts = [
            f"{METRIC_NAMES[k]} {100 * adapted[k]:.2f} vs {100 * base[k]:.2f}"
            for k in ("recall@1", "map@r")
            if k in base and k in adapted
        ]
        description = (
            "Against the frozen backbone on the same held-out classes and resolution: " + ", ".join(parts) + " (%)."
        )
    backbone_name = Path(str(base_model_id or summary.get("backbone", "backbone"))).name
    return {
        "model_name": f"{backbone_name}-{summary.get('dataset')}-{summary.get('method')}",
        "results": results,
        "parameter_counts": summary.get("parameters"),
        "images": {caption: Path(path).name for caption, path in figures.items()},
        "extra_files": [Path(path) for path in figures.values()],
        "training": training,
        "description": description,
    }
