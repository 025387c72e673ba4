"""The real pretrained DINOv2-S/14 backbone (PROMPT_PEFT_ASSETS_DIR) trained with VPT on real Flowers images."""

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from prompt_peft import VPTConfig
from peft import get_peft_model

pytestmark = pytest.mark.real_assets


def flowers_batch(root, processor, classes=(1, 2, 3, 4), per_class=3):
    images, labels = [], []
    for label, class_id in enumerate(classes):
        for path in sorted((root / str(class_id)).glob("*.jpg"))[:per_class]:
            images.append(Image.open(path).convert("RGB"))
            labels.append(label)
    return processor(images=images, return_tensors="pt")["pixel_values"], torch.tensor(labels)


def test_vpt_steps_lower_the_loss_and_leave_the_backbone_untouched(dinov2_path, flowers_root):
    torch.manual_seed(0)
    backbone = AutoModel.from_pretrained(dinov2_path)
    assert type(backbone).__name__ == "Dinov2Model"
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    # 112 px keeps the test quick on 2 CPU cores; DINOv2 interpolates its position embeddings.
    processor = AutoImageProcessor.from_pretrained(
        dinov2_path, size={"shortest_edge": 128}, crop_size={"height": 112, "width": 112}
    )
    pixel_values, labels = flowers_batch(flowers_root, processor)

    model = get_peft_model(backbone, VPTConfig(num_prompts=5, num_classes=4, embedding_dim=128))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def batch_loss():
        model.eval()
        with torch.no_grad():
            return model(pixel_values=pixel_values, labels=labels).loss.item()

    before = batch_loss()
    model.train()
    for _ in range(4):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = batch_loss()

    assert after < 0.8 * before, (before, after)
    base = model.get_base_model()
    for key, value in base.state_dict().items():
        original_key = key.replace(".base_layer", "")
        if "vpt_" in key:
            continue
        assert torch.equal(value, frozen[original_key]), key
