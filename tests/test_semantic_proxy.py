"""VPTSP-G adapters (docs/methods.md, VPTSP-G): the integration cell, mixing, the loss, parameter counts, the two-pass
forward, BitFit exactness, row-sparse class prompts, save / load / Hub and resuming."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import SIZES, perturb_adapter, pixels, tiny_model
from transformers import Dinov2Model, ViTConfig, ViTModel

import prompt_peft
from prompt_peft import SemanticProxyVPTConfig
from prompt_peft.hub import push_adapter_to_hub
from prompt_peft.losses import proxy_anchor_loss
from prompt_peft.training import RowSparseAdamW, build_optimizer
from prompt_peft.training.step import LOSS_INPUTS_KWARG, find_tuner
from prompt_peft.tuners.semantic_proxy import SemanticGRUCell, integrate_ema, integrate_gru, mix_proxies

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
D, L, I = SIZES["hidden_size"], SIZES["num_hidden_layers"], SIZES["intermediate_size"]
EMB, CLASSES = 8, 6
LABELS = torch.tensor([0, 0, 3, 3])  # class-grouped, k = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def config(**kw):
    return SemanticProxyVPTConfig(**{"embedding_dim": EMB, "num_classes": CLASSES, "num_prompts": 3,
                                     "num_class_prompts": 2, **kw})


def wrapped(seed=0, perturb=True, name="ViTModel", **kw):
    model = get_peft_model(tiny_model(name, seed=seed), config(**kw))
    if perturb:
        perturb_adapter(model, seed)
    return model.eval()


def head_of(model):
    return model.base_model.model.get_submodule(model.base_model.spec.pool_module)


def blocks_of(model):
    return list(model.base_model.model.get_submodule(model.base_model.spec.block_list))


# ---------------------------------------------------------------------------------------------------- proxies


def test_gru_cell_matches_a_hand_computation():
    cell = SemanticGRUCell(2)
    with torch.no_grad():
        cell.input_weight.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.0], [0.0, 0.5]], [[2.0, 0.0], [0.0, -1.0]]]))
        cell.hidden_weight.copy_(torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 1.0]]]))
        cell.bias.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.1, 0.2]]))
    q, h = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -0.5]])
    sig = lambda x: 1 / (1 + math.exp(-x))
    # by hand, row vectors times matrices: q W_iz = (1, 2), h W_hz = (-0.5, 0.5) ...
    z = [sig(1 - 0.5), sig(2 + 0.5)]
    r = [sig(0.5 + 0.5), sig(1.0 - 0.5)]
    h_wn = [0.5 * 1 + (-0.5) * 0, 0.5 * 1 + (-0.5) * 1]  # (0.5, 0)
    n = [max(2.0 + r[0] * h_wn[0] + 0.1, 0), max(-2.0 + r[1] * h_wn[1] + 0.2, 0)]
    expected = torch.tensor([[(1 - z[0]) * n[0] + z[0] * 0.5, (1 - z[1]) * n[1] + z[1] * -0.5]])
    torch.testing.assert_close(cell(q, h), expected)
    assert n[1] == 0  # the ReLU clipped one coordinate


def test_gru_integration_folds_each_class_sequentially_in_batch_order():
    torch.manual_seed(0)
    cell = SemanticGRUCell(4)
    proxies = F.normalize(torch.randn(5, 4), dim=-1)
    q = torch.randn(5, 4)
    labels = torch.tensor([3, 1, 3, 3, 1])  # interleaved on purpose
    got = integrate_gru(cell, proxies, q, labels)
    expected = proxies.clone()
    for c in (1, 3):
        h = proxies[c : c + 1]
        for s in (labels == c).nonzero().flatten().tolist():
            h = cell(q[s : s + 1], h)
        expected[c] = F.normalize(h, dim=-1)[0]
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[[0, 2, 4]], proxies[[0, 2, 4]])  # absent classes keep their proxy


def test_ema_integration_and_mixing():
    proxies = F.normalize(torch.randn(4, 3), dim=-1)
    q = torch.randn(3, 3)
    got = integrate_ema(proxies, q, torch.tensor([2, 2, 0]), keep=0.8)
    torch.testing.assert_close(got[2], F.normalize(0.8 * proxies[2] + 0.2 * (q[0] + q[1]) / 2, dim=0))
    torch.testing.assert_close(got[0], F.normalize(0.8 * proxies[0] + 0.2 * q[2], dim=0))
    assert torch.equal(got[[1, 3]], proxies[[1, 3]])
    bias = torch.randn(4, 3)
    torch.testing.assert_close(mix_proxies(bias, got, 0.3), 0.3 * bias + 0.7 * got)


def reference_proxy_anchor(e, labels, proxies, positive_normalisation, alpha=32.0, delta=0.1):
    """Proxy-Anchor written out with loops, straight from docs/methods.md, VPTSP-G."""
    e, proxies = F.normalize(e, dim=1), F.normalize(proxies, dim=1)
    C = proxies.shape[0]
    pos, neg, with_pos = 0.0, 0.0, 0
    for c in range(C):
        s = e @ proxies[c]
        positives, negatives = s[labels == c], s[labels != c]
        if len(positives):
            with_pos += 1
        pos += torch.log(1 + torch.exp(-alpha * (positives - delta)).sum())
        neg += torch.log(1 + torch.exp(alpha * (negatives + delta)).sum())
    return pos / (C if positive_normalisation == "all" else with_pos) + neg / C


@pytest.mark.parametrize("normalisation, center", [("all", True), ("with_positives", True), ("all", False)])
def test_model_loss_is_proxy_anchor_against_the_mixed_updated_proxies(normalisation, center):
    model = wrapped(positive_normalisation=normalisation, proxy_bias_ratio=0.3, center_proxies=center).train()
    head = head_of(model)
    before = head.vptsp_semantic_proxies["default"].clone()
    out = model(pixel_values=pixels(4), labels=LABELS)
    after = head.vptsp_semantic_proxies["default"]
    assert not after.requires_grad
    changed = (after != before).any(dim=1)
    assert changed.tolist() == [c in (0, 3) for c in range(CLASSES)]  # only the batch's classes moved
    torch.testing.assert_close(after.norm(dim=1), torch.ones(CLASSES))
    mixed = 0.3 * head.vptsp_proxies["default"] + 0.7 * after
    if center:
        mixed = mixed - mixed.mean(dim=0)
    expected = reference_proxy_anchor(out.embeddings, LABELS, mixed, normalisation)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.loss, proxy_anchor_loss(out.embeddings, LABELS, mixed,
                                                           positive_normalisation=normalisation))


@pytest.mark.parametrize("center", [True, False])
def test_centred_proxies_get_no_common_mode_push(center):
    """The collapse's lever: with centring, moving every proxy by the same vector changes nothing, so the loss
    gives the proxy bias no common-mode gradient (its rows' gradients sum to 0); the paper's mix does."""
    model = wrapped(center_proxies=center).train()
    out = model(pixel_values=pixels(4), labels=LABELS)
    out.loss.backward()
    grad = head_of(model).vptsp_proxies["default"].grad
    common = grad.sum(dim=0).norm() / grad.norm()
    assert (common < 1e-5) if center else (common > 1e-2)


def test_proxy_diagnostics_read_the_proxies_the_loss_uses():
    from prompt_peft.training import proxy_diagnostics

    model = wrapped().train()
    out = model(pixel_values=pixels(4), labels=LABELS)
    head = head_of(model)
    mixed = 0.5 * head.vptsp_proxies["default"] + 0.5 * head.vptsp_semantic_proxies["default"]
    proxies = F.normalize(mixed - mixed.mean(dim=0), dim=-1)
    cos = F.normalize(out.embeddings, dim=-1) @ proxies.T
    own = F.one_hot(LABELS, CLASSES).bool()
    pairs = proxies @ proxies.T
    expected = {
        "proxies/mutual_cosine": pairs[~torch.eye(CLASSES, dtype=torch.bool)].mean().item(),
        "proxies/own_cosine": cos[own].mean().item(),
        "proxies/other_cosine": cos[~own].mean().item(),
    }
    assert proxy_diagnostics(model, out.embeddings, LABELS) == pytest.approx(expected, abs=1e-6)
    vpt = get_peft_model(tiny_model("ViTModel"), prompt_peft.VPTConfig(num_prompts=2, embedding_dim=EMB))
    assert proxy_diagnostics(vpt, out.embeddings, LABELS) == {}  # no classes, no proxies


def test_the_candidates_come_from_a_second_pass_with_the_class_prompts():
    model = wrapped(proxy_bias_ratio=0.0, integration="ema", ema_keep=0.5).train()
    head = head_of(model)
    calls = []
    for block in blocks_of(model):
        block.base_layer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    before = head.vptsp_semantic_proxies["default"].clone()
    model(pixel_values=pixels(4), labels=LABELS)
    tokens = 1 + 16  # CLS + 4 x 4 patches
    assert calls == [tokens + 3] * L + [tokens + 2] * L  # sample branch (3 shared), proxy branch (2 class prompts)
    # rebuild the candidates by hand: the bare backbone with the class prompts appended, BitFit deltas applied
    with torch.no_grad():
        bare = model.get_base_model()
        with model.disable_adapter():
            hidden = bare.embeddings(pixels(4))
        block0 = blocks_of(model)[0]
        hidden = torch.cat([hidden[:, :1], hidden[:, 1:] + block0.vptsp_patch_bias["default"]], dim=1)
        for block in blocks_of(model):
            rows = block.vptsp_class_prompt["default"].weight[LABELS].view(4, 2, D)
            out = block.vptsp_bitfit["default"].run(block.base_layer, torch.cat([hidden, rows], 1))
            hidden = out[:, :-2]
        pooled = head.vptsp_bitfit["default"].run(head.base_layer, hidden)[:, 0]
        q = head.semantic_candidates("default", pooled)
    expected = before.clone()
    for c in (0, 3):
        expected[c] = F.normalize(0.5 * before[c] + 0.5 * q[LABELS == c].mean(0), dim=0)
    torch.testing.assert_close(head.vptsp_semantic_proxies["default"], expected, atol=1e-5, rtol=1e-5)


def test_paper_mode_inserts_shared_and_class_prompts_and_eval_runs_one_pass():
    model = wrapped(class_prompt_mode="shared_and_class").train()
    calls = []
    blocks_of(model)[0].base_layer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    model(pixel_values=pixels(4), labels=LABELS)
    assert calls == [17 + 3, 17 + 3 + 2]
    calls.clear()
    model.eval()
    before = head_of(model).vptsp_semantic_proxies["default"].clone()
    out = model(pixel_values=pixels(4), labels=LABELS)  # evaluation: one pass, proxies untouched, loss still given
    assert calls == [17 + 3] and out.loss is not None
    assert torch.equal(head_of(model).vptsp_semantic_proxies["default"], before)


# ---------------------------------------------------------------------------------------------------- shapes, counts


def test_vit_s_cub_config_counts_follow_the_formula():
    with torch.device("meta"):
        vit_s = ViTModel(ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
                         add_pooling_layer=False)
    cfg = SemanticProxyVPTConfig(num_classes=100, embedding_dim=384, num_prompts=10, num_class_prompts=3)
    model = get_peft_model(vit_s, cfg)
    d, e, c = 384, 384, 100
    shared, class_prompts = 12 * 10 * d, 12 * c * 3 * d
    head = 2 * d + d * e + e
    gru = 6 * e * e + 3 * e  # the code's unused W_ia (E) is not allocated
    bitfit = 134 * d  # 11 D per block, final norm, patch embedding (docs/methods.md, VPTSP-G, without the timm head)
    counts = model.base_model.get_parameter_counts()
    assert counts["trainable"] == shared + class_prompts + 2 * head + gru + c * e + bitfit
    assert counts["stored"] == counts["trainable"] + c * e  # + the running semantic proxies, a buffer
    assert counts["trainable"] == 2_701_440  # docs/methods.md, VPTSP-G: cub200_small ≈ 2.70 M
    assert counts["inference"] == shared + head + bitfit == 246_144


def test_decreasing_prompt_counts_and_shapes():
    model = wrapped(num_prompts=5, prompt_step=2, num_class_prompts=3, class_prompt_step=1, class_prompt_depth=2)
    blocks = blocks_of(model)
    assert [tuple(b.vptsp_prompt["default"].shape) if "default" in b.vptsp_prompt else None for b in blocks] == [
        (5, D), (3, D), (1, D)]
    widths = [b.vptsp_class_prompt["default"].weight.shape if "default" in b.vptsp_class_prompt else None
              for b in blocks]
    assert widths == [(CLASSES, 3 * D), (CLASSES, 2 * D), None]
    assert [b.vptsp_class_prompt["default"].sparse for b in blocks[:2]] == [True, True]
    bitfit = sum(b.vptsp_bitfit["default"].delta.numel() for b in blocks) + D + D  # + final norm + patch bias
    assert bitfit == L * (7 * D + I) + 2 * D
    assert config(num_prompts=2, prompt_step=1).shared_prompt_counts(4) == [2, 1, 0, 0]
    out = model(pixel_values=pixels())
    assert out.embeddings.shape == (2, EMB)
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(2))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="class_prompt_mode"):
        config(class_prompt_mode="both")
    with pytest.raises(ValueError, match="integration"):
        config(integration="lstm")
    with pytest.raises(ValueError, match="proxy_bias_ratio"):
        config(proxy_bias_ratio=1.5)
    with pytest.raises(ValueError, match="positive_normalisation"):
        config(positive_normalisation="some")
    with pytest.raises(ValueError, match="prompt_step"):
        config(prompt_step=-1)
    with pytest.raises(ValueError, match="class_prompt_depth=9"):
        get_peft_model(tiny_model("ViTModel"), config(class_prompt_depth=9))


# ---------------------------------------------------------------------------------------------------- BitFit, disable


def training_gradients(model, checkpointing: dict | None) -> dict[str, torch.Tensor]:
    model.train()
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    model(pixel_values=pixels(), labels=torch.tensor([0, 1])).loss.backward()
    dense = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {n: g.clone() for n, g in dense.items() if g is not None}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("bitfit", [True, False])
@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model", "CLIPVisionModel"])
def test_gradient_checkpointing_gives_the_same_gradients(name, bitfit, reentrant):
    """The backward replay of a checkpointed block must see the BitFit biases too (transformers checkpoints inside
    the block's forward, where the bias overrides are no longer in place unless we checkpoint around them)."""
    plain = training_gradients(wrapped(name=name, bitfit=bitfit), None)
    replayed = training_gradients(wrapped(name=name, bitfit=bitfit), {"use_reentrant": reentrant})
    assert plain.keys() == replayed.keys() and any("bitfit" in n for n in plain) == bitfit
    for n in plain:
        torch.testing.assert_close(replayed[n], plain[n], msg=n)


def test_bitfit_off_leaves_the_backbone_biases_alone():
    model = wrapped(bitfit=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("bitfit" in n or "patch_bias" in n for n in names)
    with torch.no_grad():
        model.base_model.model.layers[0].vptsp_prompt["default"].zero_()
    assert model(pixel_values=pixels()).embeddings.shape == (2, EMB)


# ---------------------------------------------------------------------------------------------------- sparse rows


def test_a_step_touches_only_the_batch_rows_and_their_state():
    model = wrapped(perturb=False).train()
    optimizer = build_optimizer(model, lr=1e-2)
    assert isinstance(optimizer, RowSparseAdamW)
    tables = [b.vptsp_class_prompt["default"].weight for b in blocks_of(model)]
    assert all(any(p is t for p in g["params"]) for t in tables for g in optimizer.param_groups if g["row_sparse"])
    before = [t.detach().clone() for t in tables]
    loss = model(pixel_values=pixels(4), labels=LABELS).loss
    loss.backward()
    assert all(t.grad.is_sparse for t in tables)
    grads = [t.grad.coalesce().to_dense() for t in tables]
    optimizer.step()
    for table, old, grad in zip(tables, before, grads):
        moved = (table.detach() != old).any(dim=1)
        assert moved.tolist() == [c in (0, 3) for c in range(CLASSES)]
        assert optimizer.allocated_rows(table).tolist() == [0, 3]
        state = optimizer.state[table]
        assert state["exp_avg"].shape[0] == 2 and state["row_step"].tolist() == [1, 1]
        # the touched rows moved exactly as torch's AdamW moves them
        reference = old[[0, 3]].clone().requires_grad_(True)
        adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.0)
        reference.grad = grad[[0, 3]]
        adamw.step()
        torch.testing.assert_close(table.detach()[[0, 3]], reference.detach())
    # a later batch of new classes grows the state by those rows only
    optimizer.zero_grad()
    model(pixel_values=pixels(4, seed=2), labels=torch.tensor([1, 1, 3, 3])).loss.backward()
    optimizer.step()
    assert optimizer.allocated_rows(tables[0]).tolist() == [0, 1, 3]
    state = optimizer.state[tables[0]]
    assert state["row_step"][state["row_slot"][[0, 1, 3]]].tolist() == [1, 1, 2]


def test_dense_gradients_are_also_updated_row_by_row():
    table = torch.nn.Parameter(torch.randn(5, 3))
    optimizer = RowSparseAdamW([{"params": [table], "row_sparse": True}], lr=0.1, weight_decay=0.5)
    before = table.detach().clone()
    table.grad = torch.zeros(5, 3)
    table.grad[2] = torch.tensor([1.0, -2.0, 0.5])
    optimizer.step()
    assert torch.equal(table.detach()[[0, 1, 3, 4]], before[[0, 1, 3, 4]])  # no lazy decay of untouched rows
    # first AdamW step: p * (1 - lr wd) - lr * sign(g) (up to eps)
    torch.testing.assert_close(table.detach()[2], before[2] * 0.95 - 0.1 * torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="2-D"):
        RowSparseAdamW([{"params": [torch.nn.Parameter(torch.randn(3))], "row_sparse": True}])


def test_sparse_aware_gradient_clipping_matches_the_dense_one():
    from prompt_peft.training import clip_grad_norm_

    table = torch.nn.Embedding(5, 3, sparse=True)
    vector = torch.nn.Parameter(torch.randn(4))
    (table(torch.tensor([1, 1, 4])).sum() * 3 + vector.sum() * 2).backward()
    dense = [table.weight.grad.to_dense(), vector.grad.clone()]
    norm = clip_grad_norm_([table.weight, vector], 1.0)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in dense]))
    torch.testing.assert_close(norm, expected)
    torch.testing.assert_close(table.weight.grad.to_dense(), dense[0] / expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vector.grad, dense[1] / expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("integration", ["gru", "ema"])
def test_training_steps_lower_the_loss_and_reach_every_trainable_tensor(integration):
    model = wrapped(perturb=False, integration=integration).train()
    optimizer = build_optimizer(model, lr=1e-2, proxy_lr=1e-1)
    x = pixels(8, seed=3)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    losses = []
    for step in range(6):
        loss = model(pixel_values=x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None, n
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("integration", ["gru", "ema"])
def test_bf16_autocast_step_matches_float32(integration):
    # accelerate's mixed precision autocasts the forward only: the candidates reach the proxy update in bf16 while
    # the cell and the running table stay float32 (this raised a dtype error in the GRU's matmul)
    losses, tables = [], []
    for autocast in (False, True):
        model = wrapped(integration=integration).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            inputs = model(pixel_values=pixels(4), labels=LABELS, **{LOSS_INPUTS_KWARG: True}).loss_inputs
        assert (inputs.candidates.dtype == torch.bfloat16) == autocast
        loss = find_tuner(model).compute_loss(inputs)
        loss.backward()
        table = head_of(model).vptsp_semantic_proxies["default"]
        assert table.dtype == torch.float32 and loss.dtype == torch.float32
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        losses.append(loss.item())
        tables.append(table.clone())
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    torch.testing.assert_close(tables[1], tables[0], atol=0.03, rtol=0)


# ---------------------------------------------------------------------------------------------------- save / load / Hub


@pytest.mark.parametrize("bitfit", [True, False])
def test_save_and_load_round_trip(bitfit, tmp_path):
    model = wrapped(bitfit=bitfit)
    expected = model(pixel_values=pixels()).embeddings
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in stored.values()) == model.base_model.get_parameter_counts()["stored"]
    assert any("semantic_proxies" in k for k in stored)
    assert any("bitfit" in k for k in stored) == bitfit
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "VPTSP"

    loaded = PeftModel.from_pretrained(tiny_model("ViTModel"), tmp_path).eval()
    assert torch.equal(loaded(pixel_values=pixels()).embeddings, expected)
    assert torch.equal(head_of(loaded).vptsp_semantic_proxies["default"],
                       head_of(model).vptsp_semantic_proxies["default"])
    plain = tiny_model("ViTModel")
    plain.load_adapter(str(tmp_path))  # transformers' own integration
    assert torch.equal(plain(pixel_values=pixels()).embeddings, expected)
    with torch.no_grad(), loaded.disable_adapter():
        assert torch.equal(loaded(pixel_values=pixels()).last_hidden_state,
                           tiny_model("ViTModel")(pixel_values=pixels()).last_hidden_state)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_inference_only_adapter_drops_the_training_parts(tmp_path):
    model = wrapped()
    expected = model(pixel_values=pixels()).embeddings
    model.save_pretrained(tmp_path, state_dict=model.base_model.inference_state_dict())
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in stored.values()) == model.base_model.get_parameter_counts()["inference"]
    assert not any(w in k for k in stored for w in ("class_prompt", "semantic", "proxies"))
    loaded = PeftModel.from_pretrained(tiny_model("ViTModel"), tmp_path).eval()
    assert torch.equal(loaded(pixel_values=pixels()).embeddings, expected)


@pytest.mark.parametrize("bitfit", [True, False])
def test_hub_round_trip(bitfit, fake_hub):
    base_id, adapter_id = "org/tiny-dinov2", f"org/tiny-dinov2-vptsp-bitfit-{bitfit}"
    tiny_model("Dinov2Model").push_to_hub(base_id)
    model = get_peft_model(Dinov2Model.from_pretrained(base_id), config(bitfit=bitfit))
    perturb_adapter(model)
    model.eval()
    expected = model(pixel_values=pixels()).embeddings
    push_adapter_to_hub(model, adapter_id, base_model_id=base_id)
    downloaded = prompt_peft.from_pretrained(adapter_id)
    with torch.no_grad():
        assert torch.equal(downloaded(pixel_values=pixels()).embeddings, expected)


def test_checkpoint_resume_continues_exactly(tmp_path):
    from accelerate import Accelerator

    def step(model, optimizer, seed):
        torch.manual_seed(seed)
        loss = model(pixel_values=pixels(4, seed=seed), labels=LABELS if seed % 2 else torch.tensor([1, 1, 3, 3])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    accelerator = Accelerator(cpu=True)
    model = wrapped(perturb=False, integration_dropout=0.2).train()
    optimizer = build_optimizer(model, lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    for seed in (1, 2):
        step(model, optimizer, seed)
    accelerator.save_state(str(tmp_path / "ckpt"))
    reference = [step(model, optimizer, seed) for seed in (3, 4)]
    state = {k: v.clone() for k, v in model.state_dict().items() if "vptsp_" in k}

    fresh = wrapped(perturb=False, seed=5, integration_dropout=0.2).train()  # different init: all must be restored
    fresh_optimizer = build_optimizer(fresh, lr=1e-2)
    accelerator = Accelerator(cpu=True)  # a new run: it prepares only the fresh model
    fresh, fresh_optimizer = accelerator.prepare(fresh, fresh_optimizer)
    accelerator.load_state(str(tmp_path / "ckpt"))
    resumed = [step(fresh, fresh_optimizer, seed) for seed in (3, 4)]
    assert torch.equal(torch.stack(resumed), torch.stack(reference))
    for key, value in fresh.state_dict().items():
        if "vptsp_" in key:
            assert torch.equal(value, state[key]), key


# Backbone biases that never reach the embedding: ViT's pooler (our head reads the final norm's [CLS]).
UNUSED_BIASES = {"ViTModel": ("pooler.",)}


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel"])
def test_bitfit_has_a_delta_for_every_bias_on_the_embedding_path(name):
    base = tiny_model(name)
    expected = sum(
        p.numel() for n, p in base.named_parameters()
        if n.endswith("bias") and not n.startswith(UNUSED_BIASES.get(name, ()))
    )  # fmt: skip
    model = get_peft_model(base, config())
    deltas = sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in ("bitfit", "_bias.")))
    assert deltas == expected


@pytest.mark.parametrize("name, norm", [("CLIPVisionModel", "pre_layrnorm"), ("SiglipVisionModel", "post_layernorm")])
def test_norm_bias_delta_is_that_norms_bias_moved(name, norm):
    """The delta of a LayerNorm outside every wrapper equals editing that LayerNorm's bias in the backbone."""
    model = wrapped(name=name)
    delta = next(p for n, p in model.named_parameters() if "norm_bias" in n)
    assert delta.abs().sum() > 0  # trained (perturbed)
    with torch.no_grad():
        expected = model(pixel_values=pixels()).embeddings
        getattr(model.base_model.model, norm).bias += delta
        delta.zero_()
        moved = model(pixel_values=pixels()).embeddings
    torch.testing.assert_close(moved, expected)
