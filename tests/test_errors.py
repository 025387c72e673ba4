"""Bad input gets a clear error naming the problem, not a stack trace from deep inside torch."""

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from tiny_models import pixels, tiny_model

from prompt_peft import SUPPORTED_MODELS, VPTConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_prompts=-3), "num_prompts must be a non-negative integer"),
        (dict(num_prompts=2.5), "num_prompts must be a non-negative integer"),
        (dict(embedding_dim=0), "embedding_dim must be a positive integer"),
        (dict(num_classes=-1), "num_classes must be a positive integer"),
        (dict(prompt_dropout=1.0), r"prompt_dropout must be in \[0, 1\)"),
        (dict(prompt_layers=[]), "non-empty list"),
        (dict(prompt_layers=[1, 1]), "distinct non-negative"),
        (dict(prompt_layers=[-1]), "distinct non-negative"),
        (dict(prompt_projection_dim=0), "prompt_projection_dim must be a positive integer"),
        (dict(proxy_alpha=0), "proxy_alpha must be > 0"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VPTConfig(**kwargs)


def test_layer_indices_out_of_range():
    with pytest.raises(ValueError, match=r"it has 3 blocks, indices 0\.\.2"):
        get_peft_model(tiny_model("ViTModel"), VPTConfig(prompt_layers=[0, 3]))


@pytest.mark.parametrize("name, config", [("SwinModel", "SwinConfig"), ("ConvNextModel", "ConvNextConfig")])
def test_unsupported_backbones(name, config):
    model = getattr(transformers, name)(getattr(transformers, config)())
    with pytest.raises(ValueError, match=f"does not support {name}.*Supported models: ViTModel"):
        get_peft_model(model, VPTConfig())
    assert "SiglipVisionModel" in SUPPORTED_MODELS


def test_adapter_for_another_hidden_size(tmp_path):
    get_peft_model(tiny_model("ViTModel"), VPTConfig()).save_pretrained(tmp_path, save_embedding_layers=False)
    other = tiny_model("ViTModel", hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError, match="hidden_size=32, but ViTModel has 48"):
        PeftModel.from_pretrained(other, tmp_path)


def test_adapter_for_another_depth(tmp_path):
    get_peft_model(tiny_model("ViTModel"), VPTConfig()).save_pretrained(tmp_path, save_embedding_layers=False)
    with pytest.raises(ValueError, match="num_layers=3, but ViTModel has 4"):
        PeftModel.from_pretrained(tiny_model("ViTModel", num_hidden_layers=4), tmp_path)


def test_attention_mask_is_refused():
    model = get_peft_model(tiny_model("ViTModel"), VPTConfig())
    mask = torch.ones(2, 1, 17, 17, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_mask"):
        model(pixel_values=pixels(), attention_mask=mask)


def test_two_active_adapters_are_refused():
    model = get_peft_model(tiny_model("ViTModel"), VPTConfig())
    model.add_adapter("other", VPTConfig())
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        model(pixel_values=pixels())
