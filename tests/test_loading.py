"""prompt_peft.from_pretrained: one call from an adapter folder to a model that returns embeddings."""

import json

import pytest
import torch
from peft import get_peft_model
from tiny_models import pixels, tiny_model
from transformers import Dinov2Model

import prompt_peft
from prompt_peft import VPTConfig


@pytest.fixture()
def saved(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("Dinov2Model").save_pretrained(base_dir)
    model = get_peft_model(Dinov2Model.from_pretrained(base_dir), VPTConfig(num_classes=3)).eval()
    model.save_pretrained(adapter_dir, save_embedding_layers=False)
    return base_dir, adapter_dir, model(pixel_values=pixels()).embeddings


def test_loads_base_named_in_the_adapter(saved):
    _, adapter_dir, expected = saved
    model = prompt_peft.from_pretrained(adapter_dir)
    assert type(model.get_base_model()) is Dinov2Model and not model.training
    torch.testing.assert_close(model(pixel_values=pixels()).embeddings, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters())


def test_given_base_and_trainable(saved):
    base_dir, adapter_dir, expected = saved
    model = prompt_peft.from_pretrained(adapter_dir, Dinov2Model.from_pretrained(base_dir), is_trainable=True)
    assert any(p.requires_grad for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(pixel_values=pixels()).embeddings, expected, rtol=0, atol=0)


def test_unknown_method_explains_the_import(saved):
    _, adapter_dir, _ = saved
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["peft_type"] = "FANCY_PROMPTS"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'FANCY_PROMPTS', which is not registered.*import it first"):
        prompt_peft.from_pretrained(adapter_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights(saved, damage):
    _, adapter_dir, _ = saved
    weights = adapter_dir / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        prompt_peft.from_pretrained(adapter_dir)


def test_incomplete_folder(saved):
    _, adapter_dir, _ = saved
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        prompt_peft.from_pretrained(adapter_dir)


def test_wrong_base_model(saved):
    _, adapter_dir, _ = saved
    with pytest.raises(ValueError, match="hidden_size=32"):
        prompt_peft.from_pretrained(adapter_dir, tiny_model("Dinov2Model", hidden_size=64, intermediate_size=64))
