"""Optimiser parameter groups (separate proxy learning rate) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .row_sparse import RowSparseAdamW

__all__ = ["PROXY_LR_FACTOR", "build_optimizer", "build_scheduler"]

# Proxy-Anchor (Kim et al., CVPR 2020) trains its proxies with 100x the backbone learning rate; proxies start
# random and must move fast. VPTSP-G's released configs use 20x to 500x (methods.md §3.7): tune it.
PROXY_LR_FACTOR = 100.0
DEFAULT_PROXY_KEYWORDS = ("proxy", "proxies")
DEFAULT_DECAY_EXEMPT = ("bias", "norm", "prompt")
# Per-class tables updated row by row (VPTSP-G's class prompts): see row_sparse.RowSparseAdamW.
DEFAULT_ROW_SPARSE_KEYWORDS = ("class_prompt",)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    proxy_lr: float | None = None,
    weight_decay: float = 0.0,
    proxy_weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    proxy_keywords: Sequence[str] = DEFAULT_PROXY_KEYWORDS,
    decay_exempt: Sequence[str] | None = DEFAULT_DECAY_EXEMPT,
    row_sparse_keywords: Sequence[str] = DEFAULT_ROW_SPARSE_KEYWORDS,
) -> torch.optim.AdamW:
    """AdamW over the trainable (``requires_grad``) parameters only, in named groups.

    Groups (empty ones are left out; each group has a ``"name"`` key for logging):

    * ``"proxy"``: parameters whose name contains a ``proxy_keywords`` entry (case-insensitive), e.g.
      ``base_model.vpt_proxies.default``; learning rate ``proxy_lr`` (default ``PROXY_LR_FACTOR × lr``),
      weight decay ``proxy_weight_decay``. Name other modules (a "proxy head") without these words, or pass
      ``proxy_keywords``.
    * ``"main"``: the other trainable parameters, with ``weight_decay``.
    * ``"no_decay"``: parameters exempt from decay: 1-D tensors (biases, LayerNorm scales) and names
      containing a ``decay_exempt`` entry (prompt tokens). Only split off when ``weight_decay > 0``;
      ``decay_exempt=None`` decays everything.
    * ``"rows"``: 2-D per-class tables whose name contains a ``row_sparse_keywords`` entry (VPTSP-G's class
      prompts), learning rate ``lr``; updated lazily, only the rows with a gradient, with optimiser state only
      for rows ever touched (:class:`~prompt_peft.training.row_sparse.RowSparseAdamW`). Decayed like "main"
      unless a ``decay_exempt`` entry matches.

    The optimiser is a :class:`RowSparseAdamW`, which is exactly ``torch.optim.AdamW`` when there is no
    "rows" group.

    Why exempt prompts: AdamW's decay is decoupled from the gradient, so it shrinks a parameter even when its
    gradient is exactly zero (prompts masked out by decoupled attention, class prompts of classes absent from
    the batch), pulling tokens toward 0 that the loss never asked to move.

    Frozen parameters get no group, hence no optimiser state; DDP likewise ignores them.

    Raises:
        ValueError: the model has no trainable parameters, or a learning rate is not positive.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    proxy_lr = PROXY_LR_FACTOR * lr if proxy_lr is None else proxy_lr
    if proxy_lr <= 0:
        raise ValueError(f"proxy_lr must be > 0, got {proxy_lr}")

    proxy_words = [w.lower() for w in proxy_keywords]
    exempt_words = None if decay_exempt is None else [w.lower() for w in decay_exempt]
    row_words = [w.lower() for w in row_sparse_keywords]
    proxy, decay, no_decay, rows, rows_exempt = [], [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lname = name.lower()
        if param.ndim == 2 and any(w in lname for w in row_words):
            exempt = exempt_words is not None and any(w in lname for w in exempt_words)
            (rows_exempt if exempt else rows).append(param)
        elif any(w in lname for w in proxy_words):
            proxy.append(param)
        elif (
            weight_decay > 0 and exempt_words is not None and (param.ndim <= 1 or any(w in lname for w in exempt_words))
        ):
            no_decay.append(param)
        else:
            decay.append(param)
    if not (proxy or decay or no_decay or rows or rows_exempt):
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none has requires_grad=True); "
            "was the adapter added (get_peft_model) and is it the active, trainable one?"
        )

    groups = [
        {"name": "main", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"name": "proxy", "params": proxy, "lr": proxy_lr, "weight_decay": proxy_weight_decay},
        {"name": "rows", "params": rows, "lr": lr, "weight_decay": weight_decay, "row_sparse": True},
        {"name": "rows_no_decay", "params": rows_exempt, "lr": lr, "weight_decay": 0.0, "row_sparse": True},
    ]
    return RowSparseAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    num_training_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    num_processes: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then cosine decay to 0, for every parameter group (each keeps its own peak lr).

    Args:
        num_training_steps: optimiser updates (after gradient accumulation) in the whole run.
        warmup_steps, warmup_ratio: warm-up length, in updates or as a fraction of ``num_training_steps``
            (rounded up); at most one of them; neither means no warm-up.
        num_processes: pass ``accelerator.num_processes`` when the scheduler goes through
            ``accelerator.prepare`` with ``split_batches=False`` (the default): accelerate's
            ``AcceleratedScheduler`` then calls ``step()`` ``num_processes`` times per update, so both
            lengths are scaled by it here (the transformers ``no_trainer`` examples do the same).
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("pass warmup_steps or warmup_ratio, not both")
    if warmup_ratio is not None:
        if not 0 <= warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        warmup_steps = math.ceil(warmup_ratio * num_training_steps)
    warmup_steps = warmup_steps or 0
    if not 0 <= warmup_steps <= num_training_steps:
        raise ValueError(f"warmup_steps must be in [0, num_training_steps={num_training_steps}], got {warmup_steps}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    return get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=num_training_steps * num_processes,
    )
