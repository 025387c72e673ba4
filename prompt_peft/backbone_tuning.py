"""Training part of the backbone under a prompt_peft head: the baselines a user would pick instead of prompts.

Every row of the benchmark shares the prompt_peft embedding head and loss (``VPTConfig(num_prompts=0)`` is the
head alone); what differs is which backbone parameters also train, at ``backbone_lr``:

* ``"all"``: every backbone parameter (full fine-tuning);
* ``"bias"``: only the bias terms (BitFit, Ben Zaken et al., ACL 2022), updated in place;
* ``"lora"``: peft's own LoRA (``peft.LoraConfig``, injected with ``peft.inject_adapter_in_model``) on the
  attention's query / key / value projections; only its ``lora_A`` / ``lora_B`` matrices train.
"""

from __future__ import annotations

from typing import Callable

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

BACKBONE_TUNINGS = ("all", "bias", "lora")
# Attention input projections by their module names: ViT / DeiT / DINOv2 (query, key, value),
# CLIP / SigLIP (q_proj, k_proj, v_proj). peft matches them as name suffixes.
ATTENTION_PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "v_proj")
LORA_ADAPTER = "backbone_lora"


def _check(tuning: str) -> None:
    if tuning not in BACKBONE_TUNINGS:
        raise ValueError(f"backbone tuning must be one of {BACKBONE_TUNINGS}, got {tuning!r}")


def prepare_backbone(backbone: nn.Module, tuning: str, *, lora_rank: int = 8, lora_alpha: float | None = None):
    """``backbone`` ready for ``tuning``: with ``"lora"``, LoRA of rank ``lora_rank`` (alpha default ``2 ×``
    rank, dropout 0) injected into every attention projection (in place; the model class is unchanged, so a
    prompt_peft adapter can wrap it next). Other tunings change nothing here."""
    _check(tuning)
    if tuning != "lora":
        return backbone
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=2 * lora_rank if lora_alpha is None else lora_alpha,
        lora_dropout=0.0,
        target_modules=list(ATTENTION_PROJECTIONS),
    )
    backbone = inject_adapter_in_model(config, backbone, adapter_name=LORA_ADAPTER)
    # the LoRA matrices are plain backbone parameters from here on: the prompt_peft adapter wrapped around the
    # backbone next must be the model's only peft config (or saving it would try to save LoRA as a VPT adapter)
    del backbone.peft_config
    return backbone


def backbone_parameter_filter(tuning: str) -> Callable[[str], bool]:
    """``name -> bool``: which parameters without a prompt_peft role train under ``tuning``."""
    _check(tuning)
    if tuning == "bias":
        return lambda name: name.rsplit(".", 1)[-1] == "bias"
    if tuning == "lora":
        return lambda name: ".lora_A." in name or ".lora_B." in name
    return lambda name: True
