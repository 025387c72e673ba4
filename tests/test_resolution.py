"""Every family trains, evaluates and serves at a non-native resolution (issue 13 point 2), and the adapter records
the resolution and preprocessing it was trained with, which evaluate.py and prompt_peft.image_transform use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from peft import get_peft_model
from PIL import Image
from test_evaluate_script import load_script as load_evaluate
from test_train_dml import args as train_args
from test_train_dml import load_script as load_train
from tiny_models import BARE, NEW_BARE, TIMM_VIT_ARGS, pixels, tiny_model

import prompt_peft
from prompt_peft import BackboneSpec
from prompt_peft.data import eval_transform, preprocessing_of, transform_from_preprocessing
from prompt_peft.retrieval.extract import pooled_features

pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE, OTHER = 32, 48

PROCESSORS = {
    "ViTModel": lambda: transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
    "DeiTModel": lambda: transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
    "Dinov2Model": lambda: transformers.BitImageProcessor(
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    ),
    "Dinov2WithRegistersModel": lambda: transformers.BitImageProcessor(
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    ),
    "CLIPVisionModel": lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ),
    "SiglipVisionModel": lambda: transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
    "DINOv3ViTModel": lambda: transformers.DINOv3ViTImageProcessor(size={"height": 32, "width": 32}),
    "Siglip2VisionModel": lambda: transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16),
}
TIMM_PRETRAINED_CFG = {  # what timm's Hub configs carry: the processor is built from it
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def save_backbone(family: str, folder) -> None:
    if family == "TimmWrapperModel":
        config = transformers.TimmWrapperConfig(
            architecture="vit_small_patch16_224", model_args=TIMM_VIT_ARGS, pretrained_cfg=TIMM_PRETRAINED_CFG
        )
        torch.manual_seed(0)
        transformers.TimmWrapperModel(config).save_pretrained(folder)  # the processor lives in config.json
        return
    tiny_model(family).save_pretrained(folder)
    PROCESSORS[family]().save_pretrained(folder)


def train_at_other_size(family, workspace, tmp_path):
    """``examples/train_dml.py`` at ``OTHER`` px for one optimiser step on a saved tiny ``family`` backbone."""
    backbone = tmp_path / "backbone"
    save_backbone(family, backbone)
    argv = train_args(
        workspace, tmp_path / "run", "--image_size", str(OTHER), "--max_steps", "1", "--eval_every_epochs", "0"
    )
    argv[argv.index("--backbone") + 1] = str(backbone)
    summary, trained = load_train().run(argv)
    return backbone, summary, trained


def evaluate_adapter(backbone, workspace, tmp_path, *extra):
    """``examples/evaluate.py`` on the trained adapter (``extra``: more arguments, e.g. ``--image_size``)."""
    adapter, images = tmp_path / "run" / "adapter", workspace / "images"
    argv = ["--adapter", str(adapter), "--backbone", str(backbone), "--dataset", "imagefolder"]
    argv += ["--data_root", str(images), "--no_check_counts", "--batch_size", "8", "--num_workers", "0"]
    return load_evaluate().main([*argv, *extra, "--output", str(tmp_path / "eval.json")])


@pytest.mark.parametrize("family", BARE + NEW_BARE)
def test_family_at_a_non_native_size_trains_evaluates_and_serves(family, workspace, tmp_path):
    backbone, summary, trained = train_at_other_size(family, workspace, tmp_path)
    assert summary["steps"] == 1 and np.isfinite(summary["history"]["loss"][0][1])

    recorded = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["image_preprocessing"]
    assert recorded["image_size"] == OTHER and recorded["processor"] is False

    # evaluate.py, no --image_size: the adapter's recorded resolution, the training run's numbers
    result = evaluate_adapter(backbone, workspace, tmp_path)
    assert result["image_size"] == OTHER
    assert result["metrics"] == pytest.approx(summary["final_metrics"], abs=1e-6)

    # serving: from_pretrained + the recorded transform gives the trained model's embeddings
    served = prompt_peft.from_pretrained(tmp_path / "run" / "adapter", backbone)
    transform = prompt_peft.image_transform(served)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8))
    batch = torch.stack([transform(image), transform(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    assert batch.shape == (2, 3, OTHER, OTHER)
    trained.eval()
    with torch.no_grad():
        assert torch.allclose(pooled_features(served, batch), pooled_features(trained, batch), atol=1e-6)


# What each family's own forward takes for a non-native size (SigLIP 2 and timm: tests/test_backbone_families.py).
EXPLICIT = {
    "ViTModel": {"interpolate_pos_encoding": True},
    "DeiTModel": {"interpolate_pos_encoding": True},
    "Dinov2Model": {},
    "Dinov2WithRegistersModel": {},
    "CLIPVisionModel": {"interpolate_pos_encoding": True},
    "SiglipVisionModel": {"interpolate_pos_encoding": True},
    "DINOv3ViTModel": {},
}


@pytest.mark.parametrize("family", list(EXPLICIT))
def test_the_bare_backbone_embeds_at_a_non_native_size(family):
    """The frozen baseline (evaluate.py without an adapter) at another size is the family's own interpolating call,
    and at the native size its plain call."""
    model = tiny_model(family)
    spec = BackboneSpec.from_model(model)

    def reference(images, **kwargs):
        out = model(pixel_values=images, **kwargs)
        pooled = out.pooler_output if spec.pool == "identity" else out.last_hidden_state[:, 0]
        return torch.nn.functional.normalize(pooled, dim=-1)

    native, other = pixels(batch=2, size=NATIVE), pixels(batch=2, size=OTHER)
    with torch.no_grad():
        assert torch.equal(pooled_features(model, native), reference(native))
        assert torch.allclose(pooled_features(model, other), reference(other, **EXPLICIT[family]), atol=1e-6)


def test_evaluate_warns_when_the_size_differs_from_the_adapters(workspace, tmp_path, capsys):
    backbone, _, _ = train_at_other_size("ViTModel", workspace, tmp_path)
    result = evaluate_adapter(backbone, workspace, tmp_path, "--image_size", "40")
    assert result["image_size"] == 40
    assert "trained at 48 px; evaluating at 40 px" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["ViTModel", "Dinov2Model", "TimmWrapperModel", "Siglip2VisionModel"])
def test_recorded_preprocessing_round_trips_through_the_adapter_config(family, tmp_path):
    save_backbone(family, tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (45, 60, 3), dtype=np.uint8))
    for size in (None, OTHER):
        recorded = json.loads(json.dumps(preprocessing_of(processor, size)))  # as stored in adapter_config.json
        again = transform_from_preprocessing(recorded, processor)(image)
        assert torch.equal(again, eval_transform(processor, size)(image))
        assert again.shape == (3, size or NATIVE, size or NATIVE)


def test_timm_scheme_is_timms_own_evaluation_transform(tmp_path):
    """Resize the short side to size / crop_pct (bicubic), centre-crop, timm's mean/std: timm's numbers exactly."""
    save_backbone("TimmWrapperModel", tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    scheme = {**preprocessing_of(processor), "processor": False}
    assert scheme["resize_shortest_edge"] == 36 and scheme["resample"] == Image.Resampling.BICUBIC
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (45, 60, 3), dtype=np.uint8))
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(transform_from_preprocessing(scheme)(image), expected)


def test_image_transform_without_a_recorded_preprocessing_needs_the_processor():
    model = get_peft_model(tiny_model("ViTModel"), prompt_peft.VPTConfig(num_prompts=2, embedding_dim=8))
    with pytest.raises(ValueError, match="records no image preprocessing"):
        prompt_peft.image_transform(model)
    processor = PROCESSORS["ViTModel"]()
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 52, 3), dtype=np.uint8))
    assert torch.equal(prompt_peft.image_transform(model, processor)(image), eval_transform(processor)(image))
