"""Fail fast, and say where to resume from, when the training loss stops being finite."""

from __future__ import annotations

import os

import torch

__all__ = ["check_finite"]


def check_finite(loss: torch.Tensor | float, step: int, *, checkpoint_dir: str | os.PathLike | None = None) -> None:
    """Raise ``FloatingPointError`` if ``loss`` (a scalar, or all elements of a tensor) is nan or inf.

    Under DDP check a value every process agrees on, e.g. ``accelerator.gather(loss.detach())`` or
    ``accelerator.reduce(loss.detach(), "mean")``: if only one process raised, the others would wait in
    the next all-reduce until the collective timeout. Reading the value synchronises with the device;
    check every step on CPU, every few steps on GPU if that matters.

    Args:
        loss: the loss (tensor or Python number).
        step: the optimiser step, for the message.
        checkpoint_dir: where the last good checkpoint is, for the message.
    """
    value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
    if bool(torch.isfinite(value).all()):
        return
    kind = "nan" if bool(torch.isnan(value).any()) else "inf"
    where = (
        f"the last good checkpoint is kept at {os.fspath(checkpoint_dir)}"
        if checkpoint_dir is not None
        else "no checkpoint has been saved yet"
    )
    raise FloatingPointError(
        f"loss became {kind} at step {step}; {where}. Resume from it with a lower learning rate "
        "(or proxy_lr), or check the mixed-precision setting"
    )
