"""Reusable training building blocks: class-balanced dataloader, optimiser groups, schedule, loss guard,
crash-safe checkpoints and the retrieval evaluation loop.

Seeding: use ``accelerate.utils.set_seed`` (not re-implemented here).
"""

from .checkpoints import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .checks import check_finite
from .dataloader import build_train_dataloader
from .evaluation import evaluate_frozen_backbone, evaluate_retrieval, format_metrics
from .optim import PROXY_LR_FACTOR, build_optimizer, build_scheduler
from .row_sparse import RowSparseAdamW, clip_grad_norm_
from .summary import card_kwargs, format_run_summary

__all__ = [
    "PROXY_LR_FACTOR",
    "RowSparseAdamW",
    "build_optimizer",
    "build_scheduler",
    "build_train_dataloader",
    "card_kwargs",
    "check_finite",
    "clip_grad_norm_",
    "evaluate_frozen_backbone",
    "evaluate_retrieval",
    "format_metrics",
    "format_run_summary",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]
