"""The FRPT tuner: a pixel-space prompt layer on the backbone's ``embeddings`` and a CAH embedding head.

FRPT adds no tokens, so unlike VPT and SHIP it wraps no encoder block. It wraps two modules:

* the module that takes ``pixel_values`` (``embeddings``) in :class:`PixelPrompt`, which re-samples the pixels
  (DPP) before handing them to the unchanged embeddings: everything after it runs as usual on the new image;
* the module whose output holds the final, normalised patch tokens in :class:`FRPTHead` (an ``EmbeddingHead``
  whose pooled vector is the CAH feature): the final LayerNorm for ViT / DeiT / DINOv2 (+registers), SigLIP's
  ``post_layernorm`` (its input to the pooling head), and CLIP's last encoder block, whose tokens the head passes
  through CLIP's own ``post_layernorm`` (CLIP applies it to [CLS] only).

Both are peft ``BaseTunerLayer`` s, so ``disable_adapter()`` runs the bare backbone exactly and ``unload()``
restores its module tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...backbones import BackboneSpec
from ...losses import ClassifierCrossEntropy, ProxyAnchorLoss, WeightedSum
from ..context import ForwardContext
from ..prompted import Container, EmbeddingHead, PromptedLayer, PromptedTuner
from .config import REFERENCE_IMAGE_SIZE, FRPTConfig
from .head import ChannelAttentionHead
from .sampler import gaussian_kernel, resample, sampling_grid


@dataclass(frozen=True)
class FRPTLayout:
    """Where FRPT attaches in one backbone (module paths from the model's root)."""

    embeddings: str  # takes pixel_values
    head: str  # its output holds the final patch tokens
    final_norm: str | None = None  # applied by the head to the head module's output (CLIP's post_layernorm)

    @classmethod
    def from_spec(cls, spec: BackboneSpec) -> FRPTLayout:
        return cls(spec.embeddings, spec.tokens_module, final_norm=spec.tokens_norm)


class FRPTLayer(PromptedLayer):
    """Common base of FRPT's wrappers (the perturbation prompt and the awareness head) under ``frpt_``."""

    prefix = "frpt_"


# ---------------------------------------------------------------------------------------------------- DPP


class ContentParser(nn.Module):
    """Saliency logits ``(B, h, w)`` from the early token map ``(B, D, h, w)``.

    ``spatial`` (paper): one ``σ × σ`` kernel over all channels, "same" padding, no bias (a constant shift cancels
    in the spatial softmax): ``σ²·D`` parameters. ``pointwise`` (code): ReLU, then a 1×1 conv with bias.

    The kernel is stored at unit scale and used times ``1 / sqrt(fan_in)`` (``fan_in = σ²·D``): an equalised
    learning rate (Karras et al., ICLR 2018, "Progressive Growing of GANs", §4.1). Under Adam every stored weight
    moves by about the learning rate per step, so a plain ``σ × σ × D`` kernel (fan-in 111 k for DINOv2-S at
    224 px) moves the logits ``sqrt(fan_in)`` times faster than the factor allows: measured on the DINOv2 asset,
    40 steps at lr 1e-3 learned a zoom that cost 6 validation MAP@R points (docs/methods.md, FRPT; the records in
    benchmarks/results/frpt-short/). The stored names (``weight``, ``bias``) differ from a plain conv's, so an
    adapter saved before the factor fails to load instead of loading with 300× too large a kernel.
    """

    def __init__(self, dim: int, kind: str, kernel: int, init: str, device=None):
        super().__init__()
        self.rectify = kind == "pointwise"
        size = 1 if self.rectify else kernel
        self.weight = nn.Parameter(torch.empty(1, dim, size, size, device=device))
        self.bias = nn.Parameter(torch.empty(1, device=device)) if self.rectify else None
        self.scale = (dim * size * size) ** -0.5
        if init == "zeros":  # uniform saliency: the identity re-sampling, so training starts from the frozen view
            nn.init.zeros_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:  # PyTorch's conv init: U(±1/sqrt(fan_in)) for the used kernel and the bias
            nn.init.uniform_(self.weight, -1.0, 1.0)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -self.scale, self.scale)

    def kernel(self) -> torch.Tensor:
        """The kernel the parser applies, ``(1, D, σ, σ)``: the stored one times ``1 / sqrt(fan_in)``."""
        return self.weight * self.scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.weight.dtype)
        if self.rectify:
            return F.conv2d(torch.relu(features), self.kernel(), self.bias)[:, 0]
        return same_conv_to_one_channel(features, self.kernel()[0])


def same_conv_to_one_channel(features: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``conv2d(features, kernel[None], padding=σ // 2)[:, 0]`` for an odd ``σ × σ`` ``kernel`` of shape ``(D, σ, σ)``.

    A large kernel with one output channel is a slow case for CPU convolutions (about 20x slower forward and
    backward at D = 384, σ = 15). Here every token is projected onto all ``σ²`` kernel offsets in one matrix
    product and ``fold`` adds the shifted maps: the same sums, in a different order.
    """
    batch, dim, height, width = features.shape
    size = kernel.shape[-1]
    # fold adds column (ky, kx) of the token at (i, j) to (i + ky - σ//2, j + kx - σ//2); conv2d reads the token at
    # (i + ky - σ//2) for output i, hence the flipped kernel
    offsets = kernel.flip(-2, -1).reshape(dim, size * size)
    columns = torch.einsum("bdl,dk->bkl", features.reshape(batch, dim, height * width), offsets)
    return F.fold(columns, (height, width), size, padding=size // 2)[:, 0]


class PixelPrompt(nn.Module, FRPTLayer):
    """DPP around the backbone's ``embeddings``: re-samples ``pixel_values`` by a learned saliency, then embeds.

    The early pass runs the *unwrapped* embeddings and the first ``parser_block`` encoder blocks (their base layers,
    with no prompts; nothing beyond them) on the original pixels, drops the prefix tokens and reads the patches as a
    ``(D, h, w)`` map. It keeps no graph unless something in it is trainable: gradients reach the parser through
    ``grid_sample``, not through the frozen early pass.
    """

    containers = {
        "parser": Container("modules", "pixel_prompt"),
        "gaussian": Container("parameters", "pixel_prompt"),  # only with train_gaussian
        "gaussian_fixed": Container("transient_buffers", "pixel_prompt"),  # rebuilt from the config, not saved
    }
    plain_dicts = ("dpp_config",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: FRPTConfig,
        spec: BackboneSpec,
        blocks: nn.ModuleList,
        model: nn.Module,
    ):
        super().__init__()
        self._init_wrapper(base_layer)
        self.spec = spec
        self._backbone = {"blocks": blocks, "model": model}  # plain dict: references, not submodules
        self.update_layer(adapter_name, config)

    def __getattr__(self, name: str):
        # The backbone reads attributes of its embeddings (e.g. ViT: patch_embeddings' dtype): forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def update_layer(self, adapter_name: str, config: FRPTConfig) -> None:
        device = self._base_device()
        self.dpp_config[adapter_name] = config
        self.frpt_parser[adapter_name] = ContentParser(
            self.spec.hidden_size, config.parser, config.parser_kernel, config.parser_init, device=device
        )
        kernel = gaussian_kernel(config.grid_size, config.resolved_gaussian_fwhm).to(device)
        for container in (self.frpt_gaussian, self.frpt_gaussian_fixed):
            if adapter_name in container:  # re-created below, trainable or not
                del container[adapter_name]
        if config.train_gaussian:
            self.frpt_gaussian[adapter_name] = nn.Parameter(kernel)
        else:
            self.frpt_gaussian_fixed[adapter_name] = kernel
        self.set_adapter(self.active_adapters)

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._running_adapter(self.dpp_config)
        if adapter is not None:
            pixel_values = self.resample(adapter, pixel_values, *args, **kwargs)
        return self.base_layer(pixel_values, *args, **kwargs)

    # -- the prompt ----------------------------------------------------------------------------------------

    def resample(self, adapter: str, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The re-sampled images ``(B, C, H, W)`` the backbone sees under this adapter."""
        saliency = self.saliency(adapter, pixel_values, *args, **kwargs)
        grid = sampling_grid(saliency, self._kernel(adapter), tuple(pixel_values.shape[-2:]))
        return resample(pixel_values, grid)

    def saliency(self, adapter: str, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The spatial-softmax saliency ``(B, g, g)`` (sums to 1 per image) on the sampling grid."""
        config = self.dpp_config[adapter]
        logits = self.frpt_parser[adapter](self.early_features(config.parser_block, pixel_values, *args, **kwargs))
        g = config.grid_size
        logits = F.interpolate(logits[:, None].float(), size=(g, g), mode="bilinear", align_corners=True)
        return logits.flatten(1).softmax(dim=1).view(-1, g, g)

    def early_features(self, num_blocks: int, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Patch tokens after ``num_blocks`` frozen blocks, as a float32 map ``(B, D, h, w)``."""
        blocks = [_unwrapped(block) for block in list(self._backbone["blocks"])[:num_blocks]]
        modules = [self.base_layer, *blocks]
        trainable = pixel_values.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            embedded = self.base_layer(pixel_values, *args, **kwargs)
            # the backbone's own steps between embeddings and block 0 (pre-norm, position embeddings, rotary tables)
            hidden, block_kwargs = self.spec.encoder_inputs(self._backbone["model"], embedded, pixel_values)
            for block in blocks:
                hidden = block(hidden, None, **block_kwargs)  # (hidden_states, attention_mask, ...) -> tensor
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        height, width = (size // self.spec.patch_size for size in pixel_values.shape[-2:])
        patches = hidden[:, self.spec.num_prefix_tokens :]
        if patches.shape[1] != height * width:
            raise RuntimeError(
                f"FRPT expected {height}x{width} patch tokens after {self.spec.num_prefix_tokens} prefix tokens, "
                f"got {patches.shape[1]}"
            )
        return patches.float().transpose(1, 2).reshape(patches.shape[0], -1, height, width)

    def _kernel(self, adapter: str) -> torch.Tensor:
        if adapter in self.frpt_gaussian:
            return self.frpt_gaussian[adapter]
        return self.frpt_gaussian_fixed[adapter]


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


# ---------------------------------------------------------------------------------------------------- CAH


class FRPTHead(EmbeddingHead, FRPTLayer):
    """The shared embedding head with CAH as its pooling and a classifier for the cross-entropy.

    ``g = CAH(final patch tokens)`` pooled (mean, or the [CLS] token mixed alike);
    ``embedding = normalize(Linear(LayerNorm(g)))`` (the shared contract); with labels,
    ``loss = proxy_loss_weight · ProxyAnchor(embedding) + ce_loss_weight · CE(Linear_C(g))``.
    Classifier and proxies are training-only (stored, not counted as inference parameters).
    """

    prefix = "frpt_"
    containers = {"cah": Container("modules", "head"), "classifier": Container("modules", "classifier")}

    def __init__(self, base_layer, adapter_name: str, config: FRPTConfig, spec: BackboneSpec, final_norm=None):
        super().__init__(base_layer, adapter_name, config, spec)
        self.num_prefix_tokens = spec.num_prefix_tokens
        self._final_norm = {"module": final_norm}  # plain dict: a reference to a backbone module

    @property
    def cah(self) -> nn.ModuleDict:
        return self.frpt_cah

    @property
    def classifier(self) -> nn.ModuleDict:
        return self.frpt_classifier

    def update_layer(self, adapter_name: str, config: FRPTConfig) -> None:
        super().update_layer(adapter_name, config)
        device = self._base_device()
        self.cah[adapter_name] = ChannelAttentionHead(
            self.hidden_size, config.cah_reduction, config.instance_norm_eps, device=device
        )
        if config.num_classes:
            self.classifier[adapter_name] = nn.Linear(self.hidden_size, config.num_classes, device=device)
        self.set_adapter(self.active_adapters)

    def collect(self, adapter: str, context: ForwardContext, out: Any) -> None:
        tokens = out[0] if isinstance(out, tuple) else out
        if self._final_norm["module"] is not None:
            tokens = self._final_norm["module"](tokens)
        context.features = self.category_feature(adapter, tokens)
        context.embeddings = self.embed(adapter, context.features)

    def category_feature(self, adapter: str, tokens: torch.Tensor) -> torch.Tensor:
        """CAH's pooled feature ``g`` ``(B, D)`` (float32) from the final normalised tokens ``(B, T, D)``."""
        cah: ChannelAttentionHead = self.cah[adapter]
        tokens = tokens.to(cah.squeeze.weight.dtype)
        patches = tokens[:, self.num_prefix_tokens :]
        if self.head_config[adapter].pooling == "cls":
            return cah(patches, extra=tokens[:, :1])[:, 0]
        return cah(patches).mean(dim=1)

    def default_loss(self, config: FRPTConfig) -> WeightedSum:
        proxy_anchor = ProxyAnchorLoss(margin=config.proxy_margin, alpha=config.proxy_alpha)
        cross_entropy = ClassifierCrossEntropy(label_smoothing=config.label_smoothing)
        return WeightedSum([(config.proxy_loss_weight, proxy_anchor), (config.ce_loss_weight, cross_entropy)])


# ---------------------------------------------------------------------------------------------------- tuner


class FRPTModel(PromptedTuner):
    """peft tuner for :class:`FRPTConfig` (created by ``get_peft_model``; not used directly)."""

    prefix = "frpt_"
    tuner_layer_cls = FRPTLayer

    def _pre_injection_hook(self, model: nn.Module, config: FRPTConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        self.layout = FRPTLayout.from_spec(self.spec)
        # A plain dict: modules set as attributes of the tuner would become its children, and peft saves those.
        self._backbone_parts = {
            "blocks": model.get_submodule(self.spec.block_list),
            "model": model,
            "final_norm": model.get_submodule(self.layout.final_norm) if self.layout.final_norm else None,
        }

    def _prepare_adapter_config(self, peft_config: FRPTConfig, model_config: dict) -> FRPTConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        # DINOv2 configs record the 518 px pre-training size; retrieval runs at 224 px (its processor's crop).
        peft_config.resolve_parser_kernel(min(self.spec.image_size, REFERENCE_IMAGE_SIZE) // self.spec.patch_size)
        if peft_config.pooling is None:  # the [CLS] head keeps CAH's instance-norm branch (config.py, pooling)
            peft_config.pooling = "cls" if self.spec.num_prefix_tokens else "mean"
        if peft_config.pooling == "cls" and self.spec.num_prefix_tokens == 0:
            raise ValueError(f"pooling='cls' needs a [CLS] token, but {self.spec.model_class} has none; use 'mean'.")
        if peft_config.cah_reduction > self.spec.hidden_size:
            raise ValueError(
                f"cah_reduction={peft_config.cah_reduction} is larger than the hidden size {self.spec.hidden_size}"
            )
        return peft_config

    def _target_paths(self) -> list[str]:
        return [self.layout.embeddings, self.layout.head]

    def _head_path(self) -> str:
        return self.layout.head  # not always the pooled-token module

    def _wrap(self, target, target_name, current_key, adapter_name, config) -> nn.Module:
        parts = self._backbone_parts
        if current_key == self.layout.embeddings:
            return PixelPrompt(target, adapter_name, config, self.spec, parts["blocks"], parts["model"])
        return FRPTHead(target, adapter_name, config, self.spec, final_norm=parts["final_norm"])

    def _check_merge_allowed(self):
        raise ValueError(
            "FRPT adapters re-sample the input pixels and add a head; they cannot be merged into the backbone "
            "weights. Use unload() to get the original backbone back, or keep the PeftModel."
        )

    # -- inspection --------------------------------------------------------------------------------------

    def _pixel_prompt(self) -> PixelPrompt:
        return self.model.get_submodule(self.layout.embeddings)

    def transformed_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """:meth:`resample_images`, in evaluation mode (no prompt dropout or sampling noise)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.resample_images(pixel_values)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def resample_images(self, pixel_values: torch.Tensor, adapter_name: str | None = None, **kwargs) -> torch.Tensor:
        """What the backbone sees: ``pixel_values`` re-sampled by the adapter's learned saliency (same shape and
        normalisation as the input). ``kwargs`` go to the embeddings (e.g. ``interpolate_pos_encoding=True``)."""
        layer = self._pixel_prompt()
        return layer.resample(adapter_name or self.active_adapters[0], pixel_values.to(layer._base_device()), **kwargs)

    @torch.no_grad()
    def saliency_maps(self, pixel_values: torch.Tensor, adapter_name: str | None = None, **kwargs) -> torch.Tensor:
        """The parser's saliency ``(B, g, g)`` on the sampling grid (each map sums to 1)."""
        layer = self._pixel_prompt()
        return layer.saliency(adapter_name or self.active_adapters[0], pixel_values.to(layer._base_device()), **kwargs)
