"""Everything prompt_peft knows about a ViT-family backbone, in one place.

Every supported transformers model keeps its encoder blocks in one ``nn.ModuleList`` and calls each block as
``block(hidden_states, attention_mask, **kwargs)``, returning a plain tensor. Prompt tokens are appended after
the image tokens, so everything that reads tokens by position (CLS at 0, DeiT's distillation token at 1,
DINOv2's registers) keeps working untouched.

A family is one :class:`Family` entry in ``FAMILIES``: where its blocks, embeddings and norms are, how the pooled
vector is read, whether the patch embedding has a bias, how a non-native input resolution is passed, what the
blocks' extra inputs become when prompt tokens are appended (DINOv3's rotary embeddings, SigLIP 2's attention
mask). A model class is supported once ``SUPPORTED_MODELS`` maps it to a family and to the path of the bare
backbone inside it. No other module of prompt_peft names a family: the tuners and the retrieval code read a
:class:`BackboneSpec`.

Families beyond transformers' own ViTs:

* **timm ViTs** through transformers' ``TimmWrapperModel`` (``AutoModel.from_pretrained("timm/vit_...")``, needs
  ``pip install timm``): timm's ``VisionTransformer`` with its class and register tokens, its blocks, its final
  norm and its pooling (``token``, ``avg`` with or without ``fc_norm``, ``map``). timm's blocks take no keyword
  arguments; a non-native input size switches the model to timm's own ``dynamic_img_size`` mode (position
  embeddings resampled per call), which gives the same numbers at the native size.
* **DINOv3** (``DINOv3ViTModel``): rotary position embeddings on the patch tokens only; its ``apply_rotary_pos_emb``
  rotates the *last* ``num_patches`` tokens, so prompts appended after the patches get the identity rotation
  (cos 1, sin 0): no image position, exactly like its [CLS] and register tokens.
* **SigLIP 2** (``Siglip2VisionModel``, NaFlex): inputs are patch sequences with ``pixel_attention_mask`` and
  ``spatial_shapes``. Prompt tokens are always attended (the mask grows by attended rows and columns); a batch
  of images ``(B, C, H, W)`` is turned into that form (every patch valid) by :meth:`BackboneSpec.model_inputs`,
  so the training and evaluation code treats SigLIP 2 like every other family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["BackboneSpec", "FAMILIES", "Family", "SUPPORTED_MODELS", "load_backbone", "pool_tokens", "without_hub_kernels"]

POOLINGS = ("first_token", "mean", "patch_mean", "identity")


def without_hub_kernels(model: nn.Module) -> nn.Module:
    """Turn transformers' Hub kernels off in ``model`` (returned): its layers run their own PyTorch code.

    Recent transformers load every model with ``use_kernels=True`` when the ``kernels`` package is installed (it is
    a dependency of transformers itself) and kernelize again at each ``train()`` / ``eval()``: on a CUDA device
    that fetches layers such as GELU from the Hub, which fails on a machine without internet (the run crashes at
    its first evaluation, after training) and otherwise computes other numbers than the model the adapter was
    trained and tested with. The prompt methods hook the blocks' own forward, so the backbone stays plain.
    """
    for module in model.modules():
        if getattr(module, "_use_kernels", False):
            module.use_kernels = False  # transformers' setter puts every kernelized layer back to its torch forward
    return model


def load_backbone(name_or_path: str, model_class=None, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(name_or_path, **kwargs)`` (default ``AutoModel``), without Hub kernels
    (:func:`without_hub_kernels`): the backbone as the examples, the serving code and adapter loading use it."""
    if model_class is None:
        from transformers import AutoModel as model_class
    return without_hub_kernels(model_class.from_pretrained(name_or_path, **kwargs))


def pool_tokens(output: torch.Tensor, pool: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """The pooled vector ``(B, D)`` from the pooled-token module's output: ``first_token`` reads [CLS] of a token
    sequence ``(B, T, D)``, ``mean`` averages the tokens, ``patch_mean`` the tokens after the
    ``num_prefix_tokens`` prefix tokens (timm's ``avg``), ``identity`` means the module already pooled."""
    if pool == "first_token":
        return output[:, 0]
    if pool == "mean":
        return output.mean(dim=1)
    if pool == "patch_mean":
        return output[:, num_prefix_tokens:].mean(dim=1)
    if pool == "identity":
        return output
    raise ValueError(f"unknown pooling {pool!r}; expected one of {POOLINGS}")


def _interpolate_kwargs(height: int, width: int) -> dict[str, Any]:
    return {"interpolate_pos_encoding": True}


def _no_kwargs(height: int, width: int) -> dict[str, Any]:
    return {}


def _config_sizes(model: nn.Module) -> dict[str, int]:
    config = model.config
    return {
        "hidden_size": config.hidden_size,
        "patch_size": _as_int(config.patch_size),
        "num_channels": config.num_channels,
        "image_size": _as_int(config.image_size),
    }


def _siglip2_sizes(model: nn.Module) -> dict[str, int]:
    # NaFlex: the position grid is sqrt(num_patches) a side; that grid is the native (square) image size
    config = model.config
    side = int(round(config.num_patches**0.5))
    return {
        "hidden_size": config.hidden_size,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "image_size": side * config.patch_size,
    }


def _timm_sizes(model: nn.Module) -> dict[str, int]:
    vit = model.timm_model
    return {
        "hidden_size": vit.embed_dim,
        "patch_size": vit.patch_embed.patch_size[0],
        "num_channels": vit.patch_embed.proj.in_channels,
        "image_size": vit.patch_embed.img_size[0],
    }


# ---------------------------------------------------------------------------------------------------- block inputs
# ``(args, kwargs, num_prompts) -> (args, kwargs)``: what a block's inputs other than the hidden states become when
# ``num_prompts`` prompt tokens follow the image tokens.


def _no_block_inputs(args: tuple, kwargs: dict, num_prompts: int) -> tuple[tuple, dict]:
    # Plain ViTs build no mask for images; a user-given one would not cover the prompt tokens.
    mask = args[0] if args else kwargs.get("attention_mask", kwargs.get("attn_mask"))
    if mask is not None:
        raise ValueError(
            "prompt_peft adapters do not support an attention_mask on this backbone: it would not cover the "
            "prompt tokens. Call the model with pixel_values only."
        )
    return args, kwargs


def _rope_identity_for_prompts(args: tuple, kwargs: dict, num_prompts: int) -> tuple[tuple, dict]:
    """DINOv3: rotary tables ``(cos, sin)`` of the patches grow by identity rows (cos 1, sin 0) for the prompts,
    which DINOv3's ``apply_rotary_pos_emb`` (it rotates the last ``len(cos)`` tokens) then leaves unrotated."""
    args, kwargs = _no_block_inputs(args, kwargs, num_prompts)
    rope = kwargs.get("position_embeddings")
    if rope is None or not num_prompts:
        return args, kwargs
    cos, sin = rope
    ones = cos.new_ones(*cos.shape[:-2], num_prompts, cos.shape[-1])
    zeros = sin.new_zeros(*sin.shape[:-2], num_prompts, sin.shape[-1])
    return args, {**kwargs, "position_embeddings": (torch.cat([cos, ones], dim=-2), torch.cat([sin, zeros], dim=-2))}


def extend_attention_mask(mask: Optional[torch.Tensor], num_prompts: int) -> Optional[torch.Tensor]:
    """A 4-D mask ``(B, 1, Q, K)`` (boolean: True attends; float: additive) for ``num_prompts`` more tokens at the
    end: the prompts are attended by every query and attend every valid key (``Q == 1`` masks broadcast)."""
    if mask is None or not num_prompts:
        return mask
    attend = True if mask.dtype == torch.bool else 0.0
    columns = mask.new_full((*mask.shape[:-1], num_prompts), attend)
    mask = torch.cat([mask, columns], dim=-1)
    if mask.shape[-2] == 1:
        return mask
    # prompt queries attend what the first image query attends (every valid image token) and every prompt
    rows = mask[..., :1, :].expand(*mask.shape[:-2], num_prompts, mask.shape[-1])
    return torch.cat([mask, rows], dim=-2)


def _masked_block_inputs(args: tuple, kwargs: dict, num_prompts: int) -> tuple[tuple, dict]:
    """SigLIP 2: the encoder's attention mask (positional or keyword) grows to cover the prompts."""
    if args:
        return (extend_attention_mask(args[0], num_prompts), *args[1:]), kwargs
    if kwargs.get("attention_mask") is not None:
        return args, {**kwargs, "attention_mask": extend_attention_mask(kwargs["attention_mask"], num_prompts)}
    return args, kwargs


# ---------------------------------------------------------------------------------------------------- model inputs
# ``(model, pixel_values) -> kwargs``: the keyword arguments of the bare backbone's forward for a batch of images
# ``(B, C, H, W)`` of any size (after the family's own rule for the native size).


def _siglip2_inputs(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, Any]:
    """Images ``(B, C, H, W)`` as NaFlex patch sequences, every patch valid (the processor's patch layout:
    row-major patches, each flattened as ``(p, p, C)``)."""
    if pixel_values.dim() != 4:
        return {"pixel_values": pixel_values}
    patch = model.config.patch_size
    batch, channels, height, width = pixel_values.shape
    if height % patch or width % patch:
        raise ValueError(f"SigLIP 2 needs image sides divisible by its patch size {patch}, got {height}x{width}")
    rows, cols = height // patch, width // patch
    patches = pixel_values.reshape(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
    return {
        "pixel_values": patches.reshape(batch, rows * cols, patch * patch * channels),
        "pixel_attention_mask": torch.ones(batch, rows * cols, dtype=torch.long, device=pixel_values.device),
        "spatial_shapes": torch.tensor([[rows, cols]] * batch, dtype=torch.long, device=pixel_values.device),
    }


def _timm_dynamic_size(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, Any]:
    """timm: an input away from the native size switches the ViT to timm's ``dynamic_img_size`` mode (position
    embeddings resampled to each input's grid; identical outputs at the native size), once."""
    vit = model.timm_model
    if tuple(pixel_values.shape[-2:]) != tuple(vit.patch_embed.img_size) and not vit.dynamic_img_size:
        embed = vit.patch_embed
        embed = embed.get_base_layer() if hasattr(embed, "get_base_layer") else embed  # FRPT wraps it
        if embed.output_fmt.value != "NCHW" or not embed.flatten:
            raise ValueError(f"{type(vit).__name__}'s patch embedding cannot be switched to dynamic image sizes")
        vit.dynamic_img_size = True
        embed.strict_img_size, embed.flatten = False, False
        embed.output_fmt = type(embed.output_fmt)("NHWC")
    return {"pixel_values": pixel_values}


# ---------------------------------------------------------------------------------------------------- encoder inputs
# ``(model, embedded, pixel_values) -> (hidden_states, block_kwargs)``: the input of block 0 from the output of the
# ``embeddings`` module, and what the blocks take besides (for a pass over the first blocks, as FRPT's parser makes).


def _pre_norm_inputs(pre_norm: Optional[str]):
    def inputs(model: nn.Module, embedded: torch.Tensor, pixel_values: torch.Tensor):
        return (model.get_submodule(pre_norm)(embedded) if pre_norm else embedded), {}

    return inputs


def _dinov3_inputs(model: nn.Module, embedded: torch.Tensor, pixel_values: torch.Tensor):
    return embedded, {"position_embeddings": model.rope_embeddings(pixel_values.to(embedded.dtype))}


def _timm_inputs(model: nn.Module, embedded: torch.Tensor, pixel_values: torch.Tensor):
    # timm's forward_features after patch_embed: class/register tokens and position embeddings, then norm_pre
    vit = model.timm_model
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(embedded))), {}


@dataclass(frozen=True)
class Family:
    """The layout of one backbone family; all paths are relative to the bare backbone.

    Attributes:
        blocks: the encoder block ``ModuleList``.
        embeddings: the module that takes ``pixel_values`` and returns the token sequence.
        pool_module: the module whose output carries the pooled token.
        pool: how :func:`pool_tokens` reads the pooled vector from that output.
        prefix_tokens: leading non-patch tokens (CLS, distillation, registers) of the bare backbone.
        tokens_module: the module whose output is the final token sequence (default: ``pool_module``).
        tokens_norm: a norm to apply to that output to get normalised tokens (CLIP normalises [CLS] only).
        pre_norm: a norm between the embeddings and block 0 (CLIP's ``pre_layrnorm``).
        unwrapped_norm: where a LayerNorm runs outside every module prompt_peft wraps: ``"before_blocks"``,
            ``"before_head"`` (between the last block and a pooling head) or None; BitFit covers its bias apart.
        patch_bias: the patch embedding has a bias (BitFit trains a delta of it).
        resolution_kwargs: ``(height, width) -> kwargs`` the backbone's forward needs for an input that is not its
            native size (e.g. ``interpolate_pos_encoding=True``); ``{}`` when it adapts by itself.
        model_inputs: ``(model, pixel_values) -> kwargs`` for families whose forward does not take a batch of
            images as is (SigLIP 2's patch sequences) or needs a switch for other sizes (timm); replaces
            ``resolution_kwargs`` when given.
        block_inputs: ``(args, kwargs, num_prompts) -> (args, kwargs)``: the blocks' other inputs for a sequence
            with prompts appended (the default refuses an attention mask).
        encoder_inputs: ``(model, embedded, pixel_values) -> (hidden_states, block_kwargs)`` from the embeddings'
            output to block 0's input (default: ``pre_norm`` if any, no keyword arguments).
        sizes: ``model -> {hidden_size, patch_size, num_channels, image_size}`` (default: from the config).
        refuses: ``{method prefix: reason}`` for methods that cannot run on this family.
        recomputes_blocks: ``model -> bool``: activation checkpointing is on and the backbone checkpoints its block
            sequence itself (timm's ``checkpoint_seq``), so the wrapped blocks re-run in the backward pass.
    """

    blocks: str
    embeddings: str
    pool_module: str
    pool: str
    prefix_tokens: Callable[[nn.Module], int]
    tokens_module: Optional[str] = None
    tokens_norm: Optional[str] = None
    pre_norm: Optional[str] = None
    unwrapped_norm: Optional[str] = None
    patch_bias: bool = True
    resolution_kwargs: Callable[[int, int], dict[str, Any]] = field(default=_interpolate_kwargs)
    model_inputs: Optional[Callable[[nn.Module, torch.Tensor], dict[str, Any]]] = None
    block_inputs: Callable[[tuple, dict, int], tuple[tuple, dict]] = field(default=_no_block_inputs)
    encoder_inputs: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple]] = None
    sizes: Callable[[nn.Module], dict[str, int]] = field(default=_config_sizes)
    refuses: dict[str, str] = field(default_factory=dict)
    recomputes_blocks: Optional[Callable[[nn.Module], bool]] = None


def _zero(model: nn.Module) -> int:
    return 0


def _one(model: nn.Module) -> int:
    return 1


def _one_plus_registers(model: nn.Module) -> int:
    return 1 + model.config.num_register_tokens


_FRPT_ON_PATCH_SEQUENCES = (
    "FRPT re-samples the input image, but SigLIP 2 (NaFlex) takes patch sequences of varying length and layout "
    "(padding, per-image aspect ratios), which have no fixed image grid to re-sample."
)


def _timm_family(pool_module: str, pool: str, **layout: Any) -> Family:
    return Family(
        "timm_model.blocks",
        "timm_model.patch_embed",
        pool_module,
        pool,
        lambda model: model.timm_model.num_prefix_tokens,
        model_inputs=_timm_dynamic_size,
        encoder_inputs=_timm_inputs,
        sizes=_timm_sizes,
        recomputes_blocks=lambda model: bool(model.timm_model.grad_checkpointing) and model.training,
        **layout,
    )


FAMILIES: dict[str, Family] = {
    "vit": Family("layers", "embeddings", "layernorm", "first_token", _one),
    "deit": Family("layers", "embeddings", "layernorm", "first_token", lambda m: 2),
    # DINOv2 always interpolates its position embeddings to the input size.
    "dinov2": Family("encoder.layer", "embeddings", "layernorm", "first_token", _one, resolution_kwargs=_no_kwargs),
    "dinov2_with_registers": Family(
        "encoder.layer",
        "embeddings",
        "layernorm",
        "first_token",
        _one_plus_registers,
        resolution_kwargs=_no_kwargs,
    ),
    # CLIP applies its post-LayerNorm to the CLS vector only, so that module's output is already pooled; the final
    # token sequence is the last block's output (put through the same norm when a method reads all tokens).
    "clip": Family(
        "encoder.layers",
        "embeddings",
        "post_layernorm",
        "identity",
        _one,
        tokens_module="<last block>",
        encoder_inputs=_pre_norm_inputs("pre_layrnorm"),
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
        _zero,
        tokens_module="post_layernorm",
        unwrapped_norm="before_head",
    ),
    # SigLIP without its pooling head (use_head=False): mean of the final normalised tokens.
    "siglip_no_head": Family("encoder.layers", "embeddings", "post_layernorm", "mean", _zero),
    # DINOv3: [CLS] + registers + patches; rotary position embeddings (computed from the input size: any size).
    "dinov3_vit": Family(
        "model.layer",
        "embeddings",
        "norm",
        "first_token",
        _one_plus_registers,
        resolution_kwargs=_no_kwargs,
        block_inputs=_rope_identity_for_prompts,
        encoder_inputs=_dinov3_inputs,
    ),
    # timm's VisionTransformer through TimmWrapperModel, one entry per pooling (timm's global_pool / fc_norm).
    "timm_vit": _timm_family("timm_model.norm", "first_token"),
    "timm_vit_avg": _timm_family("timm_model.norm", "patch_mean"),
    "timm_vit_avg_fc_norm": _timm_family("timm_model.fc_norm", "identity", tokens_module="timm_model.norm"),
    "timm_vit_map": _timm_family(
        "timm_model.attn_pool", "identity", tokens_module="timm_model.norm", unwrapped_norm="before_head"
    ),
}

# SigLIP 2 (NaFlex): SigLIP's layout (with or without its pooling head), on patch sequences with an attention mask.
_SIGLIP2 = dict(
    model_inputs=_siglip2_inputs,
    block_inputs=_masked_block_inputs,
    sizes=_siglip2_sizes,
    refuses={"frpt_": _FRPT_ON_PATCH_SEQUENCES},
)
FAMILIES["siglip2"] = replace(FAMILIES["siglip"], **_SIGLIP2)
FAMILIES["siglip2_no_head"] = replace(FAMILIES["siglip_no_head"], **_SIGLIP2)

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
    "DINOv3ViTModel": ("dinov3_vit", ""),
    "Siglip2VisionModel": ("siglip2", ""),
    "TimmWrapperModel": ("timm_vit", ""),
    "TimmWrapperForImageClassification": ("timm_vit", ""),
}

_TIMM_POOLINGS = {"token": "timm_vit", "avg": "timm_vit_avg", "map": "timm_vit_map"}


def _family_of(model: nn.Module, name: str) -> str:
    family = SUPPORTED_MODELS[name][0]
    if family in ("siglip", "siglip2") and not getattr(model, "use_head", True):
        return family + "_no_head"
    if family == "timm_vit":
        return _timm_family_of(model.timm_model)
    return family


def _timm_family_of(vit: nn.Module) -> str:
    """The family entry for one timm model: its class must be timm's plain ``VisionTransformer``."""
    kind = type(vit).__name__
    if kind != "VisionTransformer":
        raise ValueError(
            f"prompt_peft supports timm's VisionTransformer through TimmWrapperModel, not timm's {kind}: visual "
            "prompts need a plain sequence of global-attention blocks (convolutional and windowed models have none)."
        )
    pool = vit.global_pool
    if pool not in _TIMM_POOLINGS or (pool == "map" and vit.pool_include_prefix):
        raise ValueError(
            f"this timm ViT pools with global_pool={pool!r}, which prompt_peft does not read; supported: "
            f"{sorted(_TIMM_POOLINGS)} (create it with global_pool='token' or 'avg')."
        )
    if (
        not isinstance(vit.patch_drop, nn.Identity)
        or vit.pos_embed is None
        or not isinstance(vit.norm_pre, nn.Identity)
    ):
        raise ValueError(
            "prompt_peft needs a timm ViT with absolute position embeddings, no patch dropout and no pre-norm "
            "(norm_pre): the augreg / DeiT / DINO layouts."
        )
    if pool == "avg" and not isinstance(vit.fc_norm, nn.Identity):
        return "timm_vit_avg_fc_norm"
    return _TIMM_POOLINGS[pool]


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
    family_layout: Optional[Family] = field(default=None, compare=False, repr=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> "BackboneSpec":
        name = type(model).__name__
        if name not in SUPPORTED_MODELS:
            raise ValueError(
                f"prompt_peft does not support {name}: visual prompts need a ViT-family backbone whose blocks "
                f"all see one global token sequence. Supported models: {', '.join(SUPPORTED_MODELS)}."
            )
        base_path = SUPPORTED_MODELS[name][1]
        bare = model.get_submodule(base_path)
        family_name = _family_of(bare, name)
        family = FAMILIES[family_name]
        config = model.config
        sizes = family.sizes(bare)

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
            hidden_size=sizes["hidden_size"],
            patch_size=sizes["patch_size"],
            num_channels=sizes["num_channels"],
            image_size=sizes["image_size"],
            num_prefix_tokens=family.prefix_tokens(bare),
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
            family_layout=family,
        )

    @property
    def block_paths(self) -> list[str]:
        return [f"{self.block_list}.{i}" for i in range(self.num_layers)]

    def pooled(self, output: torch.Tensor) -> torch.Tensor:
        """The pooled vector from the output of :attr:`pool_module` (the one pooling rule of this backbone)."""
        return pool_tokens(output, self.pool, self.num_prefix_tokens)

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

    def model_inputs(self, model: nn.Module, pixel_values: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of ``model``'s forward (the model this spec was built from) for a batch of images
        ``(B, C, H, W)`` of any size: ``pixel_values`` plus what the family needs (``interpolate_pos_encoding``
        away from the native size; SigLIP 2's patch sequences, mask and shapes; timm's dynamic-size switch)."""
        family = self.family_layout
        if family is not None and family.model_inputs is not None:
            return family.model_inputs(model.get_submodule(self.base_path), pixel_values)
        if pixel_values.dim() != 4:
            return {"pixel_values": pixel_values}
        return {"pixel_values": pixel_values, **self.resolution_kwargs(*pixel_values.shape[-2:])}

    def block_inputs(self, args: tuple, kwargs: dict, num_prompts: int) -> tuple[tuple, dict]:
        """A block's arguments besides the hidden states, for the same call with ``num_prompts`` prompt tokens
        appended (DINOv3: identity rotary rows; SigLIP 2: attended mask rows and columns). Raises for an
        attention mask on a family that has none of its own."""
        family = self.family_layout
        return (family.block_inputs if family is not None else _no_block_inputs)(args, kwargs, num_prompts)

    def encoder_inputs(self, model: nn.Module, embedded: torch.Tensor, pixel_values: torch.Tensor) -> tuple:
        """``(hidden_states, block_kwargs)`` for block 0 from the ``embeddings`` module's output ``embedded``: what
        the backbone's own forward does in between (CLIP's pre-norm, timm's tokens and position embeddings,
        DINOv3's rotary tables)."""
        family = self.family_layout
        if family is not None and family.encoder_inputs is not None:
            return family.encoder_inputs(model.get_submodule(self.base_path), embedded, pixel_values)
        return embedded, {}

    def recomputes_blocks(self, model: nn.Module) -> bool:
        """True when ``model`` (built from this spec) re-runs whole wrapped blocks in its backward pass (timm's own
        activation checkpointing wraps the block sequence; transformers checkpoints inside each block)."""
        family = self.family_layout
        check = family.recomputes_blocks if family is not None else None
        return bool(check and check(model.get_submodule(self.base_path)))

    def check_method(self, prefix: str) -> None:
        """Raise a ``ValueError`` with the reason when the method with this adapter ``prefix`` cannot run here."""
        reason = self.family_layout.refuses.get(prefix) if self.family_layout is not None else None
        if reason:
            raise ValueError(f"{prefix.rstrip('_').upper()} does not support {self.model_class}: {reason}")


def _as_int(value) -> int:
    # Some configs store sizes as (h, w) pairs; prompt_peft only needs one side for square defaults.
    return int(value[0] if isinstance(value, (tuple, list)) else value)
