"""The VPT tuner: the shared prompt mechanism with VPT's initialisation and optional shared projection."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..prompted import EmbeddingHead, PromptedBlock, TokenPromptTuner
from .config import VPTConfig


class VPTBlock(PromptedBlock):
    """One encoder block with VPT's prompts (shallow: the first block only; deep: every block)."""

    prefix = "vpt_"

    def init_prompts(self, config: VPTConfig, n: int) -> torch.Tensor:
        dim = config.prompt_projection_dim or self.hidden_size
        bound = math.sqrt(6.0 / (self.patch_dim + dim))
        # Created in the block's dtype; peft upcasts adapter weights to fp32 and forward casts back.
        prompts = torch.empty(n, dim, device=self._base_device(), dtype=self._base_dtype())
        return nn.init.uniform_(prompts, -bound, bound)


class VPTHead(EmbeddingHead):
    """VPT's retrieval head: the shared :class:`EmbeddingHead` under the ``vpt_`` prefix."""

    prefix = "vpt_"


class VPTModel(TokenPromptTuner):
    """peft tuner for :class:`VPTConfig` (created by ``get_peft_model``; not used directly)."""

    prefix = "vpt_"
    block_cls = VPTBlock
    head_cls = VPTHead

    def _link_shared_modules(self, adapter_name: str) -> None:
        # VPT's optional projection is one Linear shared by all layers: the first prompted layer owns it.
        config: VPTConfig = self.peft_config[adapter_name]
        blocks = [m for m in self.model.modules() if isinstance(m, VPTBlock) and adapter_name in m.prompts]
        if not config.prompt_projection_dim or not blocks:
            return
        owner = blocks[0]
        if adapter_name not in owner.prompt_projections:
            proj = nn.Linear(config.prompt_projection_dim, config.backbone_hidden_size, device=owner._base_device())
            nn.init.kaiming_normal_(proj.weight, mode="fan_out")
            nn.init.zeros_(proj.bias)
            owner.prompt_projections[adapter_name] = proj
            owner.set_adapter(owner.active_adapters)
        for block in blocks:
            block.shared_projection[adapter_name] = owner.prompt_projections[adapter_name]
