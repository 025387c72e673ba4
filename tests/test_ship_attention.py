"""SHIP's decoupled attention: against a direct computation, equal to the bare backbone when it must be, with
both transformers attention implementations and every supported family."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tiny_models import BARE, SIZES, pixels, tiny_model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit import modeling_vit

from prompt_peft.tuners.ship import SHIPConfig
from prompt_peft.tuners.ship.attention import DecoupledCall, decoupled_attention

D, L, H = SIZES["hidden_size"], SIZES["num_hidden_layers"], SIZES["num_attention_heads"]
K, S, A = 3, 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw):
    defaults = dict(levels=[0, 1, 2], level_prompt_tokens=K, shared_prompt_tokens=S, attribute_prompt_tokens=A,
                    num_prototypes=5, embedding_dim=8, num_classes=4)
    return SHIPConfig(**{**defaults, **kw})


def fitted(name, attn="sdpa", seed=0, **kw):
    base = tiny_model(name, seed=seed, attn_implementation=attn)
    model = get_peft_model(base, config(**kw))
    model.fit_hierarchy([pixels(batch=4, seed=s) for s in range(2)])
    with torch.no_grad():  # move the prompts off their init so every path carries signal
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def reference_attention(q, k, v, hidden, T, s, prompts_query):
    """docs/methods.md, SHIP written out: (B, H, N, d) projections -> (B, N, H, d)."""
    scale = q.shape[-1] ** -0.5
    qv = q[:, :, :T]
    out_v = (1 - s) * torch.softmax(qv @ k[:, :, :T].transpose(-1, -2) * scale, -1) @ v[:, :, :T]
    out_v = out_v + s * torch.softmax(qv @ k[:, :, T:].transpose(-1, -2) * scale, -1) @ v[:, :, T:]
    if prompts_query:
        out_p = torch.softmax(q[:, :, T:] @ k.transpose(-1, -2) * scale, -1) @ v
    else:
        B, N, _ = hidden.shape
        out_p = hidden[:, T:].reshape(B, N - T, q.shape[1], q.shape[-1]).transpose(1, 2)
    return torch.cat([out_v, out_p], dim=2).transpose(1, 2)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("prompts_query", [False, True])
@pytest.mark.parametrize("query_token", [0, None])
def test_decoupled_attention_against_the_formula(impl, prompts_query, query_token):
    gen = torch.Generator().manual_seed(0)
    B, T, N, d = 2, 7, 11, 4
    q, k, v = (torch.randn(B, H, N, d, generator=gen) for _ in range(3))
    hidden = torch.randn(B, N, H * d, generator=gen)
    base = modeling_vit.eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS["sdpa"]
    module = tiny_model("ViTModel").layers[0].attention
    call = DecoupledCall(num_image_tokens=T, weight=0.3, prompts_query=prompts_query, query_token=query_token)
    out, weights = decoupled_attention(base, module, q, k, v, call, hidden, scaling=d**-0.5, dropout=0.0)
    assert weights is None and call.ran
    torch.testing.assert_close(out, reference_attention(q, k, v, hidden, T, 0.3, prompts_query))
    query = q[:, :, :1] if query_token == 0 else q[:, :, :T].mean(dim=2, keepdim=True)
    logits = (query @ k[:, :, :T].transpose(-1, -2) * d**-0.5).mean(dim=1)[:, 0]
    torch.testing.assert_close(call.scores, logits)


def reference_vit_block(block, x, T, s, prompts_query):
    """One ViT block with decoupled attention, from its own sub-modules (eval mode: no dropout)."""
    attention = block.attention
    h = block.layernorm_before(x)
    B, N, _ = h.shape

    def heads(t):
        return t.view(B, N, H, D // H).transpose(1, 2)

    q, k, v = heads(attention.q_proj(h)), heads(attention.k_proj(h)), heads(attention.v_proj(h))
    mixed = reference_attention(q, k, v, h, T, s, prompts_query).reshape(B, N, D)
    x = x + attention.o_proj(mixed)
    return x + block.mlp(block.layernorm_after(x)), q, k


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_vit_blocks_and_matching_loss_against_a_direct_computation(impl):
    model = fitted("ViTModel", attn=impl, decoupled_weight=0.2)
    inner = [model.base_model.model.layers[i].base_layer for i in range(L)]
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
               for i, b in enumerate(inner)]
    model.train()  # the matching loss exists only in training; the tiny ViT has no active dropout
    out = model(pixel_values=pixels())
    for h in handles:
        h.remove()
    T = 17
    for i in range(L):
        x, y = seen[i]
        expected, q, k = reference_vit_block(inner[i], x, T, 0.2, prompts_query=(i == L - 1))
        torch.testing.assert_close(y, expected, msg=f"block {i}")
    # Eq. (5) on the last block, from its [CLS] logits over the image keys.
    scores = (q[:, :, 0:1] @ k[:, :, :T].transpose(-1, -2)).mean(dim=1)[:, 0]
    top = scores.topk(10, dim=-1).indices
    y = seen[L - 1][1]
    targets = torch.stack([y[b, top[b]] for b in range(2)])
    cost = 1 - F.cosine_similarity(y[:, T:, None], targets[:, None], dim=-1)
    torch.testing.assert_close(out.auxiliary_loss, 0.5 * cost.min(dim=-1).values.mean())


def test_attribute_prompt_against_a_direct_computation():
    model = fitted("ViTModel", decoupled_weight=0.2)
    blocks = model.base_model.model.layers
    inputs = {}
    handles = [blocks[i].base_layer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
               for i in range(L)]
    model(pixel_values=pixels())
    for h in handles:
        h.remove()
    T, bank = 17, model.base_model.prototype_bank()
    for i in (1, 2):  # levels [0, 1, 2]: the last two levels build attribute prompts 0 and 1
        previous = blocks[i - 1].base_layer
        h = previous.layernorm_before(inputs[i - 1])
        q = previous.attention.q_proj(h).view(2, -1, H, D // H).transpose(1, 2)
        k = previous.attention.k_proj(h).view(2, -1, H, D // H).transpose(1, 2)
        scores = (q[:, :, 0:1] @ k[:, :, :T].transpose(-1, -2)).mean(dim=1)[:, 0]
        top = scores.topk(A, dim=-1).indices
        tokens = torch.stack([inputs[i][b, top[b]] for b in range(2)])
        weights = torch.softmax(F.cosine_similarity(tokens[:, :, None], bank[None, None], dim=-1), dim=-1)
        expected = 0.1 * weights @ bank + 0.9 * blocks[i].ship_attribute_prompt["default"]
        # the segment is [attribute | level | shared]
        torch.testing.assert_close(inputs[i][:, T : T + A], expected)
        torch.testing.assert_close(inputs[i][:, T + A : T + A + K], blocks[i].ship_prompt["default"].expand(2, -1, -1))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", BARE)
@pytest.mark.parametrize("queries", ["none", "last"])
def test_zero_weight_keeps_the_image_tokens_of_the_bare_backbone_exactly(name, impl, queries):
    base = tiny_model(name, attn_implementation=impl)
    with torch.no_grad():
        bare = base(pixel_values=pixels()).last_hidden_state
    model = fitted(name, attn=impl, decoupled_weight=0.0, prompts_as_queries=queries)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels()).last_hidden_state, bare)
        model.peft_config["default"].decoupled_weight = 0.1  # the blocks read the live config
        assert not torch.allclose(model(pixel_values=pixels()).last_hidden_state, bare)
        with model.disable_adapter():
            assert torch.equal(model(pixel_values=pixels()).last_hidden_state, bare)


@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel", "SiglipVisionModel"])
def test_eager_and_sdpa_agree(name):
    outputs = []
    for impl in ("eager", "sdpa"):
        model = fitted(name, attn=impl, prompts_as_queries="all")
        with torch.no_grad():
            outputs.append(model(pixel_values=pixels()).embeddings)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


def test_attention_implementation_is_switched_and_restored():
    base = tiny_model("ViTModel")
    model = get_peft_model(base, config())
    assert base.config._attn_implementation == "prompt_peft_ship_sdpa"
    restored = model.unload()
    assert restored.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in restored.modules())


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_other_attention_implementations_are_refused(impl):
    base = tiny_model("ViTModel")
    base.config._attn_implementation = impl  # set directly: the kernels need not be installed to test the refusal
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        get_peft_model(base, config())


def test_blocks_that_drop_keyword_arguments_are_refused(monkeypatch):
    # Older transformers 5.x blocks (e.g. Dinov2Layer in 5.17) take no **kwargs: SHIP's call could not reach
    # the attention, so the adapter is refused instead of silently running ordinary attention.
    def forward(self, hidden_states, attention_mask=None):
        raise AssertionError("not called")

    monkeypatch.setattr(modeling_vit.ViTLayer, "forward", forward)
    with pytest.raises(ValueError, match="takes none in transformers"):
        get_peft_model(tiny_model("ViTModel"), config())


def test_changing_the_implementation_afterwards_is_an_error():
    model = fitted("ViTModel")
    model.base_model.model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="decoupled attention did not run"):
        model(pixel_values=pixels())


@pytest.mark.parametrize("name", ["ViTModel", "SiglipVisionModel"])
def test_gradient_checkpointing_replays_the_decoupled_attention(name):
    def grads(checkpointing):
        torch.manual_seed(0)
        model = fitted(name)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(pixel_values=pixels(), labels=torch.tensor([0, 1]))
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], msg=n)
