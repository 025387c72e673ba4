"""transformers' Hub kernels stay off: recent transformers load every model with ``use_kernels=True`` when the
``kernels`` package is installed and kernelize again at each ``train()`` / ``eval()``; on a CUDA device that
downloads layers from the Hub, so a GPU run without internet crashed at its first evaluation, after training.

Here ``kernelize`` is replaced by one that fails the way the Hub download fails: every path that loads or wraps a
backbone must switch modes without calling it, and give the plain model's numbers."""

import pytest
import torch
import transformers.modeling_utils as modeling_utils
from peft import get_peft_model
from tiny_models import pixels, tiny_model
from transformers import AutoModel

import prompt_peft
from prompt_peft.backbones import load_backbone, without_hub_kernels

kernels_on_by_default = pytest.mark.skipif(
    not hasattr(modeling_utils, "kernelize") or not hasattr(modeling_utils.PreTrainedModel, "use_kernels"),
    reason="this transformers has no Hub kernels",
)


class HubDownload(RuntimeError):
    pass


def offline_gpu_kernelize(*args, **kwargs):
    raise HubDownload("kernelize fetched a layer from the Hub")


@pytest.fixture()
def saved_backbone(tmp_path):
    path = tmp_path / "backbone"
    tiny_model("Dinov2Model").save_pretrained(path)
    return path


def switch_modes(model):
    model.train()
    model.eval()
    return model


@kernels_on_by_default
def test_the_simulated_download_is_what_a_plain_from_pretrained_model_runs_into(saved_backbone, monkeypatch):
    """The premise: without prompt_peft, the loaded model has kernels on and a mode switch kernelizes."""
    model = AutoModel.from_pretrained(saved_backbone)
    if not model.use_kernels:
        pytest.skip("the kernels package is not installed: transformers loads without Hub kernels")
    monkeypatch.setattr(modeling_utils, "kernelize", offline_gpu_kernelize)
    with pytest.raises(HubDownload):
        switch_modes(model)


@kernels_on_by_default
def test_load_backbone_and_every_method_switch_modes_without_kernelizing(saved_backbone, monkeypatch):
    x = pixels()
    plain = tiny_model("Dinov2Model")
    loaded = load_backbone(str(saved_backbone))
    wrapped = {
        name: get_peft_model(AutoModel.from_pretrained(saved_backbone), prompt_peft.method_config(name))
        for name in ("vpt", "ship", "semantic_proxy", "frpt")
    }
    monkeypatch.setattr(modeling_utils, "kernelize", offline_gpu_kernelize)
    switch_modes(loaded)
    assert loaded.use_kernels is False
    with torch.no_grad():  # the plain PyTorch model's numbers
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, plain(pixel_values=x).last_hidden_state)
    for name, model in wrapped.items():
        switch_modes(model)
        assert model.get_base_model().use_kernels is False, name


@kernels_on_by_default
def test_an_adapter_loads_onto_its_backbone_without_kernels(saved_backbone, tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    model = get_peft_model(tiny_model("Dinov2Model"), prompt_peft.VPTConfig(num_prompts=2))
    model.peft_config["default"].base_model_name_or_path = str(saved_backbone)
    model.save_pretrained(adapter)
    loaded = prompt_peft.from_pretrained(adapter)
    monkeypatch.setattr(modeling_utils, "kernelize", offline_gpu_kernelize)
    switch_modes(loaded)
    assert loaded.get_base_model().use_kernels is False


def test_without_hub_kernels_leaves_a_model_without_them_alone():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert without_hub_kernels(model) is model
