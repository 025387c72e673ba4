"""One training step, the same for every prompt_peft method: forward, gather, loss.

1. ``model(pixel_values=..., labels=..., return_loss_inputs=True)`` runs every pass the method needs (VPTSP-G's
   proxy branch too) and returns the local batch's :class:`~prompt_peft.losses.LossInputs` as values; it computes
   no loss and runs no collective.
2. ``gather(inputs)``: the one gather point, by default the tuner's
   :meth:`~prompt_peft.tuners.prompted.PromptedTuner.gather_loss_inputs` (identity in one process).
3. ``tuner.compute_loss(inputs)``: the adapter's loss object on the (gathered) batch.

The model may be wrapped by DDP (``accelerator.prepare``): step 1 goes through the wrapper's forward, so DDP sees
one forward per step as usual; steps 2 and 3 use the unwrapped tuner. In one process, plain
``model(pixel_values=..., labels=...).loss`` gives the same loss for a single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..losses import LossInputs
from ..tuners.prompted import LOSS_INPUTS_KWARG, PromptedTuner

__all__ = ["StepOutput", "find_tuner", "training_step"]


@dataclass
class StepOutput:
    """The loss to back-propagate and the (gathered) values it was computed from."""

    loss: torch.Tensor
    inputs: LossInputs


def find_tuner(model: nn.Module) -> PromptedTuner:
    """The prompt_peft tuner inside ``model`` (a PeftModel, possibly wrapped by DDP / accelerate)."""
    inner = model
    while not isinstance(inner, PromptedTuner):
        if hasattr(inner, "module"):  # DistributedDataParallel and similar wrappers
            inner = inner.module
        elif hasattr(inner, "base_model") and inner.base_model is not inner:  # PeftModel
            inner = inner.base_model
        else:
            raise TypeError(f"{type(model).__name__} holds no prompt_peft adapter (get_peft_model(...) first)")
    return inner


def training_step(
    model: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    gather: Optional[Callable[[LossInputs], LossInputs]] = None,
) -> StepOutput:
    """Forward ``pixel_values`` with ``labels``, gather the loss inputs, compute the loss (see the module doc).

    ``gather`` replaces the tuner's default gather point for this call (e.g. a global-batch gather under DDP).
    """
    outputs = model(pixel_values=pixel_values, labels=labels, **{LOSS_INPUTS_KWARG: True})
    inputs = outputs.get("loss_inputs") if not isinstance(outputs, tuple) else None
    if inputs is None:
        raise ValueError("the model returned no loss inputs: is a prompt_peft adapter active, with num_classes set?")
    tuner = find_tuner(model)
    inputs = (gather or tuner.gather_loss_inputs)(inputs)
    return StepOutput(loss=tuner.compute_loss(inputs), inputs=inputs)
