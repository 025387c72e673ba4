"""Everything prompt_peft knows about a ViT-family backbone, in one place.

Every supported transformers model keeps its encoder blocks in one ``nn.ModuleList`` and calls each block as
``block(hidden_states, attention_mask, **kwargs)``, returning a plain tensor. Prompt tokens are appended after
the image tokens, so everything that reads tokens by position (CLS at 0, DeiT's distillation token at 1,
DINOv2's registers) keeps working untouched.

A family is one :class:`Family` entry in ``FAMILIES``: where its blocks, embeddings and norms are, how the pooled
vector is read, whether the patch embedding has a bias, how a non-native input resolution is passed. A model class
is supported once ``SUPPORTED_MODELS`` maps it to a family and to the path of the bare backbone inside it. No
other module of prompt_peft names a family: the tuners and the retrieval code read a :class:`BackboneSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["BackboneSpec", "FAMILIES", "Family", "SUPPORTED_MODELS", "pool_tokens"]

POOLINGS = ("first_token", "mean", "identity")


def pool_tokens(output: torch.Tensor, pool: str) -> torch.Tensor:
    """The pooled vector ``(B, D)`` from the pooled-token module's output: ``first_token`` reads [CLS] of a token
    sequence ``(B, T, D)``, ``mean`` averages the tokens, ``identity`` means the module already pooled."""
    if pool == "first_token":
        return output[:, 0]
    if pool == "mean":
        return output.mean(dim=1)
    if pool == "identity":
        return output
    raise ValueError(f"unknown pooling {pool!r}; expected one of {POOLINGS}")


def _interpolate_kwargs(height: int, width: int) -> dict[str, Any]:
    return {"interpolate_pos_encoding": True}


def _no_kwargs(height: int, width: int) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    """The layout of one backbone family; all paths are relative to the bare backbone.

    Attributes:
        blocks: the encoder block ``ModuleList``.
        embeddings: the module that takes ``pixel_values`` and returns the token sequence.
        pool_module: the module whose output carries the pooled token.
        pool: how :func:`pool_tokens` reads the pooled vector from that output.
        prefix_tokens: leading non-patch tokens (CLS, distillation, registers) from the model config.
        tokens_module: the module whose output is the final token sequence (default: ``pool_module``).
        tokens_norm: a norm to apply to that output to get normalised tokens (CLIP normalises [CLS] only).
        pre_norm: a norm between the embeddings and block 0 (CLIP's ``pre_layrnorm``).
        unwrapped_norm: where a LayerNorm runs outside every module prompt_peft wraps: ``"before_blocks"``,
            ``"before_head"`` (between the last block and a pooling head) or None; BitFit covers its bias apart.
        patch_bias: the patch embedding has a bias (BitFit trains a delta of it).
        resolution_kwargs: ``(height, width) -> kwargs`` the backbone's forward needs for an input that is not its
            native size (e.g. ``interpolate_pos_encoding=True``); ``{}`` when it adapts by itself.
    """

    blocks: str
    embeddings: str
    pool_module: str
    pool: str
    prefix_tokens: Callable[[Any], int]
    tokens_module: Optional[str] = None
    tokens_norm: Optional[str] = None
    pre_norm: Optional[str] = None
    unwrapped_norm: Optional[str] = None
    patch_bias: bool = True
    resolution_kwargs: Callable[[int, int], dict[str, Any]] = field(default=_interpolate_kwargs)


FAMILIES: dict[str, Family] = {
    "vit": Family("layers", "embeddings", "layernorm", "first_token", lambda c: 1),
    "deit": Family("layers", "embeddings", "layernorm", "first_token", lambda c: 2),
    # DINOv2 always interpolates its position embeddings to the input size.
    "dinov2": Family(
        "encoder.layer", "embeddings", "layernorm", "first_token", lambda c: 1, resolution_kwargs=_no_kwargs
    ),
    "dinov2_with_registers": Family(
        "encoder.layer",
        "embeddings",
        "layernorm",
        "first_token",
        lambda c: 1 + c.num_register_tokens,
        resolution_kwargs=_no_kwargs,
    ),
    # CLIP applies its post-LayerNorm to the CLS vector only, so that module's output is already pooled; the final
    # token sequence is the last block's output (put through the same norm when a method reads all tokens).
    "clip": Family(
        "encoder.layers",
        "embeddings",
        "post_layernorm",
        "identity",
        lambda c: 1,
        tokens_module="<last block>",
        tokens_norm="post_layernorm",
        pre_norm="pre_layrnorm",
        unwrapped_norm="before_blocks",
        patch_bias=False,
    ),
    # SigLIP has no CLS token; its attention-pooling head gives the pooled vector and reads post_layernorm's tokens.
    "siglip": Family(
        "encoder.layers",
        "embeddings",
        "head",
        "identity",
        lambda c: 0,
        tokens_module="post_layernorm",
        unwrapped_norm="before_head",
    ),
    # SigLIP without its pooling head (use_head=False): mean of the final normalised tokens.
    "siglip_no_head": Family("encoder.layers", "embeddings", "post_layernorm", "mean", lambda c: 0),
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


def _family_of(model: nn.Module, name: str) -> str:
    family = SUPPORTED_MODELS[name][0]
    if family == "siglip" and not getattr(model, "use_head", True):
        return "siglip_no_head"
    return family


@dataclass(frozen=True)
class BackboneSpec:
    """The layout of one supported backbone model: module paths (from the model's root), sizes, pooling.

    Build it with :meth:`BackboneSpec.from_model`; it raises a ``ValueError`` naming the supported classes
    for anything else (Swin, ConvNeXt, ...), because token insertion needs a plain sequence of global blocks.
    """

    model_class: str
    family: str
    base_path: str  # the bare backbone inside the model ("" for a bare model)
    block_list: str  # e.g. "vit.layers"
    num_layers: int
    hidden_size: int
    patch_size: int
    num_channels: int
    image_size: int
    num_prefix_tokens: int
    embeddings: str
    pool_module: str
    pool: str
    tokens_module: str  # its output holds the final token sequence
    tokens_norm: Optional[str]
    pre_norm: Optional[str]
    unwrapped_norm: Optional[str]
    patch_bias: bool
    attn_implementation: Optional[str]
    resolution_kwargs_fn: Callable[[int, int], dict[str, Any]] = field(default=_no_kwargs, compare=False, repr=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> "BackboneSpec":
        name = type(model).__name__
        if name not in SUPPORTED_MODELS:
            raise ValueError(
                f"prompt_peft does not support {name}: visual prompts need a ViT-family backbone whose blocks "
                f"all see one global token sequence. Supported models: {', '.join(SUPPORTED_MODELS)}."
            )
        family_name = _family_of(model, name)
        family = FAMILIES[family_name]
        base_path = SUPPORTED_MODELS[name][1]
        config = model.config

        def path(rel: Optional[str]) -> Optional[str]:
            if rel is None:
                return None
            return f"{base_path}.{rel}" if base_path else rel

        block_list = path(family.blocks)
        num_layers = len(model.get_submodule(block_list))
        tokens_module = family.tokens_module or family.pool_module
        tokens_module = f"{block_list}.{num_layers - 1}" if tokens_module == "<last block>" else path(tokens_module)
        return cls(
            model_class=name,
            family=family_name,
            base_path=base_path,
            block_list=block_list,
            num_layers=num_layers,
            hidden_size=config.hidden_size,
            patch_size=_as_int(config.patch_size),
            num_channels=config.num_channels,
            image_size=_as_int(config.image_size),
            num_prefix_tokens=family.prefix_tokens(config),
            embeddings=path(family.embeddings),
            pool_module=path(family.pool_module),
            pool=family.pool,
            tokens_module=tokens_module,
            tokens_norm=path(family.tokens_norm),
            pre_norm=path(family.pre_norm),
            unwrapped_norm=family.unwrapped_norm,
            patch_bias=family.patch_bias,
            attn_implementation=getattr(config, "_attn_implementation", None),
            resolution_kwargs_fn=family.resolution_kwargs,
        )

    @property
    def block_paths(self) -> list[str]:
        return [f"{self.block_list}.{i}" for i in range(self.num_layers)]

    def pooled(self, output: torch.Tensor) -> torch.Tensor:
        """The pooled vector from the output of :attr:`pool_module` (the one pooling rule of this backbone)."""
        return pool_tokens(output, self.pool)

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Image tokens (prefix + patches) for an input of the given size (default: the config's image size)."""
        height = height or self.image_size
        width = width or self.image_size
        return self.num_prefix_tokens + (height // self.patch_size) * (width // self.patch_size)

    def resolution_kwargs(self, height: int, width: int) -> dict[str, Any]:
        """Extra keyword arguments the backbone's forward needs for ``height x width`` inputs: none at the native
        size; otherwise the family's rule (e.g. ``interpolate_pos_encoding=True`` for ViT, DeiT, CLIP, SigLIP)."""
        if height == self.image_size and width == self.image_size:
            return {}
        return self.resolution_kwargs_fn(height, width)


def _as_int(value) -> int:
    # Some configs store sizes as (h, w) pairs; prompt_peft only needs one side for square defaults.
    return int(value[0] if isinstance(value, (tuple, list)) else value)
