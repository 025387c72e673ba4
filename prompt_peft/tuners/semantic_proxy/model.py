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
the tuner's output hook then calls :meth:`SemanticProxyHead.extra_pass`, which runs the backbone's ``forward``
again with the same inputs while the block wrappers insert the class prompts of ``labels`` (a per-forward
context set on the wrappers and cleared in ``finally``); the head's proxy branch yields the candidates, the
integration cell updates the semantic proxies of the batch's classes, and the loss is Proxy-Anchor against the
mixed proxies. Evaluation mode and calls without labels run the sample branch only.

BitFit without touching the backbone: trained biases are per-adapter *deltas* (zero at init) that the wrappers
add through ``torch.func.functional_call`` while the adapter is active, so ``disable_adapter()`` and ``unload()``
run the untouched pretrained biases, and the deltas are ordinary adapter parameters (saved, loaded, counted).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...distributed import gather_across_processes, sparse_gradients_supported
from ...losses import proxy_anchor_loss
from ..prompted import _BLOCKS_PATH_ATTR, EmbeddingHead, PromptedBlock, PromptedTuner, _refuse_attention_mask
from .config import SemanticProxyVPTConfig
from .proxies import SemanticGRUCell, integrate_ema, integrate_gru, mix_proxies

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


# Family -> where a backbone LayerNorm sits outside every wrapped module, so BitFit covers it with a NormBiasDelta.
UNWRAPPED_NORM = {"clip": "before_blocks", "siglip": "before_head"}


def bias_names(module: nn.Module) -> list[str]:
    # "bias", and nn.MultiheadAttention's "in_proj_bias" (SigLIP's pooling head)
    return [name for name, _ in module.named_parameters() if name.rsplit(".", 1)[-1].endswith("bias")]


def _run(bitfit: nn.ModuleDict, adapter: str, module: nn.Module, *args: Any, **kwargs: Any):
    if adapter in bitfit:
        return bitfit[adapter].run(module, *args, **kwargs)
    return module(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------- block


class SemanticProxyBlock(PromptedBlock):
    """One encoder block: shared prompts (sample branch) or the class prompts of ``labels`` (proxy branch)."""

    prefix = PREFIX
    extra_adapter_layers = ("patch_bias",)
    extra_adapter_modules = ("class_prompt", "bitfit", "norm_bias")
    extra_other_param_names = ("vptsp_config",)
    training_only_suffixes = ("class_prompt",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._proxy_labels: torch.Tensor | None = None  # set only during the proxy branch's pass

    def update_layer(self, adapter_name: str, config: SemanticProxyVPTConfig) -> None:
        super().update_layer(adapter_name, config)
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
            if self.index == 0 and self.spec.family != "clip":  # CLIP's patch conv has no bias
                self.vptsp_patch_bias[adapter_name] = nn.Parameter(torch.zeros(dim, device=device))
            if self.index == 0 and UNWRAPPED_NORM.get(self.spec.family) == "before_blocks":
                self.vptsp_norm_bias[adapter_name] = NormBiasDelta(dim, device=device)
        self.set_adapter(self.active_adapters)

    def init_prompts(self, config: SemanticProxyVPTConfig, n: int) -> torch.Tensor:
        # The code's xavier-normal on the allocated (1, N, D): std = sqrt(2 / ((N + 1) D)), whatever n_i.
        std = math.sqrt(2.0 / ((config.num_prompts + 1) * self.hidden_size))
        return torch.randn(n, self.hidden_size, device=self._base_device()) * std

    def branch_prompts(self, adapter: str, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """``(B, k, D)`` prompts of the running branch, or None when this block has none."""
        parts = []
        labels = self._proxy_labels
        shared = self.prompts.get(adapter)
        if shared is not None and (labels is None or self.vptsp_config[adapter].class_prompt_mode != "class_only"):
            parts.append(shared.to(dtype).unsqueeze(0).expand(batch, -1, -1))
        if labels is not None and adapter in self.vptsp_class_prompt:
            table = self.vptsp_class_prompt[adapter]
            # only these rows get a gradient; sparse where the process group can all-reduce it (not NCCL)
            rows = F.embedding(labels, table.weight, sparse=table.sparse and sparse_gradients_supported())
            parts.append(rows.view(batch, -1, self.hidden_size).to(dtype))
        return torch.cat(parts, dim=1) if parts else None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._running_adapter(self.prompt_step)
        if adapter is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        _refuse_attention_mask(args, kwargs)
        if adapter in self.vptsp_patch_bias:  # block 0 sees the embeddings: patch tokens after the prefix
            prefix = self.spec.num_prefix_tokens
            delta = self.vptsp_patch_bias[adapter].to(hidden_states.dtype)
            hidden_states = torch.cat([hidden_states[:, :prefix], hidden_states[:, prefix:] + delta], dim=1)
        if adapter in self.vptsp_norm_bias:
            hidden_states = self.vptsp_norm_bias[adapter](hidden_states)
        prompts = self.branch_prompts(adapter, hidden_states.shape[0], hidden_states.dtype)
        if prompts is not None:
            hidden_states = torch.cat([hidden_states, prompts], dim=1)
        out = _run(self.vptsp_bitfit, adapter, self.base_layer, hidden_states, *args, **kwargs)
        return out[:, : -prompts.shape[1]] if prompts is not None else out


# ---------------------------------------------------------------------------------------------------- head


class SemanticProxyHead(EmbeddingHead):
    """The final-norm wrapper: sample embedding, and in the proxy branch the semantic candidates and the loss."""

    prefix = PREFIX
    extra_adapter_layers = ("semantic_head_norm", "semantic_head_proj", "semantic_gru", "bitfit", "norm_bias")
    extra_buffers = ("semantic_proxies",)
    training_only_suffixes = ("proxies", "semantic_head_norm", "semantic_head_proj", "semantic_gru")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._proxy_labels: torch.Tensor | None = None  # set only during the proxy branch's pass
        self._candidates: torch.Tensor | None = None

    def update_layer(self, adapter_name: str, config: SemanticProxyVPTConfig) -> None:
        super().update_layer(adapter_name, config)
        device, dim, emb = self._base_device(), self.hidden_size, config.embedding_dim
        _xavier_head(self.head_proj[adapter_name])
        if config.bitfit:
            self.vptsp_bitfit[adapter_name] = BiasDelta(self.base_layer, device=device)
            # SigLIP's pooling head reads post_layernorm's output (with use_head=False this wrapper *is* that norm)
            if UNWRAPPED_NORM.get(self.spec.family) == "before_head" and self.spec.pool_module.endswith("head"):
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

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.running_adapter()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        if adapter in self.vptsp_norm_bias:
            x = self.vptsp_norm_bias[adapter](x)
        out = _run(self.vptsp_bitfit, adapter, self.base_layer, x, *args, **kwargs)
        pooled = self.pooled(out)
        if self._proxy_labels is not None:
            self._candidates = self.semantic_candidates(adapter, pooled)
        else:
            self._embeddings = self.embed(adapter, pooled)
        return out

    def semantic_candidates(self, adapter: str, pooled: torch.Tensor) -> torch.Tensor:
        """The proxy branch's per-sample candidates ``q = normalize(Linear'(LayerNorm'(pooled)))``."""
        norm = self.vptsp_semantic_head_norm[adapter]
        return F.normalize(self.vptsp_semantic_head_proj[adapter](norm(pooled.to(norm.weight.dtype))), dim=-1)

    # -- the proxy branch ---------------------------------------------------------------------------------

    def extra_pass(self, model: nn.Module, args: tuple, kwargs: dict, labels: torch.Tensor) -> None:
        adapter = self.running_adapter()
        if not self.training or adapter not in self.vptsp_semantic_head_proj:
            return  # evaluation: the loss uses the current proxies, nothing is updated
        blocks = [
            b for b in model.get_submodule(getattr(model, _BLOCKS_PATH_ATTR)) if isinstance(b, SemanticProxyBlock)
        ]
        with _proxy_branch([*blocks, self], labels.to(self._base_device())):
            model.forward(*args, **kwargs)

    def take_embeddings(self) -> torch.Tensor | None:
        if self._labels is None:
            self._candidates = None
        return super().take_embeddings()

    def loss(self, adapter: str, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        config: SemanticProxyVPTConfig = self.head_config[adapter]
        candidates, self._candidates = self._candidates, None
        semantic = self.vptsp_semantic_proxies[adapter]
        if candidates is not None:
            # Under DDP every process folds in the whole global batch, so the tables stay identical everywhere.
            all_labels = gather_across_processes(labels.to(candidates.device))
            semantic = self.update_semantic_proxies(adapter, gather_across_processes(candidates), all_labels)
        return proxy_anchor_loss(
            embeddings,
            labels,
            self.loss_proxies(adapter, semantic),
            margin=config.proxy_margin,
            alpha=config.proxy_alpha,
            positive_normalisation=config.positive_normalisation,
        )

    def loss_proxies(self, adapter: str, semantic: torch.Tensor | None = None) -> torch.Tensor | None:
        """The mixed proxies (Eq. 8) ``proxy_bias_ratio · proxy_bias + (1 - ratio) · semantic``, minus their mean
        over classes when ``center_proxies``; ``semantic`` defaults to the stored running proxies."""
        if adapter not in self.proxies:
            return None
        config: SemanticProxyVPTConfig = self.head_config[adapter]
        semantic = self.vptsp_semantic_proxies[adapter] if semantic is None else semantic
        proxies = mix_proxies(self.proxies[adapter], semantic, config.proxy_bias_ratio)
        # the class-independent part carries no class information; only the negative term would act on it
        return proxies - proxies.mean(dim=0, keepdim=True) if config.center_proxies else proxies

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


@contextlib.contextmanager
def _proxy_branch(modules: list, labels: torch.Tensor):
    for module in modules:
        module._proxy_labels = labels
    try:
        yield
    finally:
        for module in modules:
            module._proxy_labels = None


def _xavier_head(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


# ---------------------------------------------------------------------------------------------------- tuner


class SemanticProxyVPTModel(PromptedTuner):
    """peft tuner for :class:`SemanticProxyVPTConfig` (created by ``get_peft_model``; not used directly)."""

    prefix = PREFIX
    block_cls = SemanticProxyBlock
    head_cls = SemanticProxyHead

    def inference_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The model's state without the training-only parts (class prompts, proxy head, GRU, proxy bias, running
        proxies): ``model.save_pretrained(path, state_dict=model.base_model.inference_state_dict())`` writes an
        adapter for retrieval only (loading it warns about the missing training-only keys)."""
        adapter_name = adapter_name or self.active_adapters[0]
        dropped = (
            "class_prompt",
            "semantic_head_norm",
            "semantic_head_proj",
            "semantic_gru",
            "proxies",
            "semantic_proxies",
        )
        state = self.model.state_dict(prefix="base_model.model.")  # the keys PeftModel.state_dict() has
        return {k: v for k, v in state.items() if not any(f"{PREFIX}{name}.{adapter_name}" in k for name in dropped)}
