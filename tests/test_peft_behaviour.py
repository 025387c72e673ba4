"""PEFT behaviour of the shared prompt mechanism (VPT), on tiny random backbones of every supported family."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import FAMILIES, SIZES, perturb_adapter, pixels, reference_features, tiny_model

import prompt_peft
from prompt_peft import VPTConfig

ALL = list(FAMILIES)
N_PROMPTS, EMB, CLASSES = 4, 16, 5
D, L = SIZES["hidden_size"], SIZES["num_hidden_layers"]


def vpt(**kw):
    return VPTConfig(**{"num_prompts": N_PROMPTS, "embedding_dim": EMB, "num_classes": CLASSES, **kw})


def wrapped(name, seed=0, **kw):
    model = get_peft_model(tiny_model(name, seed=seed), vpt(**kw))
    model.eval()
    return model


def expected_trainable(deep=True):
    prompts = (L if deep else 1) * N_PROMPTS * D
    head = 2 * D + D * EMB + EMB  # LayerNorm + Linear
    return prompts + head + CLASSES * EMB


@pytest.mark.parametrize("name", ALL)
def test_only_adapter_parameters_train(name, capsys):
    model = wrapped(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vpt_" in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_trainable()
    model.print_trainable_parameters()
    assert f"trainable params: {expected_trainable():,}" in capsys.readouterr().out

    out = model(pixel_values=pixels(), labels=torch.tensor([0, 3]))
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    counts = model.base_model.get_parameter_counts()
    assert counts == {"trainable": expected_trainable(), "stored": expected_trainable(),
                      "inference": expected_trainable() - CLASSES * EMB}


@pytest.mark.parametrize("name", ALL)
def test_output_contract(name):
    base = tiny_model(name)
    with torch.no_grad():
        bare = base(pixel_values=pixels())
    model = get_peft_model(base, vpt()).eval()
    out = model(pixel_values=pixels())
    assert type(out) is type(bare)
    assert out.embeddings.shape == (2, EMB) and out.embeddings.dtype == torch.float32
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(2))
    # prompts are stripped before the final norm: the usual outputs keep their shapes, but change
    feats, bare_feats = reference_features(model, out), reference_features(base, bare)
    assert feats.shape == bare_feats.shape
    assert not torch.allclose(feats, bare_feats)
    assert getattr(out, "loss", None) is None

    labelled = model(pixel_values=pixels(), labels=torch.tensor([1, 4]))
    assert labelled.loss.ndim == 0 and torch.isfinite(labelled.loss)
    torch.testing.assert_close(labelled.embeddings, out.embeddings)


@pytest.mark.parametrize("name", ["ViTModel", "SiglipVisionModel"])
def test_merge_and_unload_refuses_clearly(name):
    with pytest.raises(ValueError, match="cannot be merged"):
        wrapped(name).merge_and_unload()


@pytest.mark.parametrize("name", ALL)
def test_save_and_load_round_trip(name, tmp_path):
    model = wrapped(name, seed=0)
    with torch.no_grad():  # move the prompts and head away from their init so the check means something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    expected = model(pixel_values=pixels()).embeddings
    model.save_pretrained(tmp_path, save_embedding_layers=False)

    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in stored.values()) == expected_trainable()
    assert all(".default" not in k and "vpt_" in k for k in stored)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VPT" and config["backbone_hidden_size"] == D

    loaded = PeftModel.from_pretrained(tiny_model(name, seed=0), tmp_path).eval()
    torch.testing.assert_close(loaded(pixel_values=pixels()).embeddings, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())

    trainable = PeftModel.from_pretrained(tiny_model(name, seed=0), tmp_path, is_trainable=True)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == expected_trainable()
    loss = trainable(pixel_values=pixels(), labels=torch.tensor([0, 1])).loss
    loss.backward()


@pytest.mark.parametrize("name", ["ViTModel", "DeiTModel", "CLIPVisionModel", "SiglipVisionModel"])
def test_interpolate_pos_encoding(name):
    model = wrapped(name)
    base = tiny_model(name)
    x = pixels(size=48)
    out = model(pixel_values=x, interpolate_pos_encoding=True)
    assert out.embeddings.shape == (2, EMB)
    with model.disable_adapter():
        disabled = model(pixel_values=x, interpolate_pos_encoding=True)
    with torch.no_grad():
        bare = base(pixel_values=x, interpolate_pos_encoding=True)
    assert torch.equal(disabled.last_hidden_state, bare.last_hidden_state)
    assert out.last_hidden_state.shape == bare.last_hidden_state.shape


def test_shallow_prompts_flow_through_all_layers():
    model = wrapped("ViTModel", deep=False)
    steps = [m.prompt_step["default"] for m in model.modules() if hasattr(m, "prompt_step")]
    assert [(s.drop, s.new, s.strip) for s in steps] == [(0, 4, 0), (0, 0, 0), (0, 0, 4)]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_trainable(deep=False)


def test_prompt_projection_is_shared():
    model = wrapped("ViTModel", prompt_projection_dim=8)
    projections = [n for n, _ in model.named_parameters() if "vpt_prompt_proj" in n]
    assert len(projections) == 2  # one Linear (weight, bias) for all layers
    prompts = [p for n, p in model.named_parameters() if n.endswith("vpt_prompt.default")]
    assert all(p.shape == (N_PROMPTS, 8) for p in prompts)
    model(pixel_values=pixels(), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_vpt_initialisation_bound():
    model = wrapped("ViTModel")
    bound = (6 / (3 * 8 * 8 + D)) ** 0.5
    prompts = torch.cat([p.flatten() for n, p in model.named_parameters() if "vpt_prompt" in n])
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.8 * bound


def test_prompt_dropout_only_in_training():
    model = wrapped("ViTModel", prompt_dropout=0.5)
    model.eval()
    a, b = model(pixel_values=pixels()).embeddings, model(pixel_values=pixels()).embeddings
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(pixel_values=pixels()).embeddings
    assert not torch.allclose(a, c)
    assert vpt().resolved_prompt_dropout == 0.1 and vpt(deep=False).resolved_prompt_dropout == 0.0


def test_classification_model_keeps_its_own_loss_without_proxies():
    model = get_peft_model(tiny_model("ViTForImageClassification"), vpt(num_classes=None))
    out = model(pixel_values=pixels(), labels=torch.tensor([0, 1]))
    expected = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1]))
    torch.testing.assert_close(out.loss, expected)


def test_labels_without_proxies_on_a_bare_backbone_is_an_error():
    model = get_peft_model(tiny_model("ViTModel"), vpt(num_classes=None))
    with pytest.raises(ValueError, match="num_classes"):
        model(pixel_values=pixels(), labels=torch.tensor([0, 1]))


def test_prompt_peft_exports_the_configs():
    assert prompt_peft.VPTConfig is VPTConfig


def test_zero_prompts_is_a_linear_probe_on_the_unchanged_backbone(tmp_path):
    """num_prompts=0: the backbone's outputs are exactly the bare model's; only the head (and proxies) train,
    and the embedding is that head applied to the bare pooled token."""
    bare = tiny_model("Dinov2Model")
    x = pixels(3)
    with torch.no_grad():
        expected = bare(pixel_values=x)
    model = get_peft_model(tiny_model("Dinov2Model"), VPTConfig(num_prompts=0, num_classes=4, embedding_dim=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("vpt_head" in n or "vpt_proxies" in n for n in trainable)
    head = model.base_model.model.layernorm
    with torch.no_grad():
        out = model(pixel_values=x)
        cls = expected.last_hidden_state[:, 0]
        by_hand = head.vpt_head_proj["default"](head.vpt_head_norm["default"](cls))
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.embeddings, torch.nn.functional.normalize(by_hand, dim=-1))

    perturb_adapter(model)
    model.save_pretrained(tmp_path)
    assert not any("prompt" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_model("Dinov2Model"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).embeddings, model(pixel_values=x).embeddings)
