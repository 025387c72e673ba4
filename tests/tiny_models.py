"""Tiny random backbones of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32)

# model class -> (config class, extra config kwargs)
FAMILIES = {
    "ViTModel": ("ViTConfig", dict(patch_size=8)),
    "ViTForImageClassification": ("ViTConfig", dict(patch_size=8, num_labels=5)),
    "DeiTModel": ("DeiTConfig", dict(patch_size=8)),
    "DeiTForImageClassification": ("DeiTConfig", dict(patch_size=8, num_labels=5)),
    "Dinov2Model": ("Dinov2Config", dict(patch_size=8)),
    "Dinov2ForImageClassification": ("Dinov2Config", dict(patch_size=8, num_labels=5)),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", dict(patch_size=8, num_register_tokens=2)),
    "CLIPVisionModel": ("CLIPVisionConfig", dict(patch_size=8, projection_dim=16)),
    "SiglipVisionModel": ("SiglipVisionConfig", dict(patch_size=8)),
}
BARE = ["ViTModel", "DeiTModel", "Dinov2Model", "Dinov2WithRegistersModel", "CLIPVisionModel", "SiglipVisionModel"]

# Families of issue 15 (timm through TimmWrapperModel, DINOv3, SigLIP 2): same sizes, 32 px native.
TIMM_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
NEW_FAMILIES = {
    "TimmWrapperModel": ("TimmWrapperConfig", dict(architecture="vit_small_patch16_224", model_args=TIMM_VIT_ARGS)),
    "DINOv3ViTModel": ("DINOv3ViTConfig", dict(patch_size=8, num_register_tokens=2)),
    "Siglip2VisionModel": ("Siglip2VisionConfig", dict(patch_size=8, num_patches=16)),
}
NEW_BARE = list(NEW_FAMILIES)


def tiny_config(name: str, **overrides):
    if name in NEW_FAMILIES:
        config_name, extra = NEW_FAMILIES[name]
        if name == "TimmWrapperModel":  # sizes live in timm's model_args
            args = {**extra["model_args"], **overrides.pop("model_args", {})}
            return transformers.TimmWrapperConfig(**{**extra, "model_args": args, **overrides})
    else:
        config_name, extra = FAMILIES[name]
    return getattr(transformers, config_name)(**{**SIZES, **extra, **overrides})


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised model of class ``name`` in eval mode (deterministic for a given seed)."""
    torch.manual_seed(seed)
    return getattr(transformers, name)(tiny_config(name, **overrides)).eval()


def pixels(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_features(model: torch.nn.Module, out) -> torch.Tensor:
    """The tensor that must not change when an adapter is disabled: logits or the last hidden state."""
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@torch.no_grad()
def perturb_adapter(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Stand-in for training: move every trainable (adapter) tensor off its initial value, seeded."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model
