"""The per-call context: what one forward of a prompt_peft model carries between its wrapped modules.

The tuner's forward pre-hook creates one :class:`ForwardContext` per call (the running adapter, the labels, the
branch) and makes it current; the wrapped modules read it and fill its slots (attention scores a later block
needs, auxiliary losses, the embedding head's outputs); the forward hook collects the slots as values and
discards the context, also when the forward raised. No module attribute holds per-call data, so a module can be
re-entered (a second branch, activation checkpointing) without stale state.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

__all__ = ["ForwardContext", "current_context", "active_context", "use_context"]


@dataclass
class ForwardContext:
    """One forward pass of a prompt_peft model.

    Attributes:
        labels: the class labels of the batch (None without a loss); the proxy branch reads them too.
        branch: ``"sample"`` (the embedding every method computes) or a method's extra branch (``"proxy"``).
        scores: per block index, what that block leaves for a later one (SHIP: [CLS] attention scores).
        auxiliary: loss terms blocks computed in this pass (SHIP's prompt matching loss), in block order.
        embeddings: the head's L2-normalised embeddings ``(B, E)``.
        features: the head's pooled features, for losses on them (FRPT's classifier).
        candidates: the head's output in a proxy branch (VPTSP-G's semantic candidates).
    """

    labels: Optional[torch.Tensor] = None
    branch: str = "sample"
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    auxiliary: list[torch.Tensor] = field(default_factory=list)
    embeddings: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    candidates: Optional[torch.Tensor] = None
    want_inputs: bool = False  # the caller takes the LossInputs and computes the loss itself
    owner: Optional[int] = None  # id() of the model whose hooks opened it
    token: Optional[Token] = field(default=None, repr=False)

    def auxiliary_loss(self) -> Optional[torch.Tensor]:
        """The sum of the auxiliary terms in block order, or None when there is none."""
        total = None
        for term in self.auxiliary:
            total = term if total is None else total + term
        return total


_CURRENT: ContextVar[Optional[ForwardContext]] = ContextVar("prompt_peft_forward_context", default=None)


def active_context() -> Optional[ForwardContext]:
    """The context of the forward running now, or None outside one."""
    return _CURRENT.get()


def current_context() -> ForwardContext:
    """The context of the forward running now; outside one (a wrapped module called on its own), a fresh context
    whose slots nobody reads."""
    context = _CURRENT.get()
    return context if context is not None else ForwardContext()


def open_context(context: ForwardContext) -> ForwardContext:
    """Make ``context`` current until :func:`close_context` (used by the tuner's hook pair)."""
    context.token = _CURRENT.set(context)
    return context


def close_context(owner: int) -> Optional[ForwardContext]:
    """Discard the current context if the model ``owner`` opened it; returns it (None otherwise)."""
    context = _CURRENT.get()
    if context is None or context.owner != owner or context.token is None:
        return None
    _CURRENT.reset(context.token)
    context.token = None
    return context


@contextlib.contextmanager
def use_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """``with use_context(ctx):`` runs a nested pass (e.g. the proxy branch) under its own context."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)
