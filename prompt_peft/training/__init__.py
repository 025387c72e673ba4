"""Reusable training building blocks: the training step, class-balanced dataloader, optimiser groups, schedule, loss guard,
crash-safe checkpoints, the retrieval evaluation loop and proxy diagnostics for the tracker.

Seeding: use ``accelerate.utils.set_seed`` (not re-implemented here).
"""

from .checkpoints import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .checks import check_finite
from .dataloader import build_train_dataloader, default_m_per_class
from .diagnostics import proxy_diagnostics
from .evaluation import evaluate_frozen_backbone, evaluate_retrieval, format_metrics
from .optim import PROXY_LR_FACTOR, build_optimizer, build_scheduler, freeze_unused_backbone_parameters
from .row_sparse import RowSparseAdamW, clip_grad_norm_, clip_gradients
from .step import StepOutput, find_tuner, training_step
from .summary import card_kwargs, format_run_summary

__all__ = [
    "PROXY_LR_FACTOR",
    "RowSparseAdamW",
    "StepOutput",
    "build_optimizer",
    "build_scheduler",
    "build_train_dataloader",
    "card_kwargs",
    "default_m_per_class",
    "check_finite",
    "clip_grad_norm_",
    "evaluate_frozen_backbone",
    "clip_gradients",
    "evaluate_retrieval",
    "find_tuner",
    "format_metrics",
    "freeze_unused_backbone_parameters",
    "proxy_diagnostics",
    "format_run_summary",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "training_step",
]
