"""Reusable training building blocks: class-balanced dataloader, optimiser groups, schedule, loss guard.

Seeding: use ``accelerate.utils.set_seed`` (not re-implemented here).
"""

from .checks import check_finite
from .dataloader import build_train_dataloader
from .optim import PROXY_LR_FACTOR, build_optimizer, build_scheduler

__all__ = ["PROXY_LR_FACTOR", "build_optimizer", "build_scheduler", "build_train_dataloader", "check_finite"]
