"""Embedding extraction: the right token for every backbone, order kept, exact under 2-process DDP."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tiny_models import pixels, tiny_model

from prompt_peft import VPTConfig
from prompt_peft.retrieval.extract import embed_dataset, pooled_features

ROOT = Path(__file__).resolve().parents[1]


def rows(n=7):
    x = pixels(batch=n, seed=5)
    return [{"pixel_values": x[i], "label": i % 3} for i in range(n)]


def collate(batch):
    return {"pixel_values": torch.stack([r["pixel_values"] for r in batch]),
            "labels": torch.tensor([r["label"] for r in batch])}


@pytest.mark.parametrize("name, reference", [
    ("ViTModel", lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]),
    ("Dinov2WithRegistersModel", lambda m, x: m(pixel_values=x).pooler_output),
    ("CLIPVisionModel", lambda m, x: m(pixel_values=x).pooler_output),
    ("SiglipVisionModel", lambda m, x: m(pixel_values=x).pooler_output),
    ("ViTForImageClassification", lambda m, x: m.vit(pixel_values=x).last_hidden_state[:, 0]),
])
def test_bare_backbone_uses_its_pooled_token(name, reference):
    model, x = tiny_model(name), pixels()
    with torch.no_grad():
        expected = F.normalize(reference(model, x), dim=-1)
        torch.testing.assert_close(pooled_features(model, x), expected)


def test_adapter_uses_its_embeddings_and_order_is_kept():
    model = get_peft_model(tiny_model("DeiTModel"), VPTConfig(embedding_dim=8)).eval()
    data = rows(7)
    embeddings, labels = embed_dataset(model, data, collate, batch_size=3, show_progress=False)
    with torch.no_grad():
        expected = model(pixel_values=collate(data)["pixel_values"]).embeddings
    torch.testing.assert_close(embeddings, expected)
    assert labels.tolist() == [i % 3 for i in range(7)]
    assert not torch.is_inference(model.base_model.model.layers[0].vpt_prompt["default"])


def test_two_processes_gather_every_item_once(tmp_path):
    script = tmp_path / "embed.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from accelerate import Accelerator
        from test_extract import rows, collate
        from tiny_models import tiny_model
        from prompt_peft.retrieval.extract import embed_dataset
        acc = Accelerator(cpu=True)
        assert acc.num_processes == 2
        emb, labels = embed_dataset(tiny_model("ViTModel"), rows(7), collate, batch_size=2, accelerator=acc)
        if acc.is_main_process:
            torch.save({{"emb": emb, "labels": labels}}, {str(tmp_path / 'out.pt')!r})
        acc.end_training()  # destroys the process group: exiting with gloo's threads still up can abort
        # and skip the interpreter's teardown: under load a torch thread still ending there aborts the process
        # ("terminate called without an active exception") after the work is done
        sys.stdout.flush(); os._exit(0)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = torch.load(tmp_path / "out.pt")
    single, labels = embed_dataset(tiny_model("ViTModel"), rows(7), collate, batch_size=2, show_progress=False)
    assert gathered["emb"].shape == (7, 32)
    torch.testing.assert_close(gathered["emb"], single)
    assert gathered["labels"].tolist() == labels.tolist()
