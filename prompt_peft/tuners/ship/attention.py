"""SHIP's decoupled attention (docs/methods.md, SHIP) as a transformers attention implementation.

With ``T`` image tokens followed by prompt tokens, per head::

    out_image  = (1 - s) · softmax(Q_v K_v^T) V_v + s · softmax(Q_v K_p^T) V_p
    out_prompt = softmax(Q_p [K_v; K_p]^T) [V_v; V_p]   if prompts are queries in this block
               = h_p                                    otherwise (the block's normed input: no attention)

and the attention module's output projection then maps ``cat(out_image, out_prompt)`` as usual.

How it plugs into transformers without copying its attention code:

* Every ViT-family attention module calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with the
  projected ``query/key/value``. :func:`install` registers ``prompt_peft_ship_sdpa`` / ``prompt_peft_ship_eager``
  and switches the backbone's config to the one wrapping its current implementation. Each softmax above is one
  call of that original implementation on a slice of the keys, so eager and sdpa keep their own numerics.
* The SHIP block wrapper passes a :class:`DecoupledCall` as the block keyword ``ship_attention``. The block hands
  its keywords to its attention module, where a forward pre-hook takes it out and leaves it, with the module's
  input (the normed ``h`` that non-query prompts pass on), on the module for the attention function, which
  takes both. The keyword travels with the block call, so gradient checkpointing replays it too. SigLIP's
  attention does not forward its keywords to the attention function, which is why the hook carries it there.
* Without a :class:`DecoupledCall` (adapter disabled, another adapter, the bare model) the function calls the
  original implementation with the original arguments: the bare backbone's output, bit for bit.
* timm's ``Attention`` (timm ViTs through ``TimmWrapperModel``) calls ``F.scaled_dot_product_attention`` itself and
  its blocks take no keyword arguments. :func:`install` gives each such module an instance ``forward`` that runs
  the module's own ``qkv`` / ``q_norm`` / ``k_norm`` / ``norm`` / ``proj`` around :func:`decoupled_attention` (each
  softmax with timm's fused or explicit attention, as the module is set) when :func:`run_block` left it a
  :class:`DecoupledCall`, and the class's ``forward`` otherwise; :func:`uninstall` removes it.
* An attention mask (SigLIP 2's padded patch sequences) is cut into the same image / prompt parts; the prompts are
  attended by every query, and padded keys never rank as attribute or matching tokens.

The call also returns the [CLS] row's pre-softmax logits over the image keys, averaged over heads (the
attribute prompts and the matching loss pick their top-k tokens from them): one extra ``(1 × T)`` product per
head. A backbone without [CLS] (SigLIP) uses the mean over the image queries instead, i.e. the logits of the
mean query, since they are linear in the query.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "prompt_peft_ship_"
SUPPORTED = ("eager", "sdpa")
CALL_KWARG = "ship_attention"
_CALL_ATTR = "_prompt_peft_ship_call"
_HOOK_ATTR = "_prompt_peft_ship_hook"


@dataclass
class DecoupledCall:
    """One block's request for decoupled attention, and what the attention hands back."""

    num_image_tokens: int  # T: the tokens before the prompt segment
    weight: float  # s
    prompts_query: bool  # prompt tokens are queries in this block
    query_token: Optional[int] = 0  # the [CLS] index whose logits rank the image tokens; None: mean query
    scores: Optional[torch.Tensor] = None  # (B, T) float32 head-mean logits of the ranking query (detached)
    ran: bool = False


# ---------------------------------------------------------------------------------------------------- the math


def decoupled_attention(
    base: Callable,
    module: nn.Module,
    query,
    key,
    value,
    call: DecoupledCall,
    hidden: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Decoupled attention from ``(B, H, S, d)`` projections; returns ``(B, S, H, d)`` like transformers' functions.

    ``base`` is the original attention function (eager or sdpa) and computes every softmax; ``hidden`` is the
    attention module's input ``(B, S, H·d)``; ``attention_mask`` a 4-D mask over all ``S`` tokens (prompts
    attended) or None; ``kwargs`` are what the module passed (scaling, dropout, ...).
    """
    T = call.num_image_tokens
    batch, heads, length, head_dim = query.shape
    n_prompts = length - T
    if n_prompts < 0:
        raise ValueError(f"decoupled attention got {length} tokens but expects at least T={T} image tokens")
    # one split per projection: its backward is one concatenation, where separate slices would each allocate a
    # zero-filled gradient of the whole projection and add them up
    q_image, q_prompt = query.split([T, n_prompts], dim=2)
    k_image, k_prompt = key.split([T, n_prompts], dim=2)
    v_image, v_prompt = value.split([T, n_prompts], dim=2)
    image, prompts, every = slice(0, T), slice(T, length), slice(0, length)
    out, _ = base(module, q_image, k_image, v_image, _mask_part(attention_mask, image, image), **kwargs)
    if n_prompts and call.weight:
        to_prompts, _ = base(module, q_image, k_prompt, v_prompt, _mask_part(attention_mask, image, prompts), **kwargs)
        out = (1 - call.weight) * out + call.weight * to_prompts
    if n_prompts:
        if call.prompts_query:
            prompt_out, _ = base(module, q_prompt, key, value, _mask_part(attention_mask, prompts, every), **kwargs)
        else:  # no attention for prompts: the output projection sees their normed input h_p
            prompt_out = hidden[:, T:].reshape(batch, n_prompts, heads, head_dim).to(out.dtype)
        out = torch.cat([out, prompt_out], dim=1)
    valid = None
    if attention_mask is not None:  # padded tokens: neither in the mean query nor among the top-scored tokens
        keys = attention_mask[:, 0, 0, :T]
        valid = (keys if keys.dtype == torch.bool else keys == 0).to(q_image.device)
    call.scores = query_scores(q_image, k_image, call.query_token, kwargs.get("scaling"), valid)
    if valid is not None:
        call.scores = call.scores.masked_fill(~valid, float("-inf"))
    call.ran = True
    return out, None


def _mask_part(mask: Optional[torch.Tensor], rows: slice, cols: slice) -> Optional[torch.Tensor]:
    """The block of a 4-D mask for these query rows and key columns (a ``Q == 1`` mask broadcasts its row)."""
    if mask is None:
        return None
    return mask[..., rows if mask.shape[-2] > 1 else slice(None), cols]


def query_scores(
    q_image, k_image, query_token: Optional[int], scaling: Optional[float], valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Head-mean pre-softmax logits ``(B, T)`` of one query row (the [CLS]) or of the mean image query (over the
    ``valid`` tokens ``(B, T)`` when given)."""
    with torch.no_grad():
        if query_token is None and valid is not None:
            weights = valid.float()[:, None, :, None]
            q = (q_image.float() * weights).sum(dim=2, keepdim=True) / weights.sum(dim=2, keepdim=True)
        elif query_token is None:
            q = q_image.float().mean(dim=2, keepdim=True)
        else:
            q = q_image[:, :, query_token : query_token + 1].float()
        scale = scaling if scaling is not None else q_image.shape[-1] ** -0.5
        logits = q @ k_image.float().transpose(-1, -2) * scale  # (B, H, 1, T)
        return logits.mean(dim=1).squeeze(1)


# ---------------------------------------------------------------------------------------------------- plumbing


def _original(module: nn.Module, name: str) -> Callable:
    if name == "eager":  # each modeling file has its own eager function; it is not in the registry
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward to run SHIP's attention with")
        return function
    return ALL_ATTENTION_FUNCTIONS[name]


def _implementation(base_name: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        base = _original(module, base_name)
        request = module.__dict__.pop(_CALL_ATTR, None)  # taken, so the module keeps no tensor between calls
        if request is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        call, hidden = request
        return decoupled_attention(base, module, query, key, value, call, hidden, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base_name}"
    return attention


for _name in SUPPORTED:
    AttentionInterface.register(PREFIX + _name, _implementation(_name))
    # Same masks as the wrapped implementation, so a disabled adapter builds exactly the bare model's masks.
    AttentionMaskInterface.register(PREFIX + _name, ALL_MASK_ATTENTION_FUNCTIONS[_name])


def _take_call(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on an attention module: hand the block's DecoupledCall and the module's input (the
    normed hidden states) to the attention function of this call."""
    call = kwargs.pop(CALL_KWARG, None)
    hidden = args[0] if args else kwargs.get("hidden_states")
    # Set or cleared on every call, so nothing stale survives a failed forward.
    module.__dict__[_CALL_ATTR] = (call, hidden) if call is not None else None
    return args, kwargs


def find_attention(block: nn.Module) -> nn.Module:
    """The module of an encoder block that projects q/k/v and calls the attention function (transformers'
    ``q_proj`` / ``k_proj`` / ``v_proj``, or timm's fused ``qkv``)."""
    for module in block.modules():
        if all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj")):
            return module
        if _is_timm_attention(module):
            return module
    raise ValueError(f"{type(block).__name__} has no attention module with q_proj/k_proj/v_proj or qkv/proj")


def _is_timm_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("qkv", "proj")) and hasattr(
        module, "head_dim"
    )


def run_block(block: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict, call: DecoupledCall):
    """``block(hidden_states, *args, **kwargs)`` with ``call`` reaching its attention: as the block keyword
    ``ship_attention`` (transformers), or handed straight to timm's attention, whose blocks take no keywords."""
    attention = find_attention(block)
    if _is_timm_attention(attention):
        # set just before the call (a checkpointed block re-runs this wrapper, so the replay gets it too)
        attention.__dict__[_CALL_ATTR] = (call, None)
        try:
            return block(hidden_states, *args, **kwargs)
        finally:
            attention.__dict__.pop(_CALL_ATTR, None)
    return block(hidden_states, *args, **kwargs, **{CALL_KWARG: call})


def _timm_softmax(module: nn.Module, query, key, value, attention_mask, scaling: float, dropout: float):
    """One softmax attention as timm's ``Attention`` computes it (fused or explicit), in transformers' layout
    ``(B, S, H, d)``."""
    if module.fused_attn:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
    else:  # timm's blocks get no mask from TimmWrapperModel: there is none to add here
        weights = (query * scaling) @ key.transpose(-2, -1)
        out = module.attn_drop(weights.softmax(dim=-1)) @ value
    return out.transpose(1, 2), None


def _timm_attention_forward(module: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
    request = module.__dict__.pop(_CALL_ATTR, None)
    if request is None:
        return type(module).forward(module, x, attn_mask=attn_mask, is_causal=is_causal)
    if attn_mask is not None or is_causal:
        raise ValueError("SHIP's decoupled attention on timm takes no attention mask and no causal attention")
    call, _ = request
    batch, length, _ = x.shape
    qkv = module.qkv(x).reshape(batch, length, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    query, key = module.q_norm(query), module.k_norm(key)
    dropout = module.attn_drop.p if module.training else 0.0
    out, _ = decoupled_attention(
        _timm_softmax, module, query, key, value, call, x, scaling=module.scale, dropout=dropout
    )
    out = module.norm(out.reshape(batch, length, module.num_heads * module.head_dim))
    return module.proj_drop(module.proj(out))


def install(model: nn.Module, blocks: list[nn.Module], hidden_size: int) -> None:
    """Route the backbone's attention through SHIP's implementation (idempotent)."""
    if blocks and _is_timm_attention(find_attention(blocks[0])):
        _install_timm(blocks, hidden_size)
        return
    config = model.config
    current = config._attn_implementation or "eager"
    base = current.removeprefix(PREFIX)
    if base not in SUPPORTED:
        raise ValueError(
            f"SHIP's decoupled attention runs on transformers' 'sdpa' or 'eager' attention, but this backbone uses "
            f"{current!r} (flash and flex attention are not supported). Load the backbone with "
            "attn_implementation='sdpa'."
        )
    for block in blocks:
        _require_keywords(block)
        attention = find_attention(block)
        if attention.q_proj.out_features != hidden_size:
            raise ValueError(
                f"SHIP passes prompt tokens through {type(attention).__name__}'s output projection, which needs "
                f"heads x head_dim == hidden size, but this backbone has {attention.q_proj.out_features} != "
                f"{hidden_size}."
            )
        if getattr(attention, _HOOK_ATTR, None) is None:
            handle = attention.register_forward_pre_hook(_take_call, with_kwargs=True)
            object.__setattr__(attention, _HOOK_ATTR, handle)
    config._attn_implementation = PREFIX + base


def _install_timm(blocks: list[nn.Module], hidden_size: int) -> None:
    for block in blocks:
        attention = find_attention(block)
        if getattr(attention, "gate", None) is not None or attention.num_heads * attention.head_dim != hidden_size:
            raise ValueError(
                f"SHIP's decoupled attention needs timm's plain Attention (no gate, heads x head_dim == hidden size), "
                f"but this model has {type(attention).__name__} with other settings."
            )
        if "forward" not in attention.__dict__:
            attention.forward = functools.partial(_timm_attention_forward, attention)


def _require_keywords(block: nn.Module) -> None:
    parameters = inspect.signature(block.forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise ValueError(
            f"SHIP hands its attention settings to the encoder blocks as a keyword argument, but "
            f"{type(block).__name__}.forward takes none in transformers {transformers.__version__}; use a "
            "transformers version whose blocks pass **kwargs on to their attention (5.23 does)."
        )


def uninstall(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Undo :func:`install`: the backbone's own attention implementation, no hooks."""
    for block in blocks:
        attention = find_attention(block)
        if _is_timm_attention(attention):
            attention.__dict__.pop("forward", None)
            attention.__dict__.pop(_CALL_ATTR, None)
            continue
        _require_keywords(block)
        handle = attention.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
        attention.__dict__.pop(_CALL_ATTR, None)
    current = model.config._attn_implementation
    if current and current.startswith(PREFIX):
        model.config._attn_implementation = current.removeprefix(PREFIX)
