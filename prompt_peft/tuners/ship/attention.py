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

The call also returns the [CLS] row's pre-softmax logits over the image keys, averaged over heads (the
attribute prompts and the matching loss pick their top-k tokens from them): one extra ``(1 × T)`` product per
head. A backbone without [CLS] (SigLIP) uses the mean over the image queries instead, i.e. the logits of the
mean query, since they are linear in the query.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
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
    base: Callable, module: nn.Module, query, key, value, call: DecoupledCall, hidden: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, None]:
    """Decoupled attention from ``(B, H, S, d)`` projections; returns ``(B, S, H, d)`` like transformers' functions.

    ``base`` is the original attention function (eager or sdpa) and computes every softmax; ``hidden`` is the
    attention module's input ``(B, S, H·d)``; ``kwargs`` are what the module passed (scaling, dropout, ...).
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
    out, _ = base(module, q_image, k_image, v_image, None, **kwargs)
    if n_prompts and call.weight:
        to_prompts, _ = base(module, q_image, k_prompt, v_prompt, None, **kwargs)
        out = (1 - call.weight) * out + call.weight * to_prompts
    if n_prompts:
        if call.prompts_query:
            prompt_out, _ = base(module, q_prompt, key, value, None, **kwargs)
        else:  # no attention for prompts: the output projection sees their normed input h_p ()
            prompt_out = hidden[:, T:].reshape(batch, n_prompts, heads, head_dim).to(out.dtype)
        out = torch.cat([out, prompt_out], dim=1)
    call.scores = query_scores(q_image, k_image, call.query_token, kwargs.get("scaling"))
    call.ran = True
    return out, None


def query_scores(q_image, k_image, query_token: Optional[int], scaling: Optional[float]) -> torch.Tensor:
    """Head-mean pre-softmax logits ``(B, T)`` of one query row (the [CLS]) or of the mean image query."""
    with torch.no_grad():
        if query_token is None:
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
        if attention_mask is not None:
            raise ValueError("SHIP's decoupled attention does not take an attention mask")
        call, hidden = request
        return decoupled_attention(base, module, query, key, value, call, hidden, **kwargs)

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
    """The module of an encoder block that projects q/k/v and calls the attention function."""
    for module in block.modules():
        if all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj")):
            return module
    raise ValueError(f"{type(block).__name__} has no attention module with q_proj/k_proj/v_proj")


def install(model: nn.Module, blocks: list[nn.Module], hidden_size: int) -> None:
    """Route the backbone's attention through SHIP's implementation (idempotent)."""
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
        _require_keywords(block)
        attention = find_attention(block)
        handle = attention.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
        attention.__dict__.pop(_CALL_ATTR, None)
    current = model.config._attn_implementation
    if current and current.startswith(PREFIX):
        model.config._attn_implementation = current.removeprefix(PREFIX)
