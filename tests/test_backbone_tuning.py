"""The baselines users would pick instead of prompts, under the same head and loss: BitFit and peft's LoRA
(prompt_peft.backbone_tuning, train_dml --backbone_tuning)."""

import re
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import pixels, tiny_model
from transformers import AutoModel

import prompt_peft
from prompt_peft.backbone_tuning import backbone_parameter_filter, merge_lora, prepare_backbone
from prompt_peft.training import build_optimizer
from prompt_peft.tuners.prompted import parameter_roles
from script_loader import load_script as _load

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel"])
def test_lora_sits_on_every_attention_projection_and_starts_as_the_identity(name):
    reference = tiny_model(name)
    model = prepare_backbone(tiny_model(name), "lora", lora_rank=2)
    lora = [n for n, _ in model.named_modules() if n.endswith(("query", "key", "value", "q_proj", "k_proj", "v_proj"))
            and hasattr(model.get_submodule(n), "lora_A")]  # fmt: skip
    assert len(lora) == 3 * model.config.num_hidden_layers
    with torch.no_grad():  # lora_B starts at zero: the backbone's own function
        torch.testing.assert_close(model(pixel_values=pixels()).last_hidden_state,
                                   reference(pixel_values=pixels()).last_hidden_state)  # fmt: skip


def block_linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """An independent reading of "the blocks' linear layers": those inside a numbered module list."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(r"\.\d+\.", n)}


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model", "SiglipVisionModel", "TimmWrapperModel", "DINOv3ViTModel"])
def test_all_linear_lora_sits_on_every_linear_layer_of_the_blocks_and_nowhere_else(name):
    reference = tiny_model(name)
    in_blocks = set(block_linear_layers(reference))
    model = prepare_backbone(tiny_model(name), "lora", lora_rank=2, lora_targets="all-linear")
    lora = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, torch.nn.Linear)}
    assert lora == in_blocks and any(".mlp." in n for n in lora)  # attention and MLP
    attention_only = prepare_backbone(tiny_model(name), "lora", lora_rank=2)
    assert {n for n, m in attention_only.named_modules() if hasattr(m, "lora_A")} < lora
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels()).last_hidden_state,
                                   reference(pixel_values=pixels()).last_hidden_state)  # fmt: skip


@pytest.mark.parametrize(
    "name", ["ViTModel", "Dinov2Model", "CLIPVisionModel", "SiglipVisionModel", "TimmWrapperModel", "DINOv3ViTModel"]
)
def test_attention_all_lora_sits_on_the_attention_projections_and_its_output_and_nowhere_else(name):
    reference = tiny_model(name)
    in_blocks = block_linear_layers(reference)
    # an independent reading: a block's linear layers that are not its MLP's (fc1 / fc2, DINOv3's up / down / gate)
    attention = {n for n in in_blocks if ".mlp." not in n}
    model = prepare_backbone(tiny_model(name), "lora", lora_rank=2, lora_targets="attention-all")
    lora = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    blocks = {re.search(r"\.(\d+)\.", n).group(1) for n in in_blocks}
    assert lora == attention and len(lora) == (2 if name == "TimmWrapperModel" else 4) * len(blocks)  # timm: fused qkv
    # a SigLIP pooling head's out_proj and timm's patch embedding "proj" are not the blocks' attention
    assert not any(n.startswith(("head.", "timm_model.patch_embed")) for n in lora)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels()).last_hidden_state,
                                   reference(pixel_values=pixels()).last_hidden_state)  # fmt: skip


@pytest.mark.parametrize(
    ("targets", "dora"), [("attention", False), ("attention-all", False), ("all-linear", False), ("attention", True)]
)
def test_merged_lora_is_the_plain_backbone_computing_the_same_function(targets, dora):
    model = prepare_backbone(tiny_model("Dinov2Model"), "lora", lora_rank=2, lora_targets=targets, lora_dora=dora)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained update: lora_B away from its zero start, DoRA's magnitudes away from the norms
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.5)
            if ".lora_magnitude_vector." in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
        adapted = model(pixel_values=pixels()).last_hidden_state
        merged = merge_lora(model)
        assert merged.state_dict().keys() == tiny_model("Dinov2Model").state_dict().keys()
        torch.testing.assert_close(merged(pixel_values=pixels()).last_hidden_state, adapted, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(adapted, tiny_model("Dinov2Model")(pixel_values=pixels()).last_hidden_state)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_at_the_pretrained_function_and_merge_back_to_it(init):
    """PiSSA / OLoRA move a top-rank part of each adapted weight into lora_A / lora_B: the base layer changes, the
    function must not, and merging (untrained) must give the pretrained weights back."""
    reference = tiny_model("Dinov2Model")
    model = prepare_backbone(
        tiny_model("Dinov2Model"), "lora", lora_rank=2, lora_targets="attention-all", lora_init=init
    )
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 4 * model.config.num_hidden_layers
    for module in adapted:  # unlike the default start, both matrices are nonzero and the base weight was changed
        assert module.lora_B["backbone_lora"].weight.abs().sum() > 0
    base = dict(reference.named_parameters())
    residual = model.get_submodule("encoder.layer.0.attention.o_proj").base_layer.weight
    assert not torch.allclose(residual, base["encoder.layer.0.attention.o_proj.weight"])
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels()).last_hidden_state,
                                   reference(pixel_values=pixels()).last_hidden_state, atol=1e-5, rtol=1e-4)  # fmt: skip
        merged = merge_lora(model).state_dict()
    assert merged.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("tuning", "lora_bias", "dora"),
    [("bias", "none", False), ("lora", "none", False), ("lora", "all", False), ("lora", "all", True),
     ("all", "none", False)],  # fmt: skip
)
def test_the_optimiser_trains_the_head_and_exactly_the_chosen_backbone_parameters(tuning, lora_bias, dora):
    backbone = prepare_backbone(tiny_model("ViTModel"), tuning, lora_rank=2, lora_bias=lora_bias, lora_dora=dora)
    model = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=0, embedding_dim=8, num_classes=3))
    head = set(parameter_roles(model))  # the prompt_peft head's parameters
    accept = backbone_parameter_filter(tuning, lora_bias)
    optimizer = build_optimizer(model, lr=1e-3, backbone_lr=1e-3, backbone_params=accept)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    expected = {id(p) for n, p in model.named_parameters() if (id(p) in head and p.requires_grad) or accept(n)}
    assert trained == expected
    names = [n for n, p in model.named_parameters() if id(p) in trained and id(p) not in head]
    if tuning == "bias":
        assert names and all(n.endswith(".bias") for n in names)
    elif lora_bias == "all":  # LoRA + BitFit: the LoRA matrices and every bias of the backbone, nothing else
        lora = [n for n in names if ".lora_A." in n or ".lora_B." in n]
        magnitudes = [n for n in names if ".lora_magnitude_vector." in n]  # DoRA: one per adapted layer
        biases = [n for n in names if n.endswith(".bias")]
        assert lora and len(lora) + len(magnitudes) + len(biases) == len(names)
        assert len(magnitudes) == (len(lora) // 2 if dora else 0)
        assert len(biases) == sum(1 for n, _ in tiny_model("ViTModel").named_parameters() if n.endswith(".bias"))
    elif tuning == "lora":
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    else:
        assert len(names) == sum(1 for _ in tiny_model("ViTModel").parameters())
    counted = model.base_model.backbone_parameter_count(accept)
    assert counted == sum(p.numel() for n, p in model.named_parameters() if id(p) in trained and id(p) not in head)


def test_bad_tuning_is_refused():
    with pytest.raises(ValueError, match="backbone tuning must be one of"):
        prepare_backbone(tiny_model("ViTModel"), "prefix")
    with pytest.raises(ValueError, match="LoRA targets must be one of"):
        prepare_backbone(tiny_model("ViTModel"), "lora", lora_targets="mlp")
    with pytest.raises(ValueError, match="LoRA bias must be one of"):
        prepare_backbone(tiny_model("ViTModel"), "lora", lora_bias="lora_only")
    with pytest.raises(ValueError, match="LoRA bias 'all' needs backbone tuning 'lora'"):
        backbone_parameter_filter("bias", "all")
    with pytest.raises(ValueError, match="DoRA needs backbone tuning 'lora'"):
        prepare_backbone(tiny_model("ViTModel"), "bias", lora_dora=True)
    with pytest.raises(ValueError, match="LoRA init must be one of"):
        prepare_backbone(tiny_model("ViTModel"), "lora", lora_init="gaussian")
    with pytest.raises(ValueError, match="LoRA init 'pissa' needs backbone tuning 'lora'"):
        prepare_backbone(tiny_model("ViTModel"), "bias", lora_init="pissa")


def attention_lora_size(backbone, rank: int) -> int:
    """LoRA's parameter count on q, k and v of every block: A (rank x D) and B (D x rank) each."""
    return backbone.config.num_hidden_layers * 3 * 2 * (rank * backbone.config.hidden_size)


def load_train_script():
    return _load("examples/train_dml.py", "train_dml_tuning")


def train(workspace, output_dir, *extra):
    """Two steps of the head alone (no prompts) plus the chosen backbone parameters."""
    return load_train_script().main([
        "--backbone", str(workspace / "backbone"), "--dataset", "imagefolder", "--data_root",
        str(workspace / "images"), "--output_dir", str(output_dir), "--check_counts", "false", "--m_per_class", "2",
        "--batch_size", "4", "--eval_batch_size", "8", "--num_workers", "0", "--embedding_dim", "16",
        "--method_kwargs", '{"num_prompts": 0}', "--max_steps", "2", "--eval_every_epochs", "0",
        "--backbone_lr", "0.01", *extra,
    ])  # fmt: skip


def test_bitfit_run_changes_only_the_backbone_biases(workspace, tmp_path):
    summary = train(workspace, tmp_path, "--backbone_tuning", "bias")
    original = AutoModel.from_pretrained(workspace / "backbone").state_dict()
    tuned = AutoModel.from_pretrained(tmp_path / "backbone").state_dict()
    changed = {k for k in original if not torch.equal(original[k], tuned[k])}
    assert changed and all(k.endswith("bias") for k in changed)
    biases = sum(v.numel() for k, v in original.items() if k.endswith("bias"))
    head = summary["parameters"]["trainable"] - biases
    assert 0 < head < biases  # the head's own parameters plus every backbone bias, nothing else


def test_a_trained_backbone_is_saved_with_its_processor_and_evaluates_to_the_run_s_metrics(workspace, tmp_path):
    """evaluate.py --adapter <out>/adapter --backbone <out>/backbone: the saved backbone loads whole (weights and
    image processor) and gives the numbers the training run reported."""
    summary = train(workspace, tmp_path / "run", "--backbone_tuning", "lora", "--lora_rank", "2", "--lora_bias", "all")
    evaluate = _load("examples/evaluate.py", "evaluate_script_tuning")
    result = evaluate.main([
        "--adapter", str(tmp_path / "run" / "adapter"), "--backbone", str(tmp_path / "run" / "backbone"),
        "--dataset", "imagefolder", "--data_root", str(workspace / "images"), "--no_check_counts",
        "--batch_size", "8", "--num_workers", "0", "--output", str(tmp_path / "eval.json"),
    ])  # fmt: skip
    assert result["metrics"] == pytest.approx(summary["final_metrics"], abs=1e-6)
    assert result["backbone"] == str(tmp_path / "run" / "backbone")  # its processor came from there


def test_lora_run_trains_the_lora_matrices_and_counts_them(workspace, tmp_path):
    summary = train(workspace, tmp_path, "--backbone_tuning", "lora", "--lora_rank", "2")
    backbone = AutoModel.from_pretrained(workspace / "backbone")
    lora = attention_lora_size(backbone, rank=2)
    probe = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=0, embedding_dim=16, num_classes=4))
    assert summary["parameters"]["trainable"] == probe.base_model.get_parameter_counts()["trainable"] + lora
    # the saved backbone has LoRA merged: from_pretrained reads every weight, and only the adapted ones moved
    tuned, info = AutoModel.from_pretrained(tmp_path / "backbone", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original, tuned = AutoModel.from_pretrained(workspace / "backbone").state_dict(), tuned.state_dict()
    changed = {k for k in original if not torch.equal(original[k], tuned[k])}
    assert changed == {k for k in original if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))}


def test_all_linear_lora_run_trains_every_block_linear_layer_and_counts_it(workspace, tmp_path):
    summary = train(workspace, tmp_path, "--backbone_tuning", "lora", "--lora_rank", "2", "--lora_targets", "all-linear")
    backbone = AutoModel.from_pretrained(workspace / "backbone")
    lora = sum(2 * (m.in_features + m.out_features) for m in block_linear_layers(backbone).values())  # A (2 x in) and B (out x 2) per layer
    probe = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=0, embedding_dim=16, num_classes=4))
    assert summary["parameters"]["trainable"] == probe.base_model.get_parameter_counts()["trainable"] + lora


QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")


def assert_lora_and_biases_trained(workspace, output_dir, summary, lora_size: int, adapted_suffixes: tuple[str, ...]):
    """A LoRA + BitFit run counted the head, ``lora_size`` LoRA parameters and every backbone bias as trainable,
    and saved a backbone that from_pretrained loads whole, in which the adapted weights moved and nothing but them
    and the biases did."""
    backbone = AutoModel.from_pretrained(workspace / "backbone")
    original = backbone.state_dict()
    biases = {k for k in original if k.endswith("bias")}
    probe = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=0, embedding_dim=16, num_classes=4))
    head = probe.base_model.get_parameter_counts()["trainable"]
    assert summary["parameters"]["trainable"] == head + lora_size + sum(original[k].numel() for k in biases)
    tuned, info = AutoModel.from_pretrained(output_dir / "backbone", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(original[k], v)}
    adapted = {k for k in original if k.endswith(adapted_suffixes)}
    assert adapted and adapted <= changed <= adapted | biases and changed & biases


def test_lora_with_biases_run_trains_lora_and_every_bias_and_counts_them(workspace, tmp_path):
    """peft's LoraConfig(bias="all"): LoRA and BitFit together; the saved backbone has both folded in."""
    summary = train(workspace, tmp_path, "--backbone_tuning", "lora", "--lora_rank", "2", "--lora_bias", "all")
    lora = attention_lora_size(AutoModel.from_pretrained(workspace / "backbone"), rank=2)
    assert_lora_and_biases_trained(workspace, tmp_path, summary, lora, QKV)


def test_dora_run_trains_lora_its_magnitudes_and_every_bias_and_saves_them_merged(workspace, tmp_path):
    """peft's LoraConfig(use_dora=True) with bias="all": a magnitude per output feature of q, k and v as well."""
    summary = train(workspace, tmp_path, "--backbone_tuning", "lora", "--lora_rank", "2", "--lora_bias", "all",
                    "--lora_dora", "true")  # fmt: skip
    backbone = AutoModel.from_pretrained(workspace / "backbone")
    magnitudes = backbone.config.num_hidden_layers * 3 * backbone.config.hidden_size
    assert_lora_and_biases_trained(workspace, tmp_path, summary, attention_lora_size(backbone, 2) + magnitudes, QKV)


def test_pissa_run_trains_lora_and_every_bias_and_saves_the_merged_backbone(workspace, tmp_path):
    """--lora_init pissa: the same parameters train as with the default start, and the saved backbone is the
    plain class with the residual weight and the trained top-rank part added back together."""
    summary = train(workspace, tmp_path, "--backbone_tuning", "lora", "--lora_rank", "2", "--lora_bias", "all",
                    "--lora_init", "pissa")  # fmt: skip
    lora = attention_lora_size(AutoModel.from_pretrained(workspace / "backbone"), rank=2)
    assert_lora_and_biases_trained(workspace, tmp_path, summary, lora, QKV)


def test_attention_all_lora_with_biases_run_trains_q_k_v_and_output_projections_and_counts_them(workspace, tmp_path):
    summary = train(workspace, tmp_path, "--backbone_tuning", "lora", "--lora_rank", "2", "--lora_bias", "all",
                    "--lora_targets", "attention-all")  # fmt: skip
    lora = attention_lora_size(AutoModel.from_pretrained(workspace / "backbone"), rank=2) * 4 // 3  # o: a 4th D x D
    assert_lora_and_biases_trained(workspace, tmp_path, summary, lora, (*QKV, "o_proj.weight"))
