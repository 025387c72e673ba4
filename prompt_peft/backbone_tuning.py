"""Training part of the backbone under a prompt_peft head: the baselines a user would pick instead of prompts.

Every row of the benchmark shares the prompt_peft embedding head and loss (``VPTConfig(num_prompts=0)`` is the
head alone); what differs is which backbone parameters also train, at ``backbone_lr``:

* ``"all"``: every backbone parameter (full fine-tuning);
* ``"bias"``: only the bias terms (BitFit, Ben Zaken et al., ACL 2022), updated in place;
* ``"lora"``: peft's own LoRA (``peft.LoraConfig``, injected with ``peft.inject_adapter_in_model``) on the
  attention's query / key / value projections (``lora_targets="attention"``), on those and the attention's
  output projection (``"attention-all"``) or on every linear layer of the encoder blocks (``"all-linear"``:
  peft's own selection, attention and MLP); never on the pooling heads outside the blocks, e.g. ViT's pooler or
  SigLIP's attention-pooling head, which the embedding does not use; its
  ``lora_A`` / ``lora_B`` matrices train, and with ``lora_bias="all"`` (peft's ``LoraConfig(bias="all")``)
  every bias of the backbone as well: LoRA and BitFit together; with ``lora_dora=True`` peft's DoRA
  (``LoraConfig(use_dora=True)``, Liu et al., ICML 2024) also trains a magnitude per output feature of each
  adapted weight; ``lora_init`` picks peft's initialisation of the LoRA matrices: ``"default"`` (``lora_B`` zero,
  the update starts at 0), ``"pissa"`` (PiSSA, Meng et al., NeurIPS 2024: the matrices start as the weight's
  top-rank singular part, which leaves the base layer, so training moves the principal directions first) or
  ``"olora"`` (OLoRA, Büyükakyüz 2024: an orthonormal QR start taken out of the weight the same way); all three
  compute the pretrained function at the start, and merging gives the plain backbone back.
"""

from __future__ import annotations

from typing import Callable

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from prompt_peft.backbones import BackboneSpec

BACKBONE_TUNINGS = ("all", "bias", "lora")
# Attention input projections by their module names: ViT / DeiT / DINOv2 (query, key, value; q_proj, k_proj,
# v_proj in transformers 5), CLIP / SigLIP (q_proj, k_proj, v_proj), timm (one fused qkv). peft matches them as
# name suffixes.
ATTENTION_PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "qkv")
# The attention's output projection: transformers 5's ViT / DeiT / DINOv2 / DINOv3 (o_proj), CLIP / SigLIP (out_proj),
# timm (attn.proj: "proj" alone would also name timm's patch embedding)
ATTENTION_OUTPUTS = ("o_proj", "out_proj", "attn.proj")
# what --lora_targets names: peft's target_modules for each
LORA_TARGETS = {
    "attention": list(ATTENTION_PROJECTIONS),
    "attention-all": [*ATTENTION_PROJECTIONS, *ATTENTION_OUTPUTS],
    "all-linear": "all-linear",
}
LORA_ADAPTER = "backbone_lora"
# peft's LoraConfig.bias values that this module supports: no bias trains, or every bias of the backbone does
LORA_BIASES = ("none", "all")
# what --lora_init names: peft's LoraConfig.init_lora_weights for each
LORA_INITS = {"default": True, "pissa": "pissa", "olora": "olora"}


def check_backbone_tuning(
    tuning: str, lora_bias: str = "none", lora_dora: bool = False, lora_init: str = "default"
) -> None:
    """Raises ``ValueError`` unless ``tuning``, ``lora_bias``, ``lora_dora`` and ``lora_init`` make sense together
    (the options beyond ``tuning`` need ``"lora"``)."""
    if tuning not in BACKBONE_TUNINGS:
        raise ValueError(f"backbone tuning must be one of {BACKBONE_TUNINGS}, got {tuning!r}")
    if lora_bias not in LORA_BIASES:
        raise ValueError(f"LoRA bias must be one of {LORA_BIASES}, got {lora_bias!r}")
    if lora_bias != "none" and tuning != "lora":
        raise ValueError(f"LoRA bias {lora_bias!r} needs backbone tuning 'lora', got {tuning!r}")
    if lora_dora and tuning != "lora":
        raise ValueError(f"DoRA needs backbone tuning 'lora', got {tuning!r}")
    if lora_init not in LORA_INITS:
        raise ValueError(f"LoRA init must be one of {sorted(LORA_INITS)}, got {lora_init!r}")
    if lora_init != "default" and tuning != "lora":
        raise ValueError(f"LoRA init {lora_init!r} needs backbone tuning 'lora', got {tuning!r}")


def prepare_backbone(
    backbone: nn.Module,
    tuning: str,
    *,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_targets: str = "attention",
    lora_bias: str = "none",
    lora_dora: bool = False,
    lora_init: str = "default",
):
    """``backbone`` ready for ``tuning``: with ``"lora"``, LoRA of rank ``lora_rank`` (alpha default ``2 ×``
    rank, dropout 0, peft's ``bias=lora_bias``, ``use_dora=lora_dora`` and the initialisation ``lora_init``, a
    key of ``LORA_INITS``) injected into the layers
    ``lora_targets`` names (a key of ``LORA_TARGETS``; in place: the model class is unchanged, so a prompt_peft
    adapter can wrap it next). Other tunings change nothing here."""
    check_backbone_tuning(tuning, lora_bias, lora_dora, lora_init)
    if lora_targets not in LORA_TARGETS:
        raise ValueError(f"LoRA targets must be one of {sorted(LORA_TARGETS)}, got {lora_targets!r}")
    if tuning != "lora":
        return backbone
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=2 * lora_rank if lora_alpha is None else lora_alpha,
        lora_dropout=0.0,
        bias=lora_bias,
        use_dora=lora_dora,
        init_lora_weights=LORA_INITS[lora_init],
        target_modules=LORA_TARGETS[lora_targets],
        # never the pooling heads outside the blocks, which have linear layers of the same names (SigLIP's out_proj)
        exclude_modules=_outside_blocks(backbone),
    )
    backbone = inject_adapter_in_model(config, backbone, adapter_name=LORA_ADAPTER)
    # the LoRA matrices are plain backbone parameters from here on: the prompt_peft adapter wrapped around the
    # backbone next must be the model's only peft config (or saving it would try to save LoRA as a VPT adapter)
    del backbone.peft_config
    return backbone


def merge_lora(backbone: nn.Module) -> nn.Module:
    """In place: fold every LoRA update into the weight it adapts and put the plain layer back, so the backbone
    saves as, and loads with ``from_pretrained`` into, its own class (its LoRA-wrapped state dict would not: the
    weights sit under ``base_layer`` and ``lora_A`` / ``lora_B`` keys that ``from_pretrained`` drops). A backbone
    without LoRA is returned unchanged."""
    for name, module in list(backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent), child, module.get_base_layer())
    return backbone


def _outside_blocks(backbone: nn.Module) -> list[str] | None:
    """Names of the linear layers outside the encoder blocks (pooling heads), or None; the blocks are where
    ``BackboneSpec`` finds them for the backbone's family."""
    blocks = BackboneSpec.from_model(backbone).block_list + "."
    names = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear) and not name.startswith(blocks)
    ]
    return names or None  # peft warns about an exclusion that excludes nothing


def backbone_parameter_filter(tuning: str, lora_bias: str = "none") -> Callable[[str], bool]:
    """``name -> bool``: which parameters without a prompt_peft role train under ``tuning`` (and, for
    ``"lora"``, ``lora_bias``; DoRA's magnitudes count as LoRA parameters)."""
    check_backbone_tuning(tuning, lora_bias)

    def is_bias(name: str) -> bool:
        return name.rsplit(".", 1)[-1] == "bias"

    def is_lora(name: str) -> bool:  # the magnitudes exist only under DoRA
        return any(f".{part}." in name for part in ("lora_A", "lora_B", "lora_magnitude_vector"))

    if tuning == "bias":
        return is_bias
    if tuning == "lora":
        return (lambda name: is_lora(name) or is_bias(name)) if lora_bias == "all" else is_lora
    return lambda name: True
