"""The VPTSP-G tuner: shared deep prompts + BitFit for the sample embedding, a label-driven proxy branch for training.

Where the state lives (all in the wrappers, so transformers' ``load_adapter`` works too):

* each block: ``vptsp_prompt`` (shared prompts ``(n_i, D)``), ``vptsp_class_prompt`` (an ``nn.Embedding`` of
  ``C`` rows of ``m_i * D``: looked up by label, sparse gradients), ``vptsp_bitfit`` (the block's bias deltas),
  block 0 also ``vptsp_patch_bias`` (the patch-embedding bias delta, added to the patch tokens it receives) and,
  for CLIP, ``vptsp_norm_bias`` (the delta of ``pre_layrnorm``'s bias);
* the head (the final-norm wrapper): the sample head (``vptsp_head_norm`` / ``vptsp_head_proj``), the proxy
  head (``vptsp_semantic_head_norm`` / ``..._proj``), the integration cell ``vptsp_semantic_gru``, the proxy bias
  ``vptsp_proxies`` ``(C, E)``, the final norm's bias delta and the running semantic proxies
  ``vptsp_semantic_proxies`` (a persistent buffer: state, not a parameter); for SigLIP, ``vptsp_norm_bias`` (the
  delta of ``post_layernorm``'s bias, which sits between the last block and the wrapped pooling head).

Two passes per training step. ``model(pixel_values, labels)`` runs the sample branch as any prompt_peft model;
the head declares one extra branch, ``"proxy"`` (:meth:`SemanticProxyHead.extra_branches`), which the tuner's
forward hook runs with the same inputs under a context of that branch: the blocks insert the class prompts of
the labels and the head puts the semantic candidates into the context. The loss object
(:class:`~.proxies.SemanticProxyAnchorLoss`) folds the candidates into the semantic proxies of the batch's classes
and computes Proxy-Anchor against the mixed proxies. No collective runs inside ``model(...)``: the training step
(:func:`prompt_peft.training.training_step`) gathers the loss inputs, candidates included, between the forward
and the loss.
Evaluation mode and calls without labels run the sample branch only.

BitFit without touching the backbone: trained biases are per-adapter *deltas* (zero at init) that the wrappers
add through ``torch.func.functional_call`` while the adapter is active, so ``disable_adapter()`` and ``unload()``
run the untouched pretrained biases, and the deltas are ordinary adapter parameters (saved, loaded, counted).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...distributed import sparse_gradients_supported
from ..context import ForwardContext
from ..prompted import Container, EmbeddingHead, PromptedBlock, TokenPromptTuner
from .config import SemanticProxyVPTConfig
from .proxies import SemanticGRUCell, SemanticProxyAnchorLoss, integrate_ema, integrate_gru

PREFIX = "vptsp_"


class BiasDelta(nn.Module):
    """Trainable deltas for every ``bias`` of a frozen module, stored as one flat vector (zero at init)."""

    def __init__(self, module: nn.Module, device=None):
        super().__init__()
        self.names = bias_names(module)
        self.shapes = [module.get_parameter(n).shape for n in self.names]
        total = sum(math.prod(s) for s in self.shapes)
        self.delta = nn.Parameter(torch.zeros(total, device=device))

    def run(self, module: nn.Module, *args: Any, **kwargs: Any):
        """``module(*args, **kwargs)`` with every bias replaced by ``bias + delta``."""
        if getattr(module, "gradient_checkpointing", False) and module.training:
            # transformers checkpoints inside the block's forward, so its backward replay would run after
            # functional_call has put the plain biases back: checkpoint around the overrides instead, with the
            # model's own checkpoint function (delta passed as an input, as reentrant checkpointing needs)
            def replayable(delta: torch.Tensor, *inputs: Any):
                module.gradient_checkpointing = False
                try:
                    return self._call(module, delta, inputs, kwargs)
                finally:
                    module.gradient_checkpointing = True

            return module._gradient_checkpointing_func(replayable, self.delta, *args)
        return self._call(module, self.delta, args, kwargs)

    def _call(self, module: nn.Module, delta: torch.Tensor, args: tuple, kwargs: dict):
        overrides, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            original = module.get_parameter(name)
            size = math.prod(shape)
            overrides[name] = original + delta[start : start + size].view(shape).to(original.dtype)
            start += size
        return functional_call(module, overrides, args, kwargs)


class NormBiasDelta(nn.Module):
    """The trainable delta of the bias of a LayerNorm that no wrapper runs (CLIP's ``pre_layrnorm`` before block 0,
    SigLIP's ``post_layernorm`` before the pooling head): added to that norm's output, which is exactly
    ``LayerNorm`` with ``bias + delta``."""

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta.to(x.dtype)


def bias_names(module: nn.Module) -> list[str]:
    # "bias", and nn.MultiheadAttention's "in_proj_bias" (SigLIP's pooling head)
    return [name for name, _ in module.named_parameters() if name.rsplit(".", 1)[-1].endswith("bias")]


def _run(bitfit: nn.ModuleDict, adapter: str, module: nn.Module, *args: Any, **kwargs: Any):
    if adapter in bitfit:
        return bitfit[adapter].run(module, *args, **kwargs)
    return module(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------- block


class SemanticProxyBlock(PromptedBlock):
    """One encoder block: shared prompts (sample branch) or the class prompts of the labels (proxy branch)."""

    prefix = PREFIX
    recomputable = False  # the prompts depend on the call's branch and labels
    containers = {
        "patch_bias": Container("parameters", "bias_delta"),
        "class_prompt": Container("modules", "class_prompt"),
        "bitfit": Container("modules", "bias_delta"),
        "norm_bias": Container("modules", "bias_delta"),
    }
    plain_dicts = ("vptsp_config",)

    def create_adapter_tensors(self, adapter_name: str, config: SemanticProxyVPTConfig, step) -> None:
        super().create_adapter_tensors(adapter_name, config, step)
        self.vptsp_config[adapter_name] = config
        device, dim = self._base_device(), self.hidden_size
        m = config.class_prompt_counts(self.num_layers)[self.index]
        if m and config.num_classes:
            table = nn.Embedding(config.num_classes, m * dim, sparse=config.sparse_class_prompts, device=device)
            # xavier-normal of the code's (C, m, D) tensor: fan_in = m * D, fan_out = C * D
            std = math.sqrt(2.0 / ((config.num_class_prompts + config.num_classes) * dim))
            nn.init.normal_(table.weight, std=std)
            self.vptsp_class_prompt[adapter_name] = table
        if config.bitfit:
            self.vptsp_bitfit[adapter_name] = BiasDelta(self.base_layer, device=device)
            if self.index == 0 and self.spec.patch_bias:
                self.vptsp_patch_bias[adapter_name] = nn.Parameter(torch.zeros(dim, device=device))
            if self.index == 0 and self.spec.unwrapped_norm == "before_blocks":
                self.vptsp_norm_bias[adapter_name] = NormBiasDelta(dim, device=device)

    def init_prompts(self, config: SemanticProxyVPTConfig, n: int) -> torch.Tensor:
        # The code's xavier-normal on the allocated (1, N, D): std = sqrt(2 / ((N + 1) D)), whatever n_i.
        std = math.sqrt(2.0 / ((config.num_prompts + 1) * self.hidden_size))
        return torch.randn(n, self.hidden_size, device=self._base_device()) * std

    def before_block(self, adapter: str, context: ForwardContext, hidden_states: torch.Tensor) -> torch.Tensor:
        if adapter in self.vptsp_patch_bias:  # block 0 sees the embeddings: patch tokens after the prefix
            prefix = self.spec.num_prefix_tokens
            delta = self.vptsp_patch_bias[adapter].to(hidden_states.dtype)
            hidden_states = torch.cat([hidden_states[:, :prefix], hidden_states[:, prefix:] + delta], dim=1)
        if adapter in self.vptsp_norm_bias:
            hidden_states = self.vptsp_norm_bias[adapter](hidden_states)
        return hidden_states

    def make_prompts(self, adapter: str, context: ForwardContext, hidden_states: torch.Tensor):
        """``(B, k, D)`` prompts of the running branch, or None when this block has none: the shared prompts, and
        in the proxy branch the class prompts of the labels (instead of the shared ones when ``class_only``)."""
        batch, dtype = hidden_states.shape[0], hidden_states.dtype
        proxy_branch = context.branch == "proxy"
        parts = []
        shared = self.prompts.get(adapter)
        if shared is not None and (not proxy_branch or self.vptsp_config[adapter].class_prompt_mode != "class_only"):
            parts.append(shared.to(dtype).unsqueeze(0).expand(batch, -1, -1))
        if proxy_branch and adapter in self.vptsp_class_prompt:
            table = self.vptsp_class_prompt[adapter]
            # only these rows get a gradient; sparse where the process group can all-reduce it (not NCCL)
            rows = F.embedding(context.labels, table.weight, sparse=table.sparse and sparse_gradients_supported())
            parts.append(rows.view(batch, -1, self.hidden_size).to(dtype))
        return torch.cat(parts, dim=1) if parts else None

    def run_block(self, adapter: str, context: ForwardContext, hidden_states: torch.Tensor, *args, **kwargs):
        return _run(self.vptsp_bitfit, adapter, self.base_layer, hidden_states, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------- head


class SemanticProxyHead(EmbeddingHead):
    """The final-norm wrapper: sample embedding, and in the proxy branch the semantic candidates."""

    prefix = PREFIX
    containers = {
        "semantic_head_norm": Container("modules", "proxy_head"),
        "semantic_head_proj": Container("modules", "proxy_head"),
        "semantic_gru": Container("modules", "proxy_head"),
        "bitfit": Container("modules", "bias_delta"),
        "norm_bias": Container("modules", "bias_delta"),
        "semantic_proxies": Container("buffers", "training_state"),
    }

    def update_layer(self, adapter_name: str, config: SemanticProxyVPTConfig) -> None:
        super().update_layer(adapter_name, config)
        device, dim, emb = self._base_device(), self.hidden_size, config.embedding_dim
        _xavier_head(self.head_proj[adapter_name])
        if config.bitfit:
            self.vptsp_bitfit[adapter_name] = BiasDelta(self.base_layer, device=device)
            # e.g. SigLIP's pooling head reads post_layernorm's output (without the head this wrapper is that norm)
            if self.spec.unwrapped_norm == "before_head":
                self.vptsp_norm_bias[adapter_name] = NormBiasDelta(dim, device=device)
        if config.num_classes:
            with torch.no_grad():  # the code: xavier-uniform, then / 8
                self.proxies[adapter_name].copy_(nn.init.xavier_uniform_(torch.empty(config.num_classes, emb)) / 8)
            self.vptsp_semantic_head_norm[adapter_name] = nn.LayerNorm(dim, device=device)
            self.vptsp_semantic_head_proj[adapter_name] = _xavier_head(nn.Linear(dim, emb, device=device))
            if config.integration == "gru":
                self.vptsp_semantic_gru[adapter_name] = SemanticGRUCell(emb, device=device)
            start = F.normalize(nn.init.xavier_uniform_(torch.empty(config.num_classes, emb)), dim=-1)
            self.vptsp_semantic_proxies[adapter_name] = start.to(device)
        self.set_adapter(self.active_adapters)

    def run_head(self, adapter: str, context: ForwardContext, x: torch.Tensor, *args: Any, **kwargs: Any):
        if adapter in self.vptsp_norm_bias:
            x = self.vptsp_norm_bias[adapter](x)
        return _run(self.vptsp_bitfit, adapter, self.base_layer, x, *args, **kwargs)

    def collect(self, adapter: str, context: ForwardContext, out: torch.Tensor) -> None:
        if context.branch == "proxy":
            context.candidates = self.semantic_candidates(adapter, self.pooled(out))
        else:
            context.embeddings = self.embed(adapter, self.pooled(out))

    def semantic_candidates(self, adapter: str, pooled: torch.Tensor) -> torch.Tensor:
        """The proxy branch's per-sample candidates ``q = normalize(Linear'(LayerNorm'(pooled)))``."""
        norm = self.vptsp_semantic_head_norm[adapter]
        return F.normalize(self.vptsp_semantic_head_proj[adapter](norm(pooled.to(norm.weight.dtype))), dim=-1)

    # -- the proxy branch and the loss -----------------------------------------------------------------------

    def extra_branches(self, adapter: str, labels: torch.Tensor) -> tuple[str, ...]:
        # evaluation: the loss uses the current proxies, nothing is updated
        return ("proxy",) if self.training and adapter in self.vptsp_semantic_head_proj else ()

    def default_loss(self, config: SemanticProxyVPTConfig) -> SemanticProxyAnchorLoss:
        return SemanticProxyAnchorLoss(
            margin=config.proxy_margin,
            alpha=config.proxy_alpha,
            positive_normalisation=config.positive_normalisation,
            proxy_bias_ratio=config.proxy_bias_ratio,
            center_proxies=config.center_proxies,
        )

    def semantic_proxies(self, adapter: str) -> torch.Tensor:
        return self.vptsp_semantic_proxies[adapter]

    def update_semantic_proxies(self, adapter: str, candidates: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fold the batch's candidates into the running proxies; returns the new table (in the graph of this step)
        and stores it detached (no gradient flows between steps)."""
        config: SemanticProxyVPTConfig = self.head_config[adapter]
        previous = self.vptsp_semantic_proxies[adapter]
        if config.integration == "gru":
            updated = integrate_gru(
                self.vptsp_semantic_gru[adapter],
                previous,
                candidates,
                labels,
                dropout=config.integration_dropout,
                training=self.training,
            )
        else:
            updated = integrate_ema(previous, candidates, labels, config.ema_keep)
        with torch.no_grad():
            previous.copy_(updated)  # in place: the buffer object stays the one DDP / checkpoints know
        return updated


def _xavier_head(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


# ---------------------------------------------------------------------------------------------------- tuner


class SemanticProxyVPTModel(TokenPromptTuner):
    """peft tuner for :class:`SemanticProxyVPTConfig` (created by ``get_peft_model``; not used directly)."""

    prefix = PREFIX
    block_cls = SemanticProxyBlock
    head_cls = SemanticProxyHead
