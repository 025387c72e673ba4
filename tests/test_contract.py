"""The PEFT contract, for every method on every supported family (tiny configs): one parametrized matrix.

To cover a new family, add its model class to ``FAMILIES`` (and to tests/tiny_models.py); a new method, to
``METHODS`` (and its config to tests/golden_cases.py).
"""

import pytest
import torch
import transformers
from golden_cases import BATCH, LABELS, build, fit_loader
from peft import AutoPeftModel, PeftModel
from tiny_models import BARE, NEW_BARE, pixels, reference_features, tiny_model
from tiny_models import FAMILIES as ALL_CLASSES

import prompt_peft  # noqa: F401  (registers the methods with peft)
from prompt_peft import BackboneSpec
from prompt_peft.training import build_optimizer, training_step

METHODS = ["vpt_deep", "ship", "semantic_proxy_bitfit", "frpt"]
FAMILIES = list(BARE) + NEW_BARE
# FRPT re-samples images; SigLIP 2 takes patch sequences (refused with that reason, tests/test_backbone_families.py)
UNSUPPORTED = {("frpt", "Siglip2VisionModel")}
MATRIX = [pytest.param(m, f, id=f"{m}-{f}") for m in METHODS for f in FAMILIES if (m, f) not in UNSUPPORTED]
pytestmark = pytest.mark.usefixtures("one_thread")


def x():
    return pixels(batch=BATCH, seed=3)


def bare_features(family, images):
    base = tiny_model(family, seed=0)
    with torch.no_grad():
        return reference_features(base, bare_call(base, images))


def bare_call(model, images):
    """A model without adapters on a batch of images (SigLIP 2: as its patch sequences)."""
    return model(**BackboneSpec.from_model(model).model_inputs(model, images))


@pytest.mark.parametrize("method,family", MATRIX)
def test_backbone_stays_frozen_disable_and_unload_are_exact(method, family):
    model = build(method, family)
    backbone = {k: v.clone() for k, v in tiny_model(family, seed=0).state_dict().items()}
    optimizer = build_optimizer(model, lr=1e-2)
    model.train()
    for _ in range(2):
        training_step(model, x(), LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable <= set(model.base_model.parameter_roles())  # only declared adapter parameters

    expected = bare_features(family, x())
    with model.disable_adapter():
        disabled = model(pixel_values=x())
    assert torch.equal(reference_features(model, disabled), expected) and "embeddings" not in disabled

    restored = model.unload()
    assert restored.state_dict().keys() == backbone.keys()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, backbone[key]), key  # bit-identical after the optimiser steps
    out = bare_call(restored, x())
    assert torch.equal(reference_features(restored, out), expected) and "embeddings" not in out
    assert not restored._forward_hooks and not restored._forward_pre_hooks


@pytest.mark.parametrize("method,family", MATRIX)
def test_save_reload_and_every_loader_give_the_same_embeddings(method, family, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model(family, seed=0).save_pretrained(base_dir)
    base_cls = getattr(transformers, family)
    model = build(method, family, base=base_cls.from_pretrained(base_dir)).eval()
    with torch.no_grad():
        expected = model(pixel_values=x()).embeddings
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    loaded = PeftModel.from_pretrained(base_cls.from_pretrained(base_dir), adapter_dir).eval()
    auto = AutoPeftModel.from_pretrained(adapter_dir).eval()
    plain = base_cls.from_pretrained(base_dir).eval()
    plain.load_adapter(str(adapter_dir))
    for other in (loaded, auto, plain):
        with torch.no_grad():
            torch.testing.assert_close(other(pixel_values=x()).embeddings, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("method,family", MATRIX)
def test_two_adapters_switch_with_set_adapter(method, family):
    model = build(method, family).eval()
    with torch.no_grad():
        first = model(pixel_values=x()).embeddings
    model.add_adapter("second", model.peft_config["default"].__class__(**_fresh_fields(model)))
    model.base_model.fit_to_data(fit_loader(), "second")
    model.set_adapter("second")
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    second_ids = {id(p) for p in trainable}
    assert trainable and not (second_ids & _ids_of(model, "default"))
    with torch.no_grad():
        second = model(pixel_values=x()).embeddings
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x()).embeddings, first, rtol=0, atol=0)


def _fresh_fields(model):
    # the same settings as "default", without what injection recorded into it
    config = model.peft_config["default"].to_dict()
    for key in (
        "peft_type",
        "task_type",
        "target_modules",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
    ):
        config.pop(key, None)
    return config


def _ids_of(model, adapter):
    return {
        id(t)
        for layer in model.base_model._layers()
        for container, t in layer.role_tensors(adapter)
        if not container.kind.endswith("buffers")
    }


@pytest.mark.parametrize("method,family", MATRIX)
def test_bf16_backbone(method, family):
    model = build(method, family, base=tiny_model(family, seed=0).to(torch.bfloat16))
    model.train()
    out = model(pixel_values=x().to(torch.bfloat16), labels=LABELS)
    assert out.embeddings.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g.to_dense() if g.is_sparse else g).all() for g in grads)


# timm checkpoints whole wrapped blocks; blocks that read their call's context refuse it (see the test below)
CONTEXT_BLOCKS_ON_TIMM = {("ship", "TimmWrapperModel"), ("semantic_proxy_bitfit", "TimmWrapperModel")}


@pytest.mark.parametrize("method,family", [p for p in MATRIX if tuple(p.values) not in CONTEXT_BLOCKS_ON_TIMM])
def test_activation_checkpointing_gives_the_same_gradients(method, family):
    def grads(checkpointing):
        model = build(method, family)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(0)
        model(pixel_values=x(), labels=LABELS).loss.backward()
        return [
            (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for p in model.parameters()
            if p.requires_grad and p.grad is not None
        ]

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("name", [name for name in ALL_CLASSES if name not in BARE])
def test_model_classes_wrapping_a_backbone_disable_and_unload_exactly(name):
    """Classification wrappers of the families (their own heads stay untouched)."""
    model = build("vpt_deep", name).eval()
    expected = bare_features(name, x())
    with model.disable_adapter():
        assert torch.equal(reference_features(model, model(pixel_values=x())), expected)
    restored = model.unload()
    assert torch.equal(reference_features(restored, bare_call(restored, x())), expected)


@pytest.mark.parametrize("method,family", sorted(CONTEXT_BLOCKS_ON_TIMM))
def test_activation_checkpointing_on_timm_refuses_blocks_that_read_their_call(method, family):
    model = build(method, family)
    model.train()
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="cannot train with TimmWrapperModel's own activation checkpointing"):
        model(pixel_values=x(), labels=LABELS)
    model.eval()  # inference never recomputes: fine
    with torch.no_grad():
        assert model(pixel_values=x()).embeddings.shape[0] == BATCH
