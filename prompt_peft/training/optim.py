"""Optimiser parameter groups by parameter role (separate proxy learning rate) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from ..tuners.prompted import parameter_roles
from .row_sparse import RowSparseAdamW

__all__ = ["PROXY_LR_FACTOR", "build_optimizer", "build_scheduler", "freeze_unused_backbone_parameters"]

# Proxy-Anchor (Kim et al., CVPR 2020) trains its proxies with 100x the backbone learning rate; proxies start
# random and must move fast. VPTSP-G's released configs use 20x to 500x: tune it.
PROXY_LR_FACTOR = 100.0
# Roles (prompt_peft.tuners.prompted.ROLES) whose parameters AdamW does not decay.
DEFAULT_DECAY_EXEMPT_ROLES = ("prompt", "class_prompt", "bias_delta")


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    proxy_lr: float | None = None,
    weight_decay: float = 0.0,
    proxy_weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_exempt_roles: Collection[str] | None = DEFAULT_DECAY_EXEMPT_ROLES,
    backbone_lr: float | None = None,
    backbone_params: Callable[[str], bool] | None = None,
    roles: Mapping[int, str] | None = None,
) -> RowSparseAdamW:
    """AdamW over the trainable (``requires_grad``) parameters only, in named groups chosen by parameter *role*.

    ``roles`` maps ``id(parameter)`` to the role its prompt_peft layer declared (default: read from the model's
    layers, :func:`~prompt_peft.tuners.prompted.parameter_roles`); a parameter with no role (the backbone,
    ``modules_to_save``) is an ordinary weight. Groups (empty ones are left out; each has a ``"name"`` key):

    * ``"proxy"``: role ``proxy`` (Proxy-Anchor proxies); learning rate ``proxy_lr`` (default
      ``PROXY_LR_FACTOR × lr``), weight decay ``proxy_weight_decay``.
    * ``"main"``: the other trainable parameters, with ``weight_decay``.
    * ``"no_decay"``: parameters exempt from decay: 1-D tensors (biases, LayerNorm scales) and the roles in
      ``decay_exempt_roles`` (prompt tokens, class prompts, bias deltas). Only split off when
      ``weight_decay > 0``; ``decay_exempt_roles=None`` decays everything.
    * ``"rows"`` / ``"rows_no_decay"``: 2-D tables of role ``class_prompt`` (VPTSP-G's class prompts), learning
      rate ``lr``; updated lazily, only the rows with a gradient, with optimiser state only for rows ever touched
      (:class:`~prompt_peft.training.row_sparse.RowSparseAdamW`).
    * ``"backbone"``: with ``backbone_lr``, every parameter without a role is unfrozen and trained at that rate
      (the full fine-tuning baseline), with ``weight_decay``; ``backbone_params(name)`` narrows that to the
      parameters it accepts (BitFit's biases, injected LoRA matrices: :mod:`prompt_peft.backbone_tuning`).

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
    if backbone_lr is not None and backbone_lr <= 0:
        raise ValueError(f"backbone_lr must be > 0, got {backbone_lr}")
    roles = parameter_roles(model) if roles is None else roles

    exempt_roles = None if decay_exempt_roles is None else set(decay_exempt_roles)
    proxy, decay, no_decay, rows, rows_exempt, backbone = [], [], [], [], [], []
    for name, param in model.named_parameters():
        role = roles.get(id(param))
        if role is None and backbone_lr and (backbone_params is None or backbone_params(name)):
            param.requires_grad_(True)
            backbone.append(param)
            continue
        if not param.requires_grad:
            continue
        exempt = exempt_roles is not None and role in exempt_roles
        if role == "class_prompt" and param.ndim == 2:
            (rows_exempt if exempt else rows).append(param)
        elif role == "proxy":
            proxy.append(param)
        elif weight_decay > 0 and exempt_roles is not None and (param.ndim <= 1 or exempt):
            no_decay.append(param)
        else:
            decay.append(param)
    if not (proxy or decay or no_decay or rows or rows_exempt or backbone):
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
        {"name": "backbone", "params": backbone, "lr": backbone_lr, "weight_decay": weight_decay},
    ]
    return RowSparseAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def freeze_unused_backbone_parameters(model: nn.Module, pixel_values: torch.Tensor) -> list[str]:
    """Freeze the trainable backbone parameters (no adapter role) that the embedding does not depend on, e.g.
    ViT's pooler or DINOv2's mask token after ``build_optimizer(..., backbone_lr=...)`` unfroze them all; returns
    their names.

    DistributedDataParallel waits for a gradient of every trainable parameter, so such parameters stall or
    fail a multi-process full fine-tuning (``find_unused_parameters=True`` is no way out: DDP would rebuild the
    model's output, whose added fields are not part of its class). One forward of ``pixel_values`` (a sample
    batch, e.g. one image) in eval mode, so no running state changes, finds them; call it on every process,
    before ``accelerator.prepare``. They keep no gradient, so the optimiser leaves them alone.
    """
    roles = parameter_roles(model)
    candidates = {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in roles}
    if not candidates:
        return []
    was_training = model.training
    params = list(model.parameters())
    saved = [p.grad for p in params]  # the probe's gradients are not training's: put the old ones back
    try:
        model.eval()
        for p in params:
            p.grad = None
        model(pixel_values=pixel_values).embeddings.float().sum().backward()
        unused = [name for name, p in candidates.items() if p.grad is None]
    finally:
        model.train(was_training)
        for p, grad in zip(params, saved):
            p.grad = grad
    for name in unused:
        candidates[name].requires_grad_(False)
    return unused


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
