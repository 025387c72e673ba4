"""SHIP adapters: shapes and parameter counts (docs/methods.md, SHIP), the token plan, fitting, losses, training,
save / load / Hub round trips, peft behaviour, on tiny random backbones."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import BARE, SIZES, perturb_adapter, pixels, tiny_model
from transformers import Dinov2Model, ViTConfig, ViTModel

import prompt_peft
from prompt_peft.hub import push_adapter_to_hub
from prompt_peft.tuners.ship import SHIPConfig
from prompt_peft.tuners.ship.hierarchy import SemanticHierarchy

pytestmark = [
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),  # huggingface_hub
    pytest.mark.usefixtures("one_thread"),
]
BASE_ID, ADAPTER_ID = "org/tiny-dinov2", "org/tiny-dinov2-ship"
D, L = SIZES["hidden_size"], SIZES["num_hidden_layers"]
K, S, A, P, EMB, CLASSES = 3, 2, 4, 5, 8, 4


def config(**kw):
    defaults = dict(levels=[0, 1, 2], level_prompt_tokens=K, shared_prompt_tokens=S, attribute_prompt_tokens=A,
                    num_prototypes=P, embedding_dim=EMB, num_classes=CLASSES)
    return SHIPConfig(**{**defaults, **kw})


def loader(n=3, batch=4):
    return [{"pixel_values": pixels(batch=batch, seed=s), "labels": torch.arange(batch) % CLASSES} for s in range(n)]


def fitted(name="ViTModel", seed=0, base=None, perturb=True, **kw):
    model = get_peft_model(base if base is not None else tiny_model(name, seed=seed), config(**kw))
    model.fit_hierarchy(loader())
    if perturb:
        perturb_adapter(model, seed)
    return model.eval()


def head_parameters(classes=CLASSES, hidden=D, emb=EMB):
    return 2 * hidden + hidden * emb + emb + classes * emb  # LayerNorm + Linear + proxies


# ---------------------------------------------------------------------------------------------------- shapes


def test_vit_b_parameter_count_follows_the_paper_formula():
    # ViT-B/16 with the cifar100 levels (M=6, K=50): 230,400 + 7,680 + 15,360 prompt parameters, as logged
    # by the official code (which adds the classifier, 76,900, and a dead 38,400; ours adds the retrieval head).
    with torch.device("meta"):
        vit_b = ViTModel(ViTConfig(), add_pooling_layer=False)
    cfg = SHIPConfig(levels=[0, 2, 4, 6, 8, 11], num_classes=100, embedding_dim=128)
    model = get_peft_model(vit_b, cfg)
    prompts = 230_400 + 7_680 + 15_360
    assert cfg.num_prompt_parameters(768) == prompts
    counts = model.base_model.get_parameter_counts()
    assert counts["trainable"] == prompts + head_parameters(100, 768, 128)
    prototypes = cfg.num_prototypes * 768  # a buffer: stored, and used at inference
    assert counts["inference"] == prompts + head_parameters(0, 768, 128) + prototypes
    assert counts["stored"] == counts["trainable"] + prototypes
    shapes = {n.removeprefix("base_model.model."): p.shape for n, p in model.named_parameters() if p.requires_grad}
    for block in (0, 2, 4, 6, 8, 11):
        assert shapes[f"layers.{block}.ship_prompt.default"] == (50, 768)
    assert shapes["layers.0.ship_shared_prompt.default"] == (10, 768)
    for block in (8, 11):
        assert shapes[f"layers.{block}.ship_attribute_prompt.default"] == (10, 768)
    assert sum("ship_prompt." in n for n in shapes) == 6 and sum("attribute" in n for n in shapes) == 2
    buffers = {n.removeprefix("base_model.model."): tuple(b.shape) for n, b in model.named_buffers() if "ship_" in n}
    assert buffers == {"layers.8.ship_prototypes.default": (200, 768)}


def test_token_plan_of_the_cifar100_levels():
    steps = SHIPConfig(levels=[0, 2, 4, 6, 8, 11]).prompt_schedule(12)
    level, attribute_level = (0, 60, 0), (60, 70, 0)  # (drop, new, strip): K=50, S=10, A=10
    inside = (10, 10, 0)
    expected = [level, inside, (60, 60, 0), inside, (60, 60, 0), inside, (60, 60, 0), inside, attribute_level,
                inside, inside, (70, 70, 70)]
    assert [(s.drop, s.new, s.strip) for s in steps] == expected
    reinserted = SHIPConfig(levels=[0, 2, 4, 6, 8, 11], reinsert_level_prompts=True).prompt_schedule(12)
    assert [(s.drop, s.new) for s in reinserted][:2] == [(0, 60), (60, 60)]
    assert (reinserted[9].drop, reinserted[9].new) == (60, 60)  # the attribute prompt of block 8 is carried


@pytest.mark.parametrize("name", BARE)
def test_tiny_parameter_counts_and_output_contract(name):
    model = fitted(name, perturb=False)
    prompts = 3 * K * D + S * D + 2 * A * D
    assert model.base_model.get_parameter_counts()["trainable"] == prompts + head_parameters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("ship_" in n for n in trainable)
    out = model(pixel_values=pixels(), labels=torch.tensor([0, 3]))
    with torch.no_grad():
        bare = tiny_model(name)(pixel_values=pixels()).last_hidden_state
    assert out.last_hidden_state.shape == bare.shape  # prompts stripped after the last block
    assert out.embeddings.shape == (2, EMB) and torch.isfinite(out.loss)
    assert "auxiliary_loss" not in out  # eval mode: no matching loss


def test_output_hidden_states_still_work():
    out = fitted()(pixel_values=pixels(), output_hidden_states=True)
    # captured inside the wrappers, so with the prompts of the first block
    assert len(out.hidden_states) == L + 1 and out.hidden_states[0].shape == (2, 17 + K + S, D)


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw,match", [
    (dict(levels=[1, 2]), "start with block 0"),
    (dict(levels=[0, 2, 2]), "increase strictly"),
    (dict(levels=[0, 1]), "2 attribute prompts need 3 levels"),
    (dict(levels="0,1"), "list of block indices"),
    (dict(prompts_as_queries="first"), "prompts_as_queries"),
    (dict(hierarchy_feature="max"), "hierarchy_feature"),
    (dict(decoupled_weight=1.5), "decoupled_weight"),
    (dict(level_prompt_tokens=0), "level_prompt_tokens"),
    (dict(shared_prompt_tokens=-1), "shared_prompt_tokens"),
])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_levels_past_the_last_block_are_refused():
    with pytest.raises(ValueError, match="reach past the backbone's last block"):
        get_peft_model(tiny_model("ViTModel"), config(levels=[0, 1, 3]))


def test_one_level_works_without_attribute_prompts():
    model = fitted(levels=[0], num_attribute_prompts=0)
    assert model.base_model.get_parameter_counts()["trainable"] == K * D + S * D + head_parameters()
    assert model(pixel_values=pixels()).embeddings.shape == (2, EMB)


# ---------------------------------------------------------------------------------------------------- fitting


def test_fit_hierarchy_creates_the_prompts_of_an_unfitted_adapter():
    model = get_peft_model(tiny_model("ViTModel"), config(levels=None, share_threshold=2.0))
    assert model.base_model.get_parameter_counts()["trainable"] == head_parameters()
    with pytest.raises(RuntimeError, match="fit_hierarchy"):
        model(pixel_values=pixels())
    hierarchy = model.fit_hierarchy(loader())
    assert hierarchy.levels == [0, 1, 2] == model.peft_config["default"].levels  # tau >= 1: a level per block
    assert model.base_model.get_parameter_counts()["trainable"] == 3 * K * D + S * D + 2 * A * D + head_parameters()
    assert torch.equal(model.base_model.prototype_bank(), hierarchy.prototypes)
    out = model(pixel_values=pixels(), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_given_levels_are_kept_unless_refit():
    model = get_peft_model(tiny_model("ViTModel"), config(levels=[0, 1, 2], share_threshold=-1.0))
    assert model.fit_hierarchy(loader()).levels == [0]  # computed, not applied
    assert model.peft_config["default"].levels == [0, 1, 2]
    with pytest.raises(ValueError, match="2 attribute prompts need 3 levels"):
        model.fit_hierarchy(loader(), refit_levels=True)
    assert model.peft_config["default"].levels == [0, 1, 2]  # unchanged after the refusal


def test_prototypes_must_be_fitted_before_use():
    model = get_peft_model(tiny_model("ViTModel"), config())
    with pytest.raises(RuntimeError, match="prototypes are not fitted"):
        model(pixel_values=pixels())
    bank = torch.randn(P, D)
    model.apply_hierarchy(SemanticHierarchy(levels=[0, 1, 2], prototypes=bank, affinity=torch.eye(3), num_images=1))
    assert torch.equal(model.base_model.prototype_bank(), bank)
    model(pixel_values=pixels())
    with pytest.raises(ValueError, match="do not fit"):
        model.apply_hierarchy(SemanticHierarchy([0, 1, 2], torch.randn(P + 1, D), torch.eye(3), 1))


# ---------------------------------------------------------------------------------------------------- losses


def test_matching_loss_only_in_training_and_weighted():
    model = fitted()
    labels = torch.tensor([0, 1])
    evaluated = model(pixel_values=pixels(), labels=labels)
    model.train()
    trained = model(pixel_values=pixels(), labels=labels)
    assert "auxiliary_loss" not in evaluated and trained.auxiliary_loss > 0
    torch.testing.assert_close(trained.loss, evaluated.loss + trained.auxiliary_loss)  # no dropout in the tiny ViT
    model.peft_config["default"].matching_loss_weight = 1.0
    torch.testing.assert_close(model(pixel_values=pixels(), labels=labels).auxiliary_loss, 2 * trained.auxiliary_loss)
    model.peft_config["default"].matching_loss_weight = 0.0
    torch.testing.assert_close(model(pixel_values=pixels(), labels=labels).loss, evaluated.loss)


def test_matching_loss_warm_up_counts_training_steps_and_is_saved(tmp_path):
    model = fitted(matching_loss_warmup_steps=2)
    model.train()
    present = ["auxiliary_loss" in model(pixel_values=pixels(), labels=torch.tensor([0, 1])) for _ in range(3)]
    assert present == [False, False, True]
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert stored["base_model.model.layers.2.ship_matching_steps"].item() == 3


def test_matching_loss_is_added_to_a_classification_models_own_loss():
    model = fitted("ViTForImageClassification", num_classes=None)
    model.train()
    out = model(pixel_values=pixels(), labels=torch.tensor([0, 1]))
    cross_entropy = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1]))
    torch.testing.assert_close(out.loss, cross_entropy + out.auxiliary_loss)


@pytest.mark.parametrize("name", ["ViTModel", "SiglipVisionModel"])
def test_one_training_step_lowers_the_loss(name):
    torch.manual_seed(0)
    model = fitted(name, perturb=False)
    model.train()
    batch = pixels(batch=8, seed=3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        out = model(pixel_values=batch, labels=labels)
        out.loss.backward()
        losses.append(out.loss.item())
        optimizer.step()
    assert losses[1] < losses[0]


# ---------------------------------------------------------------------------------------------------- peft behaviour


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2WithRegistersModel", "SiglipVisionModel"])
def test_save_and_load_round_trip(name, tmp_path):
    model = fitted(name)
    expected = model(pixel_values=pixels()).embeddings
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".default" not in k and "ship_" in k for k in stored)
    prototypes = [k for k in stored if "ship_prototypes" in k]
    assert len(prototypes) == 1 and stored[prototypes[0]].shape == (P, D)
    assert sum(t.numel() for t in stored.values()) == model.base_model.get_parameter_counts()["stored"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SHIP" and saved["levels"] == [0, 1, 2]

    base = tiny_model(name)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()  # no data needed
    assert base.config._attn_implementation == "prompt_peft_ship_sdpa"
    torch.testing.assert_close(loaded(pixel_values=pixels()).embeddings, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_hub_push_then_download_reproduces_the_embeddings(fake_hub):
    tiny_model("Dinov2Model").push_to_hub(BASE_ID)
    model = fitted(base=Dinov2Model.from_pretrained(BASE_ID))
    push_adapter_to_hub(model, ADAPTER_ID, base_model_id=BASE_ID)
    with torch.no_grad():
        expected = model(pixel_values=pixels()).embeddings
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(fake_hub.files(ADAPTER_ID))
    from_peft = PeftModel.from_pretrained(Dinov2Model.from_pretrained(BASE_ID), ADAPTER_ID).eval()
    from_helper = prompt_peft.from_pretrained(ADAPTER_ID)
    with torch.no_grad():
        assert torch.equal(from_peft(pixel_values=pixels()).embeddings, expected)
        assert torch.equal(from_helper(pixel_values=pixels()).embeddings, expected)


@pytest.mark.parametrize("name", ["ViTModel", "SiglipVisionModel"])
def test_other_image_sizes(name):
    model = fitted(name)
    out = model(pixel_values=pixels(size=48), interpolate_pos_encoding=True)
    assert out.embeddings.shape == (2, EMB)
    assert out.last_hidden_state.shape[1] == (1 if name == "ViTModel" else 0) + 36


def test_reinserted_level_prompts_and_queries_everywhere_run():
    model = fitted(reinsert_level_prompts=True, prompts_as_queries="all")
    model.train()
    out = model(pixel_values=pixels(), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_merge_is_refused():
    with pytest.raises(ValueError, match="cannot be merged"):
        fitted().merge_and_unload()
