"""The families of issue 15 (timm ViTs through TimmWrapperModel, DINOv3, SigLIP 2) with every method, checked
numerically: against the bare model (disable / unload), against a save/reload, against the same network written
in another framework (timm vs transformers' ViT), against the model's own tokens (DINOv3 registers), and padded vs
unpadded NaFlex inputs (SigLIP 2).

Per-family entries meant to be folded into the contract matrix."""

from __future__ import annotations

import pytest
import torch
import transformers
from golden_cases import CLASSES, EMB, LABELS, METHODS, _is_adapter_buffer
from peft import PeftModel, get_peft_model
from tiny_models import NEW_BARE, TIMM_VIT_ARGS, perturb_adapter, pixels, tiny_model
from transformers import AutoModel

import prompt_peft
from prompt_peft import BackboneSpec
from prompt_peft.retrieval.extract import pooled_features

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    (method, family) for family in NEW_BARE for method in METHODS if (method, family) != ("frpt", "Siglip2VisionModel")
]


def adapted(method: str, family: str, model=None):
    model = get_peft_model(model if model is not None else tiny_model(family), METHODS[method]())
    if method == "ship":
        model.fit_hierarchy([{"pixel_values": pixels(batch=4, seed=s), "labels": LABELS} for s in range(3)])
    return perturb_adapter(model, seed=0).eval()


def bare_output(family: str, batch: torch.Tensor) -> torch.Tensor:
    model = tiny_model(family)
    with torch.no_grad():
        return model(**BackboneSpec.from_model(model).model_inputs(model, batch)).last_hidden_state


@pytest.mark.parametrize("method,family", CASES)
def test_method_on_family_disable_unload_reload_train(method, family, tmp_path):
    batch = pixels(batch=4, seed=7)
    model = adapted(method, family)
    with torch.no_grad():
        active = model(pixel_values=batch)
        with model.disable_adapter():
            disabled = model(pixel_values=batch).last_hidden_state
    reference = bare_output(family, batch)
    assert torch.equal(disabled, reference)  # the bare backbone, bit for bit
    assert active.embeddings.shape == (4, EMB)
    assert torch.allclose(active.embeddings.norm(dim=-1), torch.ones(4))
    if method != "frpt" or family != "Siglip2VisionModel":
        assert not torch.allclose(active.last_hidden_state, reference, atol=1e-4)  # the adapter acts

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model(family), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=batch).embeddings, active.embeddings)

    model.train()
    out = model(pixel_values=batch, labels=LABELS)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    prompt_grads = [p.grad.norm() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert prompt_grads and sum(prompt_grads) > 0

    unloaded = model.unload().eval()
    with torch.no_grad():
        assert torch.equal(
            unloaded(**BackboneSpec.from_model(unloaded).model_inputs(unloaded, batch)).last_hidden_state, reference
        )
    assert set(unloaded.state_dict()) == set(tiny_model(family).state_dict())


def test_frpt_on_siglip2_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="FRPT does not support Siglip2VisionModel: FRPT re-samples the input image"):
        get_peft_model(tiny_model("Siglip2VisionModel"), prompt_peft.FRPTConfig(embedding_dim=EMB))


def test_timm_models_other_than_plain_vits_are_refused():
    config = transformers.TimmWrapperConfig(architecture="resnet18")
    with pytest.raises(ValueError, match="not timm's ResNet"):
        BackboneSpec.from_model(transformers.TimmWrapperModel(config))
    other_pool = tiny_model("TimmWrapperModel", model_args={"global_pool": "max", "fc_norm": False})
    with pytest.raises(ValueError, match="global_pool='max'"):
        BackboneSpec.from_model(other_pool)


# ---------------------------------------------------------------------------------------------------- timm


def vit_from_timm(timm_model) -> transformers.ViTModel:
    """transformers' ViTModel with the weights of a tiny timm ViT (the same network in the other framework)."""
    vit = tiny_model("ViTModel", layer_norm_eps=1e-6)
    source = {k.removeprefix("timm_model."): v for k, v in timm_model.state_dict().items()}
    target = {
        "embeddings.cls_token": source["cls_token"],
        "embeddings.position_embeddings": source["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": source["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": source["patch_embed.proj.bias"],
        "layernorm.weight": source["norm.weight"],
        "layernorm.bias": source["norm.bias"],
    }
    for i in range(TIMM_VIT_ARGS["depth"]):
        b, t = f"blocks.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = source[b + f"attn.qkv.{part}"].chunk(3)
            target |= {t + f"attention.q_proj.{part}": q, t + f"attention.k_proj.{part}": k}
            target |= {
                t + f"attention.v_proj.{part}": v,
                t + f"attention.o_proj.{part}": source[b + f"attn.proj.{part}"],
            }
            target |= {t + f"layernorm_before.{part}": source[b + f"norm1.{part}"]}
            target |= {t + f"layernorm_after.{part}": source[b + f"norm2.{part}"]}
            target |= {
                t + f"mlp.fc1.{part}": source[b + f"mlp.fc1.{part}"],
                t + f"mlp.fc2.{part}": source[b + f"mlp.fc2.{part}"],
            }
    missing, _ = vit.load_state_dict(target, strict=False)
    assert all(name.startswith("pooler.") for name in missing)
    return vit.eval()


def copy_adapter(source, target) -> None:
    """Adapter parameters and buffers of one model into another with the same adapter layout (in order)."""
    pairs = [
        (dict(source.named_parameters()), dict(target.named_parameters()), lambda n, p: p.requires_grad),
        (dict(source.named_buffers()), dict(target.named_buffers()), lambda n, p: _is_adapter_buffer(n)),
    ]
    for source_items, target_items, keep in pairs:
        src = [p for n, p in source_items.items() if keep(n, p)]
        dst = [p for n, p in target_items.items() if keep(n, p)]
        assert [p.shape for p in src] == [p.shape for p in dst]
        with torch.no_grad():
            for s, d in zip(src, dst):
                d.copy_(s)


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep", "ship", "semantic_proxy", "frpt"])
def test_timm_vit_gives_the_numbers_of_the_same_transformers_vit(method):
    """Prefix tokens, prompt insertion, final norm and pooling on timm, SHIP's attention on timm's Attention and
    FRPT's early pass through timm's position embeddings all agree with the transformers ViT path."""
    timm_backbone = tiny_model("TimmWrapperModel")
    vit = vit_from_timm(timm_backbone)
    batch = pixels(batch=4, seed=7)
    with torch.no_grad():
        assert torch.allclose(
            timm_backbone(batch).last_hidden_state, vit(pixel_values=batch).last_hidden_state, atol=1e-5
        )
    on_timm, on_vit = adapted(method, "TimmWrapperModel", timm_backbone), adapted(method, "ViTModel", vit)
    copy_adapter(on_timm, on_vit)
    with torch.no_grad():
        for model in (on_timm, on_vit):
            model.eval()
        assert torch.allclose(on_timm(pixel_values=batch).embeddings, on_vit(pixel_values=batch).embeddings, atol=1e-5)
    torch.manual_seed(0)
    loss_timm = on_timm.train()(pixel_values=batch, labels=LABELS).loss
    torch.manual_seed(0)
    loss_vit = on_vit.train()(pixel_values=batch, labels=LABELS).loss
    assert torch.allclose(loss_timm, loss_vit, atol=1e-5)


def test_timm_non_native_size_is_timm_dynamic_size_and_exact_at_native_size():
    model = tiny_model("TimmWrapperModel")
    spec = BackboneSpec.from_model(model)
    native, large = pixels(batch=2, size=32), pixels(batch=2, size=48)
    with torch.no_grad():
        before = model(native).last_hidden_state
        out = model(**spec.model_inputs(model, large)).last_hidden_state  # switches to dynamic_img_size
        after = model(native).last_hidden_state
        reference = tiny_model("TimmWrapperModel", model_args={"dynamic_img_size": True})(large).last_hidden_state
    assert torch.equal(before, after)
    assert out.shape == (2, 1 + 36, 32) and torch.allclose(out, reference, atol=1e-6)


def test_timm_pooling_variants_read_what_timm_pools():
    batch = pixels(batch=2, seed=3)
    for args, family in [
        ({"global_pool": "avg", "fc_norm": True}, "timm_vit_avg_fc_norm"),
        ({"global_pool": "avg", "fc_norm": False}, "timm_vit_avg"),
        ({"global_pool": "map"}, "timm_vit_map"),
        ({"reg_tokens": 2}, "timm_vit"),
    ]:
        backbone = tiny_model("TimmWrapperModel", model_args=args)
        spec = BackboneSpec.from_model(backbone)
        assert spec.family == family
        with torch.no_grad():
            expected = torch.nn.functional.normalize(backbone(batch).pooler_output, dim=-1)
            assert torch.allclose(pooled_features(backbone, batch), expected, atol=1e-6)
        assert spec.num_prefix_tokens == backbone.timm_model.num_prefix_tokens
        model = adapted("vpt_deep", "TimmWrapperModel", backbone)
        with torch.no_grad(), model.disable_adapter():
            assert torch.allclose(pooled_features(model, batch), expected, atol=1e-6)


def test_ship_end_to_end_on_a_saved_random_timm_model_loaded_with_automodel(tmp_path):
    """get_peft_model(AutoModel.from_pretrained(<saved timm folder>), SHIPConfig(...)): fit, train, save, serve."""
    config = transformers.TimmWrapperConfig(architecture="vit_small_patch16_224", model_args=TIMM_VIT_ARGS)
    torch.manual_seed(0)
    transformers.TimmWrapperModel(config).save_pretrained(tmp_path / "timm-vit")
    backbone = AutoModel.from_pretrained(tmp_path / "timm-vit")
    assert type(backbone).__name__ == "TimmWrapperModel"
    model = get_peft_model(
        backbone,
        prompt_peft.SHIPConfig(num_attribute_prompts=1, level_prompt_tokens=2, shared_prompt_tokens=1,
                               attribute_prompt_tokens=3, num_prototypes=4, embedding_dim=EMB, num_classes=CLASSES),
    )
    model.fit_hierarchy([{"pixel_values": pixels(batch=4, seed=s), "labels": LABELS} for s in range(3)])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    before = model(pixel_values=pixels(batch=4, seed=9), labels=LABELS).loss
    before.backward()
    optimizer.step()
    model.eval()
    batch = pixels(batch=3, seed=11)
    with torch.no_grad():
        embeddings = model(pixel_values=batch).embeddings
    model.save_pretrained(tmp_path / "adapter")
    served = prompt_peft.from_pretrained(tmp_path / "adapter", tmp_path / "timm-vit")
    with torch.no_grad():
        assert torch.equal(served(pixel_values=batch).embeddings, embeddings)
        with served.disable_adapter():
            bare = AutoModel.from_pretrained(tmp_path / "timm-vit")(pixel_values=batch).last_hidden_state
            assert torch.equal(served(pixel_values=batch).last_hidden_state, bare)


# ---------------------------------------------------------------------------------------------------- DINOv3


@pytest.mark.parametrize("n", [1, 3])
def test_dinov3_prompts_get_no_rotary_position_like_its_registers(n):
    """VPT-shallow prompts act exactly as n more register tokens holding the prompts (registers get no RoPE)."""
    config = prompt_peft.VPTConfig(num_prompts=n, deep=False, embedding_dim=EMB)
    prompted = perturb_adapter(get_peft_model(tiny_model("DINOv3ViTModel"), config), seed=0).eval()
    prompts = next(p for name, p in prompted.named_parameters() if "vpt_prompt" in name)
    with_registers = tiny_model("DINOv3ViTModel", num_register_tokens=2 + n)
    state = tiny_model("DINOv3ViTModel").state_dict()
    state["embeddings.register_tokens"] = torch.cat([state["embeddings.register_tokens"], prompts[None].detach()], 1)
    with_registers.load_state_dict(state)
    batch = pixels(batch=2, seed=5)
    with torch.no_grad():
        cls_prompted = prompted(pixel_values=batch).last_hidden_state[:, 0]
        cls_registers = with_registers(pixel_values=batch).last_hidden_state[:, 0]
    assert torch.allclose(cls_prompted, cls_registers, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- SigLIP 2


def test_siglip2_images_become_the_processors_patch_sequences():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    model = tiny_model("Siglip2VisionModel")
    images = pixels(batch=2, size=48)
    inputs = BackboneSpec.from_model(model).model_inputs(model, images)
    expected = torch.stack([convert_image_to_patches(image, 8) for image in images])
    assert torch.equal(inputs["pixel_values"], expected)
    assert inputs["spatial_shapes"].tolist() == [[6, 6], [6, 6]] and bool(inputs["pixel_attention_mask"].all())


@pytest.mark.parametrize("method", ["vpt_deep", "ship", "semantic_proxy_bitfit"])
def test_siglip2_padding_is_masked_and_prompts_are_always_attended(method):
    """A padded NaFlex batch gives each image the embedding it has alone: padding is never attended, prompts are."""
    model = adapted(method, "Siglip2VisionModel")
    short = pixels(batch=1, seed=4)[:, :, :16]  # 2 x 4 patches
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    alone = convert_image_to_patches(short[0], 8)[None]
    full = BackboneSpec.from_model(model.get_base_model()).model_inputs(model.get_base_model(), pixels(batch=1, seed=2))
    padded = torch.cat([alone, torch.zeros_like(alone)], dim=1)  # 8 patches + 8 padding
    batch = {
        "pixel_values": torch.cat([full["pixel_values"], padded]),
        "pixel_attention_mask": torch.tensor([[1] * 16, [1] * 8 + [0] * 8]),
        "spatial_shapes": torch.tensor([[4, 4], [2, 4]]),
    }
    with torch.no_grad():
        together = model(**batch).embeddings
        single = model(
            pixel_values=alone,
            pixel_attention_mask=torch.ones(1, 8, dtype=torch.long),
            spatial_shapes=torch.tensor([[2, 4]]),
        ).embeddings
        first = model(**full).embeddings
    assert torch.allclose(together[1], single[0], atol=1e-5)
    assert torch.allclose(together[0], first[0], atol=1e-5)
