"""Adapters load exactly or not at all, through every entry point (issue 13, point 1).

Each damaged adapter below loaded silently before (peft's ``strict=False`` left random parameters behind a
warning, or dropped tensors with no warning at all); now each is an AdapterMismatchError naming the tensors.
"""

import json
import shutil

import pytest
import torch
from peft import AutoPeftModel, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import pixels, tiny_model
from transformers import AutoModel, ViTModel

import prompt_peft
from prompt_peft import AdapterMismatchError, FRPTConfig, SemanticProxyVPTConfig, VPTConfig

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A saved tiny backbone and one saved adapter per method used below."""
    root = tmp_path_factory.mktemp("strict")
    tiny_model("ViTModel").save_pretrained(root / "base")
    configs = {
        "vpt": VPTConfig(num_classes=3, deep=True, num_prompts=4),
        "frpt": FRPTConfig(num_classes=3),
        "vptsp": SemanticProxyVPTConfig(num_classes=3),
    }
    for name, config in configs.items():
        model = get_peft_model(ViTModel.from_pretrained(root / "base"), config)
        model.save_pretrained(root / name, save_embedding_layers=False)
    return root


def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def _edit_weights(folder, edit):
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def _damage(root, kind):
    """A copy of an adapter, damaged as a user (or a bad copy) would; returns its folder."""
    target = root / f"damaged_{kind}"
    shutil.rmtree(target, ignore_errors=True)
    if kind == "vpt_under_frpt_config":
        shutil.copytree(root / "frpt", target)
        shutil.copy(root / "vpt" / WEIGHTS, target / WEIGHTS)
    elif kind == "vptsp_under_vpt_config":
        shutil.copytree(root / "vpt", target)
        shutil.copy(root / "vptsp" / WEIGHTS, target / WEIGHTS)
    else:
        shutil.copytree(root / "vpt", target)
        if kind == "prompt_deleted":
            _edit_weights(target, lambda t: t.pop("base_model.model.layers.0.vpt_prompt"))
        elif kind == "deep_false_on_deep":
            _edit_config(target, deep=False)
        elif kind == "num_prompts_changed":
            _edit_config(target, num_prompts=6)
        elif kind == "embedding_dim_changed":
            _edit_config(target, embedding_dim=16)
        elif kind == "extra_tensor":
            _edit_weights(target, lambda t: t.update({"base_model.model.layers.1.vpt_prompt_extra": torch.zeros(2)}))
        elif kind == "head_deleted":
            _edit_weights(target, lambda t: t.pop("base_model.model.layernorm.vpt_head_proj.weight"))
    return target


def _load(entry, root, folder):
    if entry == "prompt_peft.from_pretrained":
        return prompt_peft.from_pretrained(folder, root / "base")
    if entry == "PeftModel.from_pretrained":
        return PeftModel.from_pretrained(ViTModel.from_pretrained(root / "base"), folder)
    if entry == "AutoPeftModel":
        _edit_config(folder, base_model_name_or_path=str(root / "base"))
        return AutoPeftModel.from_pretrained(folder)
    if entry == "transformers load_adapter":
        return ViTModel.from_pretrained(root / "base").load_adapter(str(folder))
    if entry == "transformers AutoModel":
        _edit_config(folder, base_model_name_or_path=str(root / "base"))
        return AutoModel.from_pretrained(folder)
    raise AssertionError(entry)


ENTRY_POINTS = [
    "prompt_peft.from_pretrained",
    "PeftModel.from_pretrained",
    "AutoPeftModel",
    "transformers load_adapter",
    "transformers AutoModel",
]
DAMAGES = {
    "prompt_deleted": r"Missing from the weights file \(1\): layers\.0\.vpt_prompt\n",
    "deep_false_on_deep": r"not in the adapter the config describes \(2\): layers\.1\.vpt_prompt, layers\.2\.vpt_prompt",
    "num_prompts_changed": r"Wrong shape \(file vs config\): layers\.0\.vpt_prompt \[4, 32\] vs \[6, 32\]",
    "embedding_dim_changed": r"Wrong shape.*layernorm\.vpt_head_proj\.weight \[512, 32\] vs \[16, 32\]",
    "extra_tensor": r"not in the adapter the config describes \(1\): layers\.1\.vpt_prompt_extra",
    "head_deleted": r"Missing from the weights file \(1\): layernorm\.vpt_head_proj\.weight",
    "vpt_under_frpt_config": r"FRPT adapter.*Missing.*frpt_parser.*The weights look like a vpt adapter",
    "vptsp_under_vpt_config": r"VPT adapter.*The weights look like a semantic_proxy adapter",
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", list(DAMAGES))
def test_damaged_adapter_is_refused(adapters, kind, entry):
    folder = _damage(adapters, kind)
    with pytest.raises(AdapterMismatchError, match=f"(?s){DAMAGES[kind]}"):
        _load(entry, adapters, folder)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("method", ["vpt", "frpt", "vptsp"])
def test_intact_adapters_still_load_exactly(adapters, method, entry):
    folder = adapters / f"intact_{method}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapters / method, folder)
    expected = PeftModel.from_pretrained(ViTModel.from_pretrained(adapters / "base"), adapters / method).eval()
    loaded = _load(entry, adapters, folder)
    model = loaded if isinstance(loaded, torch.nn.Module) else None
    if model is None:  # transformers' load_adapter returns its loading report; the adapter is on the base model
        model = ViTModel.from_pretrained(adapters / "base")
        model.load_adapter(str(folder))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=pixels()).embeddings, expected(pixel_values=pixels()).embeddings, rtol=0, atol=0
        )


def test_refused_transformers_load_leaves_the_model_usable(adapters):
    model = ViTModel.from_pretrained(adapters / "base")
    with pytest.raises(AdapterMismatchError):
        model.load_adapter(str(_damage(adapters, "deep_false_on_deep")))
    assert not getattr(model, "_hf_peft_config_loaded", False)
    model.load_adapter(str(adapters / "vpt"))  # the same name again, now with a matching adapter
    assert model(pixel_values=pixels()).embeddings.shape == (2, 512)


def test_second_adapter_through_peft_load_adapter(adapters):
    model = PeftModel.from_pretrained(ViTModel.from_pretrained(adapters / "base"), adapters / "vpt")
    with pytest.raises(AdapterMismatchError, match="layers.0.vpt_prompt"):
        model.load_adapter(str(_damage(adapters, "prompt_deleted")), adapter_name="second")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_inference_only_export_loads_for_inference_only(adapters, entry):
    """Exactly the training-only parts missing (proxies): a retrieval-only export, not damage; it loads for
    inference with identical embeddings, is refused for further training, and a partial gap is still damage."""
    folder = adapters / "inference_only"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapters / "vpt", folder)
    _edit_weights(folder, lambda t: t.pop("base_model.model.layernorm.vpt_proxies"))
    expected = PeftModel.from_pretrained(ViTModel.from_pretrained(adapters / "base"), adapters / "vpt").eval()
    loaded = _load(entry, adapters, folder)
    if not isinstance(loaded, torch.nn.Module):
        loaded = ViTModel.from_pretrained(adapters / "base")
        loaded.load_adapter(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(pixel_values=pixels()).embeddings, expected(pixel_values=pixels()).embeddings, rtol=0, atol=0
        )
    with pytest.raises(AdapterMismatchError, match="(?s)vpt_proxies.*inference-only adapter"):
        PeftModel.from_pretrained(ViTModel.from_pretrained(adapters / "base"), folder, is_trainable=True)
    with pytest.raises(AdapterMismatchError, match="(?s)vpt_proxies.*inference-only adapter"):
        ViTModel.from_pretrained(adapters / "base").load_adapter(str(folder), is_trainable=True)


def test_partial_gap_in_training_parts_is_damage(adapters):
    folder = adapters / "vptsp_partial"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapters / "vptsp", folder)
    _edit_weights(folder, lambda t: t.pop("base_model.model.layernorm.vptsp_semantic_gru.bias"))
    with pytest.raises(
        AdapterMismatchError, match=r"Missing from the weights file \(1\): layernorm\.vptsp_semantic_gru"
    ):
        PeftModel.from_pretrained(ViTModel.from_pretrained(adapters / "base"), folder)
