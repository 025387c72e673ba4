"""What prompt_peft needs to know about a ViT-family backbone, found once per model.

Every supported transformers model keeps its encoder blocks in one ``nn.ModuleList`` and calls each block as
``block(hidden_states, attention_mask, **kwargs)``, returning a plain tensor. Prompt tokens are appended after
the image tokens, so everything that reads tokens by position (CLS at 0, DeiT's distillation token at 1,
DINOv2's registers) keeps working untouched. The pooled representation our embedding heads read is the output
of one module per family (the final LayerNorm, or the pooling head), listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class _Family:
    blocks: str  # path of the block ModuleList inside the bare backbone
    pool_module: str  # module whose output carries the pooled token
    pool: str  # how to read the pooled vector from that output: "first_token" | "identity" | "mean"
    prefix_tokens: Callable[[object], int]  # leading non-patch tokens (CLS, distillation, registers)


_FAMILIES: dict[str, _Family] = {
    "vit": _Family("layers", "layernorm", "first_token", lambda c: 1),
    "deit": _Family("layers", "layernorm", "first_token", lambda c: 2),
    "dinov2": _Family("encoder.layer", "layernorm", "first_token", lambda c: 1),
    "dinov2_with_registers": _Family("encoder.layer", "layernorm", "first_token", lambda c: 1 + c.num_register_tokens),
    # CLIP applies its post-LayerNorm to the CLS vector only, so that module's output is already pooled.
    "clip": _Family("encoder.layers", "post_layernorm", "identity", lambda c: 1),
    # SigLIP has no CLS token; its attention-pooling head gives the pooled vector (see _siglip_family).
    "siglip": _Family("encoder.layers", "head", "identity", lambda c: 0),
}

# Supported model classes -> (family, attribute path of the bare backbone inside the model).
SUPPORTED_MODELS: dict[str, tuple[str, str]] = {
    "ViTModel": ("vit", ""),
    "ViTForImageClassification": ("vit", "vit"),
    "DeiTModel": ("deit", ""),
    "DeiTForImageClassification": ("deit", "deit"),
    "DeiTForImageClassificationWithTeacher": ("deit", "deit"),
    "Dinov2Model": ("dinov2", ""),
    "Dinov2ForImageClassification": ("dinov2", "dinov2"),
    "Dinov2WithRegistersModel": ("dinov2_with_registers", ""),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "dinov2_with_registers"),
    "CLIPVisionModel": ("clip", ""),
    "SiglipVisionModel": ("siglip", ""),
}


@dataclass(frozen=True)
class BackboneSpec:
    """The layout of a supported backbone: where its blocks are, its sizes, and where to read the pooled token.

    Build it with :meth:`BackboneSpec.from_model`; it raises a ``ValueError`` naming the supported classes
    for anything else (Swin, ConvNeXt, ...), because token insertion needs a plain sequence of global blocks.
    """

    model_class: str
    family: str
    block_list: str  # full module path of the block ModuleList, e.g. "vit.layers"
    num_layers: int
    hidden_size: int
    patch_size: int
    num_channels: int
    image_size: int
    num_prefix_tokens: int
    pool_module: str  # full module path, e.g. "vit.layernorm"
    pool: str
    attn_implementation: str | None

    @classmethod
    def from_model(cls, model: nn.Module) -> "BackboneSpec":
        name = type(model).__name__
        if name not in SUPPORTED_MODELS:
            raise ValueError(
                f"prompt_peft does not support {name}: visual prompts need a ViT-family backbone whose blocks "
                f"all see one global token sequence. Supported models: {', '.join(SUPPORTED_MODELS)}."
            )
        family_name, base_path = SUPPORTED_MODELS[name]
        config = model.config
        family = _FAMILIES[family_name]
        if family_name == "siglip" and not getattr(model, "use_head", True):
            family = _Family("encoder.layers", "post_layernorm", "mean", lambda c: 0)

        def path(rel: str) -> str:
            return f"{base_path}.{rel}" if base_path else rel

        image_size = config.image_size
        return cls(
            model_class=name,
            family=family_name,
            block_list=path(family.blocks),
            num_layers=len(model.get_submodule(path(family.blocks))),
            hidden_size=config.hidden_size,
            patch_size=_as_int(config.patch_size),
            num_channels=config.num_channels,
            image_size=_as_int(image_size),
            num_prefix_tokens=family.prefix_tokens(config),
            pool_module=path(family.pool_module),
            pool=family.pool,
            attn_implementation=getattr(config, "_attn_implementation", None),
        )

    @property
    def block_paths(self) -> list[str]:
        return [f"{self.block_list}.{i}" for i in range(self.num_layers)]

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Image tokens (prefix + patches) for an input of the given size (default: the config's image size)."""
        height = height or self.image_size
        width = width or self.image_size
        return self.num_prefix_tokens + (height // self.patch_size) * (width // self.patch_size)


def _as_int(value) -> int:
    # Some configs store sizes as (h, w) pairs; prompt_peft only needs one side for square defaults.
    return int(value[0] if isinstance(value, (tuple, list)) else value)
