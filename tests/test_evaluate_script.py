"""examples/evaluate.py: a frozen backbone and an adapter on an image folder; table, JSON, same numbers as the API."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import ViTImageProcessor, ViTModel

from prompt_peft import VPTConfig
from prompt_peft.data import eval_transform, load_retrieval_dataset, make_collate_fn, with_rgb_images
from prompt_peft.retrieval import embed_dataset, evaluate_embeddings

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "evaluate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_script"] = module
    spec.loader.exec_module(module)
    return module


def reference(model, root, backbone):
    test = with_rgb_images(load_retrieval_dataset("imagefolder", root, check_counts=False))["test"]
    collate = make_collate_fn(eval_transform(ViTImageProcessor.from_pretrained(backbone)))
    return evaluate_embeddings(*embed_dataset(model, test, collate, batch_size=5, show_progress=False))


@pytest.mark.parametrize("with_adapter", [False, True])
def test_evaluate_script(workspace, tmp_path, capsys, with_adapter):
    backbone, images = workspace / "backbone", workspace / "images"
    argv = ["--backbone", str(backbone), "--dataset", "imagefolder", "--data_root", str(images),
            "--no_check_counts", "--batch_size", "5", "--num_workers", "0", "--output", str(tmp_path / "m.json")]
    model = ViTModel.from_pretrained(backbone).eval()
    if with_adapter:
        torch.manual_seed(0)
        model = get_peft_model(model, VPTConfig(num_prompts=2, embedding_dim=8)).eval()
        model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
        argv += ["--adapter", str(tmp_path / "adapter")]
    result = load_script().main(argv)

    expected = reference(model, images, backbone)
    assert result["metrics"] == pytest.approx(expected, abs=1e-6)
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == result["metrics"]
    assert result["num_images"] == {"test": 24}
    table = capsys.readouterr().out
    assert f"| R@1         | {100 * expected['recall@1']:6.2f} |" in table and "MAP@R" in table


def test_evaluate_script_on_the_validation_classes_a_training_run_held_out(workspace, tmp_path):
    """--val_classes: the same held-out training classes train_dml.py validated on, never the test classes."""
    from prompt_peft.data import VALIDATION, protocol_splits

    backbone, images = workspace / "backbone", workspace / "images"
    argv = ["--backbone", str(backbone), "--dataset", "imagefolder", "--data_root", str(images), "--no_check_counts",
            "--batch_size", "5", "--num_workers", "0", "--output", str(tmp_path / "m.json"), "--val_classes", "0.5",
            "--val_seed", "1"]  # fmt: skip
    result = load_script().main(argv)
    splits = with_rgb_images(protocol_splits(load_retrieval_dataset("imagefolder", images, check_counts=False),
                                             val_classes=0.5, val_seed=1))  # fmt: skip
    validation, test = splits[VALIDATION], splits["test"]

    def class_names(split):
        return {split.features["label"].names[i] for i in split.with_format(None)["label"]}

    assert class_names(validation) and not class_names(validation) & class_names(test)
    collate = make_collate_fn(eval_transform(ViTImageProcessor.from_pretrained(backbone)))
    model = ViTModel.from_pretrained(backbone).eval()
    expected = evaluate_embeddings(*embed_dataset(model, validation, collate, batch_size=5, show_progress=False))
    assert result["num_images"] == {VALIDATION: len(validation)} == {VALIDATION: 12}  # 2 of 4 training classes x 6
    assert result["metrics"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_script_refuses_a_bad_image_cap_before_loading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script().parse_args(["--backbone", str(tmp_path / "absent"), "--eval_images_per_class", "0"])
    assert "--eval_images_per_class must be a positive integer, got 0" in capsys.readouterr().err
