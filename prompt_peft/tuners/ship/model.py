"""The SHIP tuner: the shared prompt mechanism with semantic levels, attribute prompts, decoupled attention and
the prompt matching loss (docs/methods.md, SHIP).

Where the parameters live (all in block wrappers, so transformers' ``load_adapter`` works too):

* ``ship_prompt`` — the level prompt ``(K, D)``, on the first block of each level;
* ``ship_shared_prompt`` — the shared prompt ``(S, D)``, on block 0;
* ``ship_attribute_prompt`` — the learned part ``(A, D)`` of an attribute prompt, on the block that builds it;
* ``ship_prototypes`` — the k-means bank ``(k, D)``, a buffer on the first attribute block (saved, not trained);
* ``ship_matching_steps`` — the warm-up counter, a buffer on the last block (only with a warm-up).

Blocks that use another block's tensors hold a :class:`Links` record to the owning containers (looked up by
adapter name at every forward, so peft's dtype casts, which replace parameters, stay visible).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..context import ForwardContext
from ..prompted import Container, EmbeddingHead, PromptedBlock, PromptedLayer, PromptStep, TokenPromptTuner
from . import attention as ship_attention
from .config import LayerPlan, SHIPConfig, check_levels
from .hierarchy import SemanticHierarchy, fit_hierarchy

_UNFITTED = (
    "This SHIP adapter has no semantic levels yet: call model.fit_hierarchy(train_loader) (or give "
    "SHIPConfig(levels=[...])) before running it."
)


@dataclass
class Links:
    """Containers of other blocks a SHIP block reads for one adapter."""

    shared: nn.ParameterDict  # block 0's shared prompt
    level: nn.ParameterDict  # the level prompt of this block's level
    prototypes: Optional[nn.Module]  # the prototype bank (a BufferDict), if the adapter has attribute prompts


class SHIPBlock(PromptedBlock):
    """One encoder block with SHIP's shared and attribute (prototype-matched) prompts."""

    prefix = "ship_"
    recomputable = False  # the attribute prompts read the previous block's scores of this call
    containers = {
        "shared_prompt": Container("parameters", "prompt"),
        "attribute_prompt": Container("parameters", "prompt"),
        "prototypes": Container("buffers", "state"),
        "matching_steps": Container("buffers", "training_state"),
    }
    plain_dicts = ("ship_plan", "ship_config", "ship_links", "ship_bank_ready")

    # -- containers -----------------------------------------------------------------------------------------

    @property
    def shared_prompts(self) -> nn.ParameterDict:
        return self.ship_shared_prompt

    @property
    def attribute_prompts(self) -> nn.ParameterDict:
        return self.ship_attribute_prompt

    def create_adapter_tensors(self, adapter_name: str, config: SHIPConfig, step: PromptStep) -> None:
        """(Re)create this block's tensors for ``adapter_name`` from the config's plan (nothing until fitted)."""
        plans = config.layer_plans(self.num_layers)
        plan = plans[self.index] if plans is not None else None
        self.ship_plan[adapter_name] = plan
        self.ship_config[adapter_name] = config
        D = self.hidden_size
        K, S, A = config.level_prompt_tokens, config.shared_prompt_tokens, config.attribute_prompt_tokens
        fitted = plan is not None
        # The official initialisations as explicit bounds (docs/methods.md, SHIP): xavier_uniform on (1, K, D),
        # kaiming_uniform on (S, D) and on (n_a, A, D).
        level = fitted and plan.level_start
        shared = fitted and self.index == 0 and S > 0
        attribute = fitted and plan.attribute is not None
        _put(self.prompts, adapter_name, self._uniform(K, math.sqrt(6 / ((K + 1) * D))) if level else None)
        _put(self.shared_prompts, adapter_name, self._uniform(S, math.sqrt(6 / D)) if shared else None)
        _put(self.attribute_prompts, adapter_name, self._uniform(A, math.sqrt(6 / (A * D))) if attribute else None)
        owns_bank = fitted and plan.attribute == 0
        bank = self.ship_prototypes
        if owns_bank and (adapter_name not in bank or bank[adapter_name].shape != (config.num_prototypes, D)):
            # NaN until fit_hierarchy / apply_hierarchy or a loaded adapter file fills it.
            bank[adapter_name] = torch.full((config.num_prototypes, D), float("nan"), device=self._base_device())
            self.ship_bank_ready.pop(adapter_name, None)
        elif not owns_bank and adapter_name in bank:
            del bank[adapter_name]
        counts_steps = fitted and plan.last and config.matching_loss_warmup_steps > 0
        if counts_steps and adapter_name not in self.ship_matching_steps:
            self.ship_matching_steps[adapter_name] = torch.zeros((), dtype=torch.long, device=self._base_device())
        elif not counts_steps and adapter_name in self.ship_matching_steps:
            del self.ship_matching_steps[adapter_name]

    def _uniform(self, n: int, bound: float) -> nn.Parameter:
        # float32 like the embedding head; forward casts to the hidden dtype.
        prompt = torch.empty(n, self.hidden_size, device=self._base_device())
        return nn.Parameter(nn.init.uniform_(prompt, -bound, bound))

    # -- the template's steps ---------------------------------------------------------------------------------

    def _plan(self, adapter: str) -> LayerPlan:
        plan: Optional[LayerPlan] = self.ship_plan[adapter]
        if plan is None:
            raise RuntimeError(_UNFITTED)
        return plan

    def _num_image(self, plan: LayerPlan, num_tokens: int, after_new: bool) -> int:
        # tokens = image + (carried - drop) [+ new]: drop has run before make_prompts
        return num_tokens - (plan.carried - plan.step.drop) - (plan.step.new if after_new else 0)

    def make_prompts(self, adapter: str, context: ForwardContext, hidden_states: torch.Tensor):
        """``[attribute? | level? | shared]`` for this block, ``(B, new, D)`` in the hidden dtype."""
        plan = self._plan(adapter)
        if not plan.step.new:
            return None
        config: SHIPConfig = self.ship_config[adapter]
        links: Links = self.ship_links[adapter]
        image = hidden_states[:, : self._num_image(plan, hidden_states.shape[1], after_new=False)]
        batch, dtype = image.shape[0], image.dtype
        parts = []
        if plan.attribute is not None:
            scores = context.scores.pop(self.index - 1, None)
            if scores is None:
                raise RuntimeError(
                    "SHIP's attribute prompt needs the previous block's [CLS] scores of this forward: call the whole "
                    "model, not one block on its own."
                )
            parts.append(self._attribute_prompt(adapter, config, links, image, scores))
        if plan.insert_level:
            parts.append(links.level[adapter].expand(batch, -1, -1))
        if config.shared_prompt_tokens:
            parts.append(links.shared[adapter].expand(batch, -1, -1))
        fresh = torch.cat([part.to(dtype) for part in parts], dim=1)
        return F.dropout(fresh, p=self.prompt_dropout[adapter], training=self.training)

    def run_block(self, adapter: str, context: ForwardContext, hidden_states: torch.Tensor, *args, **kwargs):
        """The block with SHIP's decoupled attention; leaves the [CLS] scores for the next block and, in the last
        block, the prompt matching loss in the context."""
        plan = self._plan(adapter)
        config: SHIPConfig = self.ship_config[adapter]
        num_image = self._num_image(plan, hidden_states.shape[1], after_new=True)
        call = ship_attention.DecoupledCall(
            num_image_tokens=num_image,
            weight=config.decoupled_weight,
            prompts_query=plan.prompts_query,
            query_token=0 if self.spec.num_prefix_tokens else None,  # no [CLS] (SigLIP): the mean image query
        )
        out = ship_attention.run_block(self.base_layer, hidden_states, args, kwargs, call)
        if not call.ran:
            raise RuntimeError(
                "SHIP's decoupled attention did not run: the backbone's attention implementation was changed after "
                f"the adapter was added (config._attn_implementation={self._attention_implementation()!r}). Keep the "
                "implementation SHIP set, or re-create the adapter."
            )
        if plan.keep_scores:
            context.scores[self.index] = call.scores
        if plan.last:
            matching = self._matching_loss(adapter, config, out, num_image, call.scores)
            if matching is not None:
                context.auxiliary.append(matching)
        return out

    def _attention_implementation(self) -> Optional[str]:
        attention = ship_attention.find_attention(self.base_layer)
        return getattr(getattr(attention, "config", None), "_attn_implementation", None)

    def _attribute_prompt(self, adapter, config: SHIPConfig, links: Links, image, scores) -> torch.Tensor:
        """Eq. (4): ``mix · softmax(cos(z, bank)) @ bank + (1 - mix) · learned``, ``z`` the top-A scored tokens."""
        bank = links.prototypes[adapter]
        if not self.ship_bank_ready.get(adapter):  # checked once: a filled bank is never emptied again
            if torch.isnan(bank).any():
                raise RuntimeError(
                    "This SHIP adapter's attribute prototypes are not fitted: call model.fit_hierarchy(train_loader) "
                    "(or model.apply_hierarchy(hierarchy)) before running it."
                )
            self.ship_bank_ready[adapter] = True
        tokens = _top_tokens(image, scores, config.attribute_prompt_tokens, "attribute_prompt_tokens").float()
        similarity = F.normalize(tokens, dim=-1) @ F.normalize(bank.float(), dim=-1).T  # (B, A, k)
        pattern = similarity.softmax(dim=-1) @ bank.float()
        learned = self.attribute_prompts[adapter].float()
        return config.attribute_mix * pattern + (1 - config.attribute_mix) * learned

    def _matching_loss(self, adapter, config: SHIPConfig, out, num_image, scores) -> Optional[torch.Tensor]:
        """Eq. (5), weighted: mean over prompts of ``min_j (1 - cos(prompt, z_j))`` over the top-k scored tokens."""
        if not self.training or config.matching_loss_weight == 0 or out.shape[1] == num_image:
            return None
        if adapter in self.ship_matching_steps:
            steps = self.ship_matching_steps[adapter]
            steps += 1
            if steps.item() <= config.matching_loss_warmup_steps:
                return None
        targets = _top_tokens(out[:, :num_image], scores, config.matching_topk, "matching_topk").float()
        prompts = out[:, num_image:].float()
        cosine = F.normalize(prompts, dim=-1) @ F.normalize(targets, dim=-1).transpose(1, 2)  # (B, N_p, k)
        return config.matching_loss_weight * (1 - cosine).min(dim=-1).values.mean()


def _top_tokens(tokens: torch.Tensor, scores: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """The ``k`` tokens with the highest scores, per image: ``(B, T, D), (B, T) -> (B, k, D)``."""
    if k > tokens.shape[1]:
        raise ValueError(f"{name}={k} is more than the {tokens.shape[1]} image tokens of this input")
    index = scores.topk(k, dim=-1).indices.to(tokens.device)
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _put(container: nn.ParameterDict, adapter: str, value: Optional[nn.Parameter]) -> None:
    if value is not None:
        container[adapter] = value
    elif adapter in container:
        del container[adapter]


class SHIPHead(EmbeddingHead):
    """SHIP's retrieval head: the shared :class:`EmbeddingHead` under the ``ship_`` prefix."""

    prefix = "ship_"


class SHIPModel(TokenPromptTuner):
    """peft tuner for :class:`SHIPConfig` (created by ``get_peft_model``; not used directly).

    Besides peft's API it offers :meth:`fit_hierarchy` and :meth:`apply_hierarchy`, reachable from the
    ``PeftModel`` (``model.fit_hierarchy(train_loader)``).
    """

    prefix = "ship_"
    block_cls = SHIPBlock
    head_cls = SHIPHead

    def _pre_injection_hook(self, model: nn.Module, config: SHIPConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        ship_attention.install(model, self._base_blocks(), self.spec.hidden_size)

    def _blocks(self) -> list[nn.Module]:
        return list(self.model.get_submodule(self.spec.block_list))

    def _base_blocks(self) -> list[nn.Module]:
        return [b.get_base_layer() if isinstance(b, PromptedLayer) else b for b in self._blocks()]

    def _link_shared_modules(self, adapter_name: str) -> None:
        config: SHIPConfig = self.peft_config[adapter_name]
        blocks = self._blocks()
        plans = config.layer_plans(len(blocks))
        bank_owner = None
        if plans is not None:
            bank_owner = next((b for b, p in zip(blocks, plans) if p.attribute == 0), None)
        for i, block in enumerate(blocks):
            if plans is None:
                block.ship_links[adapter_name] = None
                continue
            block.ship_links[adapter_name] = Links(
                shared=blocks[0].shared_prompts,
                level=blocks[config.levels[plans[i].level]].prompts,
                prototypes=bank_owner.ship_prototypes if bank_owner is not None else None,
            )

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        ship_attention.uninstall(model, self._base_blocks())
        return model

    # -- semantic hierarchy -----------------------------------------------------------------------------------

    def fit_to_data(self, dataloader: Iterable, adapter_name: Optional[str] = None) -> Optional[str]:
        """:meth:`fit_hierarchy` (SHIP's data-dependent state)."""
        adapter = adapter_name or self.active_adapters[0]
        self.fit_hierarchy(dataloader, adapter)
        return f"SHIP semantic levels {self.peft_config[adapter].levels}"

    def fit_hierarchy(
        self, dataloader: Iterable, adapter_name: Optional[str] = None, *, refit_levels: Optional[bool] = None
    ) -> SemanticHierarchy:
        """Compute levels and prototypes from the frozen backbone on ``dataloader`` and store them in the adapter.

        Levels are computed and applied when the config has none (or with ``refit_levels=True``); given levels
        are kept otherwise. New levels re-create the prompt parameters: call this before building the
        optimiser. Settings come from the adapter's config (``share_threshold``, ``end_layer``,
        ``hierarchy_feature``, ``hierarchy_images``, ``num_prototypes``, ``prototype_images``, ``seed``).
        Returns what was computed. Under DDP, call it on every process with the same unsharded loader before
        wrapping the model (see :func:`~.hierarchy.fit_hierarchy`).
        """
        adapter = adapter_name or self.active_adapters[0]
        config: SHIPConfig = self.peft_config[adapter]
        refit = config.levels is None if refit_levels is None else refit_levels
        with self._adapters_disabled():
            hierarchy = fit_hierarchy(
                self.model,
                dataloader,
                share_threshold=config.share_threshold,
                end_layer=config.end_layer,
                feature=config.hierarchy_feature,
                num_prototypes=config.num_prototypes if config.num_attribute_prompts else None,
                max_images=config.hierarchy_images,
                prototype_images=config.prototype_images,
                seed=config.seed,
            )
        self.apply_hierarchy(hierarchy, adapter, levels=refit)
        return hierarchy

    def apply_hierarchy(
        self, hierarchy: SemanticHierarchy, adapter_name: Optional[str] = None, *, levels: bool = True
    ) -> None:
        """Store a :class:`SemanticHierarchy` in the adapter: its levels (if ``levels``) and its prototypes."""
        adapter = adapter_name or self.active_adapters[0]
        config: SHIPConfig = self.peft_config[adapter]
        if levels and hierarchy.levels != config.levels:
            new_levels = check_levels(hierarchy.levels, config.num_attribute_prompts)
            old_levels, config.levels = config.levels, new_levels
            try:
                config.layer_plans(self.spec.num_layers)
            except ValueError:
                config.levels = old_levels
                raise
            for block in self._blocks():
                block.update_layer(adapter, config)
            self._link_shared_modules(adapter)
        if config.levels is None or not config.num_attribute_prompts:
            return
        if hierarchy.prototypes is None:
            raise ValueError("the hierarchy has no prototypes, but this adapter has attribute prompts")
        bank = self.prototype_bank(adapter)
        if tuple(hierarchy.prototypes.shape) != tuple(bank.shape):
            raise ValueError(
                f"prototypes of shape {tuple(hierarchy.prototypes.shape)} do not fit this adapter's bank "
                f"{tuple(bank.shape)} (num_prototypes x hidden size)"
            )
        with torch.no_grad():
            bank.copy_(hierarchy.prototypes)

    def prototype_bank(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """The attribute prototype buffer ``(k, D)`` of an adapter."""
        adapter = adapter_name or self.active_adapters[0]
        for block in self._blocks():
            if adapter in block.ship_prototypes:
                return block.ship_prototypes[adapter]
        raise ValueError(f"adapter {adapter!r} has no attribute prototypes (no levels yet, or no attribute prompts)")

    @contextlib.contextmanager
    def _adapters_disabled(self):
        layers = [m for m in self.model.modules() if isinstance(m, PromptedLayer)]
        states = [m._disable_adapters for m in layers]
        for layer in layers:
            layer._disable_adapters = True  # set directly: enable_adapters() would also flip requires_grad
        try:
            yield
        finally:
            for layer, state in zip(layers, states):
                layer._disable_adapters = state
